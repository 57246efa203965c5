"""The zero-RL loop: generate, reward, advantage, train, sync weights, evaluate.

    trainer = Trainer(config)        # validates, starts Ray and the Megatron ranks, builds the engine
    trainer.fit()                    # runs config.run.num_steps steps

The step reads like the algorithm: rollout -> log-probs -> health -> advantages -> train -> sync. What differs
between modes is chosen once at setup and never tested here: the engine layout (colocated or separate engines:
phase switches and the weight transport, trainer/engine_layout.py) and the rollout source (on-policy or one step
ahead, trainer/rollout_source.py). Placement (Ray), the actor (Megatron), the engine and the grader live in their
own modules; what a run builds before step 1 in trainer/setup.py. Every step checks what silently breaks RL
trainers (trainer/health.py): the engine/actor log-prob gap (stale or broken weight sync), the step-0
policy/reference KL, and the grader's error rate; each stops the run with a clear error.

With ``eval.path`` set, the held-out set is scored greedily before step 1 (the base model's baseline), every
``run.eval_every`` steps and at the end; ``summary.json`` in the output directory holds those accuracies and what
the data filters kept (``data.pass_rate_filter``).
"""

from __future__ import annotations

import dataclasses
import json
import logging
from pathlib import Path
from typing import Any, Optional, Sequence

import torch

from megatron_zero.actor.advantages import compute_advantages
from megatron_zero.actor.batching import ActorBatch
from megatron_zero.config.trainer import TrainConfig
from megatron_zero.data.rollout_batch import RolloutSample
from megatron_zero.models.registry import read_architecture
from megatron_zero.parallel.data_parallel import ShardPlan, row_costs
from megatron_zero.rollout.factory import build_engine
from megatron_zero.trainer import setup
from megatron_zero.trainer.engine_layout import engine_layout
from megatron_zero.trainer.health import check_health
from megatron_zero.trainer.rollout_source import RolloutCollector, rollout_source
from megatron_zero.trainer.timing import timed

logger = logging.getLogger(__name__)


class Trainer:
    def __init__(self, config: TrainConfig, *, sglang_server_command: Optional[Sequence[str]] = None) -> None:
        """``sglang_server_command``: an argv template started instead of ``python -m sglang.launch_server``
        (``{host}`` and ``{port}`` filled in; see rollout/sglang_servers.py), e.g. a CPU stand-in in tests."""
        from megatron_zero.evaluation.model_eval import load_tokenizer
        from megatron_zero.preflight.train import check_train_inputs
        from megatron_zero.rewards import GraderPool
        from megatron_zero.trainer import checkpoint
        from megatron_zero.trainer.metrics import MetricsLogger
        from megatron_zero.trainer.run_records import keep_history_through

        # Preflight: a damaged checkpoint to resume from stops the run here, in one line, before Ray starts.
        check_train_inputs(config)
        self.config = config
        self.output_dir = Path(config.run.output_dir)
        self.output_dir.mkdir(parents=True, exist_ok=True)
        resume_from = checkpoint.resume_point(config.run)
        resumed_step = checkpoint.saved_step(resume_from) if resume_from is not None else None
        # Also before Ray: the records of steps this run logs again (or an earlier run's, at step 0) move out of the
        # files it appends to, so every step is in them once.
        keep_history_through(self.output_dir, resumed_step)
        self.tokenizer = load_tokenizer(config.model_path)
        self.arch = read_architecture(config.model_path)  # row costs for the data-parallel split
        # Before Ray starts: a missing or mismatched pass-rate table fails here, in one line.
        self.sampler, self.pass_rate_report = setup.load_sampler(config, self.tokenizer)
        self.eval_problems = setup.load_eval_problems(config, self.tokenizer)
        self.mcore_dir = setup.base_checkpoint(config)
        self.grader = GraderPool(config.reward)
        log_dir = self.output_dir / "logs"
        self.placement, self.rollout_placement = setup.create_placements(config)
        # The engine starts before the actor loads its weights: SGLang sizes its KV cache once, from the memory
        # free at startup. The layout (colocated or not) and the weight transport are chosen here, once.
        self.engine = build_engine(config.rollout.engine, config.model_path, config.rollout.torch,
                                   setup.rollout_sglang_config(config, write=True), config.cluster,
                                   self.rollout_placement or self.placement, self.tokenizer, log_dir,
                                   sglang_server_command, quantization=config.rollout.quantization)
        self.layout = engine_layout(config, self.engine)
        # SGLang servers take their weights from the ranks (weight_push.py), never through the driver.
        self.engine_urls = self.layout.server_urls
        self.group = setup.start_actor_group(config, self.placement, self.mcore_dir, log_dir, self.engine_urls)
        self.layout.attach(self.group)
        self.rollouts = rollout_source(config, RolloutCollector(config, self.engine, self.grader, self.sampler,
                                                                self.tokenizer))
        self.metrics = MetricsLogger(self.output_dir, config, first_step=(resumed_step or 0) + 1)
        self.step = 0
        self.weight_version = 0
        # The step whose policy the engine holds (0: the base model); each batch records the one that generated it.
        self.engine_policy_step = 0
        self.stop_requested = False
        self.progress = None  # the console's progress bar while fit() runs
        self.resumed_from = self.maybe_resume(resume_from)
        # Held-out accuracies by step; a resumed run keeps its earlier ones (the baseline among them).
        self.eval_history = setup.read_eval_history(self.output_dir) if self.resumed_from else {}
        # A resume has synced its policy already; otherwise the layout says whether the engine needs it now.
        if self.resumed_from is None and self.layout.sync_at_start:
            self.sync_weights()
        self.layout.enter_rollout_phase()

    # ---- the loop --------------------------------------------------------------------------------

    def fit(self) -> None:
        """Train until run.num_steps; on SIGTERM (preemption) save and return after the current step.

        With a held-out set: evaluated before step 1, every run.eval_every steps and at the end (not on SIGTERM:
        the grace period is for the checkpoint); summary.json is written on return."""
        from tqdm import tqdm

        with _stop_on_sigterm(self), tqdm(total=self.config.run.num_steps, initial=self.step, desc="zero-RL steps",
                                          unit="step", dynamic_ncols=True) as self.progress:
            if self.step == 0:
                self.evaluate_and_log()
            while self.step < self.config.run.num_steps and not self.stop_requested:
                self.train_one_step()
                self.progress.update(1)
                if self.config.run.eval_every and self.step % self.config.run.eval_every == 0:
                    self.evaluate_and_log()
                if self.config.run.save_every and self.step % self.config.run.save_every == 0:
                    self.save_checkpoint()
            if self.stop_requested or not self.config.run.save_every or self.step % self.config.run.save_every:
                self.save_checkpoint()
            if not self.stop_requested:
                self.evaluate_and_log()
        self.write_summary()

    def train_one_step(self) -> dict[str, Any]:
        """rollout -> log-probs -> health -> advantages -> train -> sync; the layout moves memory between phases."""
        timings: dict[str, float] = {}
        current = self.rollouts.next_batch(timings, step=self.step, policy_step=self.engine_policy_step,
                                           progress=self.progress)
        rollout, batch = current.batch, current.batch.to_actor_batch()
        # Engine log-probs under the policy the actor holds now, for the health check: the engine's own if it
        # generated the batch with it, else a probe of the batch scored again (before it starts on the next one).
        engine_logp, probe = batch.rollout_logp, slice(None)
        generated_by_older_policy = current.policy_step != self.engine_policy_step
        if generated_by_older_policy:
            probe = slice(0, self.config.health.off_policy_probe_samples)
            with timed(timings, "rescore", self.progress):
                engine_logp = self.rescore(rollout.samples[probe], like=batch.rollout_logp[probe])
        self.rollouts.start_next(step=self.step + 1, policy_step=self.engine_policy_step)
        memory = self.layout.before_training()
        with timed(timings, "old_logprobs", self.progress):
            plan = self.shard(batch)
            old_logp, entropy = self.logprobs(batch, plan)
            ref_logp = self.ref_logprobs(batch, plan) if self.config.loss.kl_coef > 0 else None
        health = check_health(self.config, self.step, batch.response_mask, old_logp, ref_logp, engine_logp, probe)
        health["rollout_policy_step"] = float(current.policy_step)
        if generated_by_older_policy:  # what TIS corrects: generating vs current policy
            health["behaviour_logprob_gap_mean"] = float((batch.rollout_logp - old_logp).abs()[batch.response_mask]
                                                         .mean())
        advantages = compute_advantages(rollout.rewards(), rollout.group_ids(), batch.response_mask,
                                        self.config.advantage, rollout.truncated())
        batch = dataclasses.replace(batch, old_logp=old_logp, ref_logp=ref_logp,
                                    advantages=advantages.advantages_NT, response_mask=advantages.loss_mask_NT)
        with timed(timings, "train", self.progress):
            train_metrics = self.train(batch, rollout.max_response_length())
        # A batch generating ahead holds the engine: the sync waits for it.
        self.rollouts.finish_next(timings, self.progress)
        with timed(timings, "sync_weights", self.progress):
            sync = self.sync_weights()
        memory.update(self.layout.after_sync())
        self.step += 1
        self.engine_policy_step = self.step
        return self.metrics.log_step(self.step, rollout, current.grade_counts,
                                     {**health, **train_metrics, **sync, **current.metrics, **memory},
                                     timings, float(entropy[batch.response_mask].mean()), current.overlapped)

    def rescore(self, samples: Sequence[RolloutSample], like: torch.Tensor) -> torch.Tensor:
        """The engine's log-probs of ``samples``' responses under its current weights, laid out like ``like``."""
        prompts = [s.prompt_ids for s in samples]
        logprobs = self.engine.compute_logprobs(prompts, [s.response_ids for s in samples],
                                                self.config.rollout.temperature)
        scored = torch.zeros_like(like)
        for row, (prompt, values) in enumerate(zip(prompts, logprobs)):
            scored[row, len(prompt):len(prompt) + len(values)] = torch.tensor(values, dtype=like.dtype)
        return scored

    # ---- phases ----------------------------------------------------------------------------------

    def shard(self, batch: ActorBatch) -> ShardPlan:
        """``batch``'s rows divided over the data-parallel replicas, balanced by forward FLOPs."""
        return ShardPlan.balance(row_costs(batch.lengths, self.arch), self.group.data_parallel_size)

    def logprobs(self, batch: ActorBatch, plan: ShardPlan) -> tuple[torch.Tensor, torch.Tensor]:
        """Old-policy log-probs and entropies [B, S]: each replica computes its shard, rows put back in order."""
        per_replica = self.group.run("logprobs", plan.scatter(batch))
        return (plan.gather([logp for logp, _ in per_replica], like=batch.tokens),
                plan.gather([entropy for _, entropy in per_replica], like=batch.tokens))

    def ref_logprobs(self, batch: ActorBatch, plan: ShardPlan) -> torch.Tensor:
        return plan.gather(self.group.run("ref_logprobs", plan.scatter(batch)), like=batch.tokens)

    def train(self, batch: ActorBatch, max_response_length: int) -> dict[str, float]:
        """One optimizer step per PPO mini-batch, each mini-batch divided over the data-parallel replicas.

        Metrics: the mini-batches' mean, but ``num_tokens`` (loss tokens of the whole batch, each counted once)
        and ``dp_token_imbalance``: the most token positions one replica's model ran over the mean (1 = even).
        """
        num_minibatches = self.config.run.num_minibatches
        rows = torch.randperm(batch.tokens.shape[0], generator=torch.Generator().manual_seed(self.step))
        per_step = []
        replica_tokens = torch.zeros(self.group.data_parallel_size, dtype=torch.float64)
        for indices in rows.chunk(num_minibatches):
            minibatch = batch.select_rows(indices)
            per_replica = self.group.run("train", self.shard(minibatch).scatter(minibatch), max_response_length)
            replica_tokens += torch.tensor([metrics.pop("replica_model_tokens") for metrics in per_replica])
            per_step.append(per_replica[0])  # reduced over DP: every replica reports the same
        metrics = {key: sum(m[key] for m in per_step) / len(per_step) for key in per_step[0]}
        metrics["num_tokens"] = sum(m["num_tokens"] for m in per_step)
        metrics["dp_token_imbalance"] = float(replica_tokens.max() / replica_tokens.mean())
        return metrics

    def sync_weights(self) -> dict[str, float]:
        """The actor's policy into the engine, as the layout chosen at setup moves it (engine_layout.py)."""
        self.weight_version += 1
        return self.layout.sync_weights(self.weight_version)

    def evaluate(self) -> dict[str, Any]:
        """Greedy accuracy on the held-out set, with the samples kept for the behaviour report."""
        from megatron_zero.evaluation.generation import EngineGenerator

        if not self.eval_problems:
            return {}
        generate = EngineGenerator(self.engine, self.tokenizer)
        outputs = [samples[0] for samples in generate([p.prompt_text for p in self.eval_problems], n=1, temperature=0.0,
                                                      top_p=1.0, max_new_tokens=self.config.eval.max_new_tokens, seed=0)]
        grades = self.grader.grade_batch([o.text for o in outputs], [p.ground_truth for p in self.eval_problems])
        samples = [dict(step=self.step, prompt=p.prompt_text, response=o.text, ground_truth=p.ground_truth,
                        reward=r.score, num_tokens=o.num_tokens, finish_reason=o.finish_reason)
                   for p, o, r in zip(self.eval_problems, outputs, grades.results)]
        accuracy = sum(r.score >= 1.0 for r in grades.results) / len(grades.results)
        return {"accuracy": accuracy, "samples": samples}

    def evaluate_and_log(self) -> None:
        """Evaluate the current policy once per step (no-op without eval.path) into the metrics."""
        if not self.eval_problems or self.step in self.eval_history:
            return
        result = self.evaluate()
        self.metrics.log_eval(self.step, result)
        self.eval_history[self.step] = result["accuracy"]

    def summary(self) -> dict[str, Any]:
        """The run at a glance: held-out accuracy before / after (greedy) and what the data filters kept."""
        history = dict(sorted(self.eval_history.items()))
        report = self.pass_rate_report
        return {
            "num_steps": self.step,
            "resumed_from": str(self.resumed_from) if self.resumed_from else None,
            "accuracy_before": history.get(0),
            "accuracy_after": history.get(self.step) if self.step > 0 else None,
            "eval_history": [{"step": step, "accuracy": accuracy} for step, accuracy in history.items()],
            "eval_problems": len(self.eval_problems),
            "decoding": "greedy",
            "num_train_problems": len(self.sampler.problems),
            "pass_rate_filter": None if report is None else {**dataclasses.asdict(report),
                                                              "num_dropped": report.num_dropped},
        }

    def write_summary(self) -> Path:
        from megatron_zero.utils.files import atomic_write_text

        path = self.output_dir / "summary.json"
        atomic_write_text(path, json.dumps(self.summary(), indent=2) + "\n")
        return path

    # ---- checkpoints -------------------------------------------------------------------------------

    def save_checkpoint(self) -> Path:
        from megatron_zero.trainer import checkpoint

        path = checkpoint.step_dir(self.output_dir, self.step)
        if path.exists():
            import shutil

            shutil.rmtree(path)  # an incomplete earlier attempt at this step
        path.mkdir(parents=True)
        with self.layout.actor_on_device(resync=self.sync_weights):  # the actor saves from the device
            self.group.run("save", str(path / "actor"))
        # A batch generated ahead (rollout.off_policy_steps=1) is part of the state: the resumed run trains on it.
        checkpoint.save_driver_state(path, self.step, self.weight_version, self.sampler.state_dict(),
                                     self.rollouts.pending)
        checkpoint.finalize(path, Path(self.mcore_dir), self.step)
        logger.info("saved checkpoint %s", path)
        return path

    def maybe_resume(self, path: Optional[Path]) -> Optional[Path]:
        """Load ``path`` (checked by the preflight; None: start at step 0)."""
        from megatron_zero.trainer import checkpoint

        if path is None:
            return None
        self.group.run("load", str(path / checkpoint.ACTOR_DIR))
        state = checkpoint.load_driver_state(path)
        self.step, self.weight_version = state["step"], state["weight_version"]
        self.sampler.load_state_dict(state["sampler"])
        self.rollouts.pending = state.get("pending_rollout")
        # The engine starts from the base model: give it the resumed policy before the first rollout.
        self.sync_weights()
        self.engine_policy_step = self.step
        logger.info("resumed from %s at step %d", path, self.step)
        return path

    def close(self) -> None:
        from megatron_zero.cluster.placement import remove_placement

        # The engine first: launched SGLang servers live in actors on the placement group, and removing it
        # would kill them without a clean shutdown.
        self.engine.shutdown()
        self.group.shutdown()
        for placement in (self.placement, self.rollout_placement):
            if placement is not None:
                remove_placement(placement)
        self.grader.close()
        self.metrics.close()


# ---- signals -------------------------------------------------------------------------------------

class _stop_on_sigterm:
    """SIGTERM (cluster preemption) asks the loop to stop after the current step and save."""

    def __init__(self, trainer: Trainer) -> None:
        self.trainer = trainer

    def __enter__(self) -> None:
        import signal

        def request_stop(signum, frame):
            logger.warning("SIGTERM: saving a checkpoint after step %d finishes, then stopping", self.trainer.step + 1)
            self.trainer.stop_requested = True

        self.previous = signal.signal(signal.SIGTERM, request_stop)

    def __exit__(self, *exc) -> None:
        import signal

        signal.signal(signal.SIGTERM, self.previous)
