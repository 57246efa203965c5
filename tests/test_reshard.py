"""Tests of resharding Megatron weights (TP=2 x PP=2) into HF-named buckets for the rollout engines.

One spawned TP=2 x PP=2 job does everything that needs the distributed model (spawning costs ~5 s of
imports per process): it streams a freshly loaded untied Llama (rotary scaling, GQA) and a tied Qwen2
actor, trains the actor one step and streams it again. The checks here compare against independent
references: the HF checkpoint's own tensors (bit for bit) and HF transformers' log-probs after loading
the streamed tensors into the torch rollout engine (an HF transformers model).

    python -m pytest tests/test_reshard.py -q
"""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from megatron_zero.actor.batching import ActorBatch
from megatron_zero.config.parallel import ParallelConfig
from megatron_zero.parallel.local_launch import run_local_workers

# Small enough that the tiny models need several buckets, and smaller than the Qwen2 embedding
# (251 x 64 float32 = 64256 bytes), which must then travel alone.
BUCKET_BYTES = 40_000
TEMPERATURE = 0.7
PROMPT_LENGTH = 4


def make_batch() -> ActorBatch:
    tokens = torch.randint(0, 251, (3, 12), generator=torch.Generator().manual_seed(0))
    lengths = torch.full((3,), 12)
    response_mask = (torch.arange(12) >= PROMPT_LENGTH).unsqueeze(0).expand(3, 12).clone()
    return ActorBatch(tokens=tokens, lengths=lengths, response_mask=response_mask)


def _materialise(stream) -> list[list[tuple[str, np.ndarray]]]:
    # Copies (bucket tensors may alias live parameters that the optimizer moves), as numpy arrays: torch
    # tensors returned by a worker travel through shared memory that can die with the worker first.
    return [[(name, tensor.numpy().copy()) for name, tensor in bucket] for bucket in stream]


def _tensors(buckets) -> list[list[tuple[str, torch.Tensor]]]:
    return [[(name, torch.from_numpy(array)) for name, array in bucket] for bucket in buckets]


def _reshard_job(llama_mcore: str, qwen_mcore: str) -> dict:
    """Worker: buckets of a fresh Llama, of a fresh Qwen2 actor and of that actor after one step; its log-probs."""
    from megatron_zero.actor.actor import MegatronActor, load_model
    from megatron_zero.config.actor import ActorConfig
    from megatron_zero.config.algorithm import PolicyLossConfig
    from megatron_zero.config.model import ModelConfig
    from megatron_zero.models.mcore_checkpoint import read_checkpoint_info
    from megatron_zero.parallel.reshard import HFWeightStream

    model_config = ModelConfig(params_dtype="float32")
    llama, info = load_model(llama_mcore, model_config)
    llama_stream = HFWeightStream(llama, info.arch, info.bridge, bucket_bytes=BUCKET_BYTES)
    result = {"is_sender": llama_stream.is_sender, "llama": _materialise(llama_stream)}

    info = read_checkpoint_info(qwen_mcore)
    actor = MegatronActor(ActorConfig(lr=1e-2, temperature=TEMPERATURE), PolicyLossConfig(kl_coef=0.0), model_config,
                         qwen_mcore)
    stream = HFWeightStream(actor.model, info.arch, info.bridge, bucket_bytes=BUCKET_BYTES)
    result["qwen2_fresh"] = _materialise(stream)
    batch = make_batch()
    logp, _ = actor.compute_logprobs(batch)
    advantages = torch.randn(batch.tokens.shape, generator=torch.Generator().manual_seed(1))
    actor.train_step(dataclasses.replace(batch, old_logp=logp, advantages=advantages))
    result["qwen2_trained"] = _materialise(stream)
    result["stats"] = stream.stats
    result["actor_logp"] = actor.compute_logprobs(batch)[0].numpy()
    return result


def _convert(pairs: list[tuple[str, str]]) -> None:
    from megatron_zero.models.mcore_checkpoint import convert_hf_to_mcore

    for hf_dir, mcore_dir in pairs:
        convert_hf_to_mcore(hf_dir, mcore_dir)


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    from megatron_zero.models.tiny import save_tiny_model

    root = tmp_path_factory.mktemp("reshard")
    dirs = {name: (save_tiny_model(name, root / f"{name}-hf"), str(root / f"{name}-mcore")) for name in ("llama", "qwen2")}
    # One process converts both (each spawned job costs seconds of imports).
    run_local_workers(_convert, ParallelConfig(), args=([(str(hf), mcore) for hf, mcore in dirs.values()],))
    return dirs


@pytest.fixture(scope="module")
def streamed(checkpoints):
    per_rank = run_local_workers(_reshard_job, ParallelConfig(tensor_parallel_size=2, pipeline_parallel_size=2),
                                 args=(checkpoints["llama"][1], checkpoints["qwen2"][1]))
    assert [r["is_sender"] for r in per_rank] == [True, False, False, False]
    for key in ("llama", "qwen2_fresh", "qwen2_trained"):
        for result in per_rank:
            result[key] = _tensors(result[key])
    for result in per_rank:
        result["actor_logp"] = torch.from_numpy(result["actor_logp"])
    for other in per_rank[1:]:  # only the sender gets buckets; every rank drove the collectives
        assert other["llama"] == [] and other["qwen2_fresh"] == [] and other["qwen2_trained"] == []
        assert torch.equal(other["actor_logp"], per_rank[0]["actor_logp"])
    return per_rank[0]


def _hf_tensors(hf_dir) -> dict[str, torch.Tensor]:
    from megatron_zero.models.hf_io import HFCheckpointReader

    reader = HFCheckpointReader(hf_dir)
    return {name: reader.get(name) for name in reader.names()}


@pytest.mark.parametrize("model, key", [("llama", "llama"), ("qwen2", "qwen2_fresh")])
def test_stream_equals_hf_checkpoint_bit_for_bit(checkpoints, streamed, model, key):
    buckets = streamed[key]
    names = [name for bucket in buckets for name, _ in bucket]
    assert len(names) == len(set(names)), "an HF tensor arrived twice"
    expected = _hf_tensors(checkpoints[model][0])
    assert sorted(names) == sorted(expected)
    for bucket in buckets:
        for name, tensor in bucket:
            assert tensor.shape == expected[name].shape and tensor.dtype == expected[name].dtype, name
            assert torch.equal(tensor, expected[name]), name
    assert len(buckets) > 2
    for bucket in buckets:
        size = sum(t.numel() * t.element_size() for _, t in bucket)
        # Only a single tensor larger than the bound may exceed it, alone in its bucket.
        assert size <= BUCKET_BYTES or len(bucket) == 1
    if model == "qwen2":
        assert [len(b) for b in buckets if b[0][0] == "model.embed_tokens.weight"] == [1]


def test_sync_after_training_step_matches_actor_logprobs(checkpoints, streamed):
    from megatron_zero.config.rollout import TorchEngineConfig
    from megatron_zero.rollout.torch_engine import TorchEngine

    engine = TorchEngine.from_pretrained(str(checkpoints["qwen2"][0]), TorchEngineConfig(dtype="float32"))
    batch = make_batch()
    prompts = batch.tokens[:, :PROMPT_LENGTH].tolist()
    responses = batch.tokens[:, PROMPT_LENGTH:].tolist()
    actor_logp = streamed["actor_logp"][:, PROMPT_LENGTH:]

    def engine_logp() -> torch.Tensor:
        return torch.tensor(engine.compute_logprobs(prompts, responses, TEMPERATURE))

    # Negative control: the step moved the policy away from the checkpoint the engine starts from.
    assert (engine_logp() - actor_logp).abs().max() > 1e-2
    # The engine refuses a sync that misses or repeats a tensor, so this also checks "exactly once".
    stats = engine.sync_weights(streamed["qwen2_trained"], version=1)
    assert stats.num_buckets == len(streamed["qwen2_trained"])
    assert (engine_logp() - actor_logp).abs().max() < 1e-5


def test_stats(streamed):
    stats = streamed["stats"]
    buckets = streamed["qwen2_trained"]
    assert stats.num_buckets == len(buckets)
    assert stats.num_tensors == sum(len(b) for b in buckets)
    assert stats.num_bytes == sum(t.numel() * t.element_size() for b in buckets for _, t in b)
    assert stats.seconds >= stats.reshard_seconds > 0 and stats.gb_per_s > 0


def test_bad_bucket_size_fails_fast():
    from megatron_zero.parallel.reshard import HFWeightStream

    with pytest.raises(ValueError, match=r"bucket_bytes=0 must be >= 1"):
        HFWeightStream(torch.nn.Linear(1, 1), None, None, bucket_bytes=0)
