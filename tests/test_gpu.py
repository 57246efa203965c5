"""Checks that need CUDA: run them on a lent GPU machine (skipped elsewhere).

    python -m pytest tests/test_gpu.py -q -m gpu

* The actor on one GPU (NCCL, Transformer Engine layers when installed, else megatron-core's local layers), in
  bf16, which TE's fused and flash attention need for the packed (THD) path: log-probs, packed and padded, near
  HF transformers' (computed on CPU in float32), and an optimizer step trains.
* TE layers load a checkpoint converted through the local spec (their ``_extra_state`` is not in it).
* Each FP8 recipe the GPU supports (``model.fp8_recipe``) trains on microbatches padded to its token multiple.

None of these has run on a GPU yet: the bf16 bounds come from the same model on CPU (below), the FP8 ones are
loose guesses, and both are to be tightened from the first measured run.
"""

import math

import pytest
import torch
from test_actor import _run, hf_logprobs, hf_reference, make_batch  # noqa: F401  (fixture)

from megatron_zero.config.parallel import ParallelConfig
from megatron_zero.parallel.local_launch import run_local_workers

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]

# |log-prob - HF's| over the response tokens, bf16 actor. Measured on CPU with megatron-core's local layers in bf16:
# mean 1.3e-3, max 3.6e-3 (entropy max 1e-4); bf16 keeps 8 bits of mantissa (relative rounding 2^-9), and TE's
# kernels round in other places, hence about 5x.
BF16_LOGP_MEAN, BF16_LOGP_MAX, BF16_ENTROPY_MAX = 5e-3, 2e-2, 2e-3
# FP8 (E4M3 forward: 3 mantissa bits, relative rounding 2^-4) on every GEMM input: loose, unmeasured bounds.
# TODO: tighten from the first GPU run; as they are they say only that FP8 did not break the model.
FP8_LOGP_MEAN, FP8_LOGP_MAX, FP8_ENTROPY_MAX = 0.25, 1.0, 0.25


def _have_te() -> bool:
    from megatron_zero.models.common.spec import have_transformer_engine

    return have_transformer_engine()


def _assert_near_hf(result: dict, reference: tuple, logp_mean: float, logp_max: float, entropy_max: float) -> None:
    hf_logp, hf_entropy = reference
    mask = make_batch().response_mask
    logp_gap = (result["logp"].double() - hf_logp)[mask].abs()
    assert logp_gap.mean() < logp_mean and logp_gap.max() < logp_max, (float(logp_gap.mean()), float(logp_gap.max()))
    assert (result["entropy"].double() - hf_entropy)[mask].abs().max() < entropy_max
    assert result["logp"][mask].lt(0).all()


@pytest.mark.parametrize("pack", [False, True])
def test_actor_on_gpu_bf16_matches_hf_and_trains(tiny_qwen2, hf_reference, pack):  # noqa: F811
    result = _run(tiny_qwen2[1], 1, 1, 32, train=True, pack=pack, model_fields={"params_dtype": "bfloat16"})
    _assert_near_hf(result, hf_reference, BF16_LOGP_MEAN, BF16_LOGP_MAX, BF16_ENTROPY_MAX)
    losses = [m["loss"] for m in result["metrics"]]
    assert losses[0] > losses[-1]
    assert result["packing"] == (("thd" if _have_te() else "dense_mask") if pack else None)


def _te_load_job(hf_dir: str, mcore_dir: str) -> dict:
    """Worker: a GPTModel of TE layers loads the converted checkpoint; its HF weights and the keys only it has."""
    from megatron_zero.config.model import ModelConfig
    from megatron_zero.models.hf_io import HFCheckpointReader
    from megatron_zero.models.mcore_checkpoint import load_mcore_weights, read_checkpoint_info
    from megatron_zero.parallel.reshard import HFWeightStream

    info = read_checkpoint_info(mcore_dir)
    model = info.bridge.build_model(info.arch, ModelConfig(transformer_impl="transformer_engine",
                                                           params_dtype="float32")).cuda()
    load_mcore_weights(model, mcore_dir)
    reader = HFCheckpointReader(hf_dir)
    stream = HFWeightStream(model, info.arch, info.bridge, bucket_bytes=1 << 30)
    mismatched = [name for bucket in stream for name, tensor in bucket
                  if not torch.equal(tensor.cpu(), reader.get(name).to(tensor.dtype))]
    return {"mismatched": mismatched,
            "extra_state": sorted(key for key in model.state_dict() if key.endswith("_extra_state"))}


@pytest.mark.skipif(not _have_te(), reason="needs transformer-engine")
def test_te_layers_load_converted_checkpoint(tiny_qwen2):
    result = run_local_workers(_te_load_job, ParallelConfig(), args=tiny_qwen2)[0]
    assert result["mismatched"] == []
    # The state the converted checkpoint lacks (TE's attention has extra state, the local spec's has none).
    assert "decoder.layers.0.self_attention.core_attention._extra_state" in result["extra_state"]


def _fp8_supported(recipe: str) -> bool:
    if not (torch.cuda.is_available() and _have_te()):
        return False
    from transformer_engine.pytorch import fp8  # TE 2.x: the check_* functions (2.20 keeps them re-exported here)

    check = {"delayed": fp8.check_fp8_support, "tensorwise": fp8.check_fp8_support,
             "mxfp8": fp8.check_mxfp8_support, "blockwise": fp8.check_fp8_block_scaling_support}[recipe]
    return check()[0]


@pytest.fixture(scope="module")
def fp8_model(tmp_path_factory):
    """A tiny Qwen2 whose weight shapes are multiples of 128 (blockwise FP8 scales 128 x 128 weight blocks)."""
    from megatron_zero.models.mcore_checkpoint import convert_hf_to_mcore
    from megatron_zero.models.tiny import save_tiny_model

    root = tmp_path_factory.mktemp("fp8_qwen2")
    hf_dir = save_tiny_model("qwen2", root / "hf", hidden_size=128, intermediate_size=256)
    run_local_workers(convert_hf_to_mcore, ParallelConfig(), args=(str(hf_dir), str(root / "mcore")))
    return str(hf_dir), str(root / "mcore")


@pytest.mark.parametrize("pack", [False, True], ids=["padded", "packed"])
@pytest.mark.parametrize("recipe", ["delayed", "tensorwise", "mxfp8", "blockwise"])
def test_fp8_recipe_trains_on_padded_microbatches(fp8_model, recipe, pack):
    if not _fp8_supported(recipe):
        pytest.skip(f"this GPU / Transformer Engine has no {recipe} FP8")
    # Budget 512: room for the rows padded to blockwise's 128 tokens. TE raises on an FP8 GEMM whose token count
    # is not a multiple its recipe needs, so getting through the steps shows the padding.
    result = _run(fp8_model[1], 1, 1, 512, train=True, pack=pack,
                  model_fields={"params_dtype": "bfloat16", "transformer_impl": "transformer_engine", "fp8": "hybrid",
                                "fp8_recipe": recipe})
    losses = [m["loss"] for m in result["metrics"]]
    assert all(math.isfinite(loss) for loss in losses) and losses[0] > losses[-1]
    _assert_near_hf(result, hf_logprobs(fp8_model[0]), FP8_LOGP_MEAN, FP8_LOGP_MAX, FP8_ENTROPY_MAX)
