"""The rollout-engine interface: what the trainer needs from SGLang and from the embedded torch engine.

An engine turns prompts (token ids) into sampled responses with per-token log-probs, takes new
weights as a stream of HF-named tensors after every training step, and, when colocated with the
actor on the same GPUs, gives its memory back during training and takes it again for rollout.

Log-prob convention (shared with the actor, checked every step by the trainer's health check):
``logprobs[i]`` is log softmax(logits / temperature)[token_ids[i]] over the model's true vocabulary,
with the temperature of the request, before top-p / top-k truncation.
"""

from __future__ import annotations

import abc
from dataclasses import dataclass, field
from typing import Iterable, Iterator, Optional, Sequence

import torch

FINISH_REASONS = ("stop", "length")


@dataclass(frozen=True, kw_only=True)
class SamplingParams:
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = -1  # -1: no top-k truncation
    max_new_tokens: int = 256
    stop: tuple[str, ...] = ()  # stop strings; the matched string is kept in the text and tokens
    stop_token_ids: tuple[int, ...] = ()  # e.g. the tokenizer's eos id; the token is kept
    seed: Optional[int] = None

    def __post_init__(self) -> None:
        if self.temperature < 0:
            raise ValueError(f"sampling.temperature={self.temperature} must be >= 0 (0 = greedy)")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"sampling.top_p={self.top_p} must be in (0, 1]")
        if self.top_k == 0 or self.top_k < -1:
            raise ValueError(f"sampling.top_k={self.top_k} must be -1 (off) or >= 1")
        if self.max_new_tokens < 1:
            raise ValueError(f"sampling.max_new_tokens={self.max_new_tokens} must be >= 1")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


@dataclass(frozen=True)
class Generation:
    """One sampled response."""

    prompt_ids: list[int]
    token_ids: list[int]
    logprobs: list[float]  # one per token_ids entry, see the module docstring
    finish_reason: str  # "stop" (stop string, stop token) or "length" (max_new_tokens)
    text: str = ""

    def __post_init__(self) -> None:
        if len(self.logprobs) != len(self.token_ids):
            raise ValueError(f"generation has {len(self.token_ids)} tokens but {len(self.logprobs)} log-probs")
        if self.finish_reason not in FINISH_REASONS:
            raise ValueError(f"finish_reason={self.finish_reason!r} must be one of {FINISH_REASONS}")


@dataclass
class WeightUpdateStats:
    """What one weight sync moved (logged per step: seconds and GB/s)."""

    num_tensors: int = 0
    num_bytes: int = 0
    num_buckets: int = 0
    seconds: float = 0.0
    version: int = -1
    names: set[str] = field(default_factory=set)

    @property
    def gb_per_s(self) -> float:
        return self.num_bytes / 1e9 / self.seconds if self.seconds > 0 else float("nan")


def gather(stream: Iterable[tuple[int, Generation]], num_prompts: int) -> list[Generation]:
    """A ``generate_stream``'s generations in prompt order; raises unless every index came exactly once."""
    generations: list[Optional[Generation]] = [None] * num_prompts
    for index, generation in stream:
        if not 0 <= index < num_prompts or generations[index] is not None:
            raise RuntimeError(f"the engine's stream gave prompt index {index} twice or outside [0, {num_prompts})")
        generations[index] = generation
    missing = [index for index, generation in enumerate(generations) if generation is None]
    if missing:
        raise RuntimeError(f"the engine's stream ended without prompts {missing[:10]} ({len(missing)} missing)")
    return generations


class RolloutEngine(abc.ABC):
    """Base class of rollout engines; see the module docstring for the contract."""

    @property
    def honours_seeds(self) -> bool:
        """Whether a seeded request (``SamplingParams.seed``) gives reproducible tokens here. Callers send a seed
        only then (``request_seed``): an engine that cannot honour one refuses it rather than ignore it. This
        default suits engines that always can (the torch engine)."""
        return True

    @abc.abstractmethod
    def generate(self, prompts: Sequence[Sequence[int]], params: SamplingParams) -> list[Generation]:
        """One response per prompt (repeat a prompt n times for n samples), in prompt order."""

    def generate_stream(self, prompts: Sequence[Sequence[int]],
                        params: SamplingParams) -> Iterator[tuple[int, Generation]]:
        """``(prompt index, generation)`` as each response finishes, every index exactly once, in any order;
        the same responses as ``generate`` (for a seeded request, the same tokens). A bad request raises here,
        before the first item, not while iterating.

        This default suits batch-synchronous engines: it runs ``generate`` and yields its results in prompt
        order. Engines that finish sequences at different times override it, so a consumer (the trainer's
        grader) can work on early responses while the rest are still sampled.
        """
        return enumerate(self.generate(prompts, params))

    @abc.abstractmethod
    def compute_logprobs(self, prompt_ids: Sequence[Sequence[int]], response_ids: Sequence[Sequence[int]],
                         temperature: float) -> list[list[float]]:
        """Log-probs of given responses under the engine's current weights (same convention as ``generate``)."""

    @abc.abstractmethod
    def begin_weight_update(self, version: int) -> None:
        """Start a weight sync; buckets follow, then ``finish_weight_update``."""

    @abc.abstractmethod
    def update_weights(self, bucket: Sequence[tuple[str, torch.Tensor]]) -> None:
        """Load one bucket of HF-named tensors."""

    @abc.abstractmethod
    def finish_weight_update(self) -> WeightUpdateStats:
        """End the sync; raises if a tensor of the model was not updated exactly once."""

    @abc.abstractmethod
    def release_memory(self) -> None:
        """Give accelerator memory (KV cache, then weights) back before training (colocated mode)."""

    @abc.abstractmethod
    def resume_memory(self) -> None:
        """Take it again before rollout: weights first, then the KV cache."""

    def resume_weights(self) -> None:
        """First stage of a colocated resume: the weights only, so the weight sync runs while the actor is still
        on the device and the KV cache returns only after the actor has left (``resume_kv_cache``). This default
        suits engines without separate pools: everything comes back here."""
        self.resume_memory()

    def resume_kv_cache(self) -> None:
        """Second stage, after ``resume_weights`` and the actor's offload; nothing left to do by default."""

    @abc.abstractmethod
    def flush_cache(self) -> None:
        """Drop cached prefixes (stale after a weight update)."""

    @abc.abstractmethod
    def health_check(self) -> None:
        """Raise with a clear message if the engine cannot serve."""

    def shutdown(self) -> None:
        """Release processes and memory; the default has nothing to release."""

    def sync_weights(self, buckets: Iterable[Sequence[tuple[str, torch.Tensor]]], version: int) -> WeightUpdateStats:
        """The whole sync: begin, every bucket, finish."""
        self.begin_weight_update(version)
        for bucket in buckets:
            self.update_weights(bucket)
        return self.finish_weight_update()


def request_seed(engine: RolloutEngine, seed: int) -> Optional[int]:
    """``seed`` where ``engine`` honours seeds, else None: reproducible sampling is a property of the engine
    (SGLang needs ``--enable-deterministic-inference`` and its slower sampler), not something to insist on."""
    return seed if engine.honours_seeds else None
