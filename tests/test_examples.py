"""Every example config (examples/configs) is a run that would start: it loads, fits the model's architecture and
the cluster, and fits 80 GB H100s by the memory planner, on the real HF config.json of its base model
(examples/model_configs: architecture fields only, as published; the checkpoints are not here).

``example_configs()`` pairs each YAML with its model directory for other checks (a ``train --dry-run`` test can
reuse it: model_path and rollout.sglang.model_path are overridden the same way).

    python -m pytest tests/test_examples.py -q
"""

from __future__ import annotations

from pathlib import Path

import pytest

from megatron_zero.preflight.config import load_config
from megatron_zero.models.registry import read_architecture
from megatron_zero.planning.actor_memory import num_parameters
from megatron_zero.planning.memory import plan_inputs, plan_memory

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
# The paper's ten base models (RECIPE.md) with their published sizes in billions (the model cards' figures).
PUBLISHED_BILLIONS = {
    "Qwen2.5-0.5B": 0.49, "Qwen2.5-1.5B": 1.54, "Qwen2.5-7B": 7.61, "Qwen2.5-14B": 14.7, "Qwen2.5-32B": 32.5,
    "Qwen2.5-Math-7B": 7.62, "Llama-3.1-8B": 8.03, "Mistral-7B-v0.1": 7.24, "Mistral-Small-24B-Base-2501": 23.6,
    "deepseek-math-7b-base": 6.91,
}


def example_configs() -> list[tuple[Path, Path]]:
    """(config YAML, model config directory) of every example: the directory named like its model_path."""
    import yaml

    pairs = []
    for path in sorted((EXAMPLES / "configs").glob("*.yaml")):
        model_dir = EXAMPLES / "model_configs" / Path(yaml.safe_load(path.read_text())["model_path"]).name
        pairs.append((path, model_dir))
    return pairs


def load_example(config_path: Path, model_dir: Path, *overrides: str):
    return load_config(str(config_path), [f"model_path={model_dir}", f"rollout.sglang.model_path={model_dir}",
                                          *overrides])


def example_architectures() -> dict:
    return {path.name: read_architecture(path) for path in sorted((EXAMPLES / "model_configs").iterdir())}


def test_every_paper_model_has_a_config_and_two_examples():
    assert set(example_architectures()) == set(PUBLISHED_BILLIONS)
    per_model: dict[str, list[int]] = {}
    for config_path, model_dir in example_configs():
        assert model_dir.is_dir(), f"{config_path.name}: no examples/model_configs/{model_dir.name}"
        per_model.setdefault(model_dir.name, []).append(load_example(config_path, model_dir).cluster.num_nodes)
    assert set(per_model) == set(PUBLISHED_BILLIONS)
    # A single-node and a multi-node variant each, except Qwen2.5-32B, whose model state alone does not fit one node
    # (its two variants are multi-node; the planner's verdict on one node is checked below).
    for name, nodes in per_model.items():
        assert len(nodes) >= 2 and max(nodes) > 1, name
        assert min(nodes) == 1 or name == "Qwen2.5-32B", name


def test_parameter_counts_match_published_sizes():
    for name, arch in example_architectures().items():
        assert num_parameters(arch) / 1e9 == pytest.approx(PUBLISHED_BILLIONS[name], rel=0.02), name


@pytest.mark.parametrize("config_path, model_dir", example_configs(), ids=lambda value: value.stem)
def test_example_loads_and_fits(config_path, model_dir):
    config = load_example(config_path, model_dir)
    arch = read_architecture(model_dir)
    arch.check_parallel_sizes(config.parallel.tensor_parallel_size, config.parallel.pipeline_parallel_size,
                              config.model.vocab_pad_multiple)
    assert config.parallel.expert_parallel_size == 1  # every supported family is dense
    config.rollout.sglang.check_launch(config.cluster)
    assert arch.num_attention_heads % config.rollout.sglang.tp_size == 0
    # Prompts and responses within the model's context.
    assert config.data.train.max_prompt_tokens + config.rollout.max_new_tokens <= arch.max_position_embeddings
    # The recipe (RECIPE.md): KL 1e-4 up to 14B, 1e-3 above; batch 1024 x 8 in mini-batches of 256 prompts.
    assert config.loss.kl_coef == (1e-3 if num_parameters(arch) > 15e9 else 1e-4)
    assert (config.data.sampler.batch_size, config.rollout.num_samples_per_prompt) == (1024, 8)
    assert config.data.sampler.batch_size // config.run.num_minibatches == 256
    plan = plan_memory(plan_inputs(config, arch))
    assert plan.fits, f"{config_path.name}: {plan.problems}"


def test_qwen32b_does_not_fit_one_node():
    config_path, model_dir = next(pair for pair in example_configs() if pair[0].name == "qwen2.5-32b-zero-2node.yaml")
    config = load_example(config_path, model_dir, "cluster.num_nodes=1", "parallel.pipeline_parallel_size=1")
    assert not plan_memory(plan_inputs(config, read_architecture(model_dir))).fits


def test_plan_command_prints_table_and_json(capsys):
    import json

    from megatron_zero.cli import main

    config_path, model_dir = example_configs()[0]
    argv = ["plan", "--config", str(config_path), f"model_path={model_dir}", f"rollout.sglang.model_path={model_dir}"]
    assert main(argv) == 0
    table = capsys.readouterr().out
    assert "peak:" in table and "train" in table and "layouts that fit" in table
    assert main([*argv, "--json", "--gpu-memory-gib", "24"]) == 1
    report = json.loads(capsys.readouterr().out)
    assert not report["fits"] and report["problems"]
    assert {phase["name"] for phase in report["phases"]} == {"rollout", "logprob", "train", "sync"}


def test_plan_refuses_impossible_memory_flags_in_one_line(capsys):
    from megatron_zero.cli import main

    config_path, _ = example_configs()[0]
    assert main(["plan", "--config", str(config_path), "--gpu-memory-gib", "-5", "--overhead-gib", "-1"]) == 2
    assert capsys.readouterr().err.strip().splitlines()[-1] == (
        "error: --gpu-memory-gib=-5.0 must be > 0; --overhead-gib=-1.0 must be >= 0")
