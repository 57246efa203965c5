"""Benchmark evaluation: local benchmark readers, pass@k / avg@k, the paper-style results table.

Public entry points: `evaluate` and `write_eval_outputs` (runner), `load_benchmark` / `BENCHMARKS`
(benchmarks), `pass_at_k` (metrics), `GeneratedText` / `Generator` / `Grader` (generation).
"""

from megatron_zero.evaluation.benchmarks import BENCHMARKS, Problem, load_benchmark
from megatron_zero.evaluation.generation import GeneratedText, Generator, Grader
from megatron_zero.evaluation.metrics import mean_avg_at_k, mean_pass_at_k, pass_at_k
from megatron_zero.evaluation.runner import BenchmarkResult, EvalReport, evaluate, results_json, results_table, write_eval_outputs

__all__ = [
    "BENCHMARKS",
    "BenchmarkResult",
    "EvalReport",
    "GeneratedText",
    "Generator",
    "Grader",
    "Problem",
    "evaluate",
    "load_benchmark",
    "mean_avg_at_k",
    "mean_pass_at_k",
    "pass_at_k",
    "results_json",
    "results_table",
    "write_eval_outputs",
]
