"""Per-step metrics: JSONL always (the analysis tool reads it), wandb and TensorBoard when configured, one
console line.

Files under the run's output directory:
    metrics.jsonl          one JSON object per step (rewards, accuracy, lengths, ratios, loss terms, timings)
    samples/step_N.jsonl   every rollout sample of step N in the analysis tool's record format
    eval.jsonl             held-out evaluations (step, accuracy)
    tensorboard/           event files of the numeric metrics (run.tensorboard=true)
    wandb/                 the wandb run (run.wandb_project set; offline without WANDB_API_KEY)

A restart resumes at its checkpoint's step: the records of later steps are moved out before it logs them again
(run_records.py), so each step is in these files once.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
from pathlib import Path
from typing import Any, Optional

from megatron_zero.analysis import has_box
from megatron_zero.config.trainer import TrainConfig
from megatron_zero.data.rollout_batch import RolloutBatch
from megatron_zero.utils.files import atomic_write_text

logger = logging.getLogger(__name__)


def rollout_metrics(rollout: RolloutBatch) -> dict[str, Optional[float]]:
    samples = rollout.samples
    correct = [s for s in samples if s.reward >= 1.0]
    wrong = [s for s in samples if s.reward < 1.0]

    def mean(values: list[float]) -> Optional[float]:
        # None (JSON null), not NaN: e.g. no correct response yet has no mean length.
        return sum(values) / len(values) if values else None

    return {
        "reward_mean": mean([s.reward for s in samples]),
        "accuracy": len(correct) / len(samples),
        "response_length": mean([len(s.response_ids) for s in samples]),
        "response_length_correct": mean([len(s.response_ids) for s in correct]),
        "response_length_wrong": mean([len(s.response_ids) for s in wrong]),
        "clip_ratio": mean([float(s.truncated) for s in samples]),
        "stop_ratio": mean([float(not s.truncated) for s in samples]),
        "box_ratio": mean([float(has_box(s.response_text)) for s in samples]),
        "num_samples": len(samples),
    }


def console_line(record: dict[str, Any], seconds: float) -> str:
    """The step's console line. Its KL is the one measured: approx_kl (new vs old policy, token mean), and the KL
    to the reference (kl_ref) only where the loss has that term; a kl_ref of 0 without it would read as a
    measurement."""
    fields = [f"step {record['step']}", f"reward {record['reward_mean']:.3f}", f"acc {record['accuracy']:.3f}",
              f"len {record['response_length']:.1f}", f"box {record['box_ratio']:.2f}",
              f"loss {record.get('loss', float('nan')):.4f}", f"approx_kl {record.get('approx_kl', float('nan')):.2e}"]
    if "kl_ref" in record:
        fields.append(f"kl_ref {record['kl_ref']:.2e}")
    fields += [f"gap {record['logprob_gap_max']:.1e}", f"{seconds:.1f}s"]
    return " | ".join(fields)


class MetricsLogger:
    def __init__(self, output_dir: Path, config: TrainConfig, first_step: int = 1) -> None:
        """``first_step``: the step this run logs first (a resumed run's records of it and later steps were moved out
        before it started: run_records.py)."""
        self.output_dir = output_dir
        # Every GPU the run holds (the ranks' and, disaggregated, the engines'); CPU workers in CPU mode.
        self.num_devices = config.cluster.num_workers + config.cluster.rollout_num_gpus
        (output_dir / "samples").mkdir(parents=True, exist_ok=True)
        self._metrics = open(output_dir / "metrics.jsonl", "a", encoding="utf-8")
        self._eval = open(output_dir / "eval.jsonl", "a", encoding="utf-8")
        self._wandb = None
        if config.run.wandb_project:
            import wandb

            mode = "online" if os.environ.get("WANDB_API_KEY") else "offline"
            self._wandb = wandb.init(project=config.run.wandb_project, dir=str(output_dir), mode=mode,
                                     config=dataclasses.asdict(config))
        self._tensorboard = None
        if config.run.tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            # TensorBoard hides the events of steps >= purge_step written before it: those of the steps redone.
            self._tensorboard = SummaryWriter(log_dir=str(output_dir / "tensorboard"), purge_step=first_step)

    def _write_scalars(self, record: dict[str, Any], step: int) -> None:
        if self._wandb is not None:
            self._wandb.log(record, step=step)
        if self._tensorboard is not None:
            for name, value in record.items():
                # None marks "no value this step" (e.g. no correct response yet): nothing to plot.
                if isinstance(value, (int, float)) and not isinstance(value, bool) and name != "step":
                    self._tensorboard.add_scalar(name, value, global_step=step)
            self._tensorboard.flush()

    def log_step(self, step: int, rollout: RolloutBatch, grade_counts: dict[str, int], extra: dict[str, float],
                 timings: dict[str, float], entropy: float,
                 overlapped: Optional[dict[str, float]] = None) -> dict[str, Any]:
        """``timings``: the step's phases, which add up to its wall time. ``overlapped``: the phases of a batch
        generated during the previous step (rollout.off_policy_steps=1), logged as ``overlapped_seconds_*``."""
        record: dict[str, Any] = {"step": step, **rollout_metrics(rollout), "entropy": entropy, **extra}
        record.update({f"grader_{status}": count for status, count in grade_counts.items()})
        record.update({f"seconds_{phase}": seconds for phase, seconds in timings.items()})
        record.update({f"overlapped_seconds_{phase}": seconds for phase, seconds in (overlapped or {}).items()})
        num_tokens = sum(len(s.response_ids) for s in rollout.samples)
        generate_seconds = (overlapped or timings).get("generate", 0.0)
        record["generate_tokens_per_s"] = num_tokens / max(generate_seconds, 1e-9)
        # Throughput as peers publish it: prompt + response tokens of the step, each once, per second of the whole
        # step and per GPU.
        step_tokens = num_tokens + sum(len(s.prompt_ids) for s in rollout.samples)
        record["tokens_per_s_per_gpu"] = step_tokens / max(sum(timings.values()), 1e-9) / self.num_devices
        self._metrics.write(json.dumps(record) + "\n")
        self._metrics.flush()
        atomic_write_text(self.output_dir / "samples" / f"step_{step}.jsonl", "".join(
            json.dumps(dict(step=step, prompt=s.prompt_text, response=s.response_text, ground_truth=s.ground_truth,
                            reward=s.reward, num_tokens=len(s.response_ids), finish_reason=s.finish_reason)) + "\n"
            for s in rollout.samples))
        self._write_scalars(record, step)
        logger.info(console_line(record, sum(timings.values())))
        return record

    def log_eval(self, step: int, result: dict[str, Any]) -> None:
        if not result:
            return
        self._eval.write(json.dumps({"step": step, "accuracy": result["accuracy"]}) + "\n")
        self._eval.flush()
        atomic_write_text(self.output_dir / "samples" / f"eval_step_{step}.jsonl",
                          "".join(json.dumps(sample) + "\n" for sample in result["samples"]))
        self._write_scalars({"eval_accuracy": result["accuracy"]}, step)
        logger.info("eval at step %d: greedy accuracy %.3f", step, result["accuracy"])

    def close(self) -> None:
        self._metrics.close()
        self._eval.close()
        if self._wandb is not None:
            self._wandb.finish()
        if self._tensorboard is not None:
            self._tensorboard.close()
