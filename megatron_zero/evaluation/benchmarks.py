"""Benchmark registry: read the six zero-RL math benchmarks from local files in their public formats.

Each benchmark is one declarative `BenchmarkSpec`: the folder name under ``data_dir``, the question
field(s) and how to get the final answer out of a row. Files follow the Qwen2.5-Math evaluation layout
(``{data_dir}/{name}/test.jsonl``, as shipped by QwenLM/Qwen2.5-Math and hkust-nlp/simpleRL-reason);
``test.parquet`` or ``test.json`` (a JSON list of rows) are read too. Field names of the public files:

  gsm8k          question | answer "... #### 42"      (openai/gsm8k)
  math500        problem  | answer                    (HuggingFaceH4/MATH-500)
  minerva_math   problem  | solution with \\boxed{..}  (last box is the answer)
  olympiadbench  question | final_answer ["$...$"]    (first entry, outer $ stripped)
  aime24         problem  | answer
  amc23          question | answer (a number, e.g. 27.0)

Re-packaged copies sometimes rename "question" <-> "problem", so a spec lists the question fields it
accepts in order of preference. Usage::

    problems = load_benchmark("math500", "data/eval")
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from megatron_zero.data.splits import ROW_FILE_SUFFIXES, gsm8k_final_answer, read_rows
from megatron_zero.rewards.extraction import last_boxed

logger = logging.getLogger(__name__)

SPLIT = "test"


@dataclass(frozen=True)
class Problem:
    benchmark: str
    index: int
    question: str
    answer: str


def _scalar(value: Any) -> str:
    # AMC23 stores answers as floats (27.0); write integral ones as integers so graders see "27".
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    return str(value).strip()


def _gsm8k_answer(row: dict) -> str:
    return gsm8k_final_answer(str(row["answer"]), "GSM8K row")


def _boxed_solution_answer(row: dict) -> str:
    answer = last_boxed(str(row["solution"]))
    if answer is None:
        raise ValueError("'solution' has no complete \\boxed{...} answer")
    return answer.strip()


def _olympiad_answer(row: dict) -> str:
    answers = row["final_answer"]
    if not isinstance(answers, (list, tuple)) or not answers:
        raise ValueError(f"'final_answer' must be a non-empty list, got {answers!r}")
    return str(answers[0]).strip().strip("$").strip()


@dataclass(frozen=True)
class BenchmarkSpec:
    name: str
    display_name: str
    question_fields: tuple[str, ...]
    answer_field: str
    extract_answer: Callable[[dict], str]


_SPECS = (
    BenchmarkSpec("gsm8k", "GSM8K", ("question", "problem"), "answer", _gsm8k_answer),
    BenchmarkSpec("math500", "MATH500", ("problem", "question"), "answer", lambda row: _scalar(row["answer"])),
    BenchmarkSpec("minerva_math", "Minerva Math", ("problem", "question"), "solution", _boxed_solution_answer),
    BenchmarkSpec("olympiadbench", "OlympiadBench", ("question", "problem"), "final_answer", _olympiad_answer),
    BenchmarkSpec("aime24", "AIME24", ("problem", "question"), "answer", lambda row: _scalar(row["answer"])),
    BenchmarkSpec("amc23", "AMC23", ("question", "problem"), "answer", lambda row: _scalar(row["answer"])),
)
BENCHMARKS: dict[str, BenchmarkSpec] = {spec.name: spec for spec in _SPECS}


def get_benchmark(name: str) -> BenchmarkSpec:
    if name not in BENCHMARKS:
        raise ValueError(f"unknown benchmark {name!r}; valid benchmarks: {', '.join(BENCHMARKS)}")
    return BENCHMARKS[name]


def benchmark_file(name: str, data_dir: str | Path) -> Path:
    """The file of benchmark `name` under `data_dir`; raises naming every path tried if none exists."""
    get_benchmark(name)
    candidates = [Path(data_dir) / name / f"{SPLIT}{suffix}" for suffix in ROW_FILE_SUFFIXES]
    for path in candidates:
        if path.is_file():
            return path
    raise FileNotFoundError(
        f"benchmark {name!r}: no data file; looked for {', '.join(str(p) for p in candidates)}. "
        f"Put the public {name} test split there or fix --data-dir {str(data_dir)!r}"
    )


def load_benchmark(name: str, data_dir: str | Path, max_problems: int | None = None) -> list[Problem]:
    """Read benchmark `name` from `data_dir`: one `Problem` per row, in file order."""
    spec = get_benchmark(name)
    path = benchmark_file(name, data_dir)
    rows = read_rows(path)
    if max_problems is not None:
        rows = rows[:max_problems]
    problems = []
    for index, row in enumerate(rows):
        where = f"{path} row {index}"
        if not isinstance(row, dict):
            raise ValueError(f"{where}: expected a JSON object, got {type(row).__name__}")
        question_field = next((key for key in spec.question_fields if row.get(key)), None)
        if question_field is None:
            raise ValueError(f"{where}: no question; expected one of the fields {list(spec.question_fields)}")
        if spec.answer_field not in row:
            raise ValueError(f"{where}: missing answer field {spec.answer_field!r} of the public {name} format")
        try:
            answer = spec.extract_answer(row)
        except ValueError as error:
            raise ValueError(f"{where}: {error}") from error
        problems.append(Problem(benchmark=name, index=index, question=str(row[question_field]).strip(), answer=answer))
    if not problems:
        raise ValueError(f"{path}: benchmark {name!r} has no problems")
    logger.info("loaded %d problems of %s from %s", len(problems), name, path)
    return problems
