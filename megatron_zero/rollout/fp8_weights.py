"""Block-scaled FP8 (e4m3) rollout weights in the layout SGLang's FP8 loader reads, and the inverse.

Why: rollout dominates a zero-RL step, and FP8 weights halve both the bytes of every weight sync and the weight
reads of decoding (issue #16; verl and slime quantize rollout weights the same way). The engine then samples from
a slightly different policy than the actor trains; ``dequantize_bucket`` lets the CPU torch engine run exactly
the weights an FP8 engine would hold, so that gap can be measured (``tools/bench_fp8_rollout_gap.py``).

Layout (SGLang 0.5.23, ``srt/layers/quantization/fp8.py``: ``Fp8LinearMethod.create_fp8_weight_`` and
``Fp8Config.from_config``; ``fp8_utils.block_quant_dequant`` is its reference dequantization): a checkpoint whose
``config.json`` carries ``FP8_QUANTIZATION_CONFIG`` holds, for each quantized linear ``<prefix>.weight`` of shape
[out, in], a ``float8_e4m3fn`` weight of the same shape and a float32 ``<prefix>.weight_scale_inv`` of shape
[ceil(out / 128), ceil(in / 128)] (the DeepSeek-V3 layout): block (i, j) of the weight is
``fp8[i*128:(i+1)*128, j*128:(j+1)*128].float() * scale_inv[i, j]``; a partial last block has a scale of its own.
SGLang quantizes only its ``LinearBase`` layers (fused ``qkv_proj`` / ``gate_up_proj`` load the per-projection
tensors and their scale rows); embeddings, norms and ``lm_head`` stay in the checkpoint's dtype, as the peers keep
them. SGLang's ``validate_block_quant_shapes`` also needs each tensor-parallel rank's slice to be whole blocks: the
output slice of every q/k/v and gate/up projection (at any tp_size, since they are fused) and, at tp_size > 1, the
input slice of o_proj and down_proj; ``check_sglang_block_alignment`` checks that for a server's tp_size before an
engine would refuse.

Why not nvidia-modelopt (checked: 0.47.0 from PyPI): its ``FP8QTensor.quantize(w, block_sizes={-1: 128, -2: 128})``
computes this very layout (scale = block amax / 448, weight ~ fp8 * scale), but (1) importing
``modelopt.torch.quantization`` pulls its optimisation stack (pulp, scipy, omegaconf, pydantic, ...) for ~20 lines
of tensor code, (2) an all-zero block divides 0 by a zero scale and gives NaN weights, and (3) its ``dequantize``
multiplies fp8 by the scale in the target dtype (bf16-rounded scales) where SGLang's kernels apply the float32
scale. So the same math is written here, with a zero-block guard and SGLang's float32 dequantization.

How::

    bucket = quantize_bucket(bucket)                       # HF-named tensors -> FP8 weights + *_scale_inv
    engine.sync_weights(dequantize_bucket(b, torch.float32) for b in fp8_buckets)   # torch engine on CPU
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from megatron_zero.models.common.architecture import DecoderArchitecture

FP8_DTYPE = torch.float8_e4m3fn
# Largest finite e4m3fn value (448): the block's absmax maps onto it.
FP8_MAX = torch.finfo(FP8_DTYPE).max
BLOCK_SIZE = (128, 128)  # (rows = output features, columns = input features), SGLang's weight_block_size
SCALE_SUFFIX = "_scale_inv"
# What config.json's "quantization_config" must say for SGLang's Fp8Config to load block-FP8 weights.
FP8_QUANTIZATION_CONFIG = {
    "quant_method": "fp8",
    "fmt": "e4m3",
    "activation_scheme": "dynamic",  # block quantization supports only dynamic (per-token-group) activations
    "weight_block_size": list(BLOCK_SIZE),
}
# The linear layers of the dense decoder families (qwen2, llama, mistral share HF names); everything else stays.
_QUANTIZED_RE = re.compile(r"\.(self_attn\.[qkvo]_proj|mlp\.(gate|up|down)_proj)\.weight$")


def is_quantized_weight(name: str, tensor: torch.Tensor) -> bool:
    """Whether an HF-named tensor is a linear weight the FP8 layout quantizes."""
    return tensor.dim() == 2 and _QUANTIZED_RE.search(name) is not None


def scale_shape(shape: Sequence[int]) -> tuple[int, int]:
    """Shape of the ``weight_scale_inv`` of a [out, in] weight."""
    return math.ceil(shape[0] / BLOCK_SIZE[0]), math.ceil(shape[1] / BLOCK_SIZE[1])


def _blocks(tensor: torch.Tensor) -> torch.Tensor:
    """[out, in] float32 -> [out_blocks, 128, in_blocks, 128], zero-padded (padding never raises an absmax)."""
    rows, cols = scale_shape(tensor.shape)
    padded = tensor.new_zeros(rows * BLOCK_SIZE[0], cols * BLOCK_SIZE[1])
    padded[:tensor.shape[0], :tensor.shape[1]] = tensor
    return padded.view(rows, BLOCK_SIZE[0], cols, BLOCK_SIZE[1])


def quantize_block_fp8(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(fp8 weight, float32 scale_inv)`` with each 128x128 block's absmax mapped onto ``FP8_MAX``."""
    if weight.dim() != 2:
        raise ValueError(f"block FP8 quantizes 2-D [out, in] weights; got shape {tuple(weight.shape)}")
    blocks = _blocks(weight.detach().float())
    amax = blocks.abs().amax(dim=(1, 3), keepdim=True)
    # An all-zero block quantizes to zeros with any scale; 1 keeps 0 / scale finite.
    scale_inv = torch.where(amax > 0, amax / FP8_MAX, torch.ones_like(amax))
    # Round-to-nearest-even cast; |blocks / scale_inv| <= FP8_MAX up to float32 rounding, which rounds back to 448.
    fp8 = (blocks / scale_inv).to(FP8_DTYPE).view(blocks.shape[0] * BLOCK_SIZE[0], -1)
    return fp8[:weight.shape[0], :weight.shape[1]].contiguous(), scale_inv[:, 0, :, 0].contiguous()


def dequantize_block_fp8(fp8: torch.Tensor, scale_inv: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """The weight an FP8 engine computes with: fp8 * scale_inv per block in float32 (as SGLang), cast to ``dtype``."""
    if fp8.dtype != FP8_DTYPE or fp8.dim() != 2:
        raise ValueError(f"expected a 2-D {FP8_DTYPE} weight; got {fp8.dtype} {tuple(fp8.shape)}")
    if tuple(scale_inv.shape) != scale_shape(fp8.shape):
        raise ValueError(f"scale_inv {tuple(scale_inv.shape)} does not match a {tuple(fp8.shape)} weight with "
                         f"{BLOCK_SIZE} blocks; expected {scale_shape(fp8.shape)}")
    scales = scale_inv.float().repeat_interleave(BLOCK_SIZE[0], 0).repeat_interleave(BLOCK_SIZE[1], 1)
    return (fp8.float() * scales[:fp8.shape[0], :fp8.shape[1]]).to(dtype)


def quantize_bucket(bucket: Sequence[tuple[str, torch.Tensor]]) -> list[tuple[str, torch.Tensor]]:
    """The bucket with each quantized linear weight replaced by its FP8 weight followed by its ``_scale_inv``;
    other tensors pass through unchanged (same objects)."""
    out: list[tuple[str, torch.Tensor]] = []
    for name, tensor in bucket:
        if is_quantized_weight(name, tensor):
            fp8, scale_inv = quantize_block_fp8(tensor)
            out += [(name, fp8), (name + SCALE_SUFFIX, scale_inv)]
        else:
            out.append((name, tensor))
    return out


def dequantize_bucket(bucket: Sequence[tuple[str, torch.Tensor]], dtype: torch.dtype) -> list[tuple[str, torch.Tensor]]:
    """An FP8 bucket as an unquantized engine loads it: each FP8 weight dequantized to ``dtype`` with the
    ``_scale_inv`` that must be in the same bucket (in any order), in the weight's place; other tensors unchanged."""
    scales = {name[:-len(SCALE_SUFFIX)]: tensor for name, tensor in bucket if name.endswith(SCALE_SUFFIX)}
    fp8_names = {name for name, tensor in bucket if tensor.dtype == FP8_DTYPE}
    orphans = sorted(set(scales) - fp8_names)
    if orphans:
        raise ValueError(f"{orphans[0] + SCALE_SUFFIX!r} has no FP8 weight {orphans[0]!r} in the bucket; "
                         "quantize_bucket keeps each weight and its scale together")
    unscaled = sorted(fp8_names - set(scales))
    if unscaled:
        raise ValueError(f"FP8 weights without a {SCALE_SUFFIX} in the bucket: {unscaled}")
    return [(name, dequantize_block_fp8(tensor, scales[name], dtype) if name in fp8_names else tensor)
            for name, tensor in bucket if not name.endswith(SCALE_SUFFIX)]


def encode_bucket(bucket: Sequence[tuple[str, torch.Tensor]],
                  quantization: str | None) -> list[tuple[str, torch.Tensor]]:
    """What a weight sync sends for ``rollout.quantization``: the bucket unchanged (None) or FP8 ("fp8")."""
    if quantization is None:
        return list(bucket)
    if quantization == "fp8":
        return quantize_bucket(bucket)
    raise ValueError(f"rollout.quantization={quantization!r} is unknown")


def as_bytes(tensor: torch.Tensor) -> torch.Tensor:
    """A float8 tensor as its bytes (a uint8 view, no copy), other tensors unchanged. gloo has no float8 type, Ray's
    pickling of a float8 tensor does not load (torch 2.13: "UntypedStorage has no attribute dtype"), and NCCL sends
    float8 as ncclUint8 anyway, so a receiver that allocates the announced float8 dtype gets the same bytes."""
    return tensor.view(torch.uint8) if tensor.dtype in (torch.float8_e4m3fn, torch.float8_e5m2) else tensor


def fp8_as_bytes(bucket: Sequence[tuple[str, torch.Tensor]]) -> list[tuple[str, torch.Tensor]]:
    """The bucket with its FP8 tensors as bytes (``as_bytes``), to cross a Ray call; ``fp8_from_bytes`` undoes it."""
    return [(name, as_bytes(tensor)) for name, tensor in bucket]


def fp8_from_bytes(bucket: Sequence[tuple[str, torch.Tensor]]) -> list[tuple[str, torch.Tensor]]:
    """The FP8 bucket ``fp8_as_bytes`` made: each uint8 tensor that has a ``_scale_inv`` in the bucket is FP8."""
    scaled = {name.removesuffix(SCALE_SUFFIX) for name, _ in bucket if name.endswith(SCALE_SUFFIX)}
    return [(name, tensor.view(FP8_DTYPE) if tensor.dtype == torch.uint8 and name in scaled else tensor)
            for name, tensor in bucket]


def round_trip_fp8_(model: torch.nn.Module) -> None:
    """Replace, in place, each linear weight the FP8 layout quantizes by ``dequantize(quantize(weight))``: the weights
    an FP8 engine loads from the FP8 checkpoint of this model."""
    with torch.no_grad():
        for name, tensor in model.state_dict(keep_vars=True).items():
            if is_quantized_weight(name, tensor):
                tensor.copy_(dequantize_block_fp8(*quantize_block_fp8(tensor), tensor.dtype))


def write_fp8_checkpoint(hf_dir: str | Path, out_dir: str | Path, *, tp_size: int,
                         tp_field: str = "tp_size") -> Path:
    """An FP8 copy of the HF checkpoint ``hf_dir`` in ``out_dir``, the one SGLang engines start from under
    ``rollout.quantization=fp8``: linear weights as FP8 + ``*_scale_inv``, every other tensor as it is, the
    tokenizer and generation files copied, and ``config.json`` with ``quantization_config`` =
    ``FP8_QUANTIZATION_CONFIG``. A model whose per-rank slices an SGLang server of ``tp_size`` GPUs cannot load
    (``check_sglang_block_alignment``; ``tp_field`` names the option that set it) is refused first, before anything
    is written."""
    from megatron_zero.models.hf_io import HFCheckpointReader, HFCheckpointWriter, copy_non_weight_files
    from megatron_zero.models.registry import read_architecture

    hf_dir, out_dir = Path(hf_dir), Path(out_dir)
    check_sglang_block_alignment(read_architecture(hf_dir), tp_size, tp_field)
    reader = HFCheckpointReader(hf_dir)
    try:
        copy_non_weight_files(hf_dir, out_dir)
        writer = HFCheckpointWriter(out_dir)
        for name in reader.names():
            for out_name, tensor in quantize_bucket([(name, reader.get(name))]):
                writer.add(out_name, tensor)
        writer.finish()
    finally:
        reader.close()
    config_path = out_dir / "config.json"
    config = json.loads(config_path.read_text(encoding="utf-8"))
    config["quantization_config"] = dict(FP8_QUANTIZATION_CONFIG)
    config_path.write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
    return out_dir


def is_fp8_checkpoint(hf_dir: str | Path) -> bool:
    """Whether ``hf_dir``'s config.json declares the block-FP8 layout ``write_fp8_checkpoint`` writes."""
    config_path = Path(hf_dir) / "config.json"
    if not config_path.is_file():
        return False
    quantization = json.loads(config_path.read_text(encoding="utf-8")).get("quantization_config") or {}
    return all(quantization.get(key) == value for key, value in FP8_QUANTIZATION_CONFIG.items())


def _sglang_slice_misfits(arch: "DecoderArchitecture", tp_size: int) -> list[str]:
    """What SGLang 0.5.23 refuses when it loads block-FP8 weights of ``arch`` on ``tp_size`` ranks, one line each.

    Mirrors its layers: ``QKVParallelLinear`` gives each rank ``heads / tp`` query heads and ``kv_heads / tp`` kv
    heads, or, when ``tp >= kv_heads``, one kv head replicated on ``tp / kv_heads`` ranks (so both must divide);
    ``MergedColumnParallelLinear`` splits gate and up by ``tp``; ``RowParallelLinear`` splits o_proj's and
    down_proj's input by ``tp`` (sglang/srt/layers/linear.py). ``Fp8LinearMethod.validate_block_quant_shapes``
    (srt/layers/quantization/fp8.py) then needs every fused output slice to be a multiple of the block rows (at any
    tp, since q/k/v and gate/up are fused) and, at tp > 1, every row-parallel input slice a multiple of the block
    columns."""
    heads, kv_heads, ffn = arch.num_attention_heads, arch.num_query_groups, arch.ffn_hidden_size
    rows, cols = BLOCK_SIZE
    misfits, slices = [], []
    if heads % tp_size:
        misfits.append(f"num_attention_heads={heads} does not split over tp_size={tp_size}")
    else:
        slices.append(("self_attn.q_proj output", heads // tp_size * arch.head_dim, rows))
        if tp_size > 1:
            slices.append(("self_attn.o_proj input", heads // tp_size * arch.head_dim, cols))
    if kv_heads % tp_size and tp_size % kv_heads:
        misfits.append(f"num_key_value_heads={kv_heads} neither splits over nor replicates onto tp_size={tp_size}")
    else:
        kv_slice = max(kv_heads // tp_size, 1) * arch.head_dim  # one replicated kv head per rank when tp >= kv heads
        slices += [("self_attn.k_proj output", kv_slice, rows), ("self_attn.v_proj output", kv_slice, rows)]
    if ffn % tp_size:
        misfits.append(f"intermediate_size={ffn} does not split over tp_size={tp_size}")
    else:
        slices += [("mlp.gate_proj output", ffn // tp_size, rows), ("mlp.up_proj output", ffn // tp_size, rows)]
        if tp_size > 1:
            slices.append(("mlp.down_proj input", ffn // tp_size, cols))
    return misfits + [f"{what} slice {size} is not a multiple of {block}" for what, size, block in slices
                      if size % block]


def check_sglang_block_alignment(arch: "DecoderArchitecture", tp_size: int, field: str = "tp_size") -> None:
    """Raise if an SGLang server of ``tp_size`` GPUs would refuse block-FP8 weights of ``arch`` at load, naming
    every projection whose per-rank slice is not whole blocks and the values of ``field`` (the option that set
    ``tp_size``) that would load."""
    misfits = _sglang_slice_misfits(arch, tp_size)
    if misfits:
        heads = arch.num_attention_heads
        fits = [tp for tp in range(1, heads + 1) if heads % tp == 0 and not _sglang_slice_misfits(arch, tp)]
        fix = f"use {field} in {fits}" if fits else f"no {field} fits: serve this model without FP8 weights"
        raise ValueError(f"{field}={tp_size}: an SGLang server of tp_size={tp_size} cannot load {BLOCK_SIZE[0]}x"
                         f"{BLOCK_SIZE[1]} block-FP8 weights of this model: {'; '.join(misfits)}; {fix}")
