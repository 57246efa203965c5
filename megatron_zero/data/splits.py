"""The paper's Easy / Medium / Hard training sets, built from MATH and GSM8K rows in their public formats.

Why: SimpleRL-Zoo matches data difficulty to the base model (shared/reference/RECIPE.md): Easy = GSM8K + MATH
level 1, Medium = MATH levels 1-4, Hard = MATH levels 3-5, about 8k problems each.

Public formats read here:
  MATH   problem | solution (final answer = last \\boxed{...}) | level "Level 3" (a few rows say "Level ?") | type
  GSM8K  question | answer "... #### 1,250" (final answer after "####", thousands separators removed)

Files: ``read_rows`` reads .jsonl, .json (a list of rows, or one row: the original MATH release is a folder tree of
one-problem .json files, e.g. MATH/train/algebra/1.json) and .parquet files, and folders of them.

How: ``rows = build_difficulty_split("hard", math_rows, gsm8k_rows)`` gives uniform rows (uid, question, answer,
level, source); ``write_jsonl(rows, "hard.jsonl")`` and train with ``DatasetConfig(path="hard.jsonl",
uid_field="uid", level_field="level", source_field="source")``. From the shell::

    megatron-zero data --split hard --math MATH/train --out data/hard.jsonl
    megatron-zero data --split easy --math math_train.parquet --gsm8k gsm8k_train.jsonl --out data/easy.jsonl
"""

import dataclasses
import json
import logging
import random
import re
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any, Optional

from megatron_zero.rewards.extraction import last_boxed
from megatron_zero.utils.files import atomic_write_text

logger = logging.getLogger(__name__)

_MATH_LEVEL = re.compile(r"Level (\d)")


ROW_FILE_SUFFIXES = (".jsonl", ".parquet", ".json")
# DatasetConfig fields (data.train.<key>=<value>) that read a written split; question/answer are the defaults.
SPLIT_DATASET_FIELDS = {"uid_field": "uid", "level_field": "level", "source_field": "source"}


def read_rows(path: str | Path) -> list[dict[str, Any]]:
    """The rows of a .jsonl / .json / .parquet file, or of every such file under a folder (sorted by path)."""
    try:
        return _read_rows(Path(path))
    except UnicodeDecodeError as error:  # raised deep in a file's reading, where the file's name is not said
        raise ValueError(f"{path}: not UTF-8 text ({error.reason} at byte {error.start})") from None


def _read_rows(path: Path) -> list[dict[str, Any]]:
    if path.is_dir():
        files = sorted(file for file in path.rglob("*") if file.is_file() and file.suffix in ROW_FILE_SUFFIXES)
        if not files:
            raise ValueError(f"{path}: a folder without {'/'.join(ROW_FILE_SUFFIXES)} files")
        return [row for file in files for row in read_rows(file)]
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist")
    if path.suffix == ".parquet":
        import pyarrow.parquet as pq

        return pq.read_table(path).to_pylist()
    if path.suffix == ".json":
        try:
            rows = json.loads(path.read_text(encoding="utf-8"))
        except json.JSONDecodeError as error:
            raise ValueError(f"{path}: not valid JSON ({error.msg} at line {error.lineno})") from None
        rows = [rows] if isinstance(rows, dict) else rows
        if not isinstance(rows, list) or not all(isinstance(row, dict) for row in rows):
            raise ValueError(f"{path}: expected a JSON object or a list of objects")
        return rows
    if path.suffix != ".jsonl":
        raise ValueError(f"{path}: unsupported file type; use one of {list(ROW_FILE_SUFFIXES)}")
    rows = []
    with path.open(encoding="utf-8") as f:
        for line_number, line in enumerate(f, start=1):
            if line.strip():
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError as error:
                    raise ValueError(f"{path}:{line_number}: not valid JSON ({error.msg})") from None
    return rows


def _require(row: Mapping[str, Any], fields: tuple[str, ...], where: str) -> None:
    for field in fields:
        if row.get(field) is None:
            raise ValueError(f"{where}: field {field!r} is missing or null; the row has keys {sorted(row)}")


def read_math_rows(rows: Iterable[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """Uniform rows from MATH rows; level is an int 1-5, or None for the few "Level ?" rows."""
    out = []
    for index, row in enumerate(rows):
        where = f"MATH row {index}"
        _require(row, ("problem", "solution", "level"), where)
        answer = last_boxed(str(row["solution"]))
        if answer is None or not answer.strip():
            raise ValueError(f"{where}: 'solution' has no complete \\boxed{{...}} answer")
        level = _MATH_LEVEL.fullmatch(str(row["level"]).strip())
        out.append(
            {
                "uid": f"math-{index}",
                "question": str(row["problem"]).strip(),
                "answer": answer.strip(),
                "level": int(level.group(1)) if level else None,
                "source": "math",
            }
        )
    return out


def gsm8k_final_answer(text: str, where: str) -> str:
    """The number after GSM8K's "####" marker, thousands separators removed ("#### 1,250" -> "1250")."""
    if "####" not in text:
        raise ValueError(f"{where}: 'answer' has no '####' final-answer marker: {text[-80:]!r}")
    answer = text.rsplit("####", 1)[1].strip().replace(",", "")
    if not answer:
        raise ValueError(f"{where}: nothing after '####' in 'answer'")
    return answer


def read_gsm8k_rows(rows: Iterable[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """Uniform rows from GSM8K rows; the answer is the number after "####" without thousands separators."""
    out = []
    for index, row in enumerate(rows):
        where = f"GSM8K row {index}"
        _require(row, ("question", "answer"), where)
        answer = gsm8k_final_answer(str(row["answer"]), where)
        question = str(row["question"]).strip()
        out.append({"uid": f"gsm8k-{index}", "question": question, "answer": answer, "level": None, "source": "gsm8k"})
    return out


@dataclasses.dataclass(frozen=True)
class DifficultySplit:
    include_gsm8k: bool
    math_levels: tuple[int, ...]


DIFFICULTY_SPLITS: dict[str, DifficultySplit] = {
    "easy": DifficultySplit(include_gsm8k=True, math_levels=(1,)),
    "medium": DifficultySplit(include_gsm8k=False, math_levels=(1, 2, 3, 4)),
    "hard": DifficultySplit(include_gsm8k=False, math_levels=(3, 4, 5)),
}


def build_difficulty_split(
    name: str,
    math_rows: Iterable[Mapping[str, Any]],
    gsm8k_rows: Iterable[Mapping[str, Any]] = (),
    max_problems: Optional[int] = None,
    seed: int = 0,
) -> list[dict[str, Any]]:
    """Rows of split `name` from public-format MATH and GSM8K rows; `max_problems` subsamples (the paper: ~8k)."""
    if name not in DIFFICULTY_SPLITS:
        raise ValueError(f"difficulty split {name!r} is unknown; use one of {sorted(DIFFICULTY_SPLITS)}")
    split = DIFFICULTY_SPLITS[name]
    gsm8k_rows = list(gsm8k_rows)
    if gsm8k_rows and not split.include_gsm8k:
        raise ValueError(f"difficulty split {name!r} is MATH levels {list(split.math_levels)} only; it has no place "
                         f"for the {len(gsm8k_rows)} GSM8K rows given (only 'easy' includes GSM8K); leave them out")
    math = read_math_rows(math_rows)
    unknown_level = sum(row["level"] is None for row in math)
    if unknown_level:
        logger.warning("MATH: %d rows without a numeric level (e.g. 'Level ?') are in no split", unknown_level)
    rows = [row for row in math if row["level"] in split.math_levels]
    if split.include_gsm8k:
        gsm8k = read_gsm8k_rows(gsm8k_rows)
        if not gsm8k:
            raise ValueError(f"difficulty split {name!r} includes GSM8K, but no GSM8K rows were given")
        rows += gsm8k
    if not rows:
        raise ValueError(f"difficulty split {name!r} is empty: no MATH rows of levels {list(split.math_levels)}")
    if max_problems is not None and len(rows) > max_problems:
        rows = random.Random(seed).sample(rows, max_problems)
    logger.info("difficulty split %r: %d problems", name, len(rows))
    return rows


def write_jsonl(rows: Iterable[Mapping[str, Any]], path: str | Path) -> None:
    atomic_write_text(path, "".join(json.dumps(dict(row), ensure_ascii=False) + "\n" for row in rows))
