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
import struct
from pathlib import Path
from typing import Iterable

import torch
from safetensors import safe_open

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
            weight_map: dict[str, str] = _read_weight_map(index)
        elif (self.hf_dir / SINGLE_NAME).is_file():
            _check_whole(self.hf_dir / SINGLE_NAME)
            with safe_open(self.hf_dir / SINGLE_NAME, framework="pt") as f:
                weight_map = {name: SINGLE_NAME for name in f.keys()}
        else:
            found = sorted(p.name for p in self.hf_dir.iterdir())
            raise FileNotFoundError(f"no {SINGLE_NAME} or {INDEX_NAME} in {self.hf_dir} (found: {found}); "
                                    "only safetensors checkpoints are supported")
        missing_files = sorted({f for f in weight_map.values() if not (self.hf_dir / f).is_file()})
        if missing_files:
            raise FileNotFoundError(f"{self.hf_dir} index names shard(s) that are missing: {missing_files}")
        if index.is_file():
            for file in sorted(set(weight_map.values())):
                _check_whole(self.hf_dir / file)
        self.weight_map = weight_map
        self._handles: dict[str, object] = {}

    def names(self) -> list[str]:
        return list(self.weight_map)

    def _shard_of(self, name: str):
        if name not in self.weight_map:
            raise KeyError(f"tensor {name!r} is not in the HF checkpoint {self.hf_dir}")
        file = self.weight_map[name]
        if file not in self._handles:
            self._handles[file] = safe_open(self.hf_dir / file, framework="pt")
        return self._handles[file]

    def get(self, name: str) -> torch.Tensor:
        return self._shard_of(name).get_tensor(name)

    def shape(self, name: str) -> list[int]:
        """A tensor's shape, read from its shard's header without loading it."""
        return list(self._shard_of(name).get_slice(name).get_shape())

    def close(self) -> None:
        self._handles.clear()


def _read_weight_map(index: Path) -> dict[str, str]:
    try:
        weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
    except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError) as error:
        raise ValueError(f"{index} is not a safetensors index ({type(error).__name__}: {error}); copy it "
                         "again") from None
    if not isinstance(weight_map, dict) or not weight_map:
        raise ValueError(f"{index} has an empty weight_map")
    return weight_map


def _check_whole(path: Path) -> None:
    problem = safetensors_problem(path)
    if problem:
        raise ValueError(f"{path} is damaged ({problem}); download or copy it again")


_HEADER_LENGTH_BYTES = 8
# A safetensors header is JSON of at most a few MB; a larger length field means the file is not safetensors.
_MAX_HEADER_BYTES = 100 * 1024**2


def safetensors_problem(path: Path) -> str | None:
    """What a safetensors file lacks against its own header (an interrupted download or copy), or None when every
    tensor's bytes are there. Reads the header only (8 bytes of length, then JSON with each tensor's byte range):
    milliseconds, where safetensors itself would fail later on with "invalid header length" and no file name."""
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


_SAFETENSORS_DTYPES = {torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16", torch.float64: "F64",
                      torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8",
                      torch.bool: "BOOL", torch.float8_e4m3fn: "F8_E4M3"}


class HFCheckpointWriter:
    """Writes tensors into size-bounded safetensors shards plus the index, then renames shards k-of-n.

    Streams: each tensor's bytes go to the open shard's data file as soon as it is added; when the
    shard is full, the safetensors header (names, dtypes, shapes, offsets) is written in front of the
    data, copied in chunks. Memory stays at one tensor whatever the shard size (safetensors' own
    ``save_file`` holds the whole shard, twice).
    """

    _COPY_CHUNK = 64 * 1024**2

    def __init__(self, out_dir: str | Path, max_shard_bytes: int = 5 * 1024**3):
        self.out_dir = Path(out_dir)
        self.out_dir.mkdir(parents=True, exist_ok=True)
        self.max_shard_bytes = max_shard_bytes
        self._names: set[str] = set()
        self._open_header: dict[str, dict] = {}
        self._open_bytes = 0
        self._open_data = None
        self._shards: list[tuple[str, list[str]]] = []
        self._total_bytes = 0

    def add(self, name: str, tensor: torch.Tensor) -> None:
        if name in self._names:
            raise ValueError(f"tensor {name!r} written twice")
        if tensor.dtype not in _SAFETENSORS_DTYPES:
            raise ValueError(f"tensor {name!r} has dtype {tensor.dtype}, which safetensors cannot store")
        nbytes = tensor.numel() * tensor.element_size()
        if self._open_header and self._open_bytes + nbytes > self.max_shard_bytes:
            self._flush()
        if self._open_data is None:
            self._open_data = open(self.out_dir / f"shard-{len(self._shards):05d}.data.tmp", "wb+")
        self._open_data.write(tensor.detach().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
        self._open_header[name] = {"dtype": _SAFETENSORS_DTYPES[tensor.dtype], "shape": list(tensor.shape),
                                   "data_offsets": [self._open_bytes, self._open_bytes + nbytes]}
        self._names.add(name)
        self._open_bytes += nbytes
        self._total_bytes += nbytes

    def _flush(self) -> None:
        if not self._open_header:
            return
        header = json.dumps({"__metadata__": {"format": "pt"}, **self._open_header}, separators=(",", ":")).encode()
        header += b" " * (-len(header) % 8)  # the data must start 8-byte aligned
        temp_name = f"shard-{len(self._shards):05d}.tmp.safetensors"
        data = self._open_data
        with open(self.out_dir / temp_name, "wb") as out:
            out.write(len(header).to_bytes(8, "little"))
            out.write(header)
            data.seek(0)
            shutil.copyfileobj(data, out, self._COPY_CHUNK)
        data.close()
        os.remove(data.name)
        self._shards.append((temp_name, list(self._open_header)))
        self._open_header, self._open_bytes, self._open_data = {}, 0, None

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
