"""Data parallelism divides the work: cost-balanced shards, per-replica log-probs, the DP=1 update.

The distributed checks run the real Megatron actor (DDP + distributed optimizer over gloo) at DP=1, TP=1 x DP=2
and TP=2 x DP=2 on one skewed batch. Each rank trains on its replica's shard only (as the trainer's
``DP_SHARDED`` dispatch hands it out) and counts the token positions its model ran from the model's own inputs
(``TokenCounter``); the update is compared with DP=1's by the log-probs after the step, and two sabotaged runs
(a replica that skips its shard, a replica that trains another's) must miss it.

    python -m pytest tests/test_data_parallel.py -q
"""

from __future__ import annotations

import dataclasses

import pytest
import torch

from megatron_zero.actor.batching import ActorBatch
from megatron_zero.config.parallel import ParallelConfig
from megatron_zero.parallel.data_parallel import ShardPlan, row_costs
from megatron_zero.parallel.local_launch import run_local_workers

TEMPERATURE = 1.0
# Zero-RL-like skew: two long rows and many short ones (10x apart).
LENGTHS = [60, 55, 6, 8, 7, 9, 6, 10, 7, 8, 6, 9]
PROMPT_LENGTH = 4
# Tolerance of "the same update": float32 reduction order (the steps themselves move log-probs by > 1e-2).
UPDATE_TOLERANCE = 1e-4


def make_batch() -> ActorBatch:
    generator = torch.Generator().manual_seed(0)
    lengths = torch.tensor(LENGTHS)
    width = int(lengths.max())
    positions = torch.arange(width).unsqueeze(0)
    tokens = torch.randint(0, 251, (len(LENGTHS), width), generator=generator).masked_fill(
        positions >= lengths.unsqueeze(1), 0)
    response_mask = (positions >= PROMPT_LENGTH) & (positions < lengths.unsqueeze(1))
    advantages = torch.randn(tokens.shape, generator=torch.Generator().manual_seed(1))
    return ActorBatch(tokens=tokens, lengths=lengths, response_mask=response_mask, advantages=advantages)


def _plan(batch: ActorBatch, hf_dir: str, num_replicas: int) -> ShardPlan:
    """The trainer's split (``Trainer.shard``): rows balanced by forward FLOPs."""
    from megatron_zero.models.registry import read_architecture

    return ShardPlan.balance(row_costs(batch.lengths, read_architecture(hf_dir)), num_replicas)


def _dp_job(mcore_dir: str, hf_dir: str, sabotage: str) -> dict:
    """One rank: log-probs of its replica's shard, one train step on it, then log-probs of the whole batch."""
    from megatron.core import parallel_state

    from megatron_zero.actor.actor import MegatronActor
    from megatron_zero.config.actor import ActorConfig
    from megatron_zero.config.algorithm import PolicyLossConfig
    from megatron_zero.config.model import ModelConfig

    actor = MegatronActor(ActorConfig(lr=1e-3, temperature=TEMPERATURE, max_tokens_per_microbatch=64),
                          PolicyLossConfig(kl_coef=0.0), ModelConfig(params_dtype="float32"), mcore_dir)
    batch = make_batch()
    dp_rank, dp_size = parallel_state.get_data_parallel_rank(), parallel_state.get_data_parallel_world_size()
    plan = _plan(batch, hf_dir, dp_size)
    shards = plan.scatter(batch)
    shard = shards[dp_rank]
    if sabotage == "skip" and dp_rank == 1:
        shard = dataclasses.replace(shard, response_mask=torch.zeros_like(shard.response_mask))  # runs, trains nothing
    elif sabotage == "swap" and dp_rank == 1:
        shard = shards[0]  # trains replica 0's rows a second time

    counted = actor.tokens.num_tokens
    logp, _ = actor.compute_logprobs(shard)
    logprob_tokens = actor.tokens.num_tokens - counted
    counted = actor.tokens.num_tokens
    metrics = actor.train_step(dataclasses.replace(shard, old_logp=logp))
    train_tokens = actor.tokens.num_tokens - counted
    return {"dp_rank": dp_rank, "rows": plan.rows[dp_rank], "shard_logp": logp, "logprob_tokens": logprob_tokens,
            "train_tokens": train_tokens, "metrics": metrics, "logp_after": actor.compute_logprobs(batch)[0]}


def _run(tiny_qwen2, tp: int, world_size: int, sabotage: str = "none") -> list[dict]:
    hf_dir, mcore_dir = tiny_qwen2
    return run_local_workers(_dp_job, ParallelConfig(tensor_parallel_size=tp), world_size=world_size,
                             args=(mcore_dir, hf_dir, sabotage))


@pytest.fixture(scope="module")
def runs(tiny_qwen2):
    return {"dp1": _run(tiny_qwen2, tp=1, world_size=1), "tp1dp2": _run(tiny_qwen2, tp=1, world_size=2),
            "tp2dp2": _run(tiny_qwen2, tp=2, world_size=4)}


def _update_gap(ranks: list[dict], reference: list[dict]) -> float:
    return max(float((rank["logp_after"] - reference[0]["logp_after"]).abs().max()) for rank in ranks)


@pytest.mark.parametrize("layout", ["tp1dp2", "tp2dp2"])
def test_each_replica_runs_about_half_the_tokens_and_the_update_equals_dp1(runs, layout):
    ranks, total = runs[layout], sum(LENGTHS)
    # Packed microbatches: the model runs exactly the real tokens of the rows it is given.
    assert runs["dp1"][0]["train_tokens"] == runs["dp1"][0]["logprob_tokens"] == total
    by_replica: dict[int, list[dict]] = {}
    for rank in ranks:
        by_replica.setdefault(rank["dp_rank"], []).append(rank)
    assert sorted(by_replica) == [0, 1]
    replica_tokens = []
    for replica in by_replica.values():
        # Every rank of a replica (its TP group) ran the same shard.
        assert len({(r["train_tokens"], r["logprob_tokens"], r["rows"]) for r in replica}) == 1
        replica_tokens.append(replica[0]["train_tokens"])
    # Each token of the batch ran once, on one replica; by cost neither replica got much more than half, while
    # an even split by row count ([0..5], [6..11]) would have given one replica 145 of 191 tokens.
    assert sum(replica_tokens) == total
    assert max(replica_tokens) <= 0.6 * total
    assert set(by_replica[0][0]["rows"]) | set(by_replica[1][0]["rows"]) == set(range(len(LENGTHS)))
    # The update is DP=1's on the global batch: the loss normaliser and DDP's average cover both shards.
    step = float((runs["dp1"][0]["logp_after"] - runs["dp1"][0]["shard_logp"]).abs().max())  # DP=1: whole batch
    assert step > 1e-2
    assert _update_gap(ranks, runs["dp1"]) < UPDATE_TOLERANCE
    for name in ("loss", "pg_loss", "entropy", "grad_norm", "num_tokens"):
        assert ranks[0]["metrics"][name] == pytest.approx(runs["dp1"][0]["metrics"][name], rel=1e-4, abs=1e-7), name
    # num_tokens counts the loss tokens of the whole batch once, not once per replica.
    assert ranks[0]["metrics"]["num_tokens"] == int(make_batch().response_mask.sum())


@pytest.mark.parametrize("layout", ["tp1dp2", "tp2dp2"])
def test_shard_logprobs_put_back_in_row_order_equal_dp1(runs, layout):
    leaders = {rank["dp_rank"]: rank for rank in runs[layout]}  # any rank of a replica holds its result
    plan = ShardPlan(rows=tuple(leaders[d]["rows"] for d in (0, 1)), costs=(0.0, 0.0), num_rows=len(LENGTHS))
    gathered = plan.gather([leaders[d]["shard_logp"] for d in (0, 1)], like=make_batch().tokens)
    assert (gathered - runs["dp1"][0]["shard_logp"]).abs().max() < 1e-5


@pytest.mark.parametrize("sabotage", ["skip", "swap"])
def test_a_replica_that_skips_or_trades_its_shard_misses_the_dp1_update(tiny_qwen2, runs, sabotage):
    assert _update_gap(_run(tiny_qwen2, tp=1, world_size=2, sabotage=sabotage), runs["dp1"]) > 10 * UPDATE_TOLERANCE


# --------------------------------------------------------------------------- the plan itself (no processes)


def test_balance_by_cost_not_by_row_count():
    costs = [100.0, 90.0] + [10.0] * 10
    plan = ShardPlan.balance(costs, 2)
    assert sorted(i for rows in plan.rows for i in rows) == list(range(12))
    assert plan.costs == (150.0, 140.0) and plan.imbalance == pytest.approx(150 / 145)
    # Same costs, same plan (resume repeats the run): the plan depends on nothing else.
    assert ShardPlan.balance(list(costs), 2) == plan
    # Ties go to the lower index: equal rows alternate over the replicas.
    assert ShardPlan.balance([1.0] * 4, 2).rows == ((0, 2), (1, 3))


def test_row_costs_follow_flops_with_attention_quadratic_term():
    """forward_flops against torch's FLOP counter on the HF model (eager attention computes every (q, k) pair,
    the causal mask throws away those above the diagonal, which forward_flops does not count)."""
    from torch.utils.flop_counter import FlopCounterMode
    from transformers import AutoModelForCausalLM

    from megatron_zero.models.registry import get_bridge
    from megatron_zero.models.tiny import tiny_config

    config = tiny_config("qwen2")
    arch = get_bridge(config.to_dict()).parse(config.to_dict())
    model = AutoModelForCausalLM.from_config(config, attn_implementation="eager").eval()
    for length in (8, 100):
        with FlopCounterMode(display=False) as counter, torch.no_grad():
            model(input_ids=torch.zeros(1, length, dtype=torch.long))
        masked_pairs = length * length - length * (length + 1) / 2
        masked = arch.num_layers * 2 * 2 * arch.num_attention_heads * arch.head_dim * masked_pairs
        # rel: HF's rotary embedding adds one small matmul (head_dim x length) the formula leaves out.
        assert arch.forward_flops(length) == pytest.approx(counter.get_total_flops() - masked, rel=1e-4)
    # The quadratic term is why tokens alone undercount long rows.
    costs = row_costs([10, 100], arch)
    assert costs[1] / costs[0] > 10.5


def test_scatter_gather_round_trip_and_fillers():
    batch = make_batch()
    plan = ShardPlan.balance([float(n) for n in LENGTHS], 3)
    shards = plan.scatter(batch)
    assert [s.num_rows for s in shards] == [len(rows) for rows in plan.rows]
    assert all(s.tokens.shape[1] == int(s.lengths.max()) for s in shards)  # trimmed: less to ship through Ray
    assert torch.equal(plan.gather([s.tokens for s in shards], like=batch.tokens), batch.tokens)
    # Fewer rows than replicas: the replica without a row gets a filler that counts nothing in the loss.
    two_rows = batch.select_rows(torch.tensor([2, 3]))
    small = ShardPlan.balance([1.0, 1.0], 3)
    assert small.rows == ((0,), (1,), ())
    filler = small.scatter(two_rows)[2]
    assert filler.num_rows == 1 and not filler.response_mask.any()
    gathered = small.gather([s.tokens.float() for s in small.scatter(two_rows)], like=two_rows.tokens)
    assert torch.equal(gathered, two_rows.tokens.float())
    with pytest.raises(ValueError, match="shard plan is for 3 rows, the batch has 2"):
        ShardPlan.balance([1.0] * 3, 2).scatter(two_rows)


def test_unimplemented_layouts_are_refused():
    with pytest.raises(ValueError, match=r"parallel.context_parallel_size=2 is not supported yet: nothing splits "
                                         r"sequences over context-parallel ranks; set it to 1"):
        ParallelConfig(context_parallel_size=2)
