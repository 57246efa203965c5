"""Pass rates of training problems under a model: sample n responses per problem with an engine, grade them.

Why: the paper matches data difficulty to the base model; ``data.pass_rate_filter`` keeps the problems whose rate
is in a band, and this writes the table it reads (``megatron-zero difficulty``). Generation and grading are the
evaluation's (`Generator`, `Grader`), so the CLI wraps whichever engine the user has (evaluation/engines.py).

How::

    rates = measure_pass_rates(problems, EngineGenerator(engine, tokenizer), grade, PassRateEstimateConfig())
    save_pass_rates(rates, "rates.jsonl")
    # or all of it, from a model directory (what `megatron-zero difficulty` calls):
    estimate_model_pass_rates("models/base", DatasetConfig(path="hard.jsonl"), PassRateEstimateConfig(),
                              EngineConfig(), "rates.jsonl")
"""

from __future__ import annotations

import dataclasses
import functools
import logging
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from megatron_zero.config.data import DatasetConfig, PassRateEstimateConfig
from megatron_zero.config.evaluation import EngineConfig
from megatron_zero.config.reward import RewardConfig
from megatron_zero.data.difficulty import PassRate, estimate_pass_rates, save_pass_rates
from megatron_zero.data.problems import DatasetKeys, Problem, train_keys
from megatron_zero.evaluation.generation import Generator, Grader
from megatron_zero.utils.progress import Progress, digest, nothing_left

logger = logging.getLogger(__name__)

# How `megatron-zero difficulty` (the one caller that sets the response budget) names it.
_MAX_NEW_TOKENS_FLAG = "--max-new-tokens"


def measure_pass_rates(problems: list[Problem], generate: Generator, grade: Grader,
                       config: PassRateEstimateConfig, *, done: Sequence[list[PassRate]] = (),
                       on_batch: Callable[[list[PassRate]], None] | None = None) -> dict[str, PassRate]:
    """Each problem's pass rate from ``config.num_samples`` samples of its prompt (``Problem.prompt_text``).
    ``done`` / ``on_batch``: the batches an interrupted run finished, and where each new one goes
    (`estimate_pass_rates`); a resumed run samples its remaining batches with the seeds the whole run would have."""
    calls = len(done)

    def generate_and_grade(batch: list[Problem], n: int) -> list[list[float]]:
        nonlocal calls
        # A seed per call: batches are sampled independently, and a rerun repeats the table on seeded engines.
        outputs = generate([problem.prompt_text for problem in batch], n=n, temperature=config.temperature,
                           top_p=config.top_p, max_new_tokens=config.max_new_tokens, seed=config.seed + calls)
        calls += 1
        if len(outputs) != len(batch) or any(len(samples) != n for samples in outputs):
            raise ValueError(f"generator returned {[len(samples) for samples in outputs]} samples for {len(batch)} "
                             f"prompts; expected {n} each")
        scores = grade([sample.text for samples in outputs for sample in samples],
                       [problem.ground_truth for problem in batch for _ in range(n)])
        return [list(scores[i * n:(i + 1) * n]) for i in range(len(batch))]

    return estimate_pass_rates(problems, generate_and_grade, config.num_samples, config.batch_size,
                               config.success_threshold, done=done, on_batch=on_batch)


def estimate_model_pass_rates(model_path: str, dataset: DatasetConfig, sampling: PassRateEstimateConfig,
                              engine: EngineConfig, out_path: str | Path, *, reward: RewardConfig | None = None,
                              server_command: Sequence[str] | None = None,
                              keys: DatasetKeys = train_keys) -> dict[str, PassRate]:
    """``megatron-zero difficulty``: the pass-rate table of ``dataset``'s problems under ``model_path``, written to
    ``out_path`` (the file ``data.pass_rate_filter.pass_rate_file`` names). The problems are read, and their
    prompts built and length-checked, exactly as the trainer reads them with the same DatasetConfig; the longest
    prompt + ``sampling.max_new_tokens`` must fit the model and the engine before the engine starts. ``keys``:
    how errors name the dataset's fields (the CLI passes its flags)."""
    from megatron_zero.data.problems import load_problems
    from megatron_zero.evaluation.engines import standalone_engine
    from megatron_zero.evaluation.generation import EngineGenerator
    from megatron_zero.evaluation.model_eval import load_tokenizer, pool_grader
    from megatron_zero.preflight.generation import GenerationInputs, check_generation_inputs
    from megatron_zero.rewards import GraderPool
    from megatron_zero.utils.files import prepare_output

    prepare_output(out_path, "--out")  # first: nothing is read before the output is known writable

    @functools.cache
    def read_problems() -> tuple[Any, list[Problem]]:
        # Read (and their prompts length-checked) with the model's tokenizer: once the preflight found its files.
        tokenizer = load_tokenizer(model_path)
        return tokenizer, load_problems(dataset, tokenizer, keys=keys)

    def prompt_bound() -> tuple[str, int]:
        if dataset.max_prompt_tokens is not None:
            return f"{keys('max_prompt_tokens')}={dataset.max_prompt_tokens}", dataset.max_prompt_tokens
        tokenizer, problems = read_problems()
        longest = max(len(ids) for ids in tokenizer([problem.prompt_text for problem in problems])["input_ids"])
        return f"the longest prompt ({longest} tokens)", longest

    inputs = GenerationInputs.for_engine(model_path, engine, ((_MAX_NEW_TOKENS_FLAG, sampling.max_new_tokens),))
    check_generation_inputs(inputs, prompt_bound)
    tokenizer, problems = read_problems()
    # Each finished batch is kept beside the table: killed, the same command resumes after the last one.
    settings = {"model": str(Path(model_path).resolve()), **engine.sample_settings(), **dataclasses.asdict(sampling),
                "problems": digest((problem.uid, problem.prompt_text, problem.ground_truth) for problem in problems)}
    progress = Progress.open(Path(out_path).with_name(Path(out_path).name + ".progress"), settings, "difficulty",
                             "batches")
    done = [[PassRate(**rate) for rate in batch] for batch in progress.done]
    if len(done) * sampling.batch_size < len(problems):
        log_dir = Path(out_path).parent / "logs"
        with standalone_engine(engine, model_path, tokenizer, log_dir,
                               server_command=server_command) as rollout_engine, GraderPool(reward) as pool:
            rates = measure_pass_rates(problems, EngineGenerator(rollout_engine, tokenizer), pool_grader(pool),
                                       sampling, done=done, on_batch=lambda batch: progress.add(
                                           [dataclasses.asdict(rate) for rate in batch]))
    else:  # every batch was finished before the interruption: only the table is left to write
        rates = measure_pass_rates(problems, nothing_left, nothing_left, sampling, done=done)
    save_pass_rates(rates, out_path)
    progress.finish()
    solved = [rate.pass_rate for rate in rates.values()]
    logger.info("pass rates of %d problems written to %s: mean %.3f, never solved %d, always solved %d", len(rates),
                out_path, sum(solved) / len(solved), solved.count(0.0), solved.count(1.0))
    return rates

