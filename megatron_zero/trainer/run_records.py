"""One history per output directory: what a (re)start does with the records of steps it is about to log again.

A run logs each step as it goes (metrics.jsonl, eval.jsonl, samples/step_N.jsonl, samples/eval_step_N.jsonl) and
saves a checkpoint every run.save_every steps. A crash loses the steps after the last checkpoint but not their
records, so a restart that resumes at step K and logs K+1, K+2, ... again would list those steps twice. Before a run
starts (before Ray), ``keep_history_through(output_dir, K)`` leaves the directory holding steps <= K only:

* resuming at step K: the records of later steps are cut out of metrics.jsonl and eval.jsonl (each written under a
  temporary name and renamed), and the sample files and checkpoints of later steps are moved out;
* starting at step 0 (no complete checkpoint, or run.resume=false) where a run left records: all of them are moved
  out, with its checkpoints, summary, plots, report, TensorBoard and wandb files.

One log line says which steps or files went where: ``OUTPUT/superseded/<UTC time>/``, relative paths kept. Moved,
not deleted, so an abandoned attempt's records and a damaged checkpoint can still be read; and not refused, because
a scheduler requeues a preempted job by itself, and a job that died before its first checkpoint must start again
without someone clearing its directory. The base model's conversion (base_mcore/), the FP8 rollout copy and logs/
stay: they belong to no step.
"""

from __future__ import annotations

import json
import logging
import re
import shutil
import time
from pathlib import Path
from typing import Callable, Optional

from megatron_zero.trainer.checkpoint import checkpoint_root, dir_step
from megatron_zero.utils.files import atomic_write_text

logger = logging.getLogger(__name__)

SUPERSEDED_DIR = "superseded"
# One JSON object per line, each with its "step".
_STEP_RECORDS = ("metrics.jsonl", "eval.jsonl")
# Written for the run as a whole: a fresh start moves them out; a resumed run writes them again at its end (the
# TensorBoard writer of a resumed run purges the later steps' events itself: MetricsLogger).
_RUN_OUTPUTS = ("summary.json", "training.png", "analysis", "tensorboard", "wandb")
_SAMPLE_FILE = re.compile(r"^(?:eval_)?step_(\d+)\.jsonl$")


def keep_history_through(output_dir: Path, step: Optional[int]) -> Optional[Path]:
    """Move out of ``output_dir`` every record of the steps after ``step`` (None: a start at step 0, so every record
    of an earlier run); return the folder they went to (None: there was nothing to move)."""
    aside = output_dir / SUPERSEDED_DIR / time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
    later: Callable[[int], bool] = (lambda other: True) if step is None else (lambda other: other > step)
    steps: set[int] = set()
    moved: list[str] = []

    def move(path: Path) -> None:
        target = aside / path.relative_to(output_dir)
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.move(path, target)

    for name in _STEP_RECORDS:
        dropped = _cut_records(output_dir / name, later, aside / name)
        if dropped is not None:
            steps.update(dropped)
            moved.append(name)
    samples = sorted(path for path in (output_dir / "samples").glob("*.jsonl")
                     if (match := _SAMPLE_FILE.match(path.name)) and later(int(match.group(1))))
    for path in samples:
        steps.add(int(_SAMPLE_FILE.match(path.name).group(1)))
        move(path)
    checkpoints = sorted(path for path in checkpoint_root(output_dir).glob("step_*")
                         if (saved := dir_step(path.name)) is not None and later(saved))
    for path in checkpoints:
        steps.add(dir_step(path.name))
        move(path)
    if samples:
        moved.append(f"samples/ ({len(samples)} files)")
    if checkpoints:
        moved.append(f"checkpoints/ ({len(checkpoints)})")
    if step is None:
        for name in _RUN_OUTPUTS:
            if (output_dir / name).exists():
                move(output_dir / name)
                moved.append(name)
    if not moved:
        return None
    if step is None:
        logger.warning("starting at step 0 in %s, which holds an earlier run's records: moved %s to %s",
                       output_dir, ", ".join(moved), aside)
    else:
        what = (f"the records of steps {_ranges(sorted(steps))} (logged after that checkpoint; this run redoes them)"
                if steps else "repeated or cut-off records")
        logger.warning("resuming at step %d: moved %s from %s to %s", step, what, ", ".join(moved), aside)
    return aside


def _cut_records(path: Path, later: Callable[[int], bool], aside: Path) -> Optional[set[int]]:
    """Keep the records of ``path`` whose step is not ``later``, one per step (the last written: an earlier one is
    from an attempt that was redone), in step order; the rest go to ``aside``. A line that is no record (a crash
    cut it off mid-write) goes too. Returns the dropped records' steps, or None when nothing was dropped."""
    if not path.is_file():
        return None
    kept: dict[int, str] = {}
    dropped: list[str] = []
    steps: set[int] = set()
    for line in path.read_text(encoding="utf-8").splitlines():
        if not line.strip():
            continue
        try:
            step = json.loads(line)["step"]
        except (json.JSONDecodeError, KeyError, TypeError):
            dropped.append(line)
            continue
        if later(step):
            dropped.append(line)
            steps.add(step)
            continue
        if step in kept:
            dropped.append(kept[step])
        kept[step] = line
    if not dropped:
        return None
    aside.parent.mkdir(parents=True, exist_ok=True)
    aside.write_text("".join(line + "\n" for line in dropped), encoding="utf-8")
    if kept:
        atomic_write_text(path, "".join(kept[step] + "\n" for step in sorted(kept)))
    else:
        path.unlink()
    return steps


def _ranges(steps: list[int]) -> str:
    """[3, 4, 5, 9] -> '3-5, 9'."""
    spans: list[list[int]] = []
    for step in steps:
        if spans and step == spans[-1][1] + 1:
            spans[-1][1] = step
        else:
            spans.append([step, step])
    return ", ".join(f"{first}-{last}" if last > first else f"{first}" for first, last in spans)
