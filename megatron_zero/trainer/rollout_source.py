"""Where each step's graded batch comes from: generated on-policy when the step asks, or one step ahead while the
actor trains (``rollout.off_policy_steps=1``). Chosen once at setup (``rollout_source``), so the step loop asks
``next_batch()`` / ``start_next()`` / ``finish_next()`` and never tests a mode.

``RolloutCollector`` generates and grades one batch (grading overlapped with generation, dynamic sampling's
refills); the sources decide when it runs. A batch generated ahead is part of the checkpoint (``pending``): a
resumed run trains on it first, as the uninterrupted run would have.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import logging
from typing import TYPE_CHECKING, Any, Optional, Sequence

from megatron_zero.config.trainer import TrainConfig
from megatron_zero.data.rollout_batch import RolloutBatch, RolloutSample
from megatron_zero.rollout.engine import Generation, RolloutEngine, SamplingParams, gather
from megatron_zero.trainer.timing import timed

if TYPE_CHECKING:
    from megatron_zero.rewards import BatchGrades, GradingSession

logger = logging.getLogger(__name__)


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


class RolloutCollector:
    """Generates and grades the batch of one step from the sampler's next prompts."""

    def __init__(self, config: TrainConfig, engine: RolloutEngine, grader, sampler, tokenizer) -> None:
        self.config, self.engine, self.grader, self.sampler, self.tokenizer = config, engine, grader, sampler, tokenizer

    def collect(self, timings: dict[str, float], *, step: int, policy_step: int, progress: Any) -> Rollout:
        """Generate and grade the batch the actor trains on at ``step`` (0-based: its sampling seeds) with the
        engine's policy of ``policy_step``; with dynamic sampling, refill it with groups that teach something.
        ``progress``: the console's bar, or None (a thread).

        A group whose samples all got the same reward has zero advantage under GRPO/RLOO/Dr.GRPO and only
        costs compute; dynamic sampling (DAPO) drops such groups and samples more prompts instead.
        """
        from collections import Counter

        from megatron_zero.data.difficulty import SampleGroup, dynamic_sampling

        counts: Counter[str] = Counter()
        rollouts: list[RolloutBatch] = []
        overlap = {"reward_overlap_seconds": 0.0}

        def supply(num_missing: int) -> list[SampleGroup]:
            # Grading overlaps generation: each response goes to the grader pool as the engine finishes it.
            # Timings: "generate" is the generation wall time, "reward" only the wait for grades after the last
            # response (what grading adds to the step). reward_overlap_seconds: the part of the grading span
            # (first response submitted to last grade) that ran alongside generation; a metric, not a timing,
            # since it is no phase of its own (timings add up to the step time).
            with self.grader.session() as grading:
                with timed(timings, "generate", progress, accumulate=True):
                    rollout = self.generate(self.sampler.next_batch(), grading, step)
                with timed(timings, "reward", progress, accumulate=True) as waited:
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


# --------------------------------------------------------------------------- sources


class OnPolicyRollouts:
    """Each step generates its batch when it starts, with the policy the actor holds."""

    def __init__(self, collector: RolloutCollector) -> None:
        self.collector = collector
        # A batch generated ahead and saved in the checkpoint resumed from; trained on before anything new.
        self.pending: Optional[Rollout] = None

    def next_batch(self, timings: dict[str, float], *, step: int, policy_step: int, progress: Any) -> Rollout:
        if self.pending is not None:
            pending, self.pending = self.pending, None
            return pending
        return self.collector.collect(timings, step=step, policy_step=policy_step, progress=progress)

    def start_next(self, *, step: int, policy_step: int) -> None:
        """Nothing ahead: the next step generates its own batch."""

    def finish_next(self, timings: dict[str, float], progress: Any) -> None:
        """Nothing to wait for."""


class OneStepOffPolicyRollouts(OnPolicyRollouts):
    """``rollout.off_policy_steps=1``: the next step's batch is generated and graded in a background thread with the
    weights the engine holds now, while the actor trains (its calls are Ray requests from the main thread); the
    engine takes the new weights only between batches, so the sync waits for it (``finish_next``)."""

    def __init__(self, collector: RolloutCollector) -> None:
        super().__init__(collector)
        self.future: Optional[concurrent.futures.Future] = None

    def start_next(self, *, step: int, policy_step: int) -> None:
        def collect() -> Rollout:
            timings: dict[str, float] = {}
            rollout = self.collector.collect(timings, step=step, policy_step=policy_step, progress=None)
            return dataclasses.replace(rollout, overlapped=timings)

        executor = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="off-policy-rollout")
        self.future = executor.submit(collect)
        executor.shutdown(wait=False)

    def finish_next(self, timings: dict[str, float], progress: Any) -> None:
        with timed(timings, "wait_rollout", progress):
            self.pending, self.future = self.future.result(), None


def rollout_source(config: TrainConfig, collector: RolloutCollector) -> OnPolicyRollouts:
    """The source ``rollout.off_policy_steps`` asks for (0 or 1: config/rollout.py)."""
    return OneStepOffPolicyRollouts(collector) if config.rollout.off_policy_steps else OnPolicyRollouts(collector)
