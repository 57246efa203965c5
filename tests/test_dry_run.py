"""``megatron-zero train --dry-run`` on every example config, and the errors it must catch before a job starts.

The example configs name checkpoints that are not on this machine (/models/...). Each gets a stand-in model
directory: the real architecture's config.json (examples/model_configs), a safetensors index whose tensor names come
from transformers' own model class for that config (built on the meta device, so nothing is allocated) and the demo
model's tokenizer (the payload's token ids are then the demo tokenizer's, the code path is the run's).
"""

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from megatron_zero.cli import main
from megatron_zero.demo import BASE_MODEL_PATH
from test_examples import example_configs

SHARD = "model-00001-of-00001.safetensors"


def _hf_tensor_names(config_dir: Path) -> list[str]:
    from transformers import AutoConfig, AutoModelForCausalLM

    hf_config = AutoConfig.from_pretrained(config_dir)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(hf_config)
    names = list(model.state_dict())
    # A tied output layer is the embedding: HF checkpoints store it once.
    return [n for n in names if not (hf_config.tie_word_embeddings and n == "lm_head.weight")]


@pytest.fixture(scope="module")
def model_dirs(tmp_path_factory):
    """examples/model_configs/<name> -> a stand-in HF directory (see the module docstring)."""
    root = tmp_path_factory.mktemp("dry_run_models")
    dirs = {}
    for _, config_dir in example_configs():
        if config_dir.name in dirs:
            continue
        model_dir = root / config_dir.name
        model_dir.mkdir()
        shutil.copy(config_dir / "config.json", model_dir / "config.json")
        for name in ("tokenizer.json", "tokenizer_config.json"):
            shutil.copy(Path(BASE_MODEL_PATH) / name, model_dir / name)
        # One real (tiny) shard for the index to point at: the dry run reads names, never tensors.
        save_file({"placeholder": torch.zeros(1)}, model_dir / SHARD)
        weight_map = {name: SHARD for name in _hf_tensor_names(config_dir)}
        (model_dir / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
        dirs[config_dir.name] = model_dir
    return dirs


@pytest.fixture(scope="module")
def train_file(tmp_path_factory):
    """Enough problems for the recipe's 1024-prompt batch."""
    path = tmp_path_factory.mktemp("dry_run_data") / "train.jsonl"
    path.write_text("".join(json.dumps({"question": f"What is {i} + {i + 1}?", "answer": str(2 * i + 1)}) + "\n"
                            for i in range(1100)))
    return path


def _dry_run(capsys, config_path: Path, model_dir: Path, train_file: Path, tmp_path: Path, *overrides: str):
    code = main(["train", "--config", str(config_path), "--dry-run", f"model_path={model_dir}",
                 f"rollout.sglang.model_path={model_dir}", f"data.train.path={train_file}",
                 f"run.output_dir={tmp_path / 'run'}", *overrides])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


@pytest.mark.parametrize("config_path", [path for path, _ in example_configs()], ids=lambda path: path.stem)
def test_every_example_config_passes_the_dry_run(config_path, model_dirs, train_file, tmp_path, capsys):
    from megatron_zero.preflight.config import load_config

    model_dir = model_dirs[dict(example_configs())[config_path].name]
    code, out, err = _dry_run(capsys, config_path, model_dir, train_file, tmp_path)
    assert code == 0, out + err
    config = load_config(str(config_path), [f"model_path={model_dir}", f"rollout.sglang.model_path={model_dir}"])
    assert "dry run: a run could start" in out
    assert not (tmp_path / "run").exists(), "a dry run must not create the output directory"
    assert f"{config.data.sampler.batch_size} prompts x {config.rollout.num_samples_per_prompt} samples" in out
    if config.rollout.engine != "sglang" or not config.rollout.sglang.launch:
        return
    # One server command per tp_size GPUs, each with the config's flags, and a first request per engine.
    sglang = config.rollout.sglang
    num_gpus = config.cluster.rollout_num_gpus or config.cluster.num_workers
    commands = [line for line in out.splitlines() if "sglang.launch_server" in line]
    assert len(commands) == num_gpus // sglang.tp_size
    assert all(f"--tp-size {sglang.tp_size}" in line and f"--mem-fraction-static {sglang.mem_fraction_static}"
               in line for line in commands)
    assert all(("--enable-memory-saver" in line) == sglang.colocated for line in commands)
    requests = [line for line in out.splitlines() if "POST /generate requests" in line]
    assert len(requests) == len(commands)
    first = json.loads(requests[0].split("the first: ", 1)[1])
    assert len(first["input_ids"]) == len(first["sampling_params"]) == 1
    sampling = first["sampling_params"][0]
    assert sampling["temperature"] == config.rollout.temperature
    assert sampling["max_new_tokens"] == config.rollout.max_new_tokens
    # Seeds only where the server honours them (deterministic inference).
    assert ("sampling_seed" in sampling) == sglang.enable_deterministic_inference


def _qwen_7b(model_dirs):
    config_path = next(path for path, _ in example_configs() if path.name == "qwen2.5-7b-zero-1node.yaml")
    return config_path, model_dirs["Qwen2.5-7B"]


def test_a_checkpoint_missing_tensors_is_refused_naming_them(model_dirs, train_file, tmp_path, capsys):
    config_path, model_dir = _qwen_7b(model_dirs)
    partial = tmp_path / "partial"
    shutil.copytree(model_dir, partial)
    index = json.loads((partial / "model.safetensors.index.json").read_text())
    del index["weight_map"]["model.layers.27.mlp.down_proj.weight"]
    (partial / "model.safetensors.index.json").write_text(json.dumps(index))
    code, out, err = _dry_run(capsys, config_path, partial, train_file, tmp_path)
    assert code == 2
    assert err.count("\n") == 1 and "model.layers.27.mlp.down_proj.weight" in err, err


def test_a_layout_that_does_not_fit_in_memory_exits_1(model_dirs, train_file, tmp_path, capsys):
    config_path, model_dir = _qwen_7b(model_dirs)
    # The whole 7B actor state on every GPU (no TP, DP=8) plus colocated engines: more than 80 GB.
    code, out, _ = _dry_run(capsys, config_path, model_dir, train_file, tmp_path, "parallel.tensor_parallel_size=1")
    assert code == 1
    assert "the memory plan does not fit" in out


def test_a_batch_larger_than_the_data_is_refused_before_anything_starts(model_dirs, tmp_path, capsys):
    config_path, model_dir = _qwen_7b(model_dirs)
    small = tmp_path / "small.jsonl"
    small.write_text("".join(json.dumps({"question": f"{i}+1?", "answer": str(i + 1)}) + "\n" for i in range(10)))
    code, _, err = _dry_run(capsys, config_path, model_dir, small, tmp_path)
    assert code == 2 and "sampler.batch_size=1024 is larger than the 10 problems" in err


def test_fp8_rollout_dry_run_launches_servers_from_the_fp8_copy(model_dirs, train_file, tmp_path, capsys):
    """rollout.quantization=fp8: every server command loads run.output_dir/rollout_fp8 (the copy the run writes
    before starting them; the dry run writes nothing), and the engine's weights in the plan shrink."""
    config_path, model_dir = _qwen_7b(model_dirs)
    code, plain, err = _dry_run(capsys, config_path, model_dir, train_file, tmp_path)
    assert code == 0, err
    code, out, err = _dry_run(capsys, config_path, model_dir, train_file, tmp_path, "rollout.quantization=fp8")
    assert code == 0, err
    fp8_dir = tmp_path / "run" / "rollout_fp8"
    commands = [line for line in out.splitlines() if "sglang.launch_server" in line]
    assert commands and all(f"--model-path {fp8_dir} " in line for line in commands), commands
    assert f"FP8 rollout weights: the servers load {fp8_dir}" in out and not fp8_dir.exists()

    def engine_weights(text: str) -> str:
        return next(line for line in text.splitlines() if "engine_weights" in line)

    assert engine_weights(out) != engine_weights(plain)


@pytest.mark.parametrize("model, tp_size, fits", [("Qwen2.5-0.5B", 1, True), ("Qwen2.5-0.5B", 2, False),
                                                  ("Qwen2.5-7B", 4, True), ("Qwen2.5-7B", 8, False)])
def test_fp8_rollout_dry_run_refuses_a_sglang_tp_size_that_splits_blocks(model, tp_size, fits, model_dirs, train_file,
                                                                         tmp_path, capsys):
    """SGLang loads block-FP8 weights only if each rank's slice is whole 128-row blocks: Qwen2.5-0.5B's q_proj is
    448 rows per rank at tp 2 and Qwen2.5-7B's gate/up 2368 at tp 8, so the dry run refuses those, naming tp_size."""
    config_path = next(path for path, config_dir in example_configs() if config_dir.name == model)
    code, out, err = _dry_run(capsys, config_path, model_dirs[model], train_file, tmp_path, "rollout.quantization=fp8",
                              f"rollout.sglang.tp_size={tp_size}")
    if fits:
        assert code == 0, out + err
    else:
        assert code == 2 and f"rollout.sglang.tp_size={tp_size}: an SGLang server of tp_size={tp_size} cannot load" \
            in err, out + err
