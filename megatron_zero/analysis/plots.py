"""Trend plots of a behaviour analysis across steps, drawn with matplotlib's Agg canvas (no display, no pyplot).

`save_plots` writes four PNGs: response length (correct vs wrong), behaviour rates, box / clip / stop / repeat
ratios with accuracy, and reflection-keyword counts. The report (report.py) embeds them.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Optional

from matplotlib.figure import Figure

from megatron_zero.analysis.behaviors import BEHAVIORS
from megatron_zero.analysis.metrics import REFLECTION_KEYWORDS
from megatron_zero.analysis.summary import StepSummary

PLOT_CAPTIONS = {
    "lengths": "Mean response length (tokens): correct vs wrong",
    "behaviors": "Cognitive behaviours (% of judged responses)",
    "ratios": "Accuracy and box / clip / stop / repeat ratios (%)",
    "keywords": "Reflection keywords (mean count per response)",
}


def _series(values: Sequence[Optional[float]], scale: float = 1.0) -> list[float]:
    return [float("nan") if v is None else scale * v for v in values]


def _line_plot(path: Path, title: str, ylabel: str, xs: list[int], series: dict[str, list[float]]) -> None:
    figure = Figure(figsize=(6.4, 4.2), layout="constrained")
    axes = figure.subplots()
    for label, ys in series.items():
        axes.plot(xs, ys, marker="o", markersize=4, label=label)
    axes.set_title(title, fontsize=11)
    axes.set_xlabel("step")
    axes.set_ylabel(ylabel)
    axes.grid(alpha=0.3)
    # Below the axes, so the legend never hides a line.
    axes.legend(fontsize=8, ncols=4, loc="upper center", bbox_to_anchor=(0.5, -0.2), frameon=False)
    figure.savefig(path, dpi=110)


def save_plots(steps: Sequence[StepSummary], plot_dir: str | Path) -> dict[str, Path]:
    """Write the four trend plots into `plot_dir`; returns name -> path (names as in PLOT_CAPTIONS)."""
    plot_dir = Path(plot_dir)
    plot_dir.mkdir(parents=True, exist_ok=True)
    xs = [s.step for s in steps]
    series = {
        "lengths": (
            "tokens",
            {
                "all": _series([s.mean_length for s in steps]),
                "correct": _series([s.mean_length_correct for s in steps]),
                "wrong": _series([s.mean_length_wrong for s in steps]),
            },
        ),
        "behaviors": (
            "% of judged responses",
            {b.replace("_", " "): _series([s.behavior_rates[b] for s in steps], 100) for b in BEHAVIORS},
        ),
        "ratios": (
            "%",
            {
                name.replace("_", " "): _series([getattr(s, name) for s in steps], 100)
                for name in ("accuracy", "box_ratio", "clip_ratio", "stop_ratio", "repeat_ratio", "reflection_ratio")
            },
        ),
        "keywords": (
            "mean count per response",
            {k: _series([s.keyword_means[k] for s in steps]) for k in REFLECTION_KEYWORDS},
        ),
    }
    paths = {}
    for name, (ylabel, lines) in series.items():
        paths[name] = plot_dir / f"{name}.png"
        _line_plot(paths[name], PLOT_CAPTIONS[name], ylabel, xs, lines)
    return paths
