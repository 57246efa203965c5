"""Checks that need CUDA: run them on a lent GPU machine (skipped elsewhere).

    python -m pytest tests/test_gpu.py -q -m gpu

The actor on one GPU (NCCL, Transformer Engine layers when installed, else megatron-core's local layers):
log-probs, packed and padded, equal HF transformers' (computed on CPU), and an optimizer step trains.
"""

import pytest
import torch

from test_actor import _assert_matches_hf, _run, hf_reference  # noqa: F401  (fixture)

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]


@pytest.mark.parametrize("pack", [False, True])
def test_actor_on_gpu_matches_hf_and_trains(tiny_qwen2, hf_reference, pack):  # noqa: F811
    result = _run(tiny_qwen2[1], 1, 1, 32, train=True, pack=pack)
    _assert_matches_hf(result, hf_reference)
    losses = [m["loss"] for m in result["metrics"]]
    assert losses[0] > losses[-1]
    assert result["packing"] == (("thd" if _have_te() else "dense_mask") if pack else None)


def _have_te() -> bool:
    from megatron_zero.models.common.spec import have_transformer_engine

    return have_transformer_engine()
