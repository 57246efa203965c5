"""The embedded zero-RL demo: the whole loop on one CPU box, no downloads, a few minutes.

    megatron-zero demo --output-dir outputs/demo
    megatron-zero demo --output-dir outputs/demo-sglang rollout.engine=sglang   # the real SGLang server on CPU

What runs is the product, scaled down: a local Ray cluster, the Megatron actor at TP=2 over gloo,
the torch rollout engine (with rollout.engine=sglang: two real SGLang servers on CPU, one beside each rank,
weights pushed into them every step), the real math reward, on a small base model and character tokenizer that
the project pretrained itself (``tools/pretrain_demo_model.py``; shipped in ``megatron_zero/demo/assets``)
on 2-digit additions whose corpus mixes answer formats. Greedy decoding of the base model mostly
takes an inaccurate direct answer; sampling sometimes takes an accurate digit-by-digit chain that
ends in a box, and the rule-based reward makes RL select it - the paper's story, in miniature.

Outputs in DIR: summary.json (accuracy_before / accuracy_after, greedy, held-out), metrics.jsonl,
training.png (reward, accuracy, response length per step), behaviour report (analysis/report.html).
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any, Optional

from megatron_zero.demo import BASE_MODEL_PATH, TEST_PROMPTS_PATH, TRAIN_PROMPTS_PATH

logger = logging.getLogger(__name__)


DEMO_DEFAULTS: dict[str, Any] = {
    "model_path": str(BASE_MODEL_PATH),
    "parallel": {"tensor_parallel_size": 2, "timeout_s": 300.0},
    "cluster": {"gpus_per_node": 0, "cpu_workers_per_node": 2, "ray_address": "local", "ray_call_timeout_s": 900.0},
    "model": {"transformer_impl": "local", "params_dtype": "float32"},
    # DEMO-NOTES: lr 1e-4 was stable (3e-4 peaked then fell); no KL term.
    # Padded rows: on CPU, packing's dense block mask made the train step 2x slower (tools/bench_packing.py).
    "actor": {"lr": 1e-4, "clip_grad": 1.0, "max_tokens_per_microbatch": 4096, "temperature": 1.0,
              "pack_sequences": False},
    "loss": {"kl_coef": 0.0, "entropy_coef": 0.0, "clip_low": 0.2, "clip_high": 0.2, "aggregation": "token-mean"},
    "advantage": {"estimator": "grpo"},
    "reward": {"num_workers": 1, "timeout_s": 5.0},
    "data": {"train": {"path": str(TRAIN_PROMPTS_PATH), "template": "{input}", "max_prompt_tokens": 80},
             "sampler": {"batch_size": 32, "seed": 0}},
    "rollout": {"engine": "torch", "num_samples_per_prompt": 8, "temperature": 1.0, "max_new_tokens": 40,
                "torch": {"max_batch_size": 256}},
    "eval": {"path": str(TEST_PROMPTS_PATH), "max_new_tokens": 40},
    "run": {"num_steps": 60, "num_minibatches": 2, "save_every": 20, "seed": 0},
}


# With rollout.engine=sglang: the real SGLang server on CPU (rollout/sglang_cpu.py), colocated like the product's
# default layout: one server of tp 1 beside each of the two ranks, weights pushed from every rank into its server
# each step. Release/resume only flush on CPU, so the phases alternate on the same cores. For a server of its own
# (weights broadcast over a gloo group from rank 0): cluster.colocate=false cluster.rollout_num_gpus=1
# rollout.sglang.colocated=false.
DEMO_SGLANG_DEFAULTS: dict[str, Any] = {
    "cluster": {"colocate": True},
    "rollout": {"sglang": {"model_path": str(BASE_MODEL_PATH), "colocated": True}},
}
SGLANG_OVERRIDE = "rollout.engine=sglang"


def demo_config(output_dir: str, num_steps: Optional[int] = None, overrides: Optional[list[str]] = None):
    from omegaconf import OmegaConf

    from megatron_zero.preflight.config import load_config

    overrides = list(overrides or [])
    steps = [f"run.num_steps={num_steps}"] if num_steps is not None else []
    base = DEMO_DEFAULTS
    if SGLANG_OVERRIDE in overrides:
        base = OmegaConf.to_container(OmegaConf.merge(DEMO_DEFAULTS, DEMO_SGLANG_DEFAULTS))
    return load_config(None, [f"run.output_dir={output_dir}", *steps, *overrides], base=base)


def run_demo(output_dir: str, num_steps: Optional[int] = None, overrides: Optional[list[str]] = None) -> dict[str, Any]:
    from megatron_zero.trainer.loop import Trainer

    config = demo_config(output_dir, num_steps, overrides)
    out = Path(output_dir)
    trainer = Trainer(config)
    try:
        # The trainer scores the held-out set before step 1 and at the end, and writes summary.json.
        trainer.fit()
    finally:
        trainer.close()
    summary = trainer.summary()
    plot = plot_training(out / "metrics.jsonl", out / "training.png")
    report = _behaviour_report(out)
    if summary["accuracy_after"] is not None:
        print(f"accuracy (greedy, held-out): {summary['accuracy_before']:.3f} -> {summary['accuracy_after']:.3f}")
    print(f"summary:  {out / 'summary.json'}\nmetrics:  {out / 'metrics.jsonl'}\nplot:     {plot}\nreport:   {report}")
    return summary


def plot_training(metrics_path: Path, png_path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    records = [json.loads(line) for line in metrics_path.read_text().splitlines() if line.strip()]
    steps = [r["step"] for r in records]
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.6))
    for ax, key, title in zip(axes, ("reward_mean", "accuracy", "response_length"),
                              ("mean reward", "sampled accuracy", "response length (tokens)")):
        ax.plot(steps, [r[key] for r in records], marker=".", label="all")
        ax.set_title(title)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
    for key, label in (("response_length_correct", "correct"), ("response_length_wrong", "wrong")):
        axes[2].plot(steps, [r[key] if r[key] is not None else float("nan") for r in records], label=label, alpha=0.7)
    axes[2].legend()
    fig.tight_layout()
    fig.savefig(png_path, dpi=100)
    plt.close(fig)
    return png_path


def _behaviour_report(out: Path) -> Path:
    from megatron_zero.analysis import analyze, load_samples, make_judge, write_analysis

    files = sorted((out / "samples").glob("step_*.jsonl"), key=lambda p: int(p.stem.split("_")[1]))
    result = analyze(load_samples(files), make_judge("rules"), max_judge_samples=64)
    write_analysis(result, out / "analysis")
    return out / "analysis" / "report.html"
