"""Behaviour analysis of rollout / evaluation samples across training steps.

Input: sample-record JSONL files (format in `megatron_zero.analysis.records`), e.g. the trainer's
rollout dumps or a folder of ``samples_step*.jsonl`` from `megatron_zero.evaluation`.
Per response: correctness, length, finish reason, box, repetition, reflection keywords and (for up to
`max_judge_samples` responses per step) the four cognitive behaviours from a judge.
Per step: the means and ratios of those (`StepSummary`, in summary.py with the other result types).

`write_analysis` writes into one folder:
  responses.jsonl   one line per response with its metrics and verdict
  steps.jsonl       one line per step (the `StepSummary` fields)
  plots/*.png       lengths, behaviour rates, ratios, keyword counts across steps
  report.html       one self-contained page (images embedded) for sharing

Run it through ``python tools/analyze_behaviors.py --samples-dir eval_out --out analysis_out``.
"""

from __future__ import annotations

import json
import logging
import random
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Optional

import numpy as np

from megatron_zero.analysis.behaviors import BEHAVIORS, BehaviorJudge
from megatron_zero.analysis.metrics import REFLECTION_KEYWORDS, has_box, keyword_counts, repetition_ratio
from megatron_zero.analysis.plots import save_plots
from megatron_zero.analysis.records import LoadedRecord
from megatron_zero.analysis.report import render_report
from megatron_zero.analysis.summary import AnalysisResult, ResponseAnalysis, StepSummary

logger = logging.getLogger(__name__)

def _mean(values: Sequence[float]) -> Optional[float]:
    return float(np.mean(values)) if len(values) else None


def _summarize_step(step: int, items: list[ResponseAnalysis]) -> StepSummary:
    records = [item.record for item in items]
    judged = [item.verdict for item in items if item.verdict is not None]
    return StepSummary(
        step=step,
        num_responses=len(items),
        accuracy=_mean([r.correct for r in records]),
        mean_reward=_mean([r.reward for r in records]),
        mean_length=_mean([r.num_tokens for r in records]),
        mean_length_correct=_mean([r.num_tokens for r in records if r.correct]),
        mean_length_wrong=_mean([r.num_tokens for r in records if not r.correct]),
        clip_ratio=_mean([r.finish_reason == "length" for r in records]),
        stop_ratio=_mean([r.finish_reason == "stop" for r in records]),
        box_ratio=_mean([item.has_box for item in items]),
        repeat_ratio=_mean([item.repetitive for item in items]),
        reflection_ratio=_mean([sum(item.keyword_counts.values()) > 0 for item in items]),
        keyword_means={k: _mean([item.keyword_counts[k] for item in items]) for k in REFLECTION_KEYWORDS},
        num_judged=len(judged),
        behavior_rates={b: _mean([v.behaviors[b] for v in judged]) for b in BEHAVIORS},
        num_judge_errors=sum(v.error is not None for v in judged),
    )


def _judged_indices(indices_by_step: dict[int, list[int]], max_judge_samples: Optional[int], seed: int) -> list[int]:
    chosen = []
    for step, indices in sorted(indices_by_step.items()):
        if max_judge_samples is None or len(indices) <= max_judge_samples:
            chosen.extend(indices)
        else:
            # A str seed is hashed deterministically (unlike tuples), so reruns judge the same responses.
            chosen.extend(sorted(random.Random(f"{seed}:{step}").sample(indices, max_judge_samples)))
    return chosen


def analyze(
    samples: Sequence[LoadedRecord],
    judge: BehaviorJudge,
    *,
    max_judge_samples: Optional[int] = None,
    seed: int = 0,
) -> AnalysisResult:
    """Metrics for every response, behaviours for up to `max_judge_samples` per step, step summaries."""
    if not samples:
        raise ValueError("no samples to analyze")
    if max_judge_samples is not None and max_judge_samples < 0:
        raise ValueError(f"max_judge_samples={max_judge_samples} must be >= 0 or None (judge all)")
    indices_by_step: dict[int, list[int]] = defaultdict(list)
    for index, loaded in enumerate(samples):
        indices_by_step[loaded.record.step].append(index)
    to_judge = _judged_indices(indices_by_step, max_judge_samples, seed)
    logger.info("judging %d of %d responses with the %s judge", len(to_judge), len(samples), judge.name)
    verdicts = dict(zip(to_judge, judge.judge([(samples[i].record.prompt, samples[i].record.response) for i in to_judge])))
    responses = [
        ResponseAnalysis(
            source=loaded.source,
            record=loaded.record,
            has_box=has_box(loaded.record.response),
            repetition_ratio=repetition_ratio(loaded.record.response),
            keyword_counts=keyword_counts(loaded.record.response),
            verdict=verdicts.get(index),
        )
        for index, loaded in enumerate(samples)
    ]
    steps = [
        _summarize_step(step, [responses[i] for i in indices]) for step, indices in sorted(indices_by_step.items())
    ]
    inputs = list(dict.fromkeys(loaded.source.rsplit(":", 1)[0] for loaded in samples))
    return AnalysisResult(judge=judge.name, judge_description=judge.description, inputs=inputs, responses=responses,
                          steps=steps)


def write_analysis(result: AnalysisResult, out_dir: str | Path) -> dict[str, Path]:
    """Write responses.jsonl, steps.jsonl, plots/*.png and report.html; returns their paths."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = {"responses": out_dir / "responses.jsonl", "steps": out_dir / "steps.jsonl"}
    with paths["responses"].open("w", encoding="utf-8") as f:
        for response in result.responses:
            f.write(json.dumps(response.to_dict(), ensure_ascii=False) + "\n")
    with paths["steps"].open("w", encoding="utf-8") as f:
        for step in result.steps:
            f.write(json.dumps(asdict(step)) + "\n")
    plots = save_plots(result.steps, out_dir / "plots")
    paths.update({f"plot_{name}": path for name, path in plots.items()})
    paths["report"] = out_dir / "report.html"
    paths["report"].write_text(render_report(result, plots), encoding="utf-8")
    return paths
