"""The demo run's before/after table: what the first and the last steps' samples show, from its output folder.

Why: docs/benchmarks.md and assets/README.md quote these numbers; computing them from the run's files (not by
hand) keeps them honest. Each figure is the mean over the first `window` and over the last `window` steps:
sampled accuracy, mean length of correct and wrong responses, box ratio, the rule judge's behaviour rates (from
analysis/steps.jsonl) and the demo's answer-pattern shares (patterns.py), plus the held-out curve.

How: ``python tools/demo_story.py OUT_DIR`` after ``megatron-zero demo --output-dir OUT_DIR``.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Optional

from megatron_zero.analysis.behaviors import BEHAVIORS
from megatron_zero.demo.patterns import pattern_rates


def _read_jsonl(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _mean(values: Sequence[Optional[float]]) -> Optional[float]:
    present = [v for v in values if v is not None]
    return sum(present) / len(present) if present else None


def demo_story(out_dir: str | Path, window: int = 5) -> dict[str, Any]:
    """{"first_steps", "last_steps", "held_out", "first", "last"}: "first" / "last" map each measure to its mean
    over the first / last `window` steps."""
    out_dir = Path(out_dir)
    steps = _read_jsonl(out_dir / "analysis" / "steps.jsonl")
    if len(steps) < 2 * window:
        raise ValueError(f"window={window} needs at least {2 * window} steps; {out_dir} has {len(steps)}")
    summary = json.loads((out_dir / "summary.json").read_text())

    def measures(chosen: list[dict[str, Any]]) -> dict[str, Optional[float]]:
        responses = [row["response"] for s in chosen
                     for row in _read_jsonl(out_dir / "samples" / f"step_{s['step']}.jsonl")]
        result = {
            "accuracy": _mean([s["accuracy"] for s in chosen]),
            "length_correct": _mean([s["mean_length_correct"] for s in chosen]),
            "length_wrong": _mean([s["mean_length_wrong"] for s in chosen]),
            "box_ratio": _mean([s["box_ratio"] for s in chosen]),
        }
        result.update({b: _mean([s["behavior_rates"][b] for s in chosen]) for b in BEHAVIORS})
        result.update({f"pattern_{name}": share for name, share in pattern_rates(responses).items()})
        return result

    return {"first_steps": [s["step"] for s in steps[:window]], "last_steps": [s["step"] for s in steps[-window:]],
            "held_out": summary["eval_history"], "first": measures(steps[:window]), "last": measures(steps[-window:])}
