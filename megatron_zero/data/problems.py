"""Training problems: read a dataset with configurable field names, build prompts, check their lengths.

Why: the trainer needs, per problem, the prompt text sent to the engine, the ground truth the reward compares
against, and a stable id. Bad data must fail before any rollout with the field, file, row and available keys
named; over-long prompts are counted and reported, and dropped only when the config says so.

How: ``problems = load_problems(DatasetConfig(path="data/hard.jsonl"), tokenizer)``. Files are read through
`datasets` (json / parquet builders, save_to_disk folders, hub names); `problems_from_rows` takes rows already
in memory (e.g. from `megatron_zero.data.splits.build_difficulty_split`).
"""

import dataclasses
import logging
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any, Optional

from megatron_zero.config.data import DatasetConfig
from megatron_zero.data.templates import make_prompt_formatter
from megatron_zero.utils.json_lines import first_json_error

logger = logging.getLogger(__name__)

_FILE_BUILDERS = {".jsonl": "json", ".json": "json", ".parquet": "parquet"}
# How many offending ids an error or log line shows.
_NUM_EXAMPLES = 5


# How the user types a DatasetConfig field, for errors and hints: its key in the training config by default; the
# held-out set (eval.path) and the `difficulty` command (its flags) name the same fields their own way.
DatasetKeys = Callable[[str], str]


def train_keys(field: str) -> str:
    return f"data.train.{field}"


def eval_set_keys(field: str) -> str:
    """eval.path is read with data.train's other settings (the trainer's held-out set)."""
    return "eval.path" if field == "path" else train_keys(field)


@dataclasses.dataclass(frozen=True)
class Problem:
    uid: str
    question: str
    # The template applied to the question: what the rollout engine is given.
    prompt_text: str
    ground_truth: str
    # "level" / "source" when the config names those fields.
    metadata: dict[str, Any] = dataclasses.field(default_factory=dict)


def _read_dataset(config: DatasetConfig, keys: DatasetKeys):
    import datasets

    key = keys("path")
    if not config.path:
        raise ValueError(f"{key}='' is not set; point it at a .jsonl/.json/.parquet file, a folder or a hub name")
    path = Path(config.path)
    if path.is_file():
        if path.suffix not in _FILE_BUILDERS:
            raise ValueError(f"{key}={config.path!r}: unsupported file type; use one of {sorted(_FILE_BUILDERS)}")
        if path.stat().st_size == 0:
            raise ValueError(f"{key}={config.path!r} is an empty file")
        try:
            return datasets.load_dataset(
                _FILE_BUILDERS[path.suffix], data_files=str(path), split="train", cache_dir=config.cache_dir
            )
        except Exception as error:  # datasets wraps the parser's error (pyarrow's, for JSON lines) in its own
            cause = error
            while cause.__cause__ is not None:
                cause = cause.__cause__
            # pyarrow names a byte position ("position 39"); the line is what a user can find and fix.
            broken = first_json_error(path) if _FILE_BUILDERS[path.suffix] == "json" else None
            if broken is not None:
                raise ValueError(f"{key}={config.path!r} is not valid JSON at {broken}") from error
            raise ValueError(f"{key}={config.path!r} cannot be read as {_FILE_BUILDERS[path.suffix]}: "
                             f"{type(cause).__name__}: {cause}") from error
    if path.is_dir() and (path / "dataset_dict.json").is_file():
        return datasets.load_from_disk(str(path))[config.split]
    if path.is_dir() and (path / "dataset_info.json").is_file():
        return datasets.load_from_disk(str(path))
    if not path.exists() and (path.suffix in _FILE_BUILDERS or config.path.startswith((".", "/"))):
        raise ValueError(f"{key}={config.path!r} does not exist")
    if path.exists():
        raise ValueError(f"{key}={config.path!r} is neither a data file nor a datasets save_to_disk folder")
    return datasets.load_dataset(config.path, split=config.split, cache_dir=config.cache_dir)


def _answer_text(value: Any) -> str:
    # Some sets store answers as floats (27.0); graders should see "27".
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    return str(value).strip()


def problems_from_rows(
    rows: Iterable[Mapping[str, Any]], config: DatasetConfig, tokenizer: Optional[Any] = None, origin: str = "rows",
    keys: DatasetKeys = train_keys,
) -> list[Problem]:
    """One `Problem` per row; `origin` names the rows' file in errors and default uids, `keys` the fields."""
    format_prompt = make_prompt_formatter(config.template, tokenizer)
    stem = Path(origin).stem
    required = [config.question_field, config.answer_field]
    optional = {"level": config.level_field, "source": config.source_field}
    fields = required + [field for field in (config.uid_field, *optional.values()) if field]
    # Metadata may be null in a row (GSM8K problems of the Easy split have no MATH level), but its field must exist.
    nullable = {field for field in optional.values() if field}
    problems = []
    seen_uids: dict[str, int] = {}
    for row_index, row in enumerate(rows):
        for field in fields:
            if (field not in row) if field in nullable else (row.get(field) is None):
                raise ValueError(
                    f"{origin} row {row_index}: field {field!r} is missing{'' if field in nullable else ' or null'}; "
                    f"the row has keys {sorted(key for key, value in row.items() if value is not None)}. Fix the file "
                    f"or set {keys(field_name(config, field))}"
                )
        question = str(row[config.question_field]).strip()
        ground_truth = _answer_text(row[config.answer_field])
        if not question or not ground_truth:
            empty = config.question_field if not question else config.answer_field
            raise ValueError(f"{origin} row {row_index}: field {empty!r} is empty")
        uid = str(row[config.uid_field]) if config.uid_field else f"{stem}-{row_index}"
        if uid in seen_uids:
            raise ValueError(f"{origin} rows {seen_uids[uid]} and {row_index} share uid {uid!r}; uids must be unique")
        seen_uids[uid] = row_index
        metadata = {key: row[field] for key, field in optional.items() if field}
        problems.append(Problem(uid, question, format_prompt(question), ground_truth, metadata))
    if not problems:
        raise ValueError(f"{origin} has no rows")
    if tokenizer is not None and config.max_prompt_tokens is not None:
        problems = _check_prompt_lengths(problems, tokenizer, config, origin, keys)
    return problems


# The DatasetConfig attributes that name a row's fields.
_FIELD_NAMES = ("question_field", "answer_field", "uid_field", "level_field", "source_field")


def field_name(config: DatasetConfig, field: str) -> str:
    """Which DatasetConfig attribute names the row field ``field`` (the first, when several name the same one)."""
    return next(name for name in _FIELD_NAMES if getattr(config, name) == field)


def _check_prompt_lengths(problems: list[Problem], tokenizer: Any, config: DatasetConfig, origin: str,
                          keys: DatasetKeys) -> list[Problem]:
    lengths = [len(ids) for ids in tokenizer([problem.prompt_text for problem in problems])["input_ids"]]
    overlong = [problem.uid for problem, length in zip(problems, lengths) if length > config.max_prompt_tokens]
    if not overlong:
        return problems
    summary = (
        f"{origin}: {len(overlong)} of {len(problems)} prompts are longer than {keys('max_prompt_tokens')}="
        f"{config.max_prompt_tokens} tokens (longest {max(lengths)}); first: {overlong[:_NUM_EXAMPLES]}"
    )
    if not config.filter_overlong:
        raise ValueError(f"{summary}. Set {keys('filter_overlong')}=true to drop them, or raise "
                         f"{keys('max_prompt_tokens')}")
    logger.warning("%s; dropped (%s=true)", summary, keys("filter_overlong"))
    dropped = set(overlong)
    return [problem for problem in problems if problem.uid not in dropped]


def load_problems(config: DatasetConfig, tokenizer: Optional[Any] = None, keys: DatasetKeys = train_keys
                  ) -> list[Problem]:
    """Read `config.path` and build one `Problem` per row (prompt lengths checked when `tokenizer` is given);
    `keys` names the fields in errors as the user typed them (default: the training config's data.train.*)."""
    dataset = _read_dataset(config, keys)
    problems = problems_from_rows(dataset, config, tokenizer, origin=config.path, keys=keys)
    logger.info("loaded %d problems from %s (template %r)", len(problems), config.path, config.template)
    return problems
