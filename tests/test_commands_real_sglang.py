"""`megatron-zero eval` and `megatron-zero difficulty` on the real SGLang 0.5.23 server on CPU.

``--engine sglang --device cpu`` launches the server through Ray like the trainer (rollout/sglang_cpu.py);
``--sglang-url`` uses one started by hand. Greedy scores must equal the torch engine's exactly (both float32 on
the same model); the difficulty table must have every problem's counts. About 3 minutes on 2 cores.

    python -m pytest tests/test_commands_real_sglang.py -q
"""

from __future__ import annotations

import json
import os
import signal

import pytest

from megatron_zero.cli import main
from megatron_zero.demo import BASE_MODEL_PATH, TRAIN_PROMPTS_PATH
from real_sglang import start_server_by_hand, wait_until_serving
from test_evaluation import _eval_argv, _same_greedy_results, greedy_torch_eval  # noqa: F401 (a fixture)


pytestmark = pytest.mark.usefixtures("real_sglang_own_ray")


def test_eval_launches_the_real_server_on_cpu_and_scores_like_the_torch_engine(tmp_path, greedy_torch_eval):
    from ray.util.placement_group import placement_group_table

    data_dir, reference_out = greedy_torch_eval
    out = tmp_path / "out"
    assert main(_eval_argv(data_dir, out, "--temperature", "0", "--engine", "sglang", "--device", "cpu",
                           "--ray-address", "local")) == 0
    first = (out / "logs" / "sglang_engine_0.log").read_text().splitlines()[0]
    assert "sglang.launch_server" in first and "--device cpu" in first and "--dtype float32" in first
    # Closing the engine removed its placement group.
    assert {group["state"] for group in placement_group_table().values()} == {"REMOVED"}
    _same_greedy_results(reference_out, out)


def test_eval_on_a_server_started_by_hand(tmp_path, greedy_torch_eval):
    from megatron_zero.cluster.node_files import free_port

    data_dir, reference_out = greedy_torch_eval
    port = free_port()
    process = start_server_by_hand(BASE_MODEL_PATH, tmp_path / "server.log", port)
    try:
        wait_until_serving(process, f"http://127.0.0.1:{port}", tmp_path / "server.log")
        out = tmp_path / "out"
        assert main(_eval_argv(data_dir, out, "--temperature", "0", "--engine", "sglang", "--sglang-url",
                               f"http://127.0.0.1:{port}")) == 0
    finally:
        os.killpg(process.pid, signal.SIGTERM)
        process.wait(timeout=60)
    _same_greedy_results(reference_out, out)


def test_difficulty_on_the_real_server_counts_every_problem(tmp_path):
    train = tmp_path / "train.jsonl"
    train.write_text("".join(TRAIN_PROMPTS_PATH.read_text().splitlines(keepends=True)[:8]))
    out = tmp_path / "rates.jsonl"
    assert main(["difficulty", "--model", str(BASE_MODEL_PATH), "--data", str(train), "--n", "4", "--template",
                 "{input}", "--max-new-tokens", "24", "--max-prompt-tokens", "80", "--engine", "sglang", "--device",
                 "cpu", "--ray-address", "local", "--out", str(out)]) == 0
    rows = [json.loads(line) for line in out.read_text().splitlines() if line.strip()]
    assert len(rows) == 8
    for row in rows:
        assert row["num_samples"] == 4 and 0 <= row["num_correct"] <= 4
        assert row["pass_rate"] == row["num_correct"] / 4
    # The demo model solves some of these and fails others when sampled (held-out greedy accuracy 0.575).
    assert 0 < sum(row["num_correct"] for row in rows) < 32
