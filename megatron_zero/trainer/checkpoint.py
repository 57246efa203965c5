"""Run checkpoints: where they live, how they are marked complete and checked, which one a run resumes from.

    OUTPUT_DIR/checkpoints/step_000012/actor/        torch_dist: weights, optimizer, LR schedule (workers)
    OUTPUT_DIR/checkpoints/step_000012/trainer.pt    step, data-loader position, RNG states (driver)
    OUTPUT_DIR/checkpoints/step_000012/hf_config/    the base model's config + tokenizer, for export
    OUTPUT_DIR/checkpoints/step_000012/megatron_zero.json + COMPLETE

``COMPLETE`` is written last (atomically), so a checkpoint cut short by a crash or preemption is never taken as the
latest. It lists every other file of the checkpoint with its size and xxh3-128 checksum (utils/files.py says why
that hash), so a file lost, truncated or overwritten since is found before anything is loaded:
``check_resume_point`` runs in the preflight (``preflight.train.check_train_inputs``, before Ray and the workers
start) and ``export_hf`` before its workers start; either names the damaged file in one line. A damaged latest
checkpoint is never loaded: the run stops and names the newest intact one for ``run.resume_from``.

Checkpoints saved before markers listed their files (``COMPLETE`` is ``{"complete": true}``) are accepted with a
warning that they cannot be verified: they were written marker-last like today's, refusing them would strand every
run in flight at the upgrade with nothing to resume but step 0, and a damaged one fails at load as it did before.
The next save writes a listed marker.

The actor directory is a megatron-zero model checkpoint as ``tools/convert_checkpoint.py`` reads it (``mcore-to-hf``
exports it), because the model part of its keys is the converted one's.
"""

from __future__ import annotations

import concurrent.futures
import json
import logging
import os
import random
import re
import shutil
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch

from megatron_zero.config.trainer import RunConfig
from megatron_zero.utils.files import CHECKSUM_NAME, atomic_write_text, checksum, replacing, staged_directory

logger = logging.getLogger(__name__)

COMPLETE_MARKER = "COMPLETE"
ACTOR_DIR = "actor"
_STEP_DIR = re.compile(r"^step_(\d{6})$")


class CheckpointDamaged(ValueError):
    """A checkpoint's files differ from what its marker recorded; the message names the file."""


def checkpoint_root(output_dir: Path) -> Path:
    return output_dir / "checkpoints"


def step_dir(output_dir: Path, step: int) -> Path:
    return checkpoint_root(output_dir) / f"step_{step:06d}"


def dir_step(name: str) -> Optional[int]:
    """The step of a checkpoint folder named ``step_000012``; None for any other name."""
    match = _STEP_DIR.match(name)
    return int(match.group(1)) if match else None


def complete_checkpoints(output_dir: Path) -> list[tuple[int, Path]]:
    """(step, folder) of the checkpoints with a COMPLETE marker, newest first; incomplete ones are left out."""
    root = checkpoint_root(output_dir)
    if not root.is_dir():
        return []
    found = [(step, path) for path in root.iterdir()
             if (step := dir_step(path.name)) is not None and (path / COMPLETE_MARKER).is_file()]
    return sorted(found, reverse=True)


def latest_checkpoint(output_dir: Path) -> Optional[Path]:
    """The newest complete checkpoint; incomplete ones (no COMPLETE marker) are ignored."""
    found = complete_checkpoints(output_dir)
    return found[0][1] if found else None


def rng_state() -> dict[str, Any]:
    return {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])


def save_driver_state(path: Path, step: int, weight_version: int, sampler_state: dict[str, Any],
                      pending_rollout: Any = None) -> None:
    """``pending_rollout``: the next step's batch, already generated and graded (rollout.off_policy_steps=1); kept,
    so a resumed run trains on it instead of skipping its prompts (the sampler has moved past them) or
    regenerating them with a policy it no longer has."""
    with replacing(path / "trainer.pt") as temp:
        torch.save({"step": step, "weight_version": weight_version, "sampler": sampler_state, "rng": rng_state(),
                    "pending_rollout": pending_rollout}, temp)


def load_driver_state(path: Path) -> dict[str, Any]:
    state = torch.load(path / "trainer.pt", weights_only=False)
    set_rng_state(state["rng"])
    return state


def finalize(path: Path, base_mcore_dir: Path, step: int) -> None:
    """Make the actor directory a self-describing model checkpoint, then mark the whole step complete: the marker
    lists every file with its size and checksum."""
    from megatron_zero.models.mcore_checkpoint import HF_CONFIG_DIR, METADATA_NAME

    shutil.copytree(base_mcore_dir / HF_CONFIG_DIR, path / ACTOR_DIR / HF_CONFIG_DIR, dirs_exist_ok=True)
    shutil.copy(base_mcore_dir / METADATA_NAME, path / ACTOR_DIR / METADATA_NAME)
    files = sorted(str(file.relative_to(path)) for file in path.rglob("*")
                   if file.is_file() and file.name != COMPLETE_MARKER)
    digests = _checksums(path, files)
    marker = {"complete": True, "step": step,
              "files": {name: {"size": (path / name).stat().st_size, CHECKSUM_NAME: digests[name]} for name in files}}
    atomic_write_text(path / COMPLETE_MARKER, json.dumps(marker, indent=1) + "\n")


def _checksums(path: Path, names: list[str]) -> dict[str, str]:
    # Files hash in parallel: xxhash releases the GIL, and a large checkpoint has a file per rank (and writer thread).
    with concurrent.futures.ThreadPoolExecutor(max_workers=min(8, os.cpu_count() or 1)) as pool:
        return dict(zip(names, pool.map(checksum, [path / name for name in names])))


def _read_marker(path: Path) -> dict[str, Any]:
    marker = path / COMPLETE_MARKER
    if not marker.is_file():
        raise CheckpointDamaged(f"checkpoint {path} is not complete: no {COMPLETE_MARKER} marker (its save did not "
                                "finish)")
    try:
        return json.loads(marker.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise CheckpointDamaged(f"checkpoint {path} is damaged: its {COMPLETE_MARKER} marker is not JSON "
                                f"({error})") from None


def verify_checkpoint(path: Path) -> None:
    """Every file the marker lists is there, with its size and checksum; raises ``CheckpointDamaged`` naming the
    first that is not. All sizes are checked before a byte is read, so a missing or truncated file is found at
    once whatever the checkpoint's size; the checksums then cost one read of the files."""
    files = _read_marker(path).get("files")
    if files is None:
        logger.warning("checkpoint %s was saved before checkpoints listed their files: it cannot be verified, and "
                       "is loaded as it is", path)
        return
    for name, recorded in files.items():
        file = path / name
        if not file.is_file():
            raise CheckpointDamaged(f"checkpoint {path} is damaged: {name} is missing")
        size = file.stat().st_size
        if size != recorded["size"]:
            raise CheckpointDamaged(f"checkpoint {path} is damaged: {name} has {size} bytes, its {COMPLETE_MARKER} "
                                    f"marker recorded {recorded['size']}")
    for name, digest in _checksums(path, list(files)).items():
        if digest != files[name][CHECKSUM_NAME]:
            raise CheckpointDamaged(f"checkpoint {path} is damaged: {name} has the recorded size but other bytes "
                                    f"({CHECKSUM_NAME} {digest}, its {COMPLETE_MARKER} marker recorded "
                                    f"{files[name][CHECKSUM_NAME]})")


def saved_step(path: Path) -> int:
    """The step a complete checkpoint was saved after: its marker's, else (an older marker) its folder's name."""
    step = _read_marker(path).get("step")
    if step is None:
        step = dir_step(path.name)
    return step if step is not None else torch.load(path / "trainer.pt", weights_only=False)["step"]


def resume_point(run: RunConfig) -> Optional[Path]:
    """The checkpoint a run resumes from: ``run.resume_from``, else (``run.resume``) the newest complete one in
    ``run.output_dir``; None: it starts at step 0. ``check_resume_point`` has checked it."""
    if run.resume_from is not None:
        return Path(run.resume_from)
    return latest_checkpoint(Path(run.output_dir)) if run.resume else None


def check_resume_point(run: RunConfig) -> Optional[Path]:
    """Preflight: the checkpoint ``resume_point`` picks is whole, else raise one line that names the damaged file
    and the way on. A damaged latest checkpoint is not skipped silently (that would redo steps unasked): the
    error names the newest intact one for ``run.resume_from``. ``run.resume_from`` older than an intact checkpoint
    of ``run.output_dir`` is refused: left in a config, it would send every later restart back to it."""
    output_dir = Path(run.output_dir)
    if run.resume_from is not None:
        path = Path(run.resume_from)
        if not (path / COMPLETE_MARKER).is_file():
            raise FileNotFoundError(f"run.resume_from={run.resume_from!r} is not a complete checkpoint (no "
                                    f"{COMPLETE_MARKER} marker there); point it at a checkpoints/step_N folder")
        try:
            verify_checkpoint(path)
        except CheckpointDamaged as damage:
            raise CheckpointDamaged(f"run.resume_from: {damage}") from None
        step = saved_step(path)
        newer = _newest_intact(output_dir, lambda other: other > step)
        if newer is not None:
            raise ValueError(f"run.resume_from={run.resume_from!r} (step {step}) is older than the intact checkpoint "
                             f"{newer} in run.output_dir; drop run.resume_from to go on from there, or move the "
                             f"checkpoints after step {step} out of {checkpoint_root(output_dir)} to go back")
        return path
    path = resume_point(run)
    if path is None:
        return None
    try:
        verify_checkpoint(path)
    except CheckpointDamaged as damage:
        step = saved_step(path)
        intact = _newest_intact(output_dir, lambda other: other < step)
        way_on = (f"resume from the newest intact one with run.resume_from={intact}" if intact is not None else
                  "no older intact checkpoint is left there: start over with run.resume=false")
        raise CheckpointDamaged(f"{damage}; it is not loaded: {way_on}") from None
    return path


def _newest_intact(output_dir: Path, wanted) -> Optional[Path]:
    """The newest complete checkpoint in ``output_dir`` whose step is ``wanted`` and that verifies."""
    for step, path in complete_checkpoints(output_dir):
        if not wanted(step):
            continue
        try:
            verify_checkpoint(path)
        except CheckpointDamaged as damage:
            logger.warning("%s", damage)
            continue
        return path
    return None


def export_hf(checkpoint: str | Path, out_dir: str | Path, max_shard_bytes: int = 5 * 1024**3) -> None:
    """The model of ``checkpoint`` (a run's ``step_N`` folder or its ``actor/``, or a converted model) as an HF model
    in ``out_dir``. A run's checkpoint is verified against its marker first; the HF files are written in a folder
    beside ``out_dir`` that is renamed at the end, and removed if the export fails."""
    from megatron_zero.config.parallel import ParallelConfig
    from megatron_zero.models.mcore_checkpoint import convert_mcore_to_hf, read_checkpoint_info
    from megatron_zero.parallel.local_launch import run_local_workers

    model_dir = Path(checkpoint)
    if (model_dir / COMPLETE_MARKER).is_file():
        model_dir = model_dir / ACTOR_DIR
    if model_dir.name == ACTOR_DIR and (model_dir.parent / COMPLETE_MARKER).is_file():
        verify_checkpoint(model_dir.parent)
    read_checkpoint_info(model_dir)  # not a model checkpoint: one line, before a worker starts
    with staged_directory(out_dir) as partial:
        run_local_workers(convert_mcore_to_hf, ParallelConfig(), args=(str(model_dir), str(partial), max_shard_bytes))
