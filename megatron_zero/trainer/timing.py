"""Phase timings of a step, shown on the console's progress bar while each phase runs."""

from __future__ import annotations

import time


class timed:
    """Time a phase into ``timings`` (summed over repeats with ``accumulate``) and show its name on ``progress``."""

    def __init__(self, timings: dict[str, float], name: str, progress=None, accumulate: bool = False) -> None:
        self.timings, self.name, self.progress, self.accumulate = timings, name, progress, accumulate

    def __enter__(self) -> "timed":
        if self.progress is not None:
            self.progress.set_postfix_str(self.name, refresh=True)
        self.start = time.perf_counter()
        return self

    def __exit__(self, *exc) -> None:
        self.seconds = time.perf_counter() - self.start
        self.timings[self.name] = self.timings.get(self.name, 0.0) + self.seconds if self.accumulate else self.seconds
