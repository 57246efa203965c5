"""tools/benchmark_throughput.py at the tiny shape on CPU: every field of its JSON, counted against the batch.

The step runs the real components (torch engine, grader pool, Megatron actor, weight stream) once as warm-up and
once timed, on one spawned worker; the checks recompute tokens, FLOPs, bytes and rates independently.

    python -m pytest tests/test_benchmark_throughput.py -q
"""

from __future__ import annotations

import json
import math
import os
import sys

import pytest
import torch

from megatron_zero.benchmark.devices import table_peak_tflops
from megatron_zero.benchmark.shapes import MODEL_SHAPES, fit_num_layers, resident_bytes
from megatron_zero.models.registry import get_bridge

NUM_PROMPTS, SAMPLES, PROMPT_TOKENS, RESPONSE_TOKENS = 2, 4, 8, 16


@pytest.fixture(scope="module")
def result(tmp_path_factory):
    import benchmark_throughput

    out = tmp_path_factory.mktemp("bench") / "bench.json"
    argv = ["benchmark_throughput.py", "--shape", "tiny-qwen2", "--device", "cpu", "--num-prompts", str(NUM_PROMPTS),
            "--samples-per-prompt", str(SAMPLES), "--prompt-tokens", str(PROMPT_TOKENS), "--response-tokens",
            str(RESPONSE_TOKENS), "--grader-workers", "1", "--peak-tflops", "0.5", "--out", str(out)]
    saved, environment = sys.argv, dict(os.environ)
    sys.argv = argv
    try:
        benchmark_throughput.main()
    finally:
        sys.argv = saved
    # Hiding the GPUs from the benchmark's worker must not leak into the caller (Ray would then see none).
    assert dict(os.environ) == environment
    return json.loads(out.read_text())


def test_benchmark_counts_tokens_flops_and_bytes(result):
    num_rows = NUM_PROMPTS * SAMPLES
    row_length = PROMPT_TOKENS + RESPONSE_TOKENS
    arch = get_bridge(MODEL_SHAPES["tiny-qwen2"]).parse(MODEL_SHAPES["tiny-qwen2"])
    phases = result["phases"]
    assert set(phases) == {"generate", "reward", "logprob", "train", "sync"}
    assert result["model"]["num_layers"] == result["model"]["num_layers_config"] == 2
    assert result["device"]["type"] == "cpu" and result["device"]["dtype"] == "float32"

    generate = phases["generate"]
    assert generate["generated_tokens"] == num_rows * RESPONSE_TOKENS  # no stop token: every row runs to the limit
    assert generate["prompt_tokens"] == num_rows * PROMPT_TOKENS
    assert math.isclose(generate["tokens_per_s"], generate["generated_tokens"] / generate["seconds"])

    reward = phases["reward"]
    assert reward["responses"] == num_rows and sum(reward["counts"].values()) == num_rows
    assert math.isclose(reward["responses_per_s"], num_rows / reward["seconds"])

    forward = num_rows * arch.forward_flops(row_length)
    for name, flops in (("logprob", forward), ("train", 3 * forward)):
        phase = phases[name]
        # The model's own input counter saw exactly the batch's tokens: equal-length rows, no padding.
        assert phase["batch_tokens"] == phase["model_tokens"] == num_rows * row_length
        assert math.isclose(phase["flops"], flops)
        assert math.isclose(phase["tflops_per_s"], flops / phase["seconds"] / 1e12)
        assert math.isclose(phase["mfu"], phase["tflops_per_s"] / 0.5)  # against --peak-tflops
    assert math.isfinite(phases["train"]["loss"]) and math.isfinite(phases["train"]["grad_norm"])
    assert result["device"]["peak_source"] == "--peak-tflops" and result["device"]["mfu_note"] is None

    # The weight stream sends every HF tensor once, in float32: the HF model's parameter bytes.
    from transformers import AutoConfig, AutoModelForCausalLM

    fields = {k: v for k, v in MODEL_SHAPES["tiny-qwen2"].items() if k != "model_type"}
    hf_model = AutoModelForCausalLM.from_config(AutoConfig.for_model("qwen2", **fields))
    num_params = sum(p.numel() for p in hf_model.parameters())  # tied embedding counted once
    assert result["model"]["num_parameters"] == num_params
    sync = phases["sync"]
    assert sync["num_bytes"] == 4 * num_params
    assert math.isclose(sync["gb_per_s"], sync["num_bytes"] / 1e9 / sync["seconds"])
    assert 0 < sync["reshard_seconds"] <= sync["seconds"] and sync["device_copy_gb_per_s"] > 0

    step = result["step"]
    assert math.isclose(step["seconds"], sum(phases[name]["seconds"] for name in phases))
    assert math.isclose(sum(step["share"].values()), 1.0)
    assert step["num_tokens"] == num_rows * row_length
    assert math.isclose(step["tokens_per_s_per_gpu"], step["num_tokens"] / step["seconds"])
    assert len(result["seconds_per_step"]) == 1 and result["command"].endswith("bench.json")


def test_peak_table_matches_device_names():
    assert table_peak_tflops("NVIDIA H100 80GB HBM3", "bfloat16") == ("H100 SXM", 989.4)
    assert table_peak_tflops("NVIDIA H200", "float32") == ("H200", 66.9)
    assert table_peak_tflops("NVIDIA A100-SXM4-80GB", "bfloat16") == ("A100", 312.0)
    # Lower-clocked parts and unknown devices get no MFU rather than a wrong one.
    assert table_peak_tflops("NVIDIA H100 PCIe", "bfloat16") == (None, None)
    assert table_peak_tflops("NVIDIA H100 NVL", "bfloat16") == (None, None)
    assert table_peak_tflops("cpu (2 threads)", "float32") == (None, None)


def test_fit_num_layers_cuts_to_the_memory():
    arch = get_bridge(MODEL_SHAPES["qwen2.5-7b"]).parse(MODEL_SHAPES["qwen2.5-7b"])
    # 7.6B parameters x (18 actor + 2 engine) bytes: ~150 GB, over 70% of an H200's 141 GB.
    assert 1.4e11 < resident_bytes(arch, arch.num_layers, "bfloat16") < 1.6e11
    fitted = fit_num_layers(arch, "bfloat16", 141 * 10**9)
    assert 0 < fitted < arch.num_layers
    assert resident_bytes(arch, fitted, "bfloat16") <= 0.7 * 141e9 < resident_bytes(arch, fitted + 1, "bfloat16")
    assert fit_num_layers(arch, "bfloat16", 10**15) == arch.num_layers
    with pytest.raises(ValueError, match="even one layer"):
        fit_num_layers(arch, "bfloat16", 10**9)


def test_bad_spec_is_refused_in_one_line():
    from megatron_zero.benchmark.throughput import BenchmarkSpec, run_benchmark

    with pytest.raises(ValueError, match="max_tokens_per_microbatch=64 is below one row"):
        BenchmarkSpec(shape="tiny-qwen2", prompt_tokens=32, response_tokens=64, max_tokens_per_microbatch=64)
    with pytest.raises(ValueError, match="neither a known shape"):
        run_benchmark(BenchmarkSpec(shape="no-such-model"), "/nonexistent")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="device='cuda' but torch sees no CUDA"):
            run_benchmark(BenchmarkSpec(shape="tiny-qwen2", device="cuda"), "/nonexistent")


def test_fp8_rollout_sync_sends_the_fp8_layouts_bytes(result, tmp_path):
    """--rollout-quantization fp8: the engine receives FP8 linear weights plus scales, the resharding still moves
    the float32 actor; the byte count is recomputed from the tiny shape's tensors."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from megatron_zero.benchmark.throughput import BenchmarkSpec, run_benchmark
    from megatron_zero.rollout.fp8_weights import encode_bucket

    spec = BenchmarkSpec(shape="tiny-qwen2", device="cpu", num_prompts=NUM_PROMPTS, samples_per_prompt=SAMPLES,
                         prompt_tokens=PROMPT_TOKENS, response_tokens=RESPONSE_TOKENS, grader_workers=1,
                         rollout_quantization="fp8")
    sync = run_benchmark(spec, str(tmp_path))["phases"]["sync"]
    assert sync["resharded_bytes"] == result["phases"]["sync"]["num_bytes"]
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(AutoConfig.for_model(**MODEL_SHAPES["tiny-qwen2"]))
    tensors = [(name, torch.empty(t.shape)) for name, t in model.state_dict().items()
               if not (model.config.tie_word_embeddings and name == "lm_head.weight")]
    assert sync["num_bytes"] == sum(t.numel() * t.element_size() for _, t in encode_bucket(tensors, "fp8"))
    assert sync["num_bytes"] < sync["resharded_bytes"] / 2
