"""Configs of the prompt data: where problems come from, how prompts are built and sampled, difficulty control.

Why: the data layer (megatron_zero/data/) reads a dataset with configurable field names, applies one of the
recipe's prompt templates, checks prompt lengths, and samples shuffled prompt batches that resume exactly.
Defaults are the SimpleRL-Zoo recipe (shared/reference/RECIPE.md): qwen-boxed template, max prompt 1024 tokens,
256 prompts per rollout batch (the script default; the paper used 1024).

How: ``DataConfig(train=DatasetConfig(path="data/hard.jsonl"))`` or ``OmegaConf.structured(DataConfig)``
(then set ``train.path``).
"""

import dataclasses
from typing import Optional

from megatron_zero.config.problems import raise_problems


@dataclasses.dataclass(kw_only=True, frozen=True)
class DatasetConfig:
    # A .jsonl / .json / .parquet file, a folder written by datasets' save_to_disk, or a Hugging Face hub name.
    path: str = ""
    # The split of a hub dataset or save_to_disk folder (a single file is one split).
    split: str = "train"
    question_field: str = "question"
    answer_field: str = "answer"
    # Stable problem ids (pass-rate tables are keyed by them); None means "<file stem>-<row>".
    uid_field: Optional[str] = None
    # Optional fields copied into Problem.metadata as "level" / "source".
    level_field: Optional[str] = None
    source_field: Optional[str] = None
    # A name in megatron_zero.data.templates ("qwen-boxed", "simple" = "abel", "chat") or a string with {input}.
    template: str = "qwen-boxed"
    # Checked when a tokenizer is given; None disables the check.
    max_prompt_tokens: Optional[int] = 1024
    # Over-long prompts are an error unless this is set; then they are dropped and reported.
    filter_overlong: bool = False
    # Where datasets caches its Arrow files; None is its default (~/.cache/huggingface/datasets).
    cache_dir: Optional[str] = None

    def __post_init__(self) -> None:
        # The template's name is checked against data/templates.py by the preflight (preflight/names.py).
        problems: list[str] = []  # every value problem of this config, raised together
        if not self.template:
            problems.append("data.train.template='' must name a prompt template (e.g. 'qwen-boxed') or hold "
                            "{input}")
        for name in ("question_field", "answer_field", "split"):
            if not getattr(self, name):
                problems.append(f"data.train.{name}='' must not be empty")
        if self.max_prompt_tokens is not None and self.max_prompt_tokens < 1:
            problems.append(f"data.train.max_prompt_tokens={self.max_prompt_tokens} must be >= 1, or None to skip "
                            "the check")
        raise_problems(problems)


@dataclasses.dataclass(kw_only=True, frozen=True)
class SamplerConfig:
    # Prompts per rollout batch.
    batch_size: int = 256
    seed: int = 0
    # Off: every epoch walks the problems in file order.
    shuffle: bool = True
    # Stop after this many passes over the problems; None means sample forever (the trainer counts steps).
    num_epochs: Optional[int] = None

    def __post_init__(self) -> None:
        problems: list[str] = []  # every value problem of this config, raised together
        if self.batch_size < 1:
            problems.append(f"sampler.batch_size={self.batch_size} must be >= 1 (recipe: 256 or 1024)")
        if self.num_epochs is not None and self.num_epochs < 1:
            problems.append(f"sampler.num_epochs={self.num_epochs} must be >= 1, or None for no limit")
        raise_problems(problems)


@dataclasses.dataclass(kw_only=True, frozen=True)
class PassRateFilterConfig:
    # JSONL table written by megatron_zero.data.difficulty.save_pass_rates; None disables the filter.
    pass_rate_file: Optional[str] = None
    # Keep problems whose estimated pass rate is in [min_pass_rate, max_pass_rate].
    min_pass_rate: float = 0.0
    max_pass_rate: float = 1.0

    def __post_init__(self) -> None:
        if not 0 <= self.min_pass_rate <= self.max_pass_rate <= 1:
            raise ValueError(
                f"pass_rate_filter band [{self.min_pass_rate}, {self.max_pass_rate}] must satisfy "
                "0 <= min_pass_rate <= max_pass_rate <= 1"
            )


@dataclasses.dataclass(kw_only=True, frozen=True)
class PassRateEstimateConfig:
    """How ``megatron-zero difficulty`` samples the pass-rate table: the training rollout's sampling by default
    (recipe: temperature 1.0, 8 samples), so a rate says how often RL would see the problem solved."""

    num_samples: int = 8
    temperature: float = 1.0
    top_p: float = 1.0
    max_new_tokens: int = 3072
    # Problems per generation call (all their samples go to the engine together).
    batch_size: int = 256
    seed: int = 0
    # A sample counts as solved when its reward is at least this (the recipe's correct reward is 1.0).
    success_threshold: float = 1.0

    def __post_init__(self) -> None:
        problems: list[str] = []  # every value problem of this config, raised together
        for name in ("num_samples", "max_new_tokens", "batch_size"):
            value = getattr(self, name)
            if not (isinstance(value, int) and value >= 1):
                problems.append(f"difficulty.{name}={value!r} must be an integer >= 1")
        if self.temperature < 0:
            problems.append(f"difficulty.temperature={self.temperature} must be >= 0 (0 = greedy)")
        if self.temperature == 0 and self.num_samples > 1:
            problems.append(f"difficulty.temperature=0 (greedy) with num_samples={self.num_samples} repeats one "
                            "sample; sample with temperature > 0 (recipe: 1.0) or set num_samples=1")
        if not 0 < self.top_p <= 1:
            problems.append(f"difficulty.top_p={self.top_p} must be in (0, 1]")
        raise_problems(problems)


@dataclasses.dataclass(kw_only=True, frozen=True)
class DynamicSamplingConfig:
    # DAPO-style: drop prompt groups whose rewards are all equal (zero advantage) and refill the batch.
    enabled: bool = False
    # Generation rounds after the first one before giving up on a full batch.
    max_refill_rounds: int = 3

    def __post_init__(self) -> None:
        if self.max_refill_rounds < 0:
            raise ValueError(f"dynamic_sampling.max_refill_rounds={self.max_refill_rounds} must be >= 0")


@dataclasses.dataclass(kw_only=True, frozen=True)
class DataConfig:
    train: DatasetConfig = dataclasses.field(default_factory=DatasetConfig)
    sampler: SamplerConfig = dataclasses.field(default_factory=SamplerConfig)
    pass_rate_filter: PassRateFilterConfig = dataclasses.field(default_factory=PassRateFilterConfig)
    dynamic_sampling: DynamicSamplingConfig = dataclasses.field(default_factory=DynamicSamplingConfig)
