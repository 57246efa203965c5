"""Streaming reads and writes of HF safetensors checkpoints.

``HFCheckpointReader`` opens every shard lazily and hands out one tensor at a time, so a 64 GB
checkpoint never has to fit in memory. ``HFCheckpointWriter`` buffers tensors up to a shard size,
writes ``model-0000k-of-0000n.safetensors`` and the ``model.safetensors.index.json`` that
``transformers.AutoModelForCausalLM.from_pretrained`` expects.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Iterable

import torch
from safetensors import safe_open
from safetensors.torch import save_file

INDEX_NAME = "model.safetensors.index.json"
SINGLE_NAME = "model.safetensors"
_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".distcp")
_WEIGHT_INDEXES = (INDEX_NAME, "pytorch_model.bin.index.json")


class HFCheckpointReader:
    """Tensor-at-a-time access to an HF safetensors checkpoint (single file or sharded with index)."""

    def __init__(self, hf_dir: str | Path):
        self.hf_dir = Path(hf_dir)
        if not self.hf_dir.is_dir():
            raise FileNotFoundError(f"HF checkpoint directory {self.hf_dir} does not exist")
        index = self.hf_dir / INDEX_NAME
        if index.is_file():
            with open(index, encoding="utf-8") as f:
                weight_map: dict[str, str] = json.load(f)["weight_map"]
        elif (self.hf_dir / SINGLE_NAME).is_file():
            with safe_open(self.hf_dir / SINGLE_NAME, framework="pt") as f:
                weight_map = {name: SINGLE_NAME for name in f.keys()}
        else:
            found = sorted(p.name for p in self.hf_dir.iterdir())
            raise FileNotFoundError(f"no {SINGLE_NAME} or {INDEX_NAME} in {self.hf_dir} (found: {found}); "
                                    "only safetensors checkpoints are supported")
        missing_files = sorted({f for f in weight_map.values() if not (self.hf_dir / f).is_file()})
        if missing_files:
            raise FileNotFoundError(f"{self.hf_dir} index names shard(s) that are missing: {missing_files}")
        self.weight_map = weight_map
        self._handles: dict[str, object] = {}

    def names(self) -> list[str]:
        return list(self.weight_map)

    def get(self, name: str) -> torch.Tensor:
        if name not in self.weight_map:
            raise KeyError(f"tensor {name!r} is not in the HF checkpoint {self.hf_dir}")
        file = self.weight_map[name]
        if file not in self._handles:
            self._handles[file] = safe_open(self.hf_dir / file, framework="pt")
        return self._handles[file].get_tensor(name)

    def close(self) -> None:
        self._handles.clear()


class HFCheckpointWriter:
    """Writes tensors into size-bounded safetensors shards plus the index, then renames shards k-of-n."""

    def __init__(self, out_dir: str | Path, max_shard_bytes: int = 5 * 1024**3):
        self.out_dir = Path(out_dir)
        self.out_dir.mkdir(parents=True, exist_ok=True)
        self.max_shard_bytes = max_shard_bytes
        self._buffer: dict[str, torch.Tensor] = {}
        self._buffer_bytes = 0
        self._shards: list[tuple[str, list[str]]] = []
        self._total_bytes = 0

    def add(self, name: str, tensor: torch.Tensor) -> None:
        if name in self._buffer or any(name in names for _, names in self._shards):
            raise ValueError(f"tensor {name!r} written twice")
        nbytes = tensor.numel() * tensor.element_size()
        if self._buffer and self._buffer_bytes + nbytes > self.max_shard_bytes:
            self._flush()
        self._buffer[name] = tensor.contiguous()
        self._buffer_bytes += nbytes
        self._total_bytes += nbytes

    def _flush(self) -> None:
        if not self._buffer:
            return
        temp_name = f"shard-{len(self._shards):05d}.tmp.safetensors"
        save_file(self._buffer, str(self.out_dir / temp_name), metadata={"format": "pt"})
        self._shards.append((temp_name, list(self._buffer)))
        self._buffer, self._buffer_bytes = {}, 0

    def finish(self) -> None:
        self._flush()
        count = len(self._shards)
        weight_map = {}
        for k, (temp_name, names) in enumerate(self._shards, start=1):
            final = f"model-{k:05d}-of-{count:05d}.safetensors"
            os.replace(self.out_dir / temp_name, self.out_dir / final)
            weight_map.update({name: final for name in names})
        index = {"metadata": {"total_size": self._total_bytes}, "weight_map": dict(sorted(weight_map.items()))}
        with open(self.out_dir / INDEX_NAME, "w", encoding="utf-8") as f:
            json.dump(index, f, indent=2)


def copy_non_weight_files(src: str | Path, dst: str | Path) -> list[str]:
    """Config, tokenizer and generation files: everything in an HF dir that is not a weight file."""
    src, dst = Path(src), Path(dst)
    dst.mkdir(parents=True, exist_ok=True)
    copied = []
    for path in sorted(src.iterdir()):
        if path.is_file() and not path.name.endswith(_WEIGHT_SUFFIXES) and path.name not in _WEIGHT_INDEXES:
            shutil.copy2(path, dst / path.name)
            copied.append(path.name)
    return copied


def write_tensors(writer: HFCheckpointWriter, tensors: Iterable[tuple[str, torch.Tensor]]) -> None:
    for name, tensor in tensors:
        writer.add(name, tensor)
