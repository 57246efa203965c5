"""Megatron distributed checkpoints (torch_dist) of HF-family models: write, read and load.

Layout of a megatron-zero model checkpoint directory::

    DIR/                    megatron.core.dist_checkpointing files (*.distcp, metadata): loads at any TP/PP
    DIR/megatron_zero.json  model_type, vocabulary sizes, dtype: what is needed to rebuild the model
    DIR/hf_config/          the source config.json, tokenizer and generation files, to go back to HF

Conversion streams so that a 32B model (64 GB in bf16) converts on a 24 GB machine:

* HF -> Megatron reads one HF tensor group at a time, writes each converted tensor to a raw
  staging file, maps it back (shared) and hands the mapped tensors to ``dist_checkpointing.save``. Mapped pages are file-backed, so the kernel can drop them under
  memory pressure; the anonymous memory in use stays around one tensor group.
* Megatron -> HF loads the checkpoint one layer at a time (``dist_checkpointing.load`` of a partial
  sharded state dict) and writes size-bounded safetensors shards as it goes.

The model whose sharded state dict drives both directions is built on the meta device at TP=1,
PP=1, so the checkpoint keys are exactly what megatron-core reads back at any layout.
"""

from __future__ import annotations

import dataclasses
import io
import json
import logging
import re
import shutil
import tempfile
from collections import defaultdict
from pathlib import Path
from typing import Any, Iterator, Optional

import torch

from megatron_zero.config.model import ModelConfig
from megatron_zero.models.common.architecture import DecoderArchitecture, read_hf_config
from megatron_zero.models.common.bridge import ModelBridge
from megatron_zero.models.common.spec import load_checkpoint_allowing_extra_state, load_state_dict_allowing_extra_state
from megatron_zero.models.hf_io import HFCheckpointReader, HFCheckpointWriter, copy_non_weight_files
from megatron_zero.models.registry import get_bridge

logger = logging.getLogger(__name__)

METADATA_NAME = "megatron_zero.json"
HF_CONFIG_DIR = "hf_config"
FORMAT_VERSION = 1
_DTYPE_NAMES = {torch.float32: "float32", torch.bfloat16: "bfloat16", torch.float16: "float16"}
_LAYER_RE = re.compile(r"^decoder\.layers\.(\d+)\.")


@dataclasses.dataclass(frozen=True)
class McoreCheckpointInfo:
    """What a megatron-zero checkpoint says about its model."""

    path: Path
    hf_config: dict[str, Any]
    bridge: ModelBridge
    arch: DecoderArchitecture
    vocab_pad_multiple: int

    @property
    def hf_config_dir(self) -> Path:
        return self.path / HF_CONFIG_DIR


def read_checkpoint_info(mcore_dir: str | Path) -> McoreCheckpointInfo:
    path = Path(mcore_dir)
    meta_path = path / METADATA_NAME
    if not meta_path.is_file():
        raise FileNotFoundError(f"{path} is not a megatron-zero checkpoint: {METADATA_NAME} is missing "
                                "(convert an HF model with `tools/convert_checkpoint.py hf-to-mcore`)")
    with open(meta_path, encoding="utf-8") as f:
        meta = json.load(f)
    if meta.get("format_version") != FORMAT_VERSION:
        raise ValueError(f"{meta_path} has format_version={meta.get('format_version')}, expected {FORMAT_VERSION}")
    if not (path / "metadata.json").is_file():
        raise FileNotFoundError(f"{path} has no dist_checkpointing metadata.json: the checkpoint is incomplete")
    hf_config = read_hf_config(path / HF_CONFIG_DIR)
    bridge = get_bridge(hf_config)
    return McoreCheckpointInfo(path=path, hf_config=hf_config, bridge=bridge, arch=bridge.parse(hf_config),
                               vocab_pad_multiple=int(meta["vocab_pad_multiple"]))


def conversion_model_config(arch: DecoderArchitecture, vocab_pad_multiple: int) -> ModelConfig:
    # The checkpoint keeps the HF checkpoint's dtype; the local spec gives the canonical key names.
    return ModelConfig(transformer_impl="local", params_dtype=_DTYPE_NAMES[arch.dtype],
                       vocab_pad_multiple=vocab_pad_multiple)


def _meta_sharded_state_dict(bridge: ModelBridge, arch: DecoderArchitecture, vocab_pad_multiple: int) -> dict[str, Any]:
    """Sharded state dict of a TP=1/PP=1 model on the meta device: keys and shapes, no memory."""
    with torch.device("meta"):
        model = bridge.build_model(arch, conversion_model_config(arch, vocab_pad_multiple), pre_process=True,
                                   post_process=True, use_cpu_initialization=True, perform_initialization=False)
    return model.sharded_state_dict()


def _tensor_entries(sharded_sd: dict[str, Any], bridge: ModelBridge, arch: DecoderArchitecture) -> dict[str, Any]:
    """The sharded entries that carry weights, checked one-to-one against the bridge's mappings."""
    from megatron.core.dist_checkpointing.mapping import ShardedObject

    entries = {name: value for name, value in sharded_sd.items() if not isinstance(value, ShardedObject)}
    mapped = set(bridge.mapping_by_mcore_name(arch))
    unmapped = sorted(set(entries) - mapped)
    if unmapped:
        raise KeyError(f"Megatron tensors without an HF mapping for model_type={arch.model_type!r}: {unmapped}")
    missing = sorted(mapped - set(entries))
    if missing:
        raise KeyError(f"mapped tensors that the Megatron model does not have: {missing}")
    return entries


def _with_data(entry: Any, data: torch.Tensor) -> Any:
    return dataclasses.replace(entry, data=data)


def _expected_shape(entry: Any) -> tuple[int, ...]:
    return tuple(entry.data.shape)


def convert_hf_to_mcore(hf_dir: str | Path, out_dir: str | Path, vocab_pad_multiple: int = 128) -> None:
    """Run inside a 1-process distributed job (TP=1, PP=1); see ``tools/convert_checkpoint.py``."""
    from megatron.core import dist_checkpointing

    hf_dir, out_dir = Path(hf_dir), Path(out_dir)
    hf_config = read_hf_config(hf_dir)
    bridge = get_bridge(hf_config)
    arch = bridge.parse(hf_config)
    reader = HFCheckpointReader(hf_dir)
    expected_hf = {name for m in bridge.weight_mappings(arch) for name in m.hf}
    unexpected = sorted(set(reader.names()) - expected_hf - _IGNORED_HF_TENSORS(arch))
    if unexpected:
        raise KeyError(f"HF tensors in {hf_dir} that no mapping consumes (model_type={arch.model_type!r}): "
                       f"{unexpected[:10]}{' ...' if len(unexpected) > 10 else ''}")
    missing = sorted(expected_hf - set(reader.names()))
    if missing:
        raise KeyError(f"HF checkpoint {hf_dir} lacks tensors the model needs: {missing[:10]}")

    meta_sharded = _meta_sharded_state_dict(bridge, arch, vocab_pad_multiple)
    entries = _tensor_entries(meta_sharded, bridge, arch)
    if out_dir.exists() and any(out_dir.iterdir()):
        raise FileExistsError(f"output directory {out_dir} is not empty; choose a new one")
    out_dir.mkdir(parents=True, exist_ok=True)
    # Beside, not inside, the output: dist_checkpointing expects to own its directory.
    staging = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.staging-", dir=out_dir.parent))
    try:
        # Non-tensor module state (the layers' _extra_state objects) is saved as the model has it, so
        # that megatron-core's strict loading at any layout finds every key.
        sharded: dict[str, Any] = {name: value for name, value in meta_sharded.items() if name not in entries}
        padded = arch.padded_vocab_size(vocab_pad_multiple)
        staged = _stage(bridge.hf_to_mcore(arch, reader.get, padded), entries, staging)
        reader.close()
        sharded.update(staged)
        dist_checkpointing.save(sharded, str(out_dir))
        del sharded, staged
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    copy_non_weight_files(hf_dir, out_dir / HF_CONFIG_DIR)
    with open(out_dir / METADATA_NAME, "w", encoding="utf-8") as f:
        json.dump({"format_version": FORMAT_VERSION, "model_type": arch.model_type, "vocab_size": arch.vocab_size,
                   "vocab_pad_multiple": vocab_pad_multiple, "padded_vocab_size": padded,
                   "dtype": _DTYPE_NAMES[arch.dtype]}, f, indent=2)
    logger.info("wrote Megatron checkpoint %s (%d tensors)", out_dir, len(entries))


def _stage(tensors: Iterator[tuple[str, torch.Tensor]], entries: dict[str, Any], staging: Path) -> dict[str, Any]:
    """Sharded entries whose data are staged files mapped back shared: page cache, not process memory.

    Measured (tools/bench_conversion.py): torch.load(mmap=True) maps privately and its pages count as
    anonymous memory, and megatron-core's writer clones every tensor whose storage is larger than the
    tensor (a view). So each saved tensor gets its own MAP_SHARED file: including the two halves that
    the fused ``linear_fc1`` factory splits [gate; up] into, which are built here instead of at save.
    """
    from megatron.core.dist_checkpointing.mapping import ShardedTensorFactory

    counter = iter(range(1 << 62))

    def mapped(tensor: torch.Tensor) -> torch.Tensor:
        path = staging / f"{next(counter):06d}.bin"
        with open(path, "wb") as f:
            f.write(tensor.contiguous().view(torch.uint8).numpy().tobytes())
        return torch.from_file(str(path), shared=True, size=tensor.numel(), dtype=tensor.dtype).view(tensor.shape)

    staged: dict[str, Any] = {}
    for name, tensor in tensors:
        entry = entries[name]
        # The dtype megatron-core gives this parameter (norms may stay float32 in a bf16 model).
        tensor = tensor.to(entry.data.dtype).contiguous()
        if tuple(tensor.shape) != _expected_shape(entry):
            raise ValueError(f"{name}: converted shape {tuple(tensor.shape)} != Megatron shape "
                             f"{_expected_shape(entry)}; config.json does not match the weights")
        if isinstance(entry, ShardedTensorFactory):
            parts = entry.build_fn(entry.key, tensor, entry.replica_id, entry.flattened_range)
            staged[name] = [_with_data(part, mapped(part.data)) for part in parts]
        else:
            staged[name] = _with_data(entry, mapped(tensor))
        del tensor
    return staged


def _IGNORED_HF_TENSORS(arch: DecoderArchitecture) -> set[str]:
    # Tied checkpoints sometimes still store lm_head.weight (a copy of the embedding).
    return {"lm_head.weight"} if arch.tie_word_embeddings else set()


def _layer_groups(names: list[str]) -> list[list[str]]:
    """Group canonical names by decoder layer (globals form their own group) to bound memory."""
    groups: dict[Optional[int], list[str]] = defaultdict(list)
    for name in names:
        match = _LAYER_RE.match(name)
        groups[int(match.group(1)) if match else None].append(name)
    ordered = [groups.pop(None)] if None in groups else []
    return ordered + [groups[layer] for layer in sorted(groups)]


class _FileView(io.RawIOBase):
    """A read-only window [start, start + length) of a file, so ``zipfile`` sees one stored item alone."""

    def __init__(self, file: Any, start: int, length: int) -> None:
        self._file, self._start, self._length, self._pos = file, start, length, 0

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self._pos

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        base = {io.SEEK_SET: 0, io.SEEK_CUR: self._pos, io.SEEK_END: self._length}[whence]
        self._pos = max(0, min(self._length, base + offset))
        return self._pos

    def readinto(self, buffer: Any) -> int:
        count = min(len(buffer), self._length - self._pos)
        self._file.seek(self._start + self._pos)
        data = self._file.read(count)
        buffer[: len(data)] = data
        self._pos += len(data)
        return len(data)


class TorchDistReader:
    """Reads row ranges of tensors from a torch_dist checkpoint without loading whole stored chunks.

    megatron-core stores each stacked parameter (a leading layer axis, all layers of a rank) as one
    chunk, a ``torch.save`` zip whose storage record is the chunk's bytes, uncompressed and row-major.
    torch DCP would ``torch.load`` the whole chunk to read one layer; here the layer's rows (one
    contiguous byte range of the record) are read, so memory stays at one layer.
    """

    def __init__(self, path: Path) -> None:
        import torch.distributed.checkpoint as dcp

        self.path = path
        metadata = dcp.FileSystemReader(str(path)).read_metadata()
        self.tensors = metadata.state_dict_metadata
        self.storage = metadata.storage_data

    def read(self, key: str, first_row: int, dest: torch.Tensor) -> None:
        """Fill ``dest`` with rows [first_row, first_row + len(dest)) of stored tensor ``key``."""
        import zipfile

        from torch.distributed.checkpoint.metadata import MetadataIndex

        stored = self.tensors.get(key)
        if stored is None:
            raise KeyError(f"tensor {key!r} is not in the checkpoint {self.path}")
        if tuple(stored.size[1:]) != tuple(dest.shape[1:]):
            raise ValueError(f"{key}: stored rows have shape {tuple(stored.size[1:])}, expected {tuple(dest.shape[1:])}")
        rows = range(first_row, first_row + dest.shape[0])
        filled = 0
        for chunk in stored.chunks:
            start, stop = max(rows.start, chunk.offsets[0]), min(rows.stop, chunk.offsets[0] + chunk.sizes[0])
            if start >= stop:
                continue
            info = self.storage[MetadataIndex(fqn=key, offset=chunk.offsets)]
            row_numel = 1
            for size in chunk.sizes[1:]:
                row_numel *= size
            itemsize = torch.empty((), dtype=stored.properties.dtype).element_size()
            file_path = self.path / info.relative_path
            try:
                with open(file_path, "rb") as file, \
                        zipfile.ZipFile(_FileView(file, info.offset, info.length)) as archive:
                    records = [n for n in archive.namelist() if n.rsplit("/", 2)[-2:-1] == ["data"]]
                    if len(records) != 1:
                        raise ValueError(f"{key}: stored chunk has {len(records)} storages, expected 1")
                    expected = row_numel * chunk.sizes[0] * itemsize
                    if archive.getinfo(records[0]).file_size != expected:
                        raise ValueError(f"{key}: stored chunk holds {archive.getinfo(records[0]).file_size} bytes, "
                                         f"expected {expected} (a contiguous {tuple(chunk.sizes)} tensor)")
                    with archive.open(records[0]) as record:
                        record.seek((start - chunk.offsets[0]) * row_numel * itemsize)
                        data = bytearray(record.read((stop - start) * row_numel * itemsize))
            except (zipfile.BadZipFile, EOFError) as error:
                # A checkpoint without a file list in its marker reaches here damaged; name the file, not the zip.
                raise ValueError(f"{file_path} is damaged (truncated or overwritten?): {key}'s bytes "
                                 f"{info.offset}-{info.offset + info.length} do not read back ({error})") from None
            part = torch.frombuffer(data, dtype=stored.properties.dtype).view(stop - start, *chunk.sizes[1:])
            target = dest[start - rows.start : stop - rows.start]
            for dim, (offset, size) in enumerate(zip(chunk.offsets[1:], chunk.sizes[1:]), start=1):
                target = target.narrow(dim, offset, size)
            target.copy_(part)
            filled += part.numel()
        if filled != dest.numel():
            raise ValueError(f"{key}: the checkpoint's chunks cover {filled} of {dest.numel()} requested elements")


def read_canonical_tensors(info: McoreCheckpointInfo, names: list[str], entries: dict[str, Any],
                           reader: Optional[TorchDistReader] = None) -> dict[str, torch.Tensor]:
    """Read canonical (full, per-layer) Megatron tensors from a torch_dist checkpoint, nothing else."""
    reader = reader or TorchDistReader(info.path)
    out: dict[str, torch.Tensor] = {}
    for name in names:
        shape = _expected_shape(entries[name])
        layer = _LAYER_RE.match(name)
        dest = torch.empty(shape, dtype=info.arch.dtype)
        if layer is not None:
            # Stacked keys carry the global layer index as a leading axis: read that one row.
            reader.read(entries[name].key, int(layer.group(1)), dest.unsqueeze(0))
        else:
            reader.read(entries[name].key, 0, dest)
        out[name] = dest
    return out


def convert_mcore_to_hf(mcore_dir: str | Path, out_dir: str | Path, max_shard_bytes: int = 5 * 1024**3) -> None:
    """Run inside a 1-process distributed job (TP=1, PP=1); see ``tools/convert_checkpoint.py``."""
    info = read_checkpoint_info(mcore_dir)
    bridge, arch = info.bridge, info.arch
    entries = _tensor_entries(_meta_sharded_state_dict(bridge, arch, info.vocab_pad_multiple), bridge, arch)
    mappings = bridge.mapping_by_mcore_name(arch)
    out_dir = Path(out_dir)
    if out_dir.exists() and any(out_dir.iterdir()):
        raise FileExistsError(f"output directory {out_dir} is not empty; choose a new one")
    writer = HFCheckpointWriter(out_dir, max_shard_bytes=max_shard_bytes)
    reader = TorchDistReader(info.path)
    for group in _layer_groups(list(entries)):
        loaded = read_canonical_tensors(info, group, entries, reader)
        for name in group:
            for hf_name, tensor in bridge.mcore_to_hf(arch, name, loaded[name], mappings):
                writer.add(hf_name, tensor)
    writer.finish()
    copy_non_weight_files(info.hf_config_dir, out_dir)
    logger.info("wrote HF checkpoint %s", out_dir)


def load_mcore_weights(model: torch.nn.Module, mcore_dir: str | Path) -> None:
    """Load a megatron-zero checkpoint into a GPTModel built at any TP/PP (dist_checkpointing reshards).

    Strict but for Transformer Engine layers' ``_extra_state``, which checkpoints converted through the local
    spec lack (``models/common/spec.py``).
    """
    info = read_checkpoint_info(mcore_dir)
    loaded = load_checkpoint_allowing_extra_state(model.sharded_state_dict(), info.path)
    load_state_dict_allowing_extra_state(model, loaded)
