"""The zero-RL loop with the real SGLang 0.5.23 server on CPU, launched by the trainer itself, in both layouts.

What ``megatron-zero demo rollout.engine=sglang`` runs, at smoke size: the trainer starts the servers in Ray actors
(rollout/sglang_servers.py, CPU mode of rollout/sglang_cpu.py), and every step generates on them, checks the
engine-vs-actor log-prob gap (float32 on both sides, so it must stay at rounding level: a sync that did not land
after step 1 would show the trained policy's change) and pushes the new weights in:
- colocated at TP=2: one server beside each rank; each rank's CPU copy through SGLang's serializer into
  ``/update_weights_from_tensor``, inside ``/begin_weight_update`` .. ``/end_weight_update``; release/resume around
  the phases (on CPU they only flush);
- a server of its own beside two data-parallel ranks (``cluster.rollout_num_gpus=1``, DP=2): rank 0 broadcasts
  over a gloo group the server joined (``/update_weights_from_distributed``).
(The demo model has 3 layers, so no PP=2 here; pushes from PP=2 ranks are tests/test_sglang_real_server.py.)
The servers' own access logs count one weight-update session per sync (before step 1, then one per step).

Seeded rollouts (resume repeating the uninterrupted run token for token) need --enable-deterministic-inference, which
SGLang refuses with the CPU's torch_native attention; that check stays on the stand-in
(tests/test_trainer_disaggregated.py). About 3 minutes on 2 cores.

    python -m pytest tests/test_trainer_real_sglang.py -q
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from megatron_zero.config.trainer import LOGPROB_GAP_BOUNDS
from megatron_zero.trainer.demo import demo_config

SMOKE = ["data.sampler.batch_size=8", "rollout.num_samples_per_prompt=4", "rollout.max_new_tokens=24",
         "eval.max_new_tokens=24", "eval.max_problems=8", "run.save_every=0", "run.num_minibatches=2",
         "reward.num_workers=1", "rollout.engine=sglang"]
NUM_STEPS = 2


pytestmark = pytest.mark.usefixtures("real_sglang_own_ray")


def _train(output_dir: Path, base_mcore: str, overrides: list[str]) -> list[dict]:
    from megatron_zero.trainer.loop import Trainer

    config = demo_config(str(output_dir), NUM_STEPS, [*SMOKE, f"mcore_path={base_mcore}", *overrides])
    trainer = Trainer(config)
    try:
        trainer.fit()
    finally:
        trainer.close()
    return [json.loads(line) for line in (output_dir / "metrics.jsonl").read_text().splitlines()]


def _served(log: Path, endpoint: str) -> int:
    """How many requests to ``endpoint`` the server answered 200 (its uvicorn access log)."""
    return len(re.findall(rf'"POST {re.escape(endpoint)} HTTP/1.1" 200', log.read_text()))


def _check_steps(records: list[dict]) -> None:
    mean_bound, max_bound = LOGPROB_GAP_BOUNDS["fp32"]
    assert [r["step"] for r in records] == list(range(1, NUM_STEPS + 1))
    for record in records:
        assert record["num_samples"] == 32
        # fp32 on both sides: SGLang's CPU kernels against Megatron's, measured ~1e-5; far inside the fp32 bounds.
        assert record["logprob_gap_max"] < 1e-3 < max_bound and record["logprob_gap_mean"] < mean_bound
    assert any(record["grad_norm"] > 0 for record in records)  # the policy moved, so step 2's gap tests the sync


def test_colocated_servers_take_every_ranks_weights_each_step(tmp_path, base_mcore):
    records = _train(tmp_path / "run", base_mcore, [])  # the demo's SGLang layout: colocated, TP=2, 2 servers
    _check_steps(records)
    logs = sorted((tmp_path / "run" / "logs").glob("sglang_engine_*.log"))
    assert len(logs) == 2
    for log in logs:
        first = log.read_text().splitlines()[0]
        assert "--device cpu" in first and "--enable-memory-saver" not in first
        # Before step 1, after each step, and after the final checkpoint: saving brings the actor back on the
        # device, which on a GPU discards the engine's released weights.
        syncs = NUM_STEPS + 2
        assert _served(log, "/begin_weight_update") == _served(log, "/end_weight_update") == syncs
        assert _served(log, "/update_weights_from_tensor") >= syncs
        assert _served(log, "/update_weights_from_distributed") == 0
        # Colocated phases: memory released for training and resumed (weights, then KV cache) every step.
        assert _served(log, "/release_memory_occupation") >= NUM_STEPS
        assert _served(log, "/resume_memory_occupation") >= 2 * NUM_STEPS


def test_a_server_of_its_own_takes_rank_zeros_broadcast_each_step(tmp_path, base_mcore):
    separate = ["cluster.colocate=false", "cluster.rollout_num_gpus=1", "rollout.sglang.colocated=false",
                "parallel.tensor_parallel_size=1"]  # two CPU workers: data parallel, DP=2
    records = _train(tmp_path / "run", base_mcore, separate)
    _check_steps(records)
    [log] = sorted((tmp_path / "run" / "logs").glob("sglang_engine_*.log"))
    syncs = NUM_STEPS + 1
    assert _served(log, "/init_weights_update_group") == 1  # one gloo group serves every step
    assert _served(log, "/begin_weight_update") == _served(log, "/end_weight_update") == syncs
    assert _served(log, "/update_weights_from_distributed") >= syncs
    assert _served(log, "/update_weights_from_tensor") == 0
    assert _served(log, "/release_memory_occupation") == 0  # a server of its own keeps its memory
