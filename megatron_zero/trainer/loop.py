"""The zero-RL loop: generate, reward, advantage, train, sync weights, evaluate.

    trainer = Trainer(config)        # validates, starts Ray and the Megatron ranks, builds the engine
    trainer.fit()                    # runs config.run.num_steps steps

The step reads like the algorithm; placement (Ray), the actor (Megatron), the engine and the grader
live in their own modules. Every step checks what silently breaks RL trainers: the engine/actor
log-prob gap (stale or broken weight sync), the step-0 policy/reference KL, and the grader's
error rate; each stops the run with a clear error.

With ``eval.path`` set, the held-out set is scored greedily before step 1 (the base model's baseline), every
``run.eval_every`` steps and at the end; ``summary.json`` in the output directory holds those accuracies and what
the data filters kept (``data.pass_rate_filter``).
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import json
import logging
import math
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, Optional, Sequence

import torch

from megatron_zero.actor.advantages import compute_advantages
from megatron_zero.actor.batching import ActorBatch
from megatron_zero.config.parallel import ParallelConfig
from megatron_zero.config.sglang import SGLangConfig
from megatron_zero.config.trainer import TrainConfig
from megatron_zero.data.rollout_batch import RolloutBatch, RolloutSample
from megatron_zero.models.registry import read_architecture
from megatron_zero.parallel.data_parallel import ShardPlan, row_costs
from megatron_zero.parallel.reshard import RECEIVED_KINDS
from megatron_zero.rollout.engine import Generation, RolloutEngine, SamplingParams, gather
from megatron_zero.rollout.factory import build_engine
from megatron_zero.rollout.fp8_weights import fp8_from_bytes, is_fp8_checkpoint, write_fp8_checkpoint

if TYPE_CHECKING:
    from megatron_zero.rewards import BatchGrades, GradingSession

logger = logging.getLogger(__name__)


class HealthCheckFailed(RuntimeError):
    """A per-step invariant of the run broke; the message says which and what to check."""


def logprob_gap(engine_logp: torch.Tensor, old_logp: torch.Tensor, mask: torch.Tensor) -> dict[str, float]:
    """Engine vs actor log-probs over the response tokens (same weights and temperature: ~0): mean, 99th
    percentile and max of |diff|, so a drift shows in the p99 before it trips a bound."""
    gap = (engine_logp - old_logp).abs()[mask]
    # kthvalue, not quantile: torch.quantile refuses inputs above 16M elements (a 32B step has more tokens).
    p99 = gap.kthvalue(max(1, math.ceil(0.99 * gap.numel()))).values
    return {"logprob_gap_mean": float(gap.mean()), "logprob_gap_p99": float(p99), "logprob_gap_max": float(gap.max())}


def rollout_prompts(problems: Sequence, tokenizer, num_samples_per_prompt: int) -> list[list[int]]:
    """The engine's prompts for one step: each problem's formatted prompt as token ids, n times in a row (the
    router keeps a problem's n samples on one engine, where they share the prefix cache)."""
    prompts = [tokenizer(problem.prompt_text, add_special_tokens=False)["input_ids"] for problem in problems]
    return [ids for ids in prompts for _ in range(num_samples_per_prompt)]


def rollout_sampling_params(config: TrainConfig, tokenizer, *, honours_seeds: bool, step: int) -> SamplingParams:
    """Step ``step``'s sampling parameters. Seeded only where the engine can reproduce it (``honours_seeds``: the
    torch engine; SGLang in deterministic mode): then a resumed run repeats the uninterrupted one's rollouts
    exactly."""
    rollout = config.rollout
    stop_ids = (tokenizer.eos_token_id,) if tokenizer.eos_token_id is not None else ()
    return SamplingParams(temperature=rollout.temperature, top_p=rollout.top_p, top_k=rollout.top_k,
                          max_new_tokens=rollout.max_new_tokens, stop_token_ids=stop_ids,
                          seed=config.run.seed * 1_000_003 + step if honours_seeds else None)


def generate_graded(engine: RolloutEngine, prompts: list[list[int]], params: SamplingParams,
                    ground_truths: list[str], grading: GradingSession) -> list[Generation]:
    """``engine``'s generations in prompt order, each submitted to ``grading`` (as item i, against
    ``ground_truths[i]``) as soon as the engine streams it out, so the grader works while the engine samples."""

    def submitted(stream):
        for index, generation in stream:
            grading.submit(index, generation.text, ground_truths[index])
            yield index, generation

    return gather(submitted(engine.generate_stream(prompts, params)), len(prompts))


@dataclasses.dataclass
class Rollout:
    """One step's graded batch, with what the step logs about it."""

    batch: RolloutBatch
    grade_counts: dict[str, int]
    metrics: dict[str, float]
    policy_step: int  # the step whose policy generated it (0: the base model)
    # The generation's phases when it ran during the previous step (rollout.off_policy_steps=1), else None.
    overlapped: Optional[dict[str, float]] = None


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
        self.sampler, self.pass_rate_report = _load_sampler(config, self.tokenizer)
        self.eval_problems = _load_eval(config, self.tokenizer)
        self.mcore_dir = base_checkpoint(config)
        self.grader = GraderPool(config.reward)
        log_dir = self.output_dir / "logs"
        self.placement, self.rollout_placement = _create_placements(config)
        # The engine starts before the actor loads its weights: SGLang sizes its KV cache once, from the memory
        # free at startup. Colocated, it then releases its memory until the actor is loaded.
        self.engine = build_engine(config.rollout.engine, config.model_path, config.rollout.torch,
                                   rollout_sglang_config(config, write=True), config.cluster,
                                   self.rollout_placement or self.placement, self.tokenizer, log_dir,
                                   sglang_server_command, quantization=config.rollout.quantization)
        if config.cluster.colocate:
            self.engine.release_memory()
        # SGLang servers take their weights from the ranks (weight_push.py), never through the driver.
        self.engine_urls = [engine.url for engine in self.engine.engines] if config.rollout.engine == "sglang" else None
        self.group = _start_actor_group(config, self.placement, self.mcore_dir, log_dir, self.engine_urls)
        self.metrics = MetricsLogger(self.output_dir, config, first_step=(resumed_step or 0) + 1)
        self.step = 0
        self.weight_version = 0
        # The step whose policy the engine holds (0: the base model); each batch records the one that generated it.
        self.engine_policy_step = 0
        # rollout.off_policy_steps=1: the next step's batch, generated while this step trained.
        self.pending: Optional[Rollout] = None
        self.stop_requested = False
        self.progress = None  # the console's progress bar while fit() runs
        self.actor_offloaded = False
        self.resumed_from = self.maybe_resume(resume_from)
        # Held-out accuracies by step; a resumed run keeps its earlier ones (the baseline among them).
        self.eval_history = _read_eval_history(self.output_dir) if self.resumed_from else {}
        # A resume has synced its policy already. Otherwise colocated engines need the weights release_memory()
        # dropped, and SGLang servers of their own get a first sync anyway: it proves the broadcast path before
        # the first rollout rather than after it.
        if self.resumed_from is None and (config.cluster.colocate or self.engine_urls):
            self.sync_weights()
        if config.cluster.colocate:
            # Colocated: the engine owns the accelerators during rollout; the actor waits off-device.
            self.switch_to_rollout()

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
        timings: dict[str, float] = {}
        if self.pending is None:  # on-policy, or the first step of an off-policy run
            current = self.collect_rollout(timings, step=self.step, progress=self.progress)
        else:
            current, self.pending = self.pending, None
        rollout, grade_counts, sampling = current.batch, current.grade_counts, current.metrics
        batch = rollout.to_actor_batch()
        # Engine log-probs under the policy the actor holds now, for the health check: the engine's own if it
        # generated the batch with it, else a probe of the batch scored again (before it starts on the next one).
        engine_logp, probe = batch.rollout_logp, slice(None)
        if current.policy_step != self.engine_policy_step:
            probe = slice(0, self.config.health.off_policy_probe_samples)
            with _timed(timings, "rescore", self.progress):
                engine_logp = self.rescore(rollout.samples[probe], like=batch.rollout_logp[probe])
        prefetch = self.start_prefetch() if self.config.rollout.off_policy_steps else None
        memory = self.switch_to_training() if self.config.cluster.colocate else {}
        with _timed(timings, "old_logprobs", self.progress):
            plan = self.shard(batch)
            old_logp, entropy = self.logprobs(batch, plan)
            ref_logp = self.ref_logprobs(batch, plan) if self.config.loss.kl_coef > 0 else None
        health = self.check_health(batch, old_logp, ref_logp, engine_logp, probe)
        health["rollout_policy_step"] = float(current.policy_step)
        if current.policy_step != self.engine_policy_step:  # what TIS corrects: generating vs current policy
            health["behaviour_logprob_gap_mean"] = float((batch.rollout_logp - old_logp).abs()[batch.response_mask]
                                                         .mean())
        advantages = compute_advantages(rollout.rewards(), rollout.group_ids(), batch.response_mask,
                                        self.config.advantage, rollout.truncated())
        batch = dataclasses.replace(batch, old_logp=old_logp, ref_logp=ref_logp,
                                    advantages=advantages.advantages_NT, response_mask=advantages.loss_mask_NT)
        with _timed(timings, "train", self.progress):
            train_metrics = self.train(batch, rollout.max_response_length())
        if prefetch is not None:
            # The engine takes the new weights only between batches: the sync waits for the generation.
            with _timed(timings, "wait_rollout", self.progress):
                self.pending = prefetch.result()
        with _timed(timings, "sync_weights", self.progress):
            sync = self.sync_weights()
        if self.config.cluster.colocate:
            memory.update(self.switch_to_rollout())
        self.step += 1
        self.engine_policy_step = self.step
        return self.metrics.log_step(self.step, rollout, grade_counts,
                                     {**health, **train_metrics, **sync, **sampling, **memory},
                                     timings, float(entropy[batch.response_mask].mean()), current.overlapped)

    def start_prefetch(self) -> concurrent.futures.Future:
        """Generate and grade the next step's batch in a background thread with the weights the engine holds now
        (rollout.off_policy_steps=1); the actor trains meanwhile (its calls are Ray requests from this thread)."""
        def collect() -> Rollout:
            timings: dict[str, float] = {}
            rollout = self.collect_rollout(timings, step=self.step + 1, progress=None)
            return dataclasses.replace(rollout, overlapped=timings)

        executor = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="off-policy-rollout")
        future = executor.submit(collect)
        executor.shutdown(wait=False)
        return future

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

    def collect_rollout(self, timings: dict[str, float], *, step: int, progress: Any) -> Rollout:
        """Generate and grade the batch the actor trains on at ``step`` (0-based: its sampling seeds); with dynamic
        sampling, refill it with groups that teach something. ``progress``: the console's bar, or None (a thread).

        A group whose samples all got the same reward has zero advantage under GRPO/RLOO/Dr.GRPO and only
        costs compute; dynamic sampling (DAPO) drops such groups and samples more prompts instead.
        """
        from collections import Counter

        from megatron_zero.data.difficulty import SampleGroup, dynamic_sampling

        counts: Counter[str] = Counter()
        rollouts: list[RolloutBatch] = []
        overlap = {"reward_overlap_seconds": 0.0}
        policy_step = self.engine_policy_step

        def supply(num_missing: int) -> list[SampleGroup]:
            # Grading overlaps generation: each response goes to the grader pool as the engine finishes it.
            # Timings: "generate" is the generation wall time, "reward" only the wait for grades after the last
            # response (what grading adds to the step). reward_overlap_seconds: the part of the grading span
            # (first response submitted to last grade) that ran alongside generation; a metric, not a timing,
            # since it is no phase of its own (timings add up to the step time).
            with self.grader.session() as grading:
                with _timed(timings, "generate", progress, accumulate=True):
                    rollout = self.generate(self.sampler.next_batch(), grading, step)
                with _timed(timings, "reward", progress, accumulate=True) as waited:
                    grades = self.reward(rollout, grading)
            counts.update(grades.counts)
            overlap["reward_overlap_seconds"] += max(0.0, grades.seconds - waited.seconds)
            rollouts.append(rollout)
            return [SampleGroup(uid=group[0].uid, rewards=tuple(s.reward for s in group), payload=group)
                    for group in rollout.groups()]

        options = self.config.data.dynamic_sampling
        if not options.enabled:
            supply(self.config.data.sampler.batch_size)
            return Rollout(rollouts[0], dict(counts), overlap, policy_step)
        groups, report = dynamic_sampling(supply, self.config.data.sampler.batch_size, options.max_refill_rounds)
        metrics = {"dynamic_sampling_rounds": report.num_rounds, "dynamic_sampling_dropped": report.num_groups_dropped,
                   "dynamic_sampling_kept": report.num_groups_kept, **overlap}
        if not groups:
            # Nothing to learn from in any round: train on the last batch (all advantages are zero).
            logger.warning("dynamic sampling kept no group in %d rounds; this step's update is a no-op", report.num_rounds)
            return Rollout(rollouts[-1], dict(counts), metrics, policy_step)
        samples = [dataclasses.replace(sample, group=index) for index, group in enumerate(groups)
                   for sample in group.payload]
        return Rollout(RolloutBatch(samples), dict(counts), metrics, policy_step)

    def generate(self, problems, grading: GradingSession, step: int) -> RolloutBatch:
        """n samples per problem; each response is submitted to ``grading`` the moment the engine finishes it."""
        n = self.config.rollout.num_samples_per_prompt
        prompts = rollout_prompts(problems, self.tokenizer, n)
        params = rollout_sampling_params(self.config, self.tokenizer, honours_seeds=self.engine.honours_seeds,
                                         step=step)
        generations = generate_graded(self.engine, prompts, params,
                                      [p.ground_truth for p in problems for _ in range(n)], grading)
        samples = []
        for index, generation in enumerate(generations):
            problem = problems[index // n]
            samples.append(RolloutSample(group=index // n, uid=problem.uid, prompt_ids=list(generation.prompt_ids),
                                         response_ids=list(generation.token_ids),
                                         rollout_logprobs=list(generation.logprobs),
                                         finish_reason=generation.finish_reason, prompt_text=problem.prompt_text,
                                         response_text=generation.text, ground_truth=problem.ground_truth))
        return RolloutBatch(samples)

    def reward(self, rollout: RolloutBatch, grading: GradingSession) -> BatchGrades:
        """Wait for the grades of ``rollout``'s responses (submitted by ``generate``) and store them."""
        grades = grading.finish()
        for sample, result in zip(rollout.samples, grades.results, strict=True):
            sample.reward, sample.grade_status = result.score, result.status.value
        # Errors and timeouts are counted, never hidden in reward 0; too many stop the run.
        grades.check_failure_rate(self.config.reward.max_failure_rate)
        return grades

    def check_health(self, batch, old_logp: torch.Tensor, ref_logp: Optional[torch.Tensor],
                     engine_logp: torch.Tensor, probe: slice) -> dict[str, float]:
        """``engine_logp``: the engine's log-probs of the batch's rows ``probe`` under the policy the actor holds
        (``old_logp``)."""
        health = logprob_gap(engine_logp, old_logp[probe], batch.response_mask[probe])
        bounds = self.config.health
        max_mean, max_max = self.config.logprob_gap_bounds
        if health["logprob_gap_mean"] > max_mean or health["logprob_gap_max"] > max_max:
            raise HealthCheckFailed(
                f"step {self.step}: engine and actor log-probs of the same responses differ (mean |diff| "
                f"{health['logprob_gap_mean']:.3g} > {max_mean:g} or max {health['logprob_gap_max']:.3g} > {max_max:g}, "
                f"the {self.config.logprob_precision} bounds unless health.max_logprob_gap_* are set); the rollout "
                "engine is not running the actor's weights (stale or broken weight sync, or different "
                "temperature/precision)")
        if ref_logp is not None:
            mask = batch.response_mask
            health["kl_policy_ref"] = float((old_logp - ref_logp)[mask].mean())
            if self.step == 0 and abs(health["kl_policy_ref"]) > bounds.max_initial_kl:
                raise HealthCheckFailed(f"step 0: policy and reference differ (mean log-ratio {health['kl_policy_ref']:.3g} "
                                        f"> {bounds.max_initial_kl:g}); they must start from the same checkpoint")
        return health

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

    def switch_to_training(self) -> dict[str, float]:
        """Colocated phase switch, in a fixed order: the engine frees its memory, then the actor takes it back."""
        self.engine.release_memory()
        onloaded = self.group.run("onload")[0]
        self.actor_offloaded = False
        return {f"onload_bytes_{kind}": float(nbytes) for kind, nbytes in onloaded.items()}

    def switch_to_rollout(self) -> dict[str, float]:
        """After the sync (engine weights resumed and updated from the on-device actor), the actor leaves, and
        only then the engine's KV cache returns: actor, engine weights and KV cache never peak together."""
        offloaded = self.group.run("offload")[0]
        self.actor_offloaded = True
        self.engine.resume_kv_cache()
        return {f"offload_bytes_{kind}": float(nbytes) for kind, nbytes in offloaded.items()}

    def sync_weights(self) -> dict[str, float]:
        if self.config.cluster.colocate:
            # The engine's weight memory comes back (a no-op if it holds it) while the actor is still on the
            # device; the KV cache returns only after the actor left (switch_to_rollout).
            self.engine.resume_weights()
        self.weight_version += 1
        if self.engine_urls:
            # Every rank pushes to the server on its GPU; each engine's first rank reports (weight_push.py).
            per_rank = self.group.run("push_weights", self.weight_version,
                                      self.config.run.weight_sync_bucket_mb * 2**20)
            leaders = [stats["engine"] for stats in per_rank if stats["engine"] is not None]
            seconds, num_bytes = max(stats["seconds"] for stats in leaders), leaders[0]["bytes"]
        else:
            buckets_and_stats = self.group.run("weight_buckets", self.config.run.weight_sync_bucket_mb * 2**20)
            buckets, stats = buckets_and_stats[0]  # rank 0 sends
            buckets = [fp8_from_bytes(bucket) for bucket in buckets]
            per_rank = [rank_stats for _, rank_stats in buckets_and_stats]
            self.engine.flush_cache()
            engine_stats = self.engine.sync_weights(buckets, version=self.weight_version)
            seconds, num_bytes = stats["reshard_seconds"] + engine_stats.seconds, stats["bytes"]
        # What the resharding moved between ranks, summed over them (cross_node: the part that left a node).
        moved = {f"weight_sync_bytes_{kind}": float(sum(stats["received_bytes"][kind] for stats in per_rank))
                 for kind in RECEIVED_KINDS}
        return {"weight_sync_seconds": seconds, "weight_sync_gb_per_s": num_bytes / 1e9 / max(seconds, 1e-9),
                "weight_sync_bytes": float(num_bytes), **moved}

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
        offloaded = self.actor_offloaded
        if offloaded:
            self.switch_to_training()  # the actor saves from the device
        self.group.run("save", str(path / "actor"))
        if offloaded:
            self.sync_weights()  # release_memory() dropped the engine's weights
            self.switch_to_rollout()
        checkpoint.save_driver_state(path, self.step, self.weight_version, self.sampler.state_dict(), self.pending)
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
        self.pending = state.get("pending_rollout")
        # The engine starts from the base model: give it the resumed policy before the first rollout.
        self.sync_weights()
        self.engine_policy_step = self.step
        logger.info("resumed from %s at step %d", path, self.step)
        return path

    def close(self) -> None:
        from megatron_zero.trainer.placement import remove_placement

        # The engine first: launched SGLang servers live in actors on the placement group, and removing it
        # would kill them without a clean shutdown.
        self.engine.shutdown()
        self.group.shutdown()
        for placement in (self.placement, self.rollout_placement):
            if placement is not None:
                remove_placement(placement)
        self.grader.close()
        self.metrics.close()


# ---- setup helpers (kept out of the loop above) ----------------------------------------------------

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


class _timed:
    """Time a phase into ``timings`` and show it on the console's progress bar while it runs."""

    def __init__(self, timings: dict[str, float], name: str, progress=None, accumulate: bool = False) -> None:
        self.timings, self.name, self.progress, self.accumulate = timings, name, progress, accumulate

    def __enter__(self) -> "_timed":
        if self.progress is not None:
            self.progress.set_postfix_str(self.name, refresh=True)
        self.start = time.perf_counter()
        return self

    def __exit__(self, *exc) -> None:
        self.seconds = time.perf_counter() - self.start
        self.timings[self.name] = self.timings.get(self.name, 0.0) + self.seconds if self.accumulate else self.seconds


def _load_sampler(config: TrainConfig, tokenizer):
    """Prompts (already formatted with data.train.template, length-checked and in data.pass_rate_filter's band)
    in a resumable sampler, and the filter's report (None without a table)."""
    from megatron_zero.data import PromptSampler, apply_pass_rate_filter, load_problems

    problems = load_problems(config.data.train, tokenizer=tokenizer)
    problems, report = apply_pass_rate_filter(problems, config.data.pass_rate_filter)
    return PromptSampler(problems, config.data.sampler), report


def _read_eval_history(output_dir: Path) -> dict[int, float]:
    """Accuracies in eval.jsonl, by step (cut back to the checkpoint resumed from: run_records.py)."""
    path = output_dir / "eval.jsonl"
    if not path.is_file():
        return {}
    records = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    return {record["step"]: record["accuracy"] for record in records}


def _load_eval(config: TrainConfig, tokenizer) -> list:
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
    return _convert_base_model(config.model_path, Path(config.run.output_dir) / BASE_MCORE_DIR)


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


def _convert_base_model(model_path: str, out_dir: Path) -> str:
    from megatron_zero.models.mcore_checkpoint import convert_hf_to_mcore, METADATA_NAME
    from megatron_zero.parallel.local_launch import run_local_workers

    if not (out_dir / METADATA_NAME).is_file():
        if out_dir.exists():
            import shutil

            shutil.rmtree(out_dir)  # a half-written conversion from an interrupted run
        run_local_workers(convert_hf_to_mcore, ParallelConfig(), args=(model_path, str(out_dir)))
    return str(out_dir)


def _create_placements(config: TrainConfig):
    """The ranks' placement, and the disaggregated engines' (None without cluster.rollout_num_gpus)."""
    from megatron_zero.trainer.placement import connect_ray, create_placement, create_rollout_placement, wait_for_nodes

    connect_ray(config.cluster)
    wait_for_nodes(config.cluster)
    placement = create_placement(config.cluster)
    return placement, create_rollout_placement(config.cluster) if config.cluster.rollout_num_gpus else None


def _start_actor_group(config: TrainConfig, placement, mcore_dir: str, log_dir: Path,
                       engine_urls: Optional[list[str]]):
    from megatron_zero.trainer.actor_group import RayActorGroup

    group = RayActorGroup(config.cluster, placement, log_dir)
    group.initialize_parallel(config.parallel)
    group.setup("megatron_zero.trainer.actor_worker:ActorWorker", mcore_dir, config.actor, config.loss, config.model,
                config.loss.kl_coef > 0, engine_urls, config.rollout.sglang, config.rollout.quantization)
    return group
