"""Evaluate a model on the math benchmarks: generate, grade, score pass@k / avg@k, write a table.

The flow per benchmark reads like the protocol: load problems -> format prompts -> generate n samples
(greedy when temperature is 0) -> grade every sample -> pass@k and avg@k. All benchmark files are read
(and names checked) before the first generation, so a typo fails in seconds, not after hours.

Outputs of `write_eval_outputs(report, out_dir)` for checkpoint step S:
  results_stepS.json   per-benchmark metrics and the average
  results_stepS.md     the paper-style table (benchmarks as columns, Avg last)
  samples_stepS.jsonl  every sample as a `SampleRecord` line; a folder of these is the input of
                       ``tools/analyze_behaviors.py --samples-dir``.

Usage::

    report = evaluate(EvalConfig(benchmarks=["math500"]), generate, grade, format_prompt, step=100)
    write_eval_outputs(report, "eval_out")
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from megatron_zero.analysis.records import SampleRecord, write_samples
from megatron_zero.config.evaluation import EvalConfig
from megatron_zero.evaluation.benchmarks import Problem, get_benchmark, load_benchmark
from megatron_zero.evaluation.generation import Generator, Grader
from megatron_zero.evaluation.metrics import mean_avg_at_k, mean_pass_at_k
from megatron_zero.utils.files import atomic_write_text

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class BenchmarkResult:
    benchmark: str
    num_problems: int
    num_samples: int
    pass_at_k: dict[int, float]
    avg_at_k: dict[int, float]


@dataclass(frozen=True)
class EvalReport:
    step: int
    config: EvalConfig
    results: list[BenchmarkResult]
    samples: list[SampleRecord] = field(repr=False)

    def average(self) -> dict[str, float]:
        """Unweighted mean over benchmarks of every metric all benchmarks have (the paper's "Avg")."""
        metrics = [_metric_columns(result) for result in self.results]
        shared = [name for name in metrics[0] if all(name in m for m in metrics)]
        return {name: float(np.mean([m[name] for m in metrics])) for name in shared}


def _metric_columns(result: BenchmarkResult) -> dict[str, float]:
    columns = {f"pass@{k}": value for k, value in result.pass_at_k.items()}
    columns.update({f"avg@{k}": value for k, value in result.avg_at_k.items()})
    return columns


def load_benchmarks(config: EvalConfig) -> dict[str, list[Problem]]:
    """Every benchmark of `config`, read and checked (call it before starting an engine: errors come in seconds)."""
    return {name: load_benchmark(name, config.data_dir, config.max_problems) for name in config.benchmarks}


def evaluate(
    config: EvalConfig,
    generate: Generator,
    grade: Grader,
    format_prompt: Callable[[str], str],
    *,
    step: int = 0,
    problems: dict[str, list[Problem]] | None = None,
    done: dict[str, list[SampleRecord]] | None = None,
    on_benchmark: Callable[[str, list[SampleRecord]], None] | None = None,
) -> EvalReport:
    """Run every benchmark of `config`; `format_prompt` applies the prompt template to a question.

    `problems`: what `load_benchmarks(config)` returned, if the caller read them already. `done`: the graded samples
    of benchmarks an interrupted run finished (not generated again); `on_benchmark` gets each newly graded one."""
    problems_by_benchmark = load_benchmarks(config) if problems is None else problems
    done = done or {}
    temperature, top_p = (0.0, 1.0) if config.greedy else (config.temperature, config.top_p)
    results, samples = [], []
    for name, problems in problems_by_benchmark.items():
        if name in done:
            records = done[name]
            if len(records) != len(problems) * config.n_samples:
                raise ValueError(f"{name}: {len(records)} finished samples, expected {len(problems)} problems x "
                                 f"n={config.n_samples}")
        else:
            prompts = [format_prompt(problem.question) for problem in problems]
            outputs = generate(
                prompts,
                n=config.n_samples,
                temperature=temperature,
                top_p=top_p,
                max_new_tokens=config.max_new_tokens,
                seed=config.seed,
            )
            _check_outputs(name, outputs, len(prompts), config.n_samples)
            records = _grade(name, problems, prompts, outputs, grade, step)
            if on_benchmark is not None:
                on_benchmark(name, records)
        correct = [[r.correct for r in records[i : i + config.n_samples]] for i in range(0, len(records), config.n_samples)]
        result = BenchmarkResult(
            benchmark=name,
            num_problems=len(problems),
            num_samples=config.n_samples,
            pass_at_k={k: mean_pass_at_k(correct, k) for k in config.k_values},
            avg_at_k={k: mean_avg_at_k(correct, k) for k in config.k_values},
        )
        logger.info("step %d %s: %s", step, name, _metric_columns(result))
        results.append(result)
        samples.extend(records)
    return EvalReport(step=step, config=config, results=results, samples=samples)


def _check_outputs(name: str, outputs: list, num_prompts: int, n: int) -> None:
    if len(outputs) != num_prompts:
        raise ValueError(f"{name}: generator returned {len(outputs)} outputs for {num_prompts} prompts")
    wrong = [i for i, samples in enumerate(outputs) if len(samples) != n]
    if wrong:
        raise ValueError(f"{name}: generator returned {len(outputs[wrong[0]])} samples for prompt {wrong[0]}, expected n={n}")


def _grade(
    name: str, problems: list[Problem], prompts: list[str], outputs: list, grade: Grader, step: int
) -> list[SampleRecord]:
    flat = [(problem, prompt, sample) for problem, prompt, group in zip(problems, prompts, outputs) for sample in group]
    scores = grade([sample.text for _, _, sample in flat], [problem.answer for problem, _, _ in flat])
    if len(scores) != len(flat):
        raise ValueError(f"{name}: grader returned {len(scores)} scores for {len(flat)} responses")
    return [
        SampleRecord(
            step=step,
            prompt=prompt,
            response=sample.text,
            ground_truth=problem.answer,
            reward=float(score),
            num_tokens=sample.num_tokens,
            finish_reason=sample.finish_reason,
            benchmark=name,
        )
        for (problem, prompt, sample), score in zip(flat, scores)
    ]


def results_table(report: EvalReport) -> str:
    """Markdown table like the paper's: one column per benchmark plus Avg, one row per metric, in %."""
    names = [get_benchmark(result.benchmark).display_name for result in report.results]
    columns = [_metric_columns(result) for result in report.results]
    average = report.average()
    metric_names = list(dict.fromkeys(name for c in columns for name in c))
    lines = [
        "| Metric | " + " | ".join(names) + " | Avg |",
        "|---" * (len(names) + 2) + "|",
    ]
    for metric in metric_names:
        cells = [f"{100 * c[metric]:.1f}" if metric in c else "-" for c in columns]
        avg = f"{100 * average[metric]:.1f}" if metric in average else "-"
        lines.append(f"| {metric} | " + " | ".join(cells) + f" | {avg} |")
    return "\n".join(lines) + "\n"


def results_json(report: EvalReport) -> dict:
    return {
        "step": report.step,
        "config": asdict(report.config),
        "benchmarks": {
            result.benchmark: {
                "num_problems": result.num_problems,
                "num_samples": result.num_samples,
                **_metric_columns(result),
            }
            for result in report.results
        },
        "average": report.average(),
    }


def write_eval_outputs(report: EvalReport, out_dir: str | Path) -> dict[str, Path]:
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = {
        "json": out_dir / f"results_step{report.step}.json",
        "markdown": out_dir / f"results_step{report.step}.md",
        "samples": out_dir / f"samples_step{report.step}.jsonl",
    }
    # Each file under a temporary name, renamed when whole: an interrupted write leaves no half-written result.
    atomic_write_text(paths["json"], json.dumps(results_json(report), indent=2) + "\n")
    atomic_write_text(paths["markdown"], results_table(report))
    write_samples(report.samples, paths["samples"])
    return paths
