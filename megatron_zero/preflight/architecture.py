"""The model's architecture for planning and checks: from the checkpoint when it is there, else from a shipped copy.

Why: ``plan`` and ``train --dry-run`` are arithmetic over the architecture, and users run them on a login node
before downloading the checkpoint. The published config.json of each example model ships in
``examples/model_configs/<name>/``; ``model_path=/models/<name>`` finds it by its basename, and ``--model-config
PATH`` (a config.json or its folder) names any other.

How: ``resolved = resolve_architecture(config.model_path, model_config=args.model_config)``; ``resolved.arch``,
``resolved.source`` (the config.json it came from), ``resolved.from_checkpoint``.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from megatron_zero.models.common.architecture import DecoderArchitecture

# The repository's examples/model_configs (present in a clone and an editable install).
SHIPPED_MODEL_CONFIGS = Path(__file__).resolve().parents[2] / "examples" / "model_configs"


@dataclass(frozen=True)
class ResolvedArchitecture:
    arch: DecoderArchitecture
    # The config.json read.
    source: Path
    # True when it is model_path's own config.json (the checkpoint is on this machine).
    from_checkpoint: bool


def _parse(config_json: Path) -> DecoderArchitecture:
    from megatron_zero.models.registry import get_bridge

    try:
        hf_config = json.loads(config_json.read_text(encoding="utf-8"))
    except json.JSONDecodeError as error:
        raise ValueError(f"{config_json}: not valid JSON ({error.msg} at line {error.lineno})") from None
    return get_bridge(hf_config).parse(hf_config)


def _config_json(path: Path) -> Path:
    return path / "config.json" if path.is_dir() else path


def resolve_architecture(model_path: str, model_config: Optional[str] = None) -> ResolvedArchitecture:
    """``model_config`` when given; else ``model_path/config.json``; else the shipped config of the same basename.
    Raises FileNotFoundError naming all three places when none is there."""
    if model_config is not None:
        source = _config_json(Path(model_config))
        if not source.is_file():
            raise FileNotFoundError(f"--model-config {model_config}: no config.json there; pass a Hugging Face "
                                    "config.json or the folder holding it")
        return ResolvedArchitecture(_parse(source), source, from_checkpoint=False)
    own = Path(model_path, "config.json")
    if own.is_file():
        return ResolvedArchitecture(_parse(own), own, from_checkpoint=True)
    shipped = SHIPPED_MODEL_CONFIGS / Path(model_path).name / "config.json"
    if Path(model_path).name and shipped.is_file():
        return ResolvedArchitecture(_parse(shipped), shipped, from_checkpoint=False)
    known = sorted(path.name for path in SHIPPED_MODEL_CONFIGS.iterdir()) if SHIPPED_MODEL_CONFIGS.is_dir() else []
    raise FileNotFoundError(f"model_path={model_path!r}: no config.json there, and no shipped architecture named "
                            f"{Path(model_path).name!r} in examples/model_configs ({', '.join(known) or 'none'}); "
                            "download the model or pass --model-config PATH (its config.json)")
