"""Is an HF model directory whole: weights that hold every byte their headers promise, and files that parse.

Why: an interrupted download or copy leaves a shard cut short or a tokenizer.json half written. Loaded anyway, it
fails inside an engine or a Ray worker minutes later ("SafetensorError: invalid header length", a bare
JSONDecodeError with no file name). Reading each safetensors header (8 bytes of length, then JSON with every
tensor's byte range) says whether the file is long enough without reading the tensors: milliseconds per shard.

How: ``damaged_model_files(folder, "--model")`` -> one line per damaged file, [] when whole. Files that are
absent are ``check_model_files``'s to report (preflight/generation.py).
"""

from __future__ import annotations

import json
import struct
from pathlib import Path

from megatron_zero.models.hf_io import INDEX_NAME, SINGLE_NAME

# JSON files a generating command parses at start (config.json has its own check: preflight/architecture.py).
PARSED_FILES = ("tokenizer.json", "tokenizer_config.json", "generation_config.json")
_HEADER_LENGTH_BYTES = 8
# A safetensors header is JSON of at most a few MB; a larger length field means the file is not safetensors.
_MAX_HEADER_BYTES = 100 * 1024**2


def damaged_model_files(folder: Path, key: str) -> list[str]:
    """One line per damaged weight shard, broken index or unparsable tokenizer / generation file in ``folder``."""
    problems = []
    for name in PARSED_FILES:
        problem = _json_problem(folder / name)
        if problem:
            problems.append(f"{key}={str(folder)!r}: {name} {problem}; copy it again from the model's source")
    shards, index_problem = _weight_files(folder)
    if index_problem:
        problems.append(f"{key}={str(folder)!r}: {index_problem}")
    for shard in shards:
        problem = _safetensors_problem(shard)
        if problem:
            problems.append(f"{key}={str(folder)!r}: {shard.name} is damaged ({problem}); download it again")
    return problems


def _json_problem(path: Path) -> str | None:
    if not path.is_file():
        return None
    try:
        json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as error:
        return f"is not valid JSON ({error.msg} at line {error.lineno}; {path.stat().st_size} bytes, cut short?)"
    except UnicodeDecodeError as error:
        return f"is not UTF-8 text ({error.reason} at byte {error.start})"
    return None


def _weight_files(folder: Path) -> tuple[list[Path], str | None]:
    """The safetensors files the model loads, and what is wrong with its index (None: nothing)."""
    index = folder / INDEX_NAME
    if not index.is_file():
        return ([folder / SINGLE_NAME] if (folder / SINGLE_NAME).is_file() else []), None
    problem = _json_problem(index)
    if problem:
        return [], f"{INDEX_NAME} {problem}"
    weight_map = json.loads(index.read_text(encoding="utf-8")).get("weight_map")
    if not isinstance(weight_map, dict) or not weight_map:
        return [], f"{INDEX_NAME} has no weight_map"
    names = sorted(set(weight_map.values()))
    absent = [name for name in names if not (folder / name).is_file()]
    if absent:
        return [], f"{INDEX_NAME} lists {len(absent)} shard(s) that are not there: {', '.join(absent[:3])}"
    return [folder / name for name in names], None


def _safetensors_problem(path: Path) -> str | None:
    """What a safetensors file lacks against its own header, or None when every tensor's bytes are there."""
    size = path.stat().st_size
    with path.open("rb") as f:
        head = f.read(_HEADER_LENGTH_BYTES)
        if len(head) < _HEADER_LENGTH_BYTES:
            return f"{size} bytes, shorter than a safetensors header"
        (header_bytes,) = struct.unpack("<Q", head)
        if header_bytes > _MAX_HEADER_BYTES:
            return f"its first 8 bytes give a {header_bytes}-byte header: not a safetensors file"
        if _HEADER_LENGTH_BYTES + header_bytes > size:
            return f"{size} bytes, its header alone needs {_HEADER_LENGTH_BYTES + header_bytes}"
        try:
            header = json.loads(f.read(header_bytes))
        except (json.JSONDecodeError, UnicodeDecodeError):
            return "its header is not valid JSON"
    ends = [entry["data_offsets"][1] for name, entry in header.items()
            if name != "__metadata__" and isinstance(entry, dict) and "data_offsets" in entry]
    needed = _HEADER_LENGTH_BYTES + header_bytes + max(ends, default=0)
    if size < needed:
        return f"{size} bytes, its header says {needed}"
    return None
