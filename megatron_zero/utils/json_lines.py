"""Where a JSON / JSON-lines file is broken, as a line number a user can open the file at.

Why: readers that parse whole files (pyarrow, through `datasets`) report a byte position ("position 39"); the
line is what a person finds in an editor. Called after such a reader fails, so the common case reads nothing twice.

How: ``where = first_json_error(path)`` -> ``"line 3: Expecting ',' delimiter"`` or None when the file parses.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional


def first_json_error(path: str | Path) -> Optional[str]:
    """The first line that does not parse, for .jsonl (one value per non-empty line) and .json (one document)."""
    path = Path(path)
    if path.suffix == ".json":
        try:
            json.loads(path.read_text(encoding="utf-8"))
        except json.JSONDecodeError as error:
            return f"line {error.lineno}: {error.msg}"
        except UnicodeDecodeError as error:
            return f"not UTF-8 ({error.reason} at byte {error.start})"
        return None
    with path.open(encoding="utf-8", errors="replace") as f:
        for line_number, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                json.loads(line)
            except json.JSONDecodeError as error:
                return f"line {line_number}: {error.msg}"
    return None
