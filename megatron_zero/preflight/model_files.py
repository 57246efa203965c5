"""Is an HF model directory whole: weights that hold every byte their headers promise, and files that parse.

Why: an interrupted download or copy leaves a shard cut short or a tokenizer.json half written. Loaded anyway, it
fails inside an engine or a Ray worker minutes later ("SafetensorError: invalid header length", a bare
JSONDecodeError with no file name). The weights are checked as the checkpoint reader opens them (every shard's
header against its size: models/hf_io.py), without reading a tensor.

How: ``damaged_model_files(folder, "--model")`` -> one line per damaged part, [] when whole. Files that are absent
are ``check_model_files``'s to report (preflight/generation.py).
"""

from __future__ import annotations

from pathlib import Path

from megatron_zero.models.hf_io import INDEX_NAME, SINGLE_NAME, HFCheckpointReader
from megatron_zero.utils.json_lines import first_json_error

# JSON files a generating command parses at start (config.json has its own check: preflight/architecture.py).
PARSED_FILES = ("tokenizer.json", "tokenizer_config.json", "generation_config.json")


def damaged_model_files(folder: Path, key: str) -> list[str]:
    """One line per unparsable tokenizer / generation file in ``folder``, and one for damaged weights."""
    problems = []
    for name in PARSED_FILES:
        where = first_json_error(folder / name) if (folder / name).is_file() else None
        if where:
            problems.append(f"{key}={str(folder)!r}: {name} does not parse ({where}; "
                            f"{(folder / name).stat().st_size} bytes, cut short?); copy it again from the model's "
                            "source")
    if (folder / INDEX_NAME).is_file() or (folder / SINGLE_NAME).is_file():
        try:
            HFCheckpointReader(folder).close()
        except (FileNotFoundError, ValueError) as error:
            problems.append(f"{key}={str(folder)!r}: {error}")
    return problems
