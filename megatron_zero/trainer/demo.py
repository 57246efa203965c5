"""The embedded zero-RL demo: the whole loop on one CPU box, no downloads, a few minutes.

    megatron-zero demo --output-dir outputs/demo
    megatron-zero demo --output-dir outputs/demo-sglang rollout.engine=sglang   # the real SGLang server on CPU

What runs is the product, scaled down: a local Ray cluster, the Megatron actor at TP=2 over gloo,
the torch rollout engine (with rollout.engine=sglang: two real SGLang servers on CPU, one beside each rank,
weights pushed into them every step), the real math reward, on a small base model and character tokenizer that
the project pretrained itself (``tools/pretrain_demo_model.py``; shipped in ``megatron_zero/demo/assets``)
on 2-digit additions whose corpus mixes answer formats. Greedy decoding of the base model mostly
takes an inaccurate direct answer; sampling sometimes takes an accurate digit-by-digit chain that
ends in a box, or a rare self-check (the direct box, then " Verify:" and a recomputation, then the
corrected box), and the correctness reward alone makes RL select them - the paper's story, in miniature:
accuracy and the length of correct responses rise, the box is learned without a format reward, and the
verification behaviour grows.

Outputs in DIR: summary.json (held-out greedy accuracy before, every 10 steps and after: eval_history),
metrics.jsonl, training.png (held-out accuracy, train reward, lengths, box / stop / clip ratios, behaviour
rates, approx_kl per step), behaviour report with real responses (analysis/report.html).
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import TYPE_CHECKING, Any, Optional

from megatron_zero.demo import BASE_MODEL_PATH, TEST_PROMPTS_PATH, TRAIN_PROMPTS_PATH

if TYPE_CHECKING:
    from megatron_zero.analysis import AnalysisResult

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
    # Only a boxed answer is read, as in the recipe's reward (RECIPE.md: the last \boxed{...}): the demo's prompt
    # stands for the qwen-boxed template, which asks for the box. With the last-number fallback, ~10% of rewarded
    # responses carried no box ("Digits: ... Sum 82."), crediting an answer the template did not ask for.
    "reward": {"num_workers": 1, "timeout_s": 5.0, "strict_boxed": True},
    "data": {"train": {"path": str(TRAIN_PROMPTS_PATH), "template": "{input}", "max_prompt_tokens": 72},
             "sampler": {"batch_size": 32, "seed": 0}},
    # 64 new tokens: the self-check (" \boxed{188}? Verify: Digits: 9+9=18, 9+9+1=19. \boxed{198}") is 59 characters;
    # with the longest prompt (66 characters; max_prompt_tokens 72) that fits the model's 144 positions.
    "rollout": {"engine": "torch", "num_samples_per_prompt": 8, "temperature": 1.0, "max_new_tokens": 64,
                "torch": {"max_batch_size": 256}},
    "eval": {"path": str(TEST_PROMPTS_PATH), "max_new_tokens": 64},
    # The held-out set (greedy, 200 problems) every 10 steps: a curve of 7 points, not just before and after.
    "run": {"num_steps": 60, "num_minibatches": 2, "save_every": 20, "eval_every": 10, "seed": 0},
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
    from megatron_zero.analysis.training_plot import plot_training
    from megatron_zero.trainer.loop import Trainer

    config = demo_config(output_dir, num_steps, overrides)
    out = Path(output_dir)
    trainer = Trainer(config)
    try:
        # The trainer scores the held-out set before step 1, every run.eval_every steps and at the end, and writes
        # summary.json.
        trainer.fit()
    finally:
        trainer.close()
    summary = trainer.summary()
    analysis, report = _behaviour_analysis(out)
    metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if line.strip()]
    plot = plot_training(metrics, summary["eval_history"], analysis.steps, out / "training.png", judge=analysis.judge)
    if summary["accuracy_after"] is not None:
        curve = ", ".join(f"{e['step']}: {e['accuracy']:.3f}" for e in summary["eval_history"])
        print(f"accuracy (greedy, held-out): {summary['accuracy_before']:.3f} -> {summary['accuracy_after']:.3f} "
              f"(by step: {curve})")
    print(f"summary:  {out / 'summary.json'}\nmetrics:  {out / 'metrics.jsonl'}\nplot:     {plot}\nreport:   {report}")
    return summary


def _behaviour_analysis(out: Path) -> tuple["AnalysisResult", Path]:
    """Every rollout sample judged by the rule judge (free and deterministic); writes out/analysis/."""
    from megatron_zero.analysis import analyze, load_samples, make_judge, write_analysis

    files = sorted((out / "samples").glob("step_*.jsonl"), key=lambda p: int(p.stem.split("_")[1]))
    result = analyze(load_samples(files), make_judge("rules"), max_judge_samples=None)
    return result, write_analysis(result, out / "analysis")["report"]
