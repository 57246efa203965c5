"""Evaluate a Hugging Face model directory on the math benchmarks, end to end (``megatron-zero eval``).

Why: the paper reports the base model and the RL model on the same six benchmarks with pass@k; this runs the whole
protocol with the engine the user has (evaluation/engines.py: the torch engine on CPU, SGLang on GPUs) and the
real rule-based grader (megatron_zero/rewards), and writes the outputs of `write_eval_outputs`.

How::

    report = evaluate_model("models/base", EvalConfig(benchmarks=["math500"]), EngineConfig(), "outputs/eval")
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from megatron_zero.analysis.records import SampleRecord
from megatron_zero.config.evaluation import EngineConfig, EvalConfig
from megatron_zero.config.reward import RewardConfig
from megatron_zero.evaluation.generation import Grader
from megatron_zero.utils.progress import Progress, digest, nothing_left

# The graded benchmarks of an unfinished `eval`, in its --out folder (utils/progress.py).
PROGRESS_NAME = "eval.progress"


def pool_grader(pool: Any) -> Grader:
    """A `Grader` over a ``GraderPool``: the score of each response (errors and timeouts score as wrong)."""
    return lambda responses, ground_truths: pool.grade_batch(responses, ground_truths).scores


def load_tokenizer(model_path: str) -> Any:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(model_path)


def evaluate_model(model_path: str, config: EvalConfig, engine: EngineConfig, out_dir: str | Path, *,
                   reward: RewardConfig | None = None, server_command: Sequence[str] | None = None):
    """Evaluate ``model_path`` on ``config``'s benchmarks and write the results under ``out_dir``; returns the
    `EvalReport`. Benchmark files are read before the engine starts. ``server_command``: see `standalone_engine`."""
    from megatron_zero.data.templates import make_prompt_formatter
    from megatron_zero.evaluation.engines import standalone_engine
    from megatron_zero.evaluation.generation import EngineGenerator
    from megatron_zero.evaluation.runner import evaluate, load_benchmarks, write_eval_outputs
    from megatron_zero.preflight.generation import GenerationInputs, check_generation_inputs
    from megatron_zero.rewards import GraderPool
    from megatron_zero.utils.files import prepare_output

    prepare_output(out_dir, "--out", folder=True)  # first: nothing is read before the output is known writable
    problems = load_benchmarks(config)
    # Loaded once, when the preflight has found the model's files and asks for the longest prompt.
    read_tokenizer = functools.cache(lambda: load_tokenizer(model_path))
    inputs = GenerationInputs.for_engine(model_path, engine, (("--max-new-tokens", config.max_new_tokens),))
    check_generation_inputs(inputs, lambda: _longest_prompt(problems, config.template, read_tokenizer()))
    tokenizer = read_tokenizer()
    format_prompt = make_prompt_formatter(config.template, tokenizer)
    # Each graded benchmark is kept in the output folder: killed, the same command resumes after the last one.
    settings = {"model": str(Path(model_path).resolve()), **engine.sample_settings(), **dataclasses.asdict(config),
                "problems": digest((name, problem.question, problem.answer) for name, items in problems.items()
                                   for problem in items)}
    progress = Progress.open(Path(out_dir) / PROGRESS_NAME, settings, "eval", "benchmarks")
    done = {part["benchmark"]: [SampleRecord.from_dict(row) for row in part["samples"]] for part in progress.done}

    def keep(name: str, records: list[SampleRecord]) -> None:
        progress.add({"benchmark": name, "samples": [record.to_dict() for record in records]})

    if set(done) < set(problems):
        with standalone_engine(engine, model_path, tokenizer, Path(out_dir) / "logs",
                               server_command=server_command) as rollout_engine, GraderPool(reward) as pool:
            report = evaluate(config, EngineGenerator(rollout_engine, tokenizer), pool_grader(pool), format_prompt,
                              problems=problems, done=done, on_benchmark=keep)
    else:  # every benchmark was graded before the interruption: only the results are left to write
        report = evaluate(config, nothing_left, nothing_left, format_prompt, problems=problems, done=done)
    write_eval_outputs(report, out_dir)
    progress.finish()
    return report


def _longest_prompt(problems: dict[str, list], template: str, tokenizer: Any) -> tuple[str, int]:
    """How the longest benchmark prompt is named in an error (benchmark and row), and its tokens."""
    from megatron_zero.data.templates import make_prompt_formatter

    format_prompt = make_prompt_formatter(template, tokenizer)
    items = [problem for problems_of_set in problems.values() for problem in problems_of_set]
    lengths = [len(ids) for ids in tokenizer([format_prompt(problem.question) for problem in items])["input_ids"]]
    longest = max(range(len(items)), key=lengths.__getitem__)
    label = f"the longest prompt ({items[longest].benchmark} row {items[longest].index}, {lengths[longest]} tokens)"
    return label, lengths[longest]
