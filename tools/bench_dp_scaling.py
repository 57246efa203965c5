"""Measure what data parallelism buys: one global batch at DP=1 and DP=2, train step and log-prob pass.

Builds one batch of prompt+response rows with zero-RL-like lengths (most short, some prompts' samples all up to
10x longer), then
runs the Megatron actor (DDP + distributed optimizer, TP=1) on it in three ways, each after one warm-up call:

* ``dp1``: one rank, the whole batch, all cores' threads.
* ``dp2``: two ranks, half the threads each; each rank gets its replica's shard, balanced by forward FLOPs
  (``parallel/data_parallel.py``, what the trainer does).
* ``dp2-replicated``: two ranks, each running the *whole* batch (what the trainer did before batches were
  sharded), to show the cost of replicas repeating each other's work side by side.

Printed per mode: seconds of ``compute_logprobs`` and ``train_step`` (best of --repeats; a step's time is its
slowest rank's), token positions each rank's model ran (counted from the model's inputs) and the imbalance
(largest rank / mean). Also the imbalance a split by row count would have had. Run it on the machine whose
numbers you quote; the ratios are what carry over, the seconds are this machine's.

    python tools/bench_dp_scaling.py
    python tools/bench_dp_scaling.py --num-rows 128 --hidden-size 512 --num-layers 4
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import tempfile
import time

import torch

from megatron_zero.actor.batching import ActorBatch
from megatron_zero.config.parallel import ParallelConfig
from megatron_zero.parallel.data_parallel import ShardPlan, row_costs
from megatron_zero.parallel.local_launch import run_local_workers

MODES = ("dp1", "dp2", "dp2-replicated")


def make_batch(num_rows: int, min_length: int, max_length: int, vocab_size: int, group_size: int = 8) -> ActorBatch:
    """Rows in groups of ``group_size`` (the samples of one prompt, adjacent as the rollout returns them), each
    group's length log-uniform in [min_length, max_length] and its samples within +-25% of it: many short
    responses, a long tail, and hard prompts whose samples are all long."""
    generator = torch.Generator().manual_seed(0)
    num_groups = -(-num_rows // group_size)
    log_lengths = torch.empty(num_groups).uniform_(float(torch.log(torch.tensor(float(min_length)))),
                                                   float(torch.log(torch.tensor(float(max_length)))),
                                                   generator=generator)
    spread = torch.empty(num_groups, group_size).uniform_(0.75, 1.25, generator=generator)
    lengths = (log_lengths.exp().unsqueeze(1) * spread).flatten()[:num_rows].round().long().clamp(min_length,
                                                                                                   max_length)
    positions = torch.arange(int(lengths.max())).unsqueeze(0)
    tokens = torch.randint(0, vocab_size, (num_rows, int(lengths.max())), generator=generator)
    response_mask = (positions >= (lengths // 4).clamp(min=1).unsqueeze(1)) & (positions < lengths.unsqueeze(1))
    return ActorBatch(tokens=tokens, lengths=lengths, response_mask=response_mask,
                      advantages=torch.randn(tokens.shape, generator=generator))


def _bench_job(mcore_dir: str, hf_dir: str, args: argparse.Namespace, replicated: bool) -> dict:
    from megatron.core import parallel_state

    from megatron_zero.actor.actor import MegatronActor
    from megatron_zero.config.actor import ActorConfig
    from megatron_zero.config.algorithm import PolicyLossConfig
    from megatron_zero.config.model import ModelConfig
    from megatron_zero.models.registry import read_architecture

    actor = MegatronActor(ActorConfig(lr=1e-5, max_tokens_per_microbatch=args.max_tokens, pack_sequences=False),
                          PolicyLossConfig(kl_coef=0.0), ModelConfig(params_dtype="float32"), mcore_dir)
    batch = make_batch(args.num_rows, args.min_length, args.max_length, actor.vocab_size)
    dp_rank, dp_size = parallel_state.get_data_parallel_rank(), parallel_state.get_data_parallel_world_size()
    plan = ShardPlan.balance(row_costs(batch.lengths, read_architecture(hf_dir)), dp_size)
    shard = batch if replicated else plan.scatter(batch)[dp_rank]
    logp, _ = actor.compute_logprobs(shard)
    train_batch = dataclasses.replace(shard, old_logp=logp)
    actor.train_step(train_batch)  # warm-up
    timings: dict[str, list[float]] = {"logprobs": [], "train_step": []}
    tokens = {}
    for _ in range(args.repeats):
        for name, call in (("logprobs", lambda: actor.compute_logprobs(shard)),
                           ("train_step", lambda: actor.train_step(train_batch))):
            torch.distributed.barrier()  # each timing starts together on all ranks
            counted = actor.tokens.num_tokens
            start = time.perf_counter()
            call()
            timings[name].append(time.perf_counter() - start)
            tokens[name] = actor.tokens.num_tokens - counted
    return {"seconds": timings, "tokens": tokens, "threads": torch.get_num_threads()}


def _step_seconds(per_rank: list[dict], name: str) -> float:
    """Best over repeats of the slowest rank's time."""
    return min(max(rank["seconds"][name][i] for rank in per_rank) for i in range(len(per_rank[0]["seconds"][name])))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--num-rows", type=int, default=64)
    parser.add_argument("--min-length", type=int, default=24)
    parser.add_argument("--max-length", type=int, default=320)
    parser.add_argument("--max-tokens", type=int, default=2048, help="actor.max_tokens_per_microbatch")
    parser.add_argument("--hidden-size", type=int, default=256, help="of the random Qwen2-shaped model")
    parser.add_argument("--num-layers", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()

    from megatron_zero.models.mcore_checkpoint import convert_hf_to_mcore
    from megatron_zero.models.registry import read_architecture
    from megatron_zero.models.tiny import save_tiny_model

    results = {}
    with tempfile.TemporaryDirectory() as folder:
        hf_dir = str(save_tiny_model("qwen2", os.path.join(folder, "hf"), hidden_size=args.hidden_size,
                                     intermediate_size=4 * args.hidden_size, num_hidden_layers=args.num_layers,
                                     num_attention_heads=8, num_key_value_heads=2, vocab_size=4096,
                                     max_position_embeddings=max(256, args.max_length)))
        mcore_dir = os.path.join(folder, "mcore")
        run_local_workers(convert_hf_to_mcore, ParallelConfig(), args=(hf_dir, mcore_dir))
        arch = read_architecture(hf_dir)
        for mode in MODES:
            # run_local_workers gives each rank its share of the cores: DP=1 and DP=2 use the same CPUs.
            results[mode] = run_local_workers(_bench_job, ParallelConfig(), world_size=1 if mode == "dp1" else 2,
                                              args=(mcore_dir, hf_dir, args, mode == "dp2-replicated"))
    lengths = make_batch(args.num_rows, args.min_length, args.max_length, arch.vocab_size).lengths
    costs = row_costs(lengths, arch)
    by_count = ShardPlan(rows=(tuple(range(args.num_rows // 2)), tuple(range(args.num_rows // 2, args.num_rows))),
                         costs=(sum(costs[: args.num_rows // 2]), sum(costs[args.num_rows // 2:])),
                         num_rows=args.num_rows)
    print(f"{args.num_rows} rows of {args.min_length}-{args.max_length} tokens ({int(lengths.sum())} in all), random "
          f"Qwen2 hidden {args.hidden_size} x {args.num_layers} layers, TP=1, padded microbatches of <= "
          f"{args.max_tokens} tokens, load average {os.getloadavg()[0]:.1f} on "
          f"{os.cpu_count()} cores")
    print(f"FLOP imbalance of the DP=2 split: by cost {ShardPlan.balance(costs, 2).imbalance:.3f}, by row count "
          f"(first half / second half) {by_count.imbalance:.3f}")
    base = {name: _step_seconds(results["dp1"], name) for name in ("logprobs", "train_step")}
    for mode, per_rank in results.items():
        seconds = {name: _step_seconds(per_rank, name) for name in ("logprobs", "train_step")}
        tokens = [rank["tokens"]["train_step"] for rank in per_rank]
        print(f"{mode:15s} logprobs {seconds['logprobs']:.3f} s ({base['logprobs'] / seconds['logprobs']:.2f}x dp1), "
              f"train_step {seconds['train_step']:.3f} s ({base['train_step'] / seconds['train_step']:.2f}x dp1), "
              f"tokens per rank {tokens} (max/mean {max(tokens) * len(tokens) / sum(tokens):.3f}), "
              f"{per_rank[0]['threads']} thread(s) per rank")


if __name__ == "__main__":
    main()
