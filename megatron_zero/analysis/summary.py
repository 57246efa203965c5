"""The results of a behaviour analysis: one response's metrics and verdict, one step's summary, the whole run's.

Why a module of its own: the pipeline builds these and the report renders them; both import this module and
neither imports the other, so there is no import circle between computing and rendering.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Optional

from megatron_zero.analysis.behaviors import Verdict
from megatron_zero.analysis.metrics import is_repetitive
from megatron_zero.analysis.records import SampleRecord

NUM_EXAMPLES_PER_STAGE = 3
NUM_SAMPLES_PER_STAGE = 6
STAGES = ("early", "late")


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


def stage_steps(steps: Sequence[int]) -> dict[str, list[int]]:
    """The steps of each stage: "early" the first third of the distinct steps, "late" the last third (one step at
    least; with one or two steps the stages share them)."""
    ordered = sorted(set(steps))
    if not ordered:
        raise ValueError("steps is empty; a stage needs at least one step")
    size = max(1, len(ordered) // 3)
    return {"early": ordered[:size], "late": ordered[-size:]}


def _spread_over_steps(by_step: dict[int, list[ResponseAnalysis]], steps: Sequence[int],
                       count: int) -> list[ResponseAnalysis]:
    """Up to `count` responses taking one per step in `steps` order, then a second per step, and so on."""
    chosen: list[ResponseAnalysis] = []
    depth = 0
    while len(chosen) < count and any(depth < len(by_step.get(step, ())) for step in steps):
        chosen.extend(by_step[step][depth] for step in steps if depth < len(by_step.get(step, ())))
        depth += 1
    return chosen[:count]


@dataclass(frozen=True)
class AnalysisResult:
    judge: str
    # Which judge and how it decides, in words the report prints (e.g. the rule judge's regex cues).
    judge_description: str
    inputs: list[str]
    responses: list[ResponseAnalysis]
    steps: list[StepSummary]

    @property
    def num_judge_errors(self) -> int:
        return sum(step.num_judge_errors for step in self.steps)

    def _stage_order(self, stage: str) -> list[int]:
        if stage not in STAGES:
            raise ValueError(f"stage={stage!r} is unknown; use one of {STAGES}")
        steps = stage_steps([s.step for s in self.steps])[stage]
        # Late examples come from the last steps first: they show where training ended up.
        return steps if stage == "early" else steps[::-1]

    def examples(self, behavior: str, stage: str, count: int = NUM_EXAMPLES_PER_STAGE) -> list[ResponseAnalysis]:
        """Up to `count` judged responses of `stage` showing `behavior`, one per step before a second per step."""
        by_step: dict[int, list[ResponseAnalysis]] = defaultdict(list)
        for response in self.responses:
            if response.verdict and response.verdict.behaviors[behavior]:
                by_step[response.record.step].append(response)
        return _spread_over_steps(by_step, self._stage_order(stage), count)

    def stage_samples(self, stage: str, count: int = NUM_SAMPLES_PER_STAGE) -> list[ResponseAnalysis]:
        """The first `count` responses of the stage's first (early) or last (late) step, each of another prompt:
        what the model wrote at the start and at the end, in the proportions it wrote it (the rollout's prompts
        are shuffled, so the first ones are a fair sample)."""
        steps = self._stage_order(stage)[:1]
        # One response per prompt: a prompt's samples often repeat each other.
        first_per_prompt: dict[str, ResponseAnalysis] = {}
        for response in self.responses:
            if response.record.step in steps:
                first_per_prompt.setdefault(response.record.prompt, response)
        return list(first_per_prompt.values())[:count]
