"""The rollout-sample record: the JSONL line format that the trainer and the evaluator write and the
behaviour analysis reads.

One JSON object per line, one line per generated response:

    {"step": 40,                 # training step (or checkpoint step of an evaluation), int >= 0
     "prompt": "...",            # the full prompt the model saw (template applied)
     "response": "...",          # the generated text, cut at the first end token
     "ground_truth": "42",       # the reference answer
     "reward": 1.0,              # the rule-based reward; 1.0 (CORRECT_REWARD) means correct
     "num_tokens": 187,          # response length in tokens, int >= 0
     "finish_reason": "stop",    # "stop" (end token) or "length" (cut at max_new_tokens)
     "benchmark": "math500"}     # optional: which benchmark an evaluation sample belongs to

Other keys are allowed and ignored. A record with a missing or mistyped field is an error naming the
file, the line and the field; nothing is silently skipped.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Optional

from megatron_zero.utils.files import atomic_write_text

FINISH_REASONS = ("stop", "length")
# Only a full-score reward counts as correct, so the format-aware reward (1 / 0.5 / -0.5 / -1)
# and the binary one (1 / 0) agree on what "correct" means.
CORRECT_REWARD = 1.0


def is_correct(reward: float) -> bool:
    return reward >= CORRECT_REWARD


@dataclass(frozen=True)
class SampleRecord:
    step: int
    prompt: str
    response: str
    ground_truth: str
    reward: float
    num_tokens: int
    finish_reason: str
    benchmark: Optional[str] = None

    def __post_init__(self) -> None:
        if isinstance(self.step, bool) or not isinstance(self.step, int) or self.step < 0:
            raise ValueError(f"field 'step'={self.step!r} must be an int >= 0")
        for name in ("prompt", "response", "ground_truth"):
            if not isinstance(getattr(self, name), str):
                raise ValueError(f"field {name!r}={getattr(self, name)!r} must be a string")
        if isinstance(self.reward, bool) or not isinstance(self.reward, (int, float)):
            raise ValueError(f"field 'reward'={self.reward!r} must be a number")
        if isinstance(self.num_tokens, bool) or not isinstance(self.num_tokens, int) or self.num_tokens < 0:
            raise ValueError(f"field 'num_tokens'={self.num_tokens!r} must be an int >= 0")
        if self.finish_reason not in FINISH_REASONS:
            raise ValueError(f"field 'finish_reason'={self.finish_reason!r} must be one of {list(FINISH_REASONS)}")
        if self.benchmark is not None and not isinstance(self.benchmark, str):
            raise ValueError(f"field 'benchmark'={self.benchmark!r} must be a string or absent")

    @property
    def correct(self) -> bool:
        return is_correct(self.reward)

    @classmethod
    def from_dict(cls, row: dict) -> "SampleRecord":
        missing = [name for name in ("step", "prompt", "response", "ground_truth", "reward", "num_tokens", "finish_reason") if name not in row]
        if missing:
            raise ValueError(f"missing field(s) {missing}; a sample record needs step, prompt, response, "
                             "ground_truth, reward, num_tokens, finish_reason")
        return cls(
            step=row["step"],
            prompt=row["prompt"],
            response=row["response"],
            ground_truth=row["ground_truth"],
            reward=row["reward"],
            num_tokens=row["num_tokens"],
            finish_reason=row["finish_reason"],
            benchmark=row.get("benchmark"),
        )

    def to_dict(self) -> dict:
        row = asdict(self)
        if self.benchmark is None:
            del row["benchmark"]
        return row


@dataclass(frozen=True)
class LoadedRecord:
    """A record plus where it came from ("file:line"), so every later finding can be traced back."""

    record: SampleRecord
    source: str


def read_sample_file(path: str | Path) -> Iterator[LoadedRecord]:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"sample file {path} does not exist")
    with path.open(encoding="utf-8") as f:
        for line_number, line in enumerate(f, start=1):
            if not line.strip():
                continue
            where = f"{path}:{line_number}"
            try:
                row = json.loads(line)
            except json.JSONDecodeError as error:
                raise ValueError(f"{where}: not valid JSON ({error.msg})") from error
            if not isinstance(row, dict):
                raise ValueError(f"{where}: expected a JSON object, got {type(row).__name__}")
            try:
                yield LoadedRecord(SampleRecord.from_dict(row), where)
            except ValueError as error:
                raise ValueError(f"{where}: {error}") from error


def sample_files_in(directory: str | Path) -> list[Path]:
    """The ``*.jsonl`` files of a directory of checkpoint evaluations (one file per step), sorted."""
    directory = Path(directory)
    if not directory.is_dir():
        raise NotADirectoryError(f"samples directory {directory} does not exist")
    files = sorted(directory.glob("*.jsonl"))
    if not files:
        raise FileNotFoundError(f"samples directory {directory} has no *.jsonl files")
    return files


def load_samples(paths: Iterable[str | Path]) -> list[LoadedRecord]:
    paths = list(paths)
    records = [loaded for path in paths for loaded in read_sample_file(path)]
    if not records:
        raise ValueError(f"no sample records in {[str(p) for p in paths]}")
    return records


def write_samples(records: Iterable[SampleRecord], path: str | Path) -> None:
    atomic_write_text(path, "".join(json.dumps(record.to_dict(), ensure_ascii=False) + "\n" for record in records))
