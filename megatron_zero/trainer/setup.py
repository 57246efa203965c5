"""What a run builds before its first step: prompts and the held-out set, the Megatron checkpoint it starts from,
the SGLang config its servers launch with, the Ray placements and the ranks. The step loop (trainer/loop.py)
calls these once; ``megatron-zero train --dry-run`` (trainer/dry_run.py) and the launchers (trainer/launch.py)
call the same ones, so what they check is what a run does.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Optional

from megatron_zero.config.parallel import ParallelConfig
from megatron_zero.config.sglang import SGLangConfig
from megatron_zero.config.trainer import TrainConfig
from megatron_zero.rollout.fp8_weights import is_fp8_checkpoint, write_fp8_checkpoint


def load_sampler(config: TrainConfig, tokenizer):
    """Prompts (already formatted with data.train.template, length-checked and in data.pass_rate_filter's band)
    in a resumable sampler, and the filter's report (None without a table)."""
    from megatron_zero.data import PromptSampler, apply_pass_rate_filter, load_problems

    problems = load_problems(config.data.train, tokenizer=tokenizer)
    problems, report = apply_pass_rate_filter(problems, config.data.pass_rate_filter)
    return PromptSampler(problems, config.data.sampler), report


def read_eval_history(output_dir: Path) -> dict[int, float]:
    """Accuracies in eval.jsonl, by step (cut back to the checkpoint resumed from: run_records.py)."""
    path = output_dir / "eval.jsonl"
    if not path.is_file():
        return {}
    records = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    return {record["step"]: record["accuracy"] for record in records}


def load_eval_problems(config: TrainConfig, tokenizer) -> list:
    if config.eval.path is None:
        return []
    from megatron_zero.data import load_problems
    from megatron_zero.data.problems import eval_set_keys

    dataset = dataclasses.replace(config.data.train, path=config.eval.path)
    problems = load_problems(dataset, tokenizer=tokenizer, keys=eval_set_keys)
    return problems[: config.eval.max_problems] if config.eval.max_problems else problems


# Where model_path is converted when mcore_path is unset, inside run.output_dir (the launchers convert there too).
BASE_MCORE_DIR = "base_mcore"
ROLLOUT_FP8_DIR = "rollout_fp8"


def base_checkpoint(config: TrainConfig) -> str:
    """The Megatron checkpoint a run starts from: ``mcore_path``, or ``model_path`` converted into
    ``run.output_dir/base_mcore`` (reused when a complete conversion is there)."""
    if config.mcore_path is not None:
        return config.mcore_path
    return convert_base_model(config.model_path, Path(config.run.output_dir) / BASE_MCORE_DIR)


def rollout_sglang_config(config: TrainConfig, *, write: bool = False) -> Optional[SGLangConfig]:
    """The SGLang config servers launch with: rollout.sglang, but under rollout.quantization=fp8 pointed at the FP8
    copy of model_path in ``run.output_dir/rollout_fp8`` (written when ``write`` and not complete there yet; a
    server started by hand must already serve an FP8 checkpoint, which the preflight checked:
    ``preflight.train.check_train_inputs``)."""
    sglang = config.rollout.sglang
    if sglang is None or config.rollout.quantization != "fp8" or not sglang.launch:
        return sglang
    out_dir = Path(config.run.output_dir) / ROLLOUT_FP8_DIR
    if write and not is_fp8_checkpoint(out_dir):
        import shutil

        partial = out_dir.with_name(out_dir.name + ".partial")
        shutil.rmtree(partial, ignore_errors=True)  # an interrupted earlier write
        write_fp8_checkpoint(config.model_path, partial, tp_size=sglang.tp_size, tp_field="rollout.sglang.tp_size")
        shutil.rmtree(out_dir, ignore_errors=True)
        partial.rename(out_dir)  # config.json declares FP8 only once every shard is in place
    return dataclasses.replace(sglang, model_path=str(out_dir))


def convert_base_model(model_path: str, out_dir: Path) -> str:
    from megatron_zero.models.mcore_checkpoint import convert_hf_to_mcore, METADATA_NAME
    from megatron_zero.parallel.local_launch import run_local_workers

    if not (out_dir / METADATA_NAME).is_file():
        if out_dir.exists():
            import shutil

            shutil.rmtree(out_dir)  # a half-written conversion from an interrupted run
        run_local_workers(convert_hf_to_mcore, ParallelConfig(), args=(model_path, str(out_dir)))
    return str(out_dir)


def create_placements(config: TrainConfig):
    """The ranks' placement, and the disaggregated engines' (None without cluster.rollout_num_gpus)."""
    from megatron_zero.cluster.placement import connect_ray, create_placement, create_rollout_placement, wait_for_nodes

    connect_ray(config.cluster)
    wait_for_nodes(config.cluster)
    placement = create_placement(config.cluster)
    return placement, create_rollout_placement(config.cluster) if config.cluster.rollout_num_gpus else None


def start_actor_group(config: TrainConfig, placement, mcore_dir: str, log_dir: Path,
                       engine_urls: Optional[list[str]]):
    from megatron_zero.trainer.actor_group import RayActorGroup

    group = RayActorGroup(config.cluster, placement, log_dir)
    group.initialize_parallel(config.parallel)
    group.setup("megatron_zero.trainer.actor_worker:ActorWorker", mcore_dir, config.actor, config.loss, config.model,
                config.loss.kl_coef > 0, engine_urls, config.rollout.sglang, config.rollout.quantization)
    return group
