"""The run's one-figure summary (training.png): what a zero-RL paper plots, one quantity per panel.

Panels: held-out accuracy (greedy, from summary.json's eval_history), the mean train reward (sampled), response
length of correct and wrong responses, box / stop / clip ratios, the judge's behaviour rates, and the measured
KL between the policy before and after each update (approx_kl). The train reward gets its own panel, and the
sampled accuracy none: with a 0/1 reward they are the same curve.

How: ``plot_training(metrics_records, eval_history, analysis.steps, "training.png")``; `training_panels` is the
data behind it (tests read it).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Optional

from matplotlib.figure import Figure

from megatron_zero.analysis.behaviors import BEHAVIORS
from megatron_zero.analysis.summary import StepSummary


@dataclasses.dataclass(frozen=True)
class Panel:
    title: str
    ylabel: str
    # label -> (steps, values); NaN where a step has no value (e.g. no wrong response).
    lines: dict[str, tuple[list[int], list[float]]]
    ylim: Optional[tuple[float, float]] = None


def _values(records: Sequence[Mapping[str, Any]], key: str) -> list[float]:
    return [float("nan") if record.get(key) is None else float(record[key]) for record in records]


def training_panels(metrics: Sequence[Mapping[str, Any]], eval_history: Sequence[Mapping[str, Any]],
                    behavior_steps: Sequence[StepSummary], judge: str) -> list[Panel]:
    """The panels of training.png. `metrics`: metrics.jsonl records; `eval_history`: [{"step", "accuracy"}]
    (step 0 = the base model); `behavior_steps`: the behaviour analysis of the same run's samples."""
    steps = [int(record["step"]) for record in metrics]
    share = (-0.02, 1.02)
    return [
        Panel("Held-out accuracy", "accuracy (greedy, held-out set)",
              {"held-out": ([int(e["step"]) for e in eval_history], [float(e["accuracy"]) for e in eval_history])},
              share),
        Panel("Train reward", "mean reward per response (T=1 samples)",
              {"reward": (steps, _values(metrics, "reward_mean"))}),
        Panel("Response length", "mean response length (tokens)",
              {"correct": (steps, _values(metrics, "response_length_correct")),
               "wrong": (steps, _values(metrics, "response_length_wrong"))}),
        Panel("Answer format and ending", "share of responses",
              {name: (steps, _values(metrics, f"{name}_ratio")) for name in ("box", "stop", "clip")}, share),
        Panel("Cognitive behaviours", f"share of judged responses ({judge} judge)",
              {b.replace("_", " "): ([s.step for s in behavior_steps],
                                     [float("nan") if s.behavior_rates[b] is None else s.behavior_rates[b]
                                      for s in behavior_steps]) for b in BEHAVIORS}),
        Panel("Policy change per update", "approx. KL(old || new) per token",
              {"approx_kl": (steps, _values(metrics, "approx_kl"))}),
    ]


def plot_training(metrics: Sequence[Mapping[str, Any]], eval_history: Sequence[Mapping[str, Any]],
                  behavior_steps: Sequence[StepSummary], png_path: str | Path, judge: str = "rules") -> Path:
    """Draw `training_panels` in a 2 x 3 grid into `png_path` (matplotlib's Agg canvas, no pyplot state)."""
    panels = training_panels(metrics, eval_history, behavior_steps, judge)
    figure = Figure(figsize=(15, 8), layout="constrained")
    for axes, panel in zip(figure.subplots(2, 3).flat, panels):
        for label, (xs, ys) in panel.lines.items():
            axes.plot(xs, ys, marker="o" if len(xs) <= 12 else ".", markersize=4, label=label)
        axes.set_title(panel.title)
        axes.set_xlabel("step")
        axes.set_ylabel(panel.ylabel)
        if panel.ylim:
            axes.set_ylim(*panel.ylim)
        axes.grid(alpha=0.3)
        if len(panel.lines) > 1:
            axes.legend(fontsize=8)
    png_path = Path(png_path)
    figure.savefig(png_path, dpi=100)
    return png_path
