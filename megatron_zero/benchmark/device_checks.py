"""Checks the GPU smoke run (tools/gpu_smoke.sh) makes on a device: the actor against HF, and the CUDA IPC hand-off.

Why: CI has no GPU, so what only a GPU exercises (megatron-core's local layers on CUDA in bf16, handing a weight
bucket to another process by CUDA IPC handle) must be checkable in one short command when a GPU is lent. Both
checks are plain functions that also run on the CPU (the tests run them there): the comparison at float32 on a
tiny model, the hand-off through shared memory instead of CUDA IPC, by the same torch reductions.

* ``compare_actor_with_hf``: log-probs of the Megatron actor (``MegatronActor``, DDP + distributed optimizer) on
  the compute device against HF transformers' from the same checkpoint, read at float32 on the same device. The
  bound is the trainer's engine-vs-actor gap bound of that precision (``config/trainer.LOGPROB_GAP_BOUNDS``).
* ``ipc_handoff``: what the colocated weight push relies on (``trainer/weight_push.py``,
  ``rollout/sglang_weights.serialize_flattened_bucket``): a bucket of named tensors flattened into one uint8 buffer
  (SGLang's ``FlattenedTensorBucket`` layout), pickled with ``torch.multiprocessing``'s reductions (what SGLang's
  ``MultiprocessingSerializer`` does), and opened and read by a second process. SGLang additionally pickles the
  GPU's UUID instead of its index (``monkey_patch_torch_reductions``), for processes with different
  ``CUDA_VISIBLE_DEVICES``; both processes here see the same devices, so the stock reductions are the path.
"""

from __future__ import annotations

import io
import multiprocessing.connection
import time
from pathlib import Path
from typing import Any, Sequence

import torch
import torch.multiprocessing as mp

from megatron_zero.actor.batching import ActorBatch
from megatron_zero.config.parallel import ParallelConfig
from megatron_zero.parallel.local_launch import run_local_workers

# --------------------------------------------------------------------------- actor vs HF


def comparison_batch(vocab_size: int, num_rows: int, seq_length: int, seed: int = 0) -> ActorBatch:
    """Right-padded rows of random tokens, lengths from half to all of ``seq_length``, the second half of each row
    its response."""
    generator = torch.Generator().manual_seed(seed)
    lengths = torch.randint(seq_length // 2, seq_length + 1, (num_rows,), generator=generator)
    positions = torch.arange(seq_length).unsqueeze(0)
    tokens = torch.randint(0, vocab_size, (num_rows, seq_length), generator=generator)
    response_mask = (positions >= (lengths // 2).unsqueeze(1)) & (positions < lengths.unsqueeze(1))
    return ActorBatch(tokens=tokens.masked_fill(positions >= lengths.unsqueeze(1), 0), lengths=lengths,
                      response_mask=response_mask)


def _actor_logprobs_job(mcore_dir: str, batch: ActorBatch, params_dtype: str) -> dict[str, Any]:
    from megatron_zero.actor.actor import MegatronActor
    from megatron_zero.config.actor import ActorConfig
    from megatron_zero.config.algorithm import PolicyLossConfig
    from megatron_zero.config.model import ModelConfig
    from megatron_zero.parallel.init import compute_device

    # Temperature 1 and padded rows: the trainer's defaults on a GPU without Transformer Engine differ only in
    # packing, which tests/test_actor.py checks against padding on CPU.
    actor = MegatronActor(ActorConfig(lr=1e-6, temperature=1.0, pack_sequences=False), PolicyLossConfig(kl_coef=0.0),
                          ModelConfig(params_dtype=params_dtype), mcore_dir)
    logp, _ = actor.compute_logprobs(batch)
    return {"logp": logp, "device": str(compute_device()), "transformer_impl": _layer_impl(actor)}


def _layer_impl(actor) -> str:
    """The class of the first layer's attention projection: shows which spec (local or TE) was built."""
    layer = actor.model.module.decoder.layers[0]
    return type(layer.self_attention.linear_qkv).__name__


def hf_logprobs(hf_dir: str | Path, batch: ActorBatch, device: torch.device) -> torch.Tensor:
    """[B, S] float32 log-probs of ``batch``'s response tokens under the HF model at float32 on ``device``, 0 off
    the response (the actor's convention, temperature 1)."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(hf_dir), dtype=torch.float32).to(device).eval()
    tokens = batch.tokens.to(device)
    attention_mask = (torch.arange(tokens.shape[1], device=device).unsqueeze(0)
                      < batch.lengths.to(device).unsqueeze(1)).long()
    with torch.no_grad():
        logits = model(input_ids=tokens, attention_mask=attention_mask).logits.float()
    logp = torch.log_softmax(logits[:, :-1], dim=-1).gather(-1, tokens[:, 1:].unsqueeze(-1)).squeeze(-1).cpu()
    logp = torch.cat([torch.zeros(batch.num_rows, 1), logp], dim=1)
    return logp.masked_fill(~batch.response_mask, 0.0)


def compare_actor_with_hf(hf_dir: str | Path, mcore_dir: str | Path, params_dtype: str, *, num_rows: int = 4,
                          seq_length: int = 64, seed: int = 0) -> dict[str, Any]:
    """The actor's log-probs (one worker, the compute device, ``params_dtype``) against HF's; the gap's mean and
    max over response tokens and the bounds they must stay within."""
    from megatron_zero.config.trainer import LOGPROB_GAP_BOUNDS
    from megatron_zero.models.registry import read_architecture

    batch = comparison_batch(read_architecture(hf_dir).vocab_size, num_rows, seq_length, seed)
    actor = run_local_workers(_actor_logprobs_job, ParallelConfig(), world_size=1,
                              args=(str(mcore_dir), batch, params_dtype))[0]
    reference = hf_logprobs(hf_dir, batch, torch.device(actor["device"]))
    gap = (actor["logp"] - reference).abs()[batch.response_mask]
    mean_bound, max_bound = LOGPROB_GAP_BOUNDS["fp32" if params_dtype == "float32" else "16bit"]
    result = {"params_dtype": params_dtype, "device": actor["device"], "qkv_layer": actor["transformer_impl"],
              "num_response_tokens": int(batch.response_mask.sum()), "gap_mean": float(gap.mean()),
              "gap_max": float(gap.max()), "bound_mean": mean_bound, "bound_max": max_bound}
    result["ok"] = result["gap_mean"] <= mean_bound and result["gap_max"] <= max_bound
    return result


# --------------------------------------------------------------------------- IPC hand-off

# A view of the buffer as dtype X must start at a multiple of X's size (torch refuses otherwise): 16 covers all.
_ALIGN = 16


def flatten_bucket(named_tensors: Sequence[tuple[str, torch.Tensor]]) -> tuple[torch.Tensor, list[dict[str, Any]]]:
    """One uint8 buffer on the tensors' device holding their bytes one after the other, each starting at a multiple
    of ``_ALIGN`` bytes, and each tensor's name, dtype, shape and byte range (SGLang's ``FlattenedTensorBucket``
    layout, which the receiving side views back into tensors)."""
    metadata, parts, offset = [], [], 0
    for name, tensor in named_tensors:
        raw = tensor.detach().contiguous().view(-1).view(torch.uint8)
        pad = -offset % _ALIGN
        if pad:
            parts.append(raw.new_zeros(pad))
            offset += pad
        metadata.append({"name": name, "dtype": tensor.dtype, "shape": tuple(tensor.shape), "start": offset,
                         "end": offset + raw.numel()})
        parts.append(raw)
        offset += raw.numel()
    return torch.cat(parts), metadata


def unflatten_bucket(buffer: torch.Tensor, metadata: Sequence[dict[str, Any]]) -> list[tuple[str, torch.Tensor]]:
    """The named tensors of ``flatten_bucket``'s buffer, as views of it."""
    return [(m["name"], buffer[m["start"]:m["end"]].view(m["dtype"]).view(m["shape"])) for m in metadata]


def _checksums(named_tensors: Sequence[tuple[str, torch.Tensor]]) -> list[float]:
    return [float(tensor.double().sum()) for _, tensor in named_tensors]


def _consumer(conn: multiprocessing.connection.Connection) -> None:
    """The receiving process: open the payload, copy the tensors into storage of its own, report checksums."""
    from multiprocessing.reduction import ForkingPickler

    conn.send("ready")
    payload = conn.recv_bytes()
    start = time.perf_counter()
    buffer, metadata = ForkingPickler.loads(payload)
    received = [(name, tensor.clone()) for name, tensor in unflatten_bucket(buffer, metadata)]
    if buffer.is_cuda:
        torch.cuda.synchronize(buffer.device)
    seconds = time.perf_counter() - start
    conn.send({"checksums": _checksums(received), "seconds": seconds, "device": str(buffer.device)})
    conn.recv()  # the producer frees its buffer only after this process has closed its view of it
    del buffer, received


def ipc_handoff(device: torch.device, num_bytes: int = 256 * 2**20, timeout_s: float = 120.0) -> dict[str, Any]:
    """Hand a bucket of about ``num_bytes`` (bf16 and fp32 tensors) on ``device`` to a spawned process by handle;
    check that it read the same values. CUDA IPC on a GPU, shared memory on the CPU."""
    from multiprocessing.reduction import ForkingPickler

    generator = torch.Generator(device=device).manual_seed(0)
    # Half the bytes in a bf16 matrix, half in an fp32 vector, and an odd-sized tail, as a layer's bucket might hold.
    named = [("layers.0.mlp.weight", torch.randn(num_bytes // 4 // 256, 256, device=device,
                                                 generator=generator).bfloat16()),
             ("layers.0.attn.weight", torch.randn(num_bytes // 8, device=device, generator=generator)),
             ("layers.0.attn.bias", torch.randn(7, device=device, generator=generator))]
    expected = _checksums(named)
    ctx = mp.get_context("spawn")
    ours, theirs = ctx.Pipe()
    process = ctx.Process(target=_consumer, args=(theirs,), daemon=True)
    process.start()
    try:
        if not ours.poll(timeout_s) or ours.recv() != "ready":
            raise TimeoutError(f"the consumer process did not start within {timeout_s} s")
        start = time.perf_counter()
        buffer, metadata = flatten_bucket(named)
        payload = io.BytesIO()
        ForkingPickler(payload).dump((buffer, metadata))
        ours.send_bytes(payload.getvalue())
        if not ours.poll(timeout_s):
            raise TimeoutError(f"the consumer process did not answer within {timeout_s} s")
        answer = ours.recv()
        seconds = time.perf_counter() - start
        ours.send("done")
        process.join(timeout_s)
    finally:
        if process.is_alive():
            process.kill()
    total = sum(tensor.numel() * tensor.element_size() for _, tensor in named)
    return {"device": str(device), "consumer_device": answer["device"], "num_tensors": len(named), "num_bytes": total,
            "payload_bytes": len(payload.getvalue()), "checksums_equal": answer["checksums"] == expected,
            "seconds": seconds, "gb_per_s": total / 1e9 / seconds, "consumer_seconds": answer["seconds"],
            "consumer_exit_code": process.exitcode}
