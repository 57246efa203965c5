"""The finished parts of a long command, kept on disk so that an interrupted run resumes where it stopped.

Why: `megatron-zero difficulty` and `eval` sample for minutes on the demo and for hours on a 7B model. Killed
(pre-empted, Ctrl-C, out of memory), they used to lose everything they had sampled. Each finished part (a batch of
pass rates, a benchmark's graded samples) is now appended to a progress file beside the output and synced to disk
before the next part starts; the same command run again with the same settings reads it and skips that work.

How::

    progress = Progress.open(Path("rates.jsonl.progress"), settings, "difficulty", "batches")
    for part in progress.done: ...     # parts an earlier run with these settings finished
    progress.add(part)                 # a finished part, on disk before this returns
    progress.finish()                  # the command's result is written: the file goes

The file is JSON lines: a header with the settings, then one line per part. A run with other settings is refused
(its parts are not this run's work), naming the settings that differ. A last line cut short by a kill is dropped,
and that part is done again.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)

_FORMAT = "megatron-zero progress"


class Progress:
    def __init__(self, path: Path, done: list[Any]) -> None:
        self.path = path
        self.done = done

    @classmethod
    def open(cls, path: str | Path, settings: dict[str, Any], command: str, parts: str = "parts") -> "Progress":
        """The progress at ``path`` of a ``command`` run with ``settings`` (JSON values): what an earlier run with
        the same settings finished, or a new file. ``parts`` names what the command keeps ("batches")."""
        path = Path(path)
        settings = json.loads(json.dumps(settings))  # as it reads back: tuples are lists
        header, done = _read(path, command) if path.exists() else (None, [])
        if header is None:  # no file, or one whose header a kill cut short
            _append(path, {"format": _FORMAT, "command": command, "settings": settings})
            return cls(path, [])
        if header["settings"] != settings:
            before = header["settings"]
            differ = [f"{key} {_short(before.get(key))} then, {_short(settings.get(key))} now"
                      for key in sorted({**before, **settings}) if before.get(key) != settings.get(key)]
            raise ValueError(f"{path} holds {len(done)} finished {parts} of a {command} run with other settings "
                             f"({'; '.join(differ)}); run that command again to resume it, or delete the file to "
                             "start over")
        logger.info("resuming from %s: %d %s that an earlier %s run finished are kept, not done again", path,
                    len(done), parts, command)
        return cls(path, done)

    def add(self, part: Any) -> None:
        _append(self.path, part)
        self.done.append(part)

    def finish(self) -> None:
        self.path.unlink(missing_ok=True)


def digest(rows: Iterable[Sequence[str]]) -> str:
    """A hash of what a command works on (its problems, in order), for its settings: a run on other problems is
    not the same run."""
    hashed = hashlib.sha256()
    for row in rows:
        hashed.update(("\x00".join(row) + "\x01").encode("utf-8"))
    return hashed.hexdigest()


def nothing_left(*args: Any, **kwargs: Any) -> Any:
    """The generator and grader of a resumed run whose every part was finished: never called."""
    raise AssertionError("every part was finished before the interruption; nothing is generated or graded")


def _short(value: Any) -> str:
    """A setting as an error shows it; a digest (the problems sampled) by its first characters."""
    text = json.dumps(value)
    return text if len(text) <= 40 else text[:17] + "...\""


def _append(path: Path, row: Any) -> None:
    with path.open("a", encoding="utf-8") as f:
        f.write(json.dumps(row) + "\n")
        f.flush()
        os.fsync(f.fileno())  # on disk before the next part starts: a crash after this keeps it


def _read(path: Path, command: str) -> tuple[dict[str, Any] | None, list[Any]]:
    data = path.read_bytes()
    whole = data.rfind(b"\n") + 1
    if whole < len(data):
        # A kill during a write: the part on that line is not finished. Cut so the next line starts clean.
        logger.warning("%s: its last line was cut short (%d bytes, a kill during a write); that part is done again",
                       path, len(data) - whole)
        os.truncate(path, whole)
    lines = data[:whole].decode("utf-8", errors="replace").splitlines()
    if not lines:
        return None, []
    try:
        header = json.loads(lines[0])
    except json.JSONDecodeError:
        header = None
    if not isinstance(header, dict) or header.get("format") != _FORMAT or header.get("command") != command:
        raise ValueError(f"{path} is not the progress file of a {command} run; move it away or delete it")
    done = []
    for number, line in enumerate(lines[1:], start=2):
        try:
            done.append(json.loads(line))
        except json.JSONDecodeError as error:
            raise ValueError(f"{path}:{number}: damaged ({error.msg}); delete the file to start over") from None
    return header, done
