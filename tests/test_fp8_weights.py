"""FP8 rollout weights (``megatron_zero/rollout/fp8_weights.py``): the e4m3 rounding bound, SGLang's block-scale
layout, the bytes a bucket saves, and the torch engine running the dequantized weights.

The bound: a weight block with absmax ``a`` is scaled by ``s = a / 448`` so ``q = w / s`` lies in [-448, 448].
e4m3 has 3 mantissa bits, so a normal ``q`` (|q| >= 2^-6) in [2^e, 2^(e+1)) sits on a grid of spacing 2^(e-3) and
round-to-nearest moves it by at most half that, 2^(e-4) <= |q| * 2^-4; below 2^-6 the subnormal grid has spacing
2^-9, a move of at most 2^-10. Scaled back: |w - w_fp8| <= max(|w| * 2^-4, s * 2^-10) per element, hence at most
2^-4 * a in every block (|w| <= a). The float32 division and product add ~2^-24 relative, covered by the slack.

    python -m pytest tests/test_fp8_weights.py -q
"""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from megatron_zero.rollout.fp8_weights import (
    FP8_DTYPE,
    SCALE_SUFFIX,
    check_sglang_block_alignment,
    dequantize_block_fp8,
    dequantize_bucket,
    quantize_block_fp8,
    quantize_bucket,
)

SLACK = 1 + 1e-6


def block_weight(shape: tuple[int, int], seed: int = 0) -> torch.Tensor:
    """Random weight whose 128x128 blocks span six decades of magnitude, with one all-zero block."""
    generator = torch.Generator().manual_seed(seed)
    weight = torch.randn(shape, generator=generator)
    rows, cols = math.ceil(shape[0] / 128), math.ceil(shape[1] / 128)
    magnitudes = 10.0 ** torch.linspace(-4, 2, rows * cols).view(rows, cols)
    magnitudes[0, -1] = 0.0
    return weight * magnitudes.repeat_interleave(128, 0).repeat_interleave(128, 1)[:shape[0], :shape[1]]


def reference_scale(weight: torch.Tensor) -> torch.Tensor:
    """Block absmax / 448 by a plain loop over the blocks: scale_inv[i, j] belongs to rows i*128.., columns j*128.."""
    rows, cols = math.ceil(weight.shape[0] / 128), math.ceil(weight.shape[1] / 128)
    scale = torch.empty(rows, cols)
    for i in range(rows):
        for j in range(cols):
            amax = weight[i * 128:(i + 1) * 128, j * 128:(j + 1) * 128].abs().max()
            scale[i, j] = amax / 448 if amax > 0 else 1.0
    return scale


def expand(scale_inv: torch.Tensor, shape: torch.Size) -> torch.Tensor:
    return scale_inv.repeat_interleave(128, 0).repeat_interleave(128, 1)[:shape[0], :shape[1]]


def element_bound(weight: torch.Tensor, scale_inv: torch.Tensor) -> torch.Tensor:
    return torch.maximum(weight.abs() * 2**-4, expand(scale_inv, weight.shape) * 2**-10) * SLACK


@pytest.mark.parametrize("shape", [(200, 300), (256, 128), (7, 129)])
def test_round_trip_error_is_within_the_e4m3_bound(shape):
    weight = block_weight(shape)
    fp8, scale_inv = quantize_block_fp8(weight)
    assert fp8.dtype == FP8_DTYPE and tuple(fp8.shape) == shape
    assert scale_inv.dtype == torch.float32
    torch.testing.assert_close(scale_inv, reference_scale(weight), rtol=0, atol=0)
    restored = dequantize_block_fp8(fp8, scale_inv, torch.float32)
    error = (weight - restored).abs()
    assert torch.isfinite(restored).all()
    assert (error <= element_bound(weight, scale_inv)).all()
    # The block form of the bound (2^-4 of the block's absmax, 448 * scale_inv).
    assert (error <= expand(scale_inv, weight.shape) * 448 * 2**-4 * SLACK).all()
    assert restored[:128, 128 * (math.ceil(shape[1] / 128) - 1):].abs().max() == 0  # the all-zero block
    # The bound is met because values were rounded, not left alone: the worst relative error is near 2^-4.
    relative = error[weight.abs() > 1e-30] / weight.abs()[weight.abs() > 1e-30]
    assert relative.max() > 2**-5


def test_bf16_weights_quantize_from_their_own_values():
    weight = block_weight((300, 200), seed=1).to(torch.bfloat16)
    fp8, scale_inv = quantize_block_fp8(weight)
    restored = dequantize_block_fp8(fp8, scale_inv, torch.float32)
    assert ((weight.float() - restored).abs() <= element_bound(weight.float(), scale_inv)).all()
    assert dequantize_block_fp8(fp8, scale_inv, torch.bfloat16).dtype == torch.bfloat16


def test_wrong_scale_layout_gives_a_large_error():
    """Negative control: the per-block scale placed transposed (scale_inv.T, the same shape for a square block grid)
    breaks the bound by orders of magnitude, so the round-trip test does see the layout."""
    weight = block_weight((256, 256), seed=2)
    fp8, scale_inv = quantize_block_fp8(weight)
    wrong = dequantize_block_fp8(fp8, scale_inv.T.contiguous(), torch.float32)
    assert ((weight - wrong).abs() / element_bound(weight, scale_inv)).max() > 100
    with pytest.raises(ValueError, match=r"scale_inv \(3, 2\) does not match a \(256, 256\) weight"):
        dequantize_block_fp8(fp8, torch.ones(3, 2), torch.float32)


def test_bucket_has_sglang_names_and_scale_shapes_and_leaves_the_rest():
    layer = "model.layers.3"
    shapes = {f"{layer}.self_attn.q_proj.weight": (200, 300), f"{layer}.self_attn.k_proj.weight": (64, 300),
              f"{layer}.self_attn.v_proj.weight": (64, 300), f"{layer}.self_attn.o_proj.weight": (300, 200),
              f"{layer}.mlp.gate_proj.weight": (520, 300), f"{layer}.mlp.up_proj.weight": (520, 300),
              f"{layer}.mlp.down_proj.weight": (300, 520)}
    untouched = {"model.embed_tokens.weight": torch.randn(50, 300), "lm_head.weight": torch.randn(50, 300),
                 "model.norm.weight": torch.randn(300), f"{layer}.input_layernorm.weight": torch.randn(300),
                 f"{layer}.post_attention_layernorm.weight": torch.randn(300),
                 f"{layer}.self_attn.q_proj.bias": torch.randn(200)}
    bucket = [(name, torch.randn(shape)) for name, shape in shapes.items()] + list(untouched.items())
    quantized = quantize_bucket(bucket)
    names = [name for name, _ in quantized]
    expected = [n for name in shapes for n in (name, name + SCALE_SUFFIX)] + list(untouched)
    assert names == expected
    tensors = dict(quantized)
    for name, (out_features, in_features) in shapes.items():
        assert tensors[name].dtype == FP8_DTYPE and tensors[name].shape == (out_features, in_features)
        scale = tensors[name + SCALE_SUFFIX]
        assert scale.dtype == torch.float32
        assert tuple(scale.shape) == (-(-out_features // 128), -(-in_features // 128))
    for name, tensor in untouched.items():
        assert tensors[name] is tensor
    # The inverse restores names, order, shapes and the untouched tensors.
    restored = dequantize_bucket(quantized, torch.bfloat16)
    assert [n for n, _ in restored] == [n for n, _ in bucket]
    assert all(t.shape == original.shape for (_, t), (_, original) in zip(restored, bucket))
    assert all(dict(restored)[name] is tensor for name, tensor in untouched.items())


def test_dequantize_bucket_refuses_a_weight_and_its_scale_split():
    (name, fp8), (scale_name, scale) = quantize_bucket([("model.layers.0.mlp.up_proj.weight", torch.randn(8, 8))])
    with pytest.raises(ValueError, match="without a _scale_inv"):
        dequantize_bucket([(name, fp8)], torch.float32)
    with pytest.raises(ValueError, match="has no FP8 weight"):
        dequantize_bucket([(scale_name, scale)], torch.float32)


def test_fp8_bucket_is_half_the_bytes_of_bf16():
    """Qwen2.5-0.5B's linear shapes in one layer (hidden 896, 2 KV heads of 64, MLP 4864): FP8 weight + float32
    block scales against bf16."""
    shapes = {"self_attn.q_proj": (896, 896), "self_attn.k_proj": (128, 896), "self_attn.v_proj": (128, 896),
              "self_attn.o_proj": (896, 896), "mlp.gate_proj": (4864, 896), "mlp.up_proj": (4864, 896),
              "mlp.down_proj": (896, 4864)}
    bucket = [(f"model.layers.0.{name}.weight", torch.randn(shape, dtype=torch.bfloat16))
              for name, shape in shapes.items()]
    bf16_bytes = sum(t.numel() * t.element_size() for _, t in bucket)
    fp8_bytes = sum(t.numel() * t.element_size() for _, t in quantize_bucket(bucket))
    assert 0.5 < fp8_bytes / bf16_bytes < 0.501


def _example_architecture(name: str):
    from megatron_zero.models.registry import read_architecture

    return read_architecture(Path(__file__).resolve().parents[1] / "examples/model_configs" / name)


@pytest.mark.parametrize("model, tp_size", [("Qwen2.5-0.5B", 1), ("Qwen2.5-7B", 4), ("Llama-3.1-8B", 16)])
def test_sglang_alignment_check_accepts_whole_block_slices(model, tp_size):
    # Llama-3.1-8B at 16 ranks: 32 heads x 128 / 16 = 256 for q, its 8 kv heads replicated (one of 128 per rank),
    # 14336 / 16 = 896 = 7 blocks for gate/up.
    check_sglang_block_alignment(_example_architecture(model), tp_size)


@pytest.mark.parametrize("model, tp_size, misfits, fits", [
    # 14 heads x 64 = 896 = 7 blocks whole, but 448 per rank at tp 2; 2 kv heads x 64 / 2 = 64.
    ("Qwen2.5-0.5B", 2, ["self_attn.q_proj output slice 448", "self_attn.o_proj input slice 448",
                         "self_attn.k_proj output slice 64", "self_attn.v_proj output slice 64"], "[1]"),
    # 14 ranks: each holds one of the 2 kv heads (64 rows) replicated, and 4864 / 14 is not whole.
    ("Qwen2.5-0.5B", 14, ["intermediate_size=4864 does not split", "self_attn.k_proj output slice 64"], "[1]"),
    # 18944 / 8 = 2368 = 18.5 blocks; SGLang also cannot split 28 heads over 8 ranks.
    ("Qwen2.5-7B", 8, ["num_attention_heads=28 does not split", "mlp.gate_proj output slice 2368",
                       "mlp.up_proj output slice 2368", "mlp.down_proj input slice 2368"], "[1, 2, 4]"),
])
def test_sglang_alignment_check_refuses_per_rank_slices_naming_them(model, tp_size, misfits, fits):
    with pytest.raises(ValueError) as error:
        check_sglang_block_alignment(_example_architecture(model), tp_size, "rollout.sglang.tp_size")
    message = str(error.value)
    assert message.startswith(f"rollout.sglang.tp_size={tp_size}: ")
    assert all(misfit in message for misfit in misfits), message
    assert message.endswith(f"use rollout.sglang.tp_size in {fits}")


def test_sglang_alignment_check_needs_whole_fused_outputs_on_one_rank():
    # 2 kv heads of 32 rows: SGLang's fused qkv_proj needs each of q, k, v in whole blocks even unsplit.
    from megatron_zero.models.common.architecture import DecoderArchitecture

    base = dict(model_type="qwen2", vocab_size=256, hidden_size=128, num_layers=2, norm_epsilon=1e-6,
                rope_theta=1e6, rope_scaling=None, tie_word_embeddings=True, qkv_bias=True,
                max_position_embeddings=512, sliding_window=None, dtype=torch.float32)
    with pytest.raises(ValueError, match=r"self_attn\.k_proj output slice 64 is not a multiple of 128; "
                                         r"self_attn\.v_proj output slice 64 .*; no tp_size fits"):
        check_sglang_block_alignment(DecoderArchitecture(**base, ffn_hidden_size=256, num_attention_heads=4,
                                                         num_query_groups=2, head_dim=32), 1)
    check_sglang_block_alignment(DecoderArchitecture(**base, ffn_hidden_size=256, num_attention_heads=2,
                                                     num_query_groups=2, head_dim=64), 1)


def test_torch_engine_runs_the_dequantized_weights():
    """The demo model's buckets through quantize -> dequantize into the torch engine: every linear weight is now
    the FP8 one, the rest bit-identical, and the log-probs move but stay close."""
    from megatron_zero.demo import BASE_MODEL_PATH
    from megatron_zero.rollout.torch_engine import TorchEngine

    engine = TorchEngine.from_pretrained(str(BASE_MODEL_PATH))
    original = {name: t.detach().clone() for name, t in engine._model.state_dict().items()}
    prompts, responses = [[1, 5, 9, 30], [2, 40]], [[7, 8, 100, 3, 3], [250, 1, 2]]
    before = engine.compute_logprobs(prompts, responses, temperature=1.0)
    bucket = [(name, tensor) for name, tensor in original.items() if name != "lm_head.weight"]  # tied embedding
    engine.sync_weights([dequantize_bucket(quantize_bucket(bucket), torch.float32)], version=1)
    after = engine.compute_logprobs(prompts, responses, temperature=1.0)
    state = engine._model.state_dict()
    num_quantized = 0
    for name, tensor in original.items():
        if name.endswith("_proj.weight"):
            fp8, scale_inv = quantize_block_fp8(tensor)
            assert torch.equal(state[name], dequantize_block_fp8(fp8, scale_inv, torch.float32))
            assert not torch.equal(state[name], tensor)
            num_quantized += 1
        else:
            assert torch.equal(state[name], tensor), name
    assert num_quantized == 7 * 3
    gaps = [abs(a - b) for row_a, row_b in zip(after, before) for a, b in zip(row_a, row_b)]
    assert 0 < max(gaps) < 0.5
