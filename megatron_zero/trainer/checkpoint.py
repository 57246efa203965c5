"""Run checkpoints: where they live, how they are marked complete, what the driver keeps.

    OUTPUT_DIR/checkpoints/step_000012/actor/        torch_dist: weights, optimizer, LR schedule (workers)
    OUTPUT_DIR/checkpoints/step_000012/trainer.pt    step, data-loader position, RNG states (driver)
    OUTPUT_DIR/checkpoints/step_000012/hf_config/    the base model's config + tokenizer, for export
    OUTPUT_DIR/checkpoints/step_000012/megatron_zero.json + COMPLETE

``COMPLETE`` is written last, so a checkpoint cut short by a crash or preemption is never taken as
the latest. The actor directory is a megatron-zero model checkpoint as ``tools/convert_checkpoint.py``
reads it (``mcore-to-hf`` exports it), because the model part of its keys is the converted one's.
"""

from __future__ import annotations

import json
import random
import re
import shutil
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch

COMPLETE_MARKER = "COMPLETE"
_STEP_DIR = re.compile(r"^step_(\d{6})$")


def checkpoint_root(output_dir: Path) -> Path:
    return output_dir / "checkpoints"


def step_dir(output_dir: Path, step: int) -> Path:
    return checkpoint_root(output_dir) / f"step_{step:06d}"


def latest_checkpoint(output_dir: Path) -> Optional[Path]:
    """The newest complete checkpoint; incomplete ones (no COMPLETE marker) are ignored."""
    root = checkpoint_root(output_dir)
    if not root.is_dir():
        return None
    complete = [p for p in root.iterdir() if _STEP_DIR.match(p.name) and (p / COMPLETE_MARKER).is_file()]
    return max(complete, key=lambda p: int(_STEP_DIR.match(p.name).group(1)), default=None)


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
    torch.save({"step": step, "weight_version": weight_version, "sampler": sampler_state, "rng": rng_state(),
                "pending_rollout": pending_rollout}, path / "trainer.pt")


def load_driver_state(path: Path) -> dict[str, Any]:
    state = torch.load(path / "trainer.pt", weights_only=False)
    set_rng_state(state["rng"])
    return state


def finalize(path: Path, base_mcore_dir: Path) -> None:
    """Make the actor directory a self-describing model checkpoint, then mark the whole step complete."""
    from megatron_zero.models.mcore_checkpoint import HF_CONFIG_DIR, METADATA_NAME

    shutil.copytree(base_mcore_dir / HF_CONFIG_DIR, path / "actor" / HF_CONFIG_DIR, dirs_exist_ok=True)
    shutil.copy(base_mcore_dir / METADATA_NAME, path / "actor" / METADATA_NAME)
    (path / COMPLETE_MARKER).write_text(json.dumps({"complete": True}))
