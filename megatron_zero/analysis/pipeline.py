"""Behaviour analysis of rollout / evaluation samples across training steps.

Input: sample-record JSONL files (format in `megatron_zero.analysis.records`), e.g. the trainer's
rollout dumps or a folder of ``samples_step*.jsonl`` from `megatron_zero.evaluation`.
Per response: correctness, length, finish reason, box, repetition, reflection keywords and (for up to
`max_judge_samples` responses per step) the four cognitive behaviours from a judge.
Per step: the means and ratios of those (`StepSummary`).

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
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Optional

import numpy as np

from megatron_zero.analysis.behaviors import BEHAVIORS, BehaviorJudge, Verdict
from megatron_zero.analysis.metrics import REFLECTION_KEYWORDS, has_box, is_repetitive, keyword_counts, repetition_ratio
from megatron_zero.analysis.records import LoadedRecord, SampleRecord
from megatron_zero.analysis.report import render_report, save_plots

logger = logging.getLogger(__name__)

NUM_EXAMPLES_PER_BEHAVIOR = 3


@dataclass(frozen=True)
class ResponseAnalysis:
    source: str
    record: SampleRecord
    has_box: bool
    repetition_ratio: float
    keyword_counts: dict[str, int]
    verdict: Optional[Verdict]  # None when this response was not among the judged sample

    @property
    def repetitive(self) -> bool:
        return is_repetitive(self.repetition_ratio)

    def to_dict(self) -> dict:
        record = self.record
        return {
            "source": self.source,
            "step": record.step,
            "benchmark": record.benchmark,
            "reward": record.reward,
            "correct": record.correct,
            "num_tokens": record.num_tokens,
            "finish_reason": record.finish_reason,
            "has_box": self.has_box,
            "repetition_ratio": self.repetition_ratio,
            "repetitive": self.repetitive,
            "keyword_counts": self.keyword_counts,
            "behaviors": self.verdict.behaviors if self.verdict else None,
            "behavior_evidence": self.verdict.evidence if self.verdict else None,
            "judge_source": self.verdict.source if self.verdict else None,
            "judge_error": self.verdict.error if self.verdict else None,
            "response": record.response,
        }


@dataclass(frozen=True)
class StepSummary:
    step: int
    num_responses: int
    accuracy: float
    mean_reward: float
    mean_length: float
    mean_length_correct: Optional[float]  # None when no response of the step is correct
    mean_length_wrong: Optional[float]  # None when every response is correct
    clip_ratio: float  # finish_reason == "length"
    stop_ratio: float  # finish_reason == "stop"
    box_ratio: float
    repeat_ratio: float  # share of responses with repetition_ratio > 0
    reflection_ratio: float  # share of responses with at least one reflection keyword
    keyword_means: dict[str, float]  # mean occurrences per response
    num_judged: int
    behavior_rates: dict[str, Optional[float]]  # share of judged responses; None when none judged
    num_judge_errors: int


@dataclass(frozen=True)
class AnalysisResult:
    judge: str
    inputs: list[str]
    responses: list[ResponseAnalysis]
    steps: list[StepSummary]

    @property
    def num_judge_errors(self) -> int:
        return sum(step.num_judge_errors for step in self.steps)

    def examples(self, behavior: str, count: int = NUM_EXAMPLES_PER_BEHAVIOR) -> list[ResponseAnalysis]:
        """Up to `count` responses showing `behavior`, from steps spread from the last to the first
        (one per step while steps last), so the examples show how the behaviour changed."""
        by_step: dict[int, list[ResponseAnalysis]] = defaultdict(list)
        for response in self.responses:
            if response.verdict and response.verdict.behaviors[behavior]:
                by_step[response.record.step].append(response)
        steps = sorted(by_step, reverse=True)
        if len(steps) > count > 1:
            steps = [steps[round(i * (len(steps) - 1) / (count - 1))] for i in range(count)]
        chosen = []
        for rank in range(count):
            chosen.extend(by_step[step][rank] for step in steps if rank < len(by_step[step]))
        return chosen[:count]


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
    return AnalysisResult(judge=judge.name, inputs=inputs, responses=responses, steps=steps)


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
