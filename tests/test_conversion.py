"""HF <-> Megatron conversion of tiny models of every family, proven by round trips and logits.

Each family's tiny model (megatron_zero.models.tiny) carries its awkward shapes: odd vocabulary
(padding), GQA, Qwen2 QKV bias and tied embeddings, llama3 rotary scaling, Mistral's
head_dim != hidden/heads and a sliding window shorter than the test sequence.
"""

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import convert_checkpoint
from megatron_zero.models.hf_io import HFCheckpointReader
from megatron_zero.models.tiny import save_tiny_model
from megatron_zero.models.verify import (DEFAULT_TOLERANCE, ConversionCase, hf_logits, random_tokens,
                                         verify_conversions)

FAMILIES = ["qwen2", "qwen2-untied", "llama", "mistral"]
# llama3 scaling only changes low rotary frequencies: a long sequence makes a wrong scaling visible.
SEQ_LENGTH = {"llama": 64}
TOL = DEFAULT_TOLERANCE["float32"]


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    """name -> (hf_dir, mcore_dir), converted with the CLI."""
    root = tmp_path_factory.mktemp("conversion")
    out = {}
    for name in FAMILIES:
        hf_dir = save_tiny_model(name, root / name / "hf", seed=0)
        mcore_dir = root / name / "mcore"
        assert convert_checkpoint.main(["hf-to-mcore", "--hf", str(hf_dir), "--out", str(mcore_dir)]) == 0
        out[name] = (hf_dir, mcore_dir)
    return out


def _hf_tensors(hf_dir: Path) -> dict[str, torch.Tensor]:
    reader = HFCheckpointReader(hf_dir)
    return {name: reader.get(name) for name in reader.names()}


@pytest.mark.parametrize("name", FAMILIES)
def test_round_trip_is_bit_exact(converted, tmp_path, name):
    hf_dir, mcore_dir = converted[name]
    back = tmp_path / "back"
    # A tiny shard limit forces several shards and the index.
    assert convert_checkpoint.main(["mcore-to-hf", "--mcore", str(mcore_dir), "--out", str(back),
                                    "--max-shard-size", "40KB"]) == 0
    original, restored = _hf_tensors(hf_dir), _hf_tensors(back)
    assert sorted(original) == sorted(restored)
    for tensor_name, tensor in original.items():
        assert torch.equal(tensor, restored[tensor_name]), tensor_name
    index = json.loads((back / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(back))
    tokens = random_tokens(model.config.vocab_size, 1, 8, seed=3)
    assert torch.equal(model(input_ids=tokens).logits, hf_logits(hf_dir, tokens))


@pytest.mark.parametrize("tp,pp", [(1, 1), (2, 1), (1, 2), (2, 2)])
def test_logits_match_hf(converted, tp, pp):
    # Every family in one launch per layout: process start and parallel init dominate at these sizes.
    cases = [ConversionCase(*converted[name], seq_length=SEQ_LENGTH.get(name, 16)) for name in FAMILIES]
    results = verify_conversions(cases, tp, pp)
    assert len(results) == len(FAMILIES)
    failed = {name: result.max_abs_diff for name, result in zip(FAMILIES, results) if not result.max_abs_diff < TOL}
    assert not failed, f"logits differ from HF beyond {TOL} at tp={tp} pp={pp}: {failed}"


def test_tests_are_sensitive_to_rope_scaling_and_sliding_window(converted, tmp_path):
    """The verify bound must be far below what dropping llama3 scaling or the window would change."""
    llama_hf, _ = converted["llama"]
    unscaled = save_tiny_model("llama", tmp_path / "unscaled", seed=0, rope_scaling=None)
    tokens = random_tokens(251, 2, SEQ_LENGTH["llama"], seed=0)
    assert (hf_logits(llama_hf, tokens) - hf_logits(unscaled, tokens)).abs().max() > 10 * TOL
    mistral_hf, _ = converted["mistral"]
    unwindowed = save_tiny_model("mistral", tmp_path / "unwindowed", seed=0, sliding_window=None)
    tokens = random_tokens(251, 2, 16, seed=0)
    assert (hf_logits(mistral_hf, tokens) - hf_logits(unwindowed, tokens)).abs().max() > 10 * TOL


def test_verify_fails_for_another_models_weights(converted, tmp_path, capsys):
    _, mcore_dir = converted["qwen2"]
    other = save_tiny_model("qwen2", tmp_path / "other", seed=1)
    code = convert_checkpoint.main(["verify", "--hf", str(other), "--mcore", str(mcore_dir), "--tp", "2"])
    assert code == 1
    last_line = capsys.readouterr().out.strip().splitlines()[-1]
    assert last_line.startswith("max |logit diff| =") and float(last_line.split("=")[1]) > TOL


def test_verify_catches_a_wrong_mapping(converted, tmp_path):
    """Convert weights with two projections swapped (what a wrong QKV or gate/up mapping does)."""
    hf_dir, _ = converted["qwen2-untied"]
    swaps = [("k_proj", "v_proj"), ("gate_proj", "up_proj")]
    cases = []
    for a, b in swaps:
        wrong = tmp_path / f"wrong_{a}"
        shutil.copytree(hf_dir, wrong)
        tensors = load_file(wrong / "model.safetensors")
        for name in list(tensors):
            if f".{a}." in name:
                tensors[name], tensors[name.replace(a, b)] = tensors[name.replace(a, b)], tensors[name]
        save_file(tensors, wrong / "model.safetensors", metadata={"format": "pt"})
        wrong_mcore = tmp_path / f"wrong_{a}_mcore"
        assert convert_checkpoint.main(["hf-to-mcore", "--hf", str(wrong), "--out", str(wrong_mcore)]) == 0
        cases.append(ConversionCase(hf_dir, wrong_mcore))
    for (a, b), result in zip(swaps, verify_conversions(cases, 1, 1)):
        assert not result.ok and result.max_abs_diff > 10 * TOL, (a, b, result)


def test_megatron_layout_of_fused_tensors(converted):
    """The fused QKV is grouped per query group and fc1 is [gate; up], as megatron-core expects."""
    from megatron_zero.models.common.weights import fuse_qkv, split_qkv
    from megatron_zero.models.registry import get_bridge

    hf_dir, _ = converted["qwen2"]
    config = json.loads((hf_dir / "config.json").read_text())
    arch = get_bridge(config).parse(config)
    heads, groups, dim = arch.num_attention_heads, arch.num_query_groups, arch.head_dim
    q = torch.arange(heads * dim).float().reshape(heads * dim, 1)
    k = 1000 + torch.arange(groups * dim).float().reshape(groups * dim, 1)
    v = 2000 + torch.arange(groups * dim).float().reshape(groups * dim, 1)
    fused = fuse_qkv(q, k, v, arch).reshape(groups, -1)
    per_group = heads // groups
    for g in range(groups):
        expected = torch.cat([q.reshape(heads, dim)[g * per_group:(g + 1) * per_group].flatten(),
                              k.reshape(groups, dim)[g], v.reshape(groups, dim)[g]])
        assert torch.equal(fused[g], expected)
    assert all(torch.equal(x, y) for x, y in zip(split_qkv(fuse_qkv(q, k, v, arch), arch), (q, k, v)))


# ---- bad input: clear errors before any worker starts -----------------------------------------

def _write_config(path: Path, **fields) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    (path / "config.json").write_text(json.dumps(fields))
    return path


def _cli_error(capsys, argv) -> str:
    assert convert_checkpoint.main(argv) == 2
    return capsys.readouterr().err


def test_missing_files(tmp_path, capsys, converted):
    assert "no config.json" in _cli_error(capsys, ["hf-to-mcore", "--hf", str(tmp_path / "nope"), "--out", str(tmp_path / "o")])
    hf_dir, mcore_dir = converted["qwen2"]
    no_weights = tmp_path / "no_weights"
    no_weights.mkdir()
    shutil.copy(hf_dir / "config.json", no_weights / "config.json")
    assert "no model.safetensors" in _cli_error(capsys, ["hf-to-mcore", "--hf", str(no_weights), "--out", str(tmp_path / "o")])
    assert "megatron_zero.json is missing" in _cli_error(capsys, ["mcore-to-hf", "--mcore", str(hf_dir), "--out", str(tmp_path / "o2")])
    assert "not empty" in _cli_error(capsys, ["mcore-to-hf", "--mcore", str(mcore_dir), "--out", str(hf_dir)])


def test_missing_tensor_is_named(converted, tmp_path, capsys):
    hf_dir, _ = converted["qwen2"]
    partial = tmp_path / "partial"
    shutil.copytree(hf_dir, partial)
    tensors = load_file(partial / "model.safetensors")
    del tensors["model.layers.1.self_attn.k_proj.bias"]
    save_file(tensors, partial / "model.safetensors", metadata={"format": "pt"})
    from megatron_zero.models.mcore_checkpoint import convert_hf_to_mcore

    with pytest.raises(KeyError, match="model.layers.1.self_attn.k_proj.bias"):
        convert_hf_to_mcore(partial, tmp_path / "out")


@pytest.mark.parametrize("fields,message", [
    (dict(model_type="gpt2", architectures=["GPT2LMHeadModel"]), "model_type='gpt2'.*supported model types"),
    (dict(model_type="llama", hidden_size=64, num_attention_heads=4, intermediate_size=8, num_hidden_layers=1,
          vocab_size=10, rope_scaling=dict(rope_type="yarn", factor=4.0)), "rope_scaling.rope_type='yarn'"),
    (dict(model_type="llama", hidden_size=64, num_attention_heads=4, intermediate_size=8, num_hidden_layers=1,
          vocab_size=10, rope_parameters=dict(rope_type="llama3", rope_theta=5e5, factor=8.0, low_freq_factor=2.0,
                                              high_freq_factor=4.0, original_max_position_embeddings=8192)),
     "rope_parameters.low_freq_factor=2.0"),
    (dict(model_type="llama", hidden_size=64, num_attention_heads=4, intermediate_size=8, num_hidden_layers=1,
          vocab_size=10, attention_bias=True), "attention_bias=true"),
    (dict(model_type="mistral", hidden_size=64, num_attention_heads=4, intermediate_size=8, num_hidden_layers=1,
          vocab_size=10, hidden_act="gelu"), "hidden_act='gelu'"),
    (dict(model_type="qwen2", num_attention_heads=4, intermediate_size=8, num_hidden_layers=1, vocab_size=10),
     "'hidden_size' is missing"),
])
def test_unsupported_configs_name_the_field(tmp_path, capsys, fields, message):
    import re

    hf_dir = _write_config(tmp_path / "hf", **fields)
    assert re.search(message, _cli_error(capsys, ["hf-to-mcore", "--hf", str(hf_dir), "--out", str(tmp_path / "o")]))


def test_tp_must_divide_heads(converted, capsys):
    hf_dir, mcore_dir = converted["qwen2"]
    err = _cli_error(capsys, ["verify", "--hf", str(hf_dir), "--mcore", str(mcore_dir), "--tp", "3"])
    assert "tensor_parallel_size=3 must divide num_attention_heads=4" in err
    err = _cli_error(capsys, ["verify", "--hf", str(hf_dir), "--mcore", str(mcore_dir), "--pp", "3"])
    assert "pipeline_parallel_size=3 must divide num_hidden_layers=2" in err
