"""Prompt data: problems from files with configurable fields, prompt templates, the resumable prompt sampler,
difficulty splits (Easy / Medium / Hard) and difficulty control (pass-rate band, dynamic sampling).
"""

from megatron_zero.data.difficulty import (
    DynamicSamplingReport,
    GenerateAndGrade,
    PassRate,
    PassRateFilterReport,
    SampleGroup,
    apply_pass_rate_filter,
    check_pass_rate_table,
    dynamic_sampling,
    estimate_pass_rates,
    filter_by_pass_rate,
    load_pass_rates,
    problem_fingerprint,
    save_pass_rates,
)
from megatron_zero.data.problems import Problem, load_problems, problems_from_rows
from megatron_zero.data.sampler import PromptSampler
from megatron_zero.data.splits import (
    DIFFICULTY_SPLITS,
    build_difficulty_split,
    read_gsm8k_rows,
    read_math_rows,
    read_rows,
    write_jsonl,
)
from megatron_zero.data.templates import PROMPT_TEMPLATES, check_template, make_prompt_formatter

__all__ = [
    "DIFFICULTY_SPLITS",
    "PROMPT_TEMPLATES",
    "DynamicSamplingReport",
    "GenerateAndGrade",
    "PassRate",
    "PassRateFilterReport",
    "Problem",
    "PromptSampler",
    "SampleGroup",
    "apply_pass_rate_filter",
    "build_difficulty_split",
    "check_pass_rate_table",
    "check_template",
    "dynamic_sampling",
    "estimate_pass_rates",
    "filter_by_pass_rate",
    "load_pass_rates",
    "load_problems",
    "make_prompt_formatter",
    "problem_fingerprint",
    "problems_from_rows",
    "read_gsm8k_rows",
    "read_math_rows",
    "read_rows",
    "save_pass_rates",
    "write_jsonl",
]
