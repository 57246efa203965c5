"""rollout.quantization=fp8 end to end, short of a GPU: the torch engine holding and receiving FP8 weights, the FP8
checkpoint SGLang engines start from, the broadcast of FP8 buckets to a CPU stand-in server started from it, and
the config errors before Ray. The trainer run is in tests/test_trainer.py; the format itself in
tests/test_fp8_weights.py.

    python -m pytest tests/test_fp8_rollout.py -q
"""

from __future__ import annotations

import json

import pytest
import torch

from megatron_zero.config.parallel import ParallelConfig
from megatron_zero.parallel.local_launch import run_local_workers
from megatron_zero.rollout.fp8_weights import (
    FP8_DTYPE,
    FP8_QUANTIZATION_CONFIG,
    SCALE_SUFFIX,
    dequantize_block_fp8,
    encode_bucket,
    is_quantized_weight,
    quantize_block_fp8,
    round_trip_fp8_,
    write_fp8_checkpoint,
)

# Tiny Qwen2 whose fused projections are block-aligned, as SGLang's FP8 loader needs: q/k/v 2 heads x 64 = 128
# rows, gate/up 256.
ALIGNED = dict(hidden_size=128, intermediate_size=256, num_attention_heads=2, num_key_value_heads=2)


def _nbytes(bucket) -> int:
    return sum(tensor.numel() * tensor.element_size() for _, tensor in bucket)


def _fp8_round_trip(tensor: torch.Tensor) -> torch.Tensor:
    return dequantize_block_fp8(*quantize_block_fp8(tensor), tensor.dtype)


def test_torch_engine_starts_from_and_receives_fp8_weights(tmp_path):
    """Built with quantization="fp8" the engine computes with the FP8 round trip of its checkpoint's linear
    weights (as an FP8 engine loading the FP8 checkpoint would); a sync of FP8 buckets leaves it at the round
    trip of the sent weights, its stats count the bytes sent; a linear weight sent unquantized is refused."""
    from transformers import AutoModelForCausalLM

    from megatron_zero.models.tiny import save_tiny_model
    from megatron_zero.rollout.torch_engine import TorchEngine

    start = save_tiny_model("qwen2-untied", tmp_path / "start", seed=0)
    pushed = AutoModelForCausalLM.from_pretrained(str(save_tiny_model("qwen2-untied", tmp_path / "pushed", seed=1)))
    engine = TorchEngine.from_pretrained(str(start), quantization="fp8")
    original = AutoModelForCausalLM.from_pretrained(str(start)).state_dict()
    quantized = [name for name, tensor in original.items() if is_quantized_weight(name, tensor)]
    assert len(quantized) == 7 * 2  # q, k, v, o, gate, up, down in each of 2 layers
    state = engine._model.state_dict()
    for name, tensor in original.items():
        expected = _fp8_round_trip(tensor) if name in quantized else tensor
        assert torch.equal(state[name], expected), name

    sent = pushed.state_dict()
    buckets = [encode_bucket(list(sent.items())[:5], "fp8"), encode_bucket(list(sent.items())[5:], "fp8")]
    assert all(any(tensor.dtype == FP8_DTYPE for _, tensor in bucket) for bucket in buckets)
    stats = engine.sync_weights(buckets, version=1)
    assert stats.num_bytes == sum(_nbytes(bucket) for bucket in buckets) < _nbytes(sent.items())
    state = engine._model.state_dict()
    for name, tensor in sent.items():
        assert torch.equal(state[name], _fp8_round_trip(tensor) if name in quantized else tensor), name

    unquantized = list(sent.items())
    with pytest.raises(ValueError, match=r"'model.layers.0.self_attn.q_proj.weight' arrived as torch.float32, but "
                                         r"this engine holds FP8 weights"):
        engine.sync_weights([unquantized], version=2)
    # An engine without quantization refuses FP8 tensors by their dtype, as before.
    plain = TorchEngine.from_pretrained(str(start))
    with pytest.raises(ValueError, match="float8_e4m3fn"):
        plain.sync_weights(buckets, version=1)


def test_fp8_checkpoint_has_sglang_layout_and_refuses_unfusable_shapes(tmp_path):
    """write_fp8_checkpoint: FP8 linear weights with [ceil(out/128), ceil(in/128)] float32 scales, everything else
    and the tokenizer as they were, config.json declaring SGLang's block-FP8 config; a model whose fused
    projections are not block-aligned is refused before anything is written."""
    from safetensors import safe_open

    from megatron_zero.demo.tokenizer import build_char_tokenizer
    from megatron_zero.models.hf_io import HFCheckpointReader
    from megatron_zero.models.tiny import save_tiny_model

    model_dir = save_tiny_model("qwen2", tmp_path / "hf", **ALIGNED)
    build_char_tokenizer().save_pretrained(str(model_dir))
    out = write_fp8_checkpoint(model_dir, tmp_path / "fp8", tp_size=1)
    config = json.loads((out / "config.json").read_text())
    assert config["quantization_config"] == FP8_QUANTIZATION_CONFIG
    assert (out / "tokenizer.json").is_file()
    source, written = HFCheckpointReader(model_dir), HFCheckpointReader(out)
    fp8_names = [name for name in written.names() if written.get(name).dtype == FP8_DTYPE]
    assert len(fp8_names) == 7 * 2
    for name in source.names():
        original = source.get(name)
        if name in fp8_names:
            scale = written.get(name + SCALE_SUFFIX)
            assert scale.dtype == torch.float32
            assert list(scale.shape) == [-(-original.shape[0] // 128), -(-original.shape[1] // 128)]
            expected_fp8, expected_scale = quantize_block_fp8(original)
            assert torch.equal(written.get(name).view(torch.uint8), expected_fp8.view(torch.uint8))
            assert torch.equal(scale, expected_scale)
        else:
            assert torch.equal(written.get(name), original), name
    assert set(written.names()) == set(source.names()) | {name + SCALE_SUFFIX for name in fp8_names}
    shard = next(out.glob("model-*.safetensors"))
    with safe_open(shard, framework="pt") as f:  # what SGLang's loader reads: safetensors' own F8_E4M3 dtype
        assert any(f.get_slice(name).get_dtype() == "F8_E4M3" for name in f.keys())

    unaligned = save_tiny_model("qwen2", tmp_path / "unaligned")
    with pytest.raises(ValueError, match=r"tp_size=1: an SGLang server of tp_size=1 cannot load 128x128 block-FP8 "
                                         r"weights of this model: .*self_attn\.k_proj output slice"):
        write_fp8_checkpoint(unaligned, tmp_path / "never", tp_size=1)
    assert not (tmp_path / "never").exists()


def test_hf_to_fp8_refuses_a_tp_size_whose_rank_slices_sglang_cannot_load(tmp_path, capsys):
    """The ALIGNED model's q/k/v are one 128-row block each: whole on one rank, 64 rows per rank at --tp-size 2,
    which SGLang's loader refuses, so the converter does too, before writing anything."""
    import convert_checkpoint

    from megatron_zero.demo.tokenizer import build_char_tokenizer
    from megatron_zero.models.tiny import save_tiny_model

    model_dir = save_tiny_model("qwen2", tmp_path / "hf", **ALIGNED)
    build_char_tokenizer().save_pretrained(str(model_dir))
    capsys.readouterr()  # transformers' progress bars
    argv = ["hf-to-fp8", "--hf", str(model_dir), "--out", str(tmp_path / "tp2"), "--tp-size", "2"]
    assert convert_checkpoint.main(argv) == 2
    error = capsys.readouterr().err
    assert error.startswith("error: --tp-size=2: an SGLang server of tp_size=2 cannot load"), error
    assert "self_attn.q_proj output slice 64 is not a multiple of 128" in error
    assert error.rstrip().endswith("use --tp-size in [1]")
    assert not (tmp_path / "tp2").exists()
    assert convert_checkpoint.main(["hf-to-fp8", "--hf", str(model_dir), "--out", str(tmp_path / "tp1")]) == 0
    assert (tmp_path / "tp1" / "config.json").is_file()


def _fp8_broadcast_job(mcore_dir: str, server_model_dir: str, url: str, quantization):
    from megatron_zero.actor.actor import load_model
    from megatron_zero.config.model import ModelConfig
    from megatron_zero.config.sglang import SGLangConfig
    from megatron_zero.parallel.reshard import HFWeightStream
    from megatron_zero.trainer.weight_push import BroadcastWeightPush

    model, info = load_model(mcore_dir, ModelConfig(params_dtype="float32"))
    config = SGLangConfig(model_path=server_model_dir, colocated=False, retry_backoff_s=0.0, control_timeout_s=60.0)
    push = BroadcastWeightPush([url], config, backend="gloo", master_address="127.0.0.1", quantization=quantization)
    stats = push.push(HFWeightStream(model, info.arch, info.bridge, bucket_bytes=64 * 1024), 1)
    return None if stats is None else (stats.num_bytes, sorted(stats.names))


def test_fp8_buckets_broadcast_to_an_fp8_server_serve_the_fp8_policy(tmp_path):
    """Disaggregated: a stand-in server started from an FP8 checkpoint takes rank 0's FP8 buckets (float8 goes
    over the wire as bytes) and then serves exactly the FP8 round trip of the pushed policy (float64 reference);
    an unquantized push to it (no scales) is refused at the end of the sync, naming the setting."""
    from test_sglang_cpu_server import float64_logprobs, start_server, wait_healthy
    from transformers import AutoModelForCausalLM

    from megatron_zero.config.sglang import SGLangConfig
    from megatron_zero.demo.tokenizer import build_char_tokenizer
    from megatron_zero.models.mcore_checkpoint import convert_hf_to_mcore
    from megatron_zero.models.tiny import save_tiny_model
    from megatron_zero.rollout.sglang_engine import SGLangEngine

    pushed_dir = save_tiny_model("qwen2", tmp_path / "pushed", seed=2, **ALIGNED)
    mcore_dir = str(tmp_path / "mcore")
    run_local_workers(convert_hf_to_mcore, ParallelConfig(), args=(str(pushed_dir), mcore_dir))
    served_dir = save_tiny_model("qwen2", tmp_path / "served", seed=3, **ALIGNED)
    build_char_tokenizer().save_pretrained(str(served_dir))
    fp8_dir = write_fp8_checkpoint(served_dir, tmp_path / "served_fp8", tp_size=1)
    # The reference: the pushed model with its linear weights through the FP8 round trip, in float64.
    reference = AutoModelForCausalLM.from_pretrained(str(pushed_dir))
    round_trip_fp8_(reference)
    reference.save_pretrained(str(tmp_path / "reference"))
    prompt, response = [5, 17, 3, 99], [42, 7, 250, 1, 64]
    expected = float64_logprobs(tmp_path / "reference", prompt, response)

    process, port = start_server(fp8_dir, tmp_path / "server.log")
    try:
        wait_healthy(process, port, tmp_path / "server.log")
        url = f"http://127.0.0.1:{port}"
        engine = SGLangEngine(SGLangConfig(model_path=str(fp8_dir), port=port, colocated=False))

        def gap() -> float:
            served = engine.compute_logprobs([prompt], [response], 1.0)[0]
            return max(abs(a - b) for a, b in zip(served, expected))

        assert gap() > 0.1  # another model before the push: the check can fail
        num_bytes, names = run_local_workers(_fp8_broadcast_job, ParallelConfig(),
                                             args=(mcore_dir, str(fp8_dir), url, "fp8"))[0]
        assert any(name.endswith(SCALE_SUFFIX) for name in names)
        assert gap() < 1e-5
        with pytest.raises(Exception, match=r"weight_scale_inv.*its scales were not sent: set "
                                            r"rollout.quantization=fp8"):
            run_local_workers(_fp8_broadcast_job, ParallelConfig(), args=(mcore_dir, str(fp8_dir), url, None))
    finally:
        process.kill()
        process.wait()
