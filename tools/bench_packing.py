"""Measure the Megatron actor's log-prob pass and train step with packed vs padded microbatches.

Converts a HF model (default: the CPU demo's base model) to a Megatron checkpoint in a temporary folder, builds
a batch of prompt+response rows with lengths drawn uniformly from [--min-length, --max-length] (zero-RL
responses vary widely in length), and times ``compute_logprobs`` and ``train_step`` at TP=1 in one process,
with ``actor.pack_sequences`` false and true, after one warm-up call each. Prints seconds (best of
--repeats), the number of microbatches and the share of computed token positions that are padding.

On CPU the packed path uses megatron-core's local layers with a dense block-diagonal mask (cost grows with
the square of the row length); on a GPU with Transformer Engine it uses THD kernels, which is where packing
pays off. Run it on the machine whose numbers you quote.

    python tools/bench_packing.py
    python tools/bench_packing.py --num-rows 256 --max-tokens 2048 --min-length 20 --max-length 400
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import tempfile
import time

import torch

from megatron_zero.actor.batching import ActorBatch, split_by_token_budget
from megatron_zero.config.parallel import ParallelConfig
from megatron_zero.parallel.local_launch import run_local_workers
from megatron_zero.trainer.demo import BASE_MODEL_PATH


def make_batch(num_rows: int, min_length: int, max_length: int, vocab_size: int) -> ActorBatch:
    generator = torch.Generator().manual_seed(0)
    lengths = torch.randint(min_length, max_length + 1, (num_rows,), generator=generator)
    positions = torch.arange(int(lengths.max())).unsqueeze(0)
    tokens = torch.randint(0, vocab_size, (num_rows, int(lengths.max())), generator=generator)
    # The first quarter of each row is the prompt; the rest is the response.
    response_mask = (positions >= (lengths // 4).clamp(min=1).unsqueeze(1)) & (positions < lengths.unsqueeze(1))
    return ActorBatch(tokens=tokens, lengths=lengths, response_mask=response_mask)


def padding_share(lengths: list[int], max_tokens: int, packed: bool) -> float:
    """Share of the token positions the model computes that are padding."""
    groups = split_by_token_budget(lengths, max_tokens, packed=packed)
    computed = sum(sum(lengths[i] for i in g) if packed else len(g) * max(lengths[i] for i in g) for g in groups)
    return 1.0 - sum(lengths) / computed


def _bench_job(mcore_dir: str, args: argparse.Namespace) -> dict:
    from megatron_zero.actor.actor import MegatronActor
    from megatron_zero.config.actor import ActorConfig
    from megatron_zero.config.algorithm import PolicyLossConfig
    from megatron_zero.config.model import ModelConfig

    torch.set_num_threads(args.threads)
    results = {}
    for packed in (False, True):
        actor = MegatronActor(ActorConfig(lr=1e-5, max_tokens_per_microbatch=args.max_tokens, pack_sequences=packed),
                              PolicyLossConfig(kl_coef=0.0), ModelConfig(params_dtype="float32",
                                                                        transformer_impl="local"), mcore_dir)
        batch = make_batch(args.num_rows, args.min_length, args.max_length, actor.vocab_size)
        logp, _ = actor.compute_logprobs(batch)
        train_batch = dataclasses.replace(batch, old_logp=logp, advantages=torch.ones_like(logp))
        actor.train_step(train_batch)
        timings = {"logprobs": [], "train_step": []}
        for _ in range(args.repeats):
            start = time.perf_counter()
            actor.compute_logprobs(batch)
            timings["logprobs"].append(time.perf_counter() - start)
            start = time.perf_counter()
            metrics = actor.train_step(train_batch)
            timings["train_step"].append(time.perf_counter() - start)
        results["packed" if packed else "padded"] = {
            **{name: min(values) for name, values in timings.items()},
            "microbatches": metrics["num_microbatches"],
            "padding_share": padding_share(batch.lengths.tolist(), args.max_tokens, packed),
        }
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=str(BASE_MODEL_PATH), help="HF model directory")
    parser.add_argument("--num-rows", type=int, default=128)
    parser.add_argument("--min-length", type=int, default=20)
    parser.add_argument("--max-length", type=int, default=120)
    parser.add_argument("--max-tokens", type=int, default=1024, help="actor.max_tokens_per_microbatch")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()

    from megatron_zero.models.mcore_checkpoint import convert_hf_to_mcore

    with tempfile.TemporaryDirectory() as folder:
        mcore_dir = os.path.join(folder, "mcore")
        run_local_workers(convert_hf_to_mcore, ParallelConfig(), args=(args.model, mcore_dir))
        results = run_local_workers(_bench_job, ParallelConfig(), args=(mcore_dir, args))[0]
    print(f"{args.num_rows} rows of {args.min_length}-{args.max_length} tokens, budget {args.max_tokens} tokens per "
          f"microbatch, TP=1, {args.threads} threads, load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores")
    for name, result in results.items():
        print(f"{name}: logprobs {result['logprobs']:.3f} s, train_step {result['train_step']:.3f} s, "
              f"{result['microbatches']:.0f} microbatches, {100 * result['padding_share']:.1f}% padding")


if __name__ == "__main__":
    main()
