"""training.png's panels (analysis/training_plot.py) and the console line's KL (trainer/metrics.py), on hand-made
records: one quantity per panel, each panel labelled, the held-out curve from eval_history, the KL measured."""

import math

import pytest

from megatron_zero.analysis.summary import StepSummary
from megatron_zero.analysis.training_plot import plot_training, training_panels
from megatron_zero.trainer.metrics import console_line


def _metrics(num_steps: int) -> list[dict]:
    # A 0/1 reward: reward_mean and the sampled accuracy are the same numbers.
    return [{"step": step, "reward_mean": 0.3 + 0.1 * step, "accuracy": 0.3 + 0.1 * step,
             "response_length_correct": 20.0 + step, "response_length_wrong": None if step == 3 else 10.0,
             "box_ratio": 0.5 + 0.1 * step, "stop_ratio": 1.0, "clip_ratio": 0.0, "approx_kl": 1e-4 * step}
            for step in range(1, num_steps + 1)]


def _step_summary(step: int, verification: float) -> StepSummary:
    return StepSummary(step=step, num_responses=4, accuracy=0.5, mean_reward=0.5, mean_length=10.0,
                       mean_length_correct=12.0, mean_length_wrong=8.0, clip_ratio=0.0, stop_ratio=1.0, box_ratio=0.5,
                       repeat_ratio=0.0, reflection_ratio=0.0, keyword_means={}, num_judged=4,
                       behavior_rates={"verification": verification, "backtracking": 0.0, "subgoal_setting": 0.0,
                                       "enumeration": None}, num_judge_errors=0)


EVAL_HISTORY = [{"step": 0, "accuracy": 0.5}, {"step": 2, "accuracy": 0.7}, {"step": 3, "accuracy": 0.8}]


def test_each_panel_shows_one_labelled_quantity_and_none_repeats_another():
    panels = training_panels(_metrics(3), EVAL_HISTORY, [_step_summary(s, 0.1 * s) for s in (1, 2, 3)], "rules")
    ylabels = [panel.ylabel for panel in panels]
    assert len(set(ylabels)) == len(ylabels) == 6 and all(ylabels)
    # The reward is drawn once: the old plot drew it twice, as "mean reward" and as "sampled accuracy".
    reward = pytest.approx([0.4, 0.5, 0.6])
    assert sum(ys == reward for panel in panels for _, ys in panel.lines.values()) == 1
    by_title = {panel.title: panel for panel in panels}
    assert by_title["Held-out accuracy"].lines["held-out"] == ([0, 2, 3], [0.5, 0.7, 0.8])
    assert by_title["Train reward"].lines["reward"][1] == pytest.approx([0.4, 0.5, 0.6])
    wrong = by_title["Response length"].lines["wrong"][1]
    assert wrong[:2] == [10.0, 10.0] and math.isnan(wrong[2])  # no wrong response at step 3: a gap, not a zero
    assert set(by_title["Answer format and ending"].lines) == {"box", "stop", "clip"}
    behaviours = by_title["Cognitive behaviours"]
    assert "rules judge" in behaviours.ylabel
    assert behaviours.lines["verification"] == ([1, 2, 3], pytest.approx([0.1, 0.2, 0.3]))
    assert all(math.isnan(v) for v in behaviours.lines["enumeration"][1])
    assert by_title["Policy change per update"].lines["approx_kl"][1] == pytest.approx([1e-4, 2e-4, 3e-4])


def test_plot_training_writes_a_png(tmp_path):
    path = plot_training(_metrics(3), EVAL_HISTORY, [_step_summary(s, 0.2) for s in (1, 2, 3)], tmp_path / "t.png")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_console_line_shows_the_measured_kl():
    record = {"step": 7, "reward_mean": 0.5, "accuracy": 0.5, "response_length": 30.0, "box_ratio": 0.9,
              "loss": 0.01, "approx_kl": 1.5e-4, "logprob_gap_max": 2e-6}
    line = console_line(record, seconds=2.0)
    assert "approx_kl 1.50e-04" in line and "kl_ref" not in line
    assert line.startswith("step 7 | reward 0.500") and line.endswith("| 2.0s")
    # With a KL-to-reference term in the loss, its value is shown too.
    assert "kl_ref 3.00e-03" in console_line({**record, "kl_ref": 3e-3}, seconds=2.0)
