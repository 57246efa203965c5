"""What evaluation needs from a generation engine and from a grader, as plain callables.

Evaluation does not own an engine: the SGLang rollout engine (or a tiny CPU model in tests) is
wrapped in a `Generator`, and the rule-based reward's batch grader is passed as a `Grader`. Both are
structural types, so any function with the right signature works.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

from megatron_zero.analysis.records import FINISH_REASONS


@dataclass(frozen=True)
class GeneratedText:
    """One sampled continuation: its text, its length in tokens and why generation stopped."""

    text: str
    num_tokens: int
    finish_reason: str  # "stop": an end token was produced; "length": cut at max_new_tokens

    def __post_init__(self) -> None:
        if self.finish_reason not in FINISH_REASONS:
            raise ValueError(f"finish_reason={self.finish_reason!r} must be one of {list(FINISH_REASONS)}")
        if self.num_tokens < 0:
            raise ValueError(f"num_tokens={self.num_tokens} must be >= 0")


class Generator(Protocol):
    def __call__(
        self,
        prompts: list[str],
        *,
        n: int,
        temperature: float,
        top_p: float,
        max_new_tokens: int,
        seed: int,
    ) -> list[list[GeneratedText]]:
        """For each prompt, `n` continuations (temperature 0 means greedy)."""
        ...


# grade(responses, ground_truths) -> one score per response; 1.0 means correct.
Grader = Callable[[list[str], list[str]], list[float]]


class EngineGenerator:
    """A ``Generator`` over any ``RolloutEngine``: tokenizes prompts, repeats each n times, decodes."""

    def __init__(self, engine, tokenizer) -> None:
        self.engine, self.tokenizer = engine, tokenizer

    def __call__(self, prompts: list[str], *, n: int, temperature: float, top_p: float, max_new_tokens: int,
                 seed: int) -> list[list[GeneratedText]]:
        from megatron_zero.rollout.engine import SamplingParams, request_seed

        ids = [self.tokenizer(p, add_special_tokens=False)["input_ids"] for p in prompts]
        eos = self.tokenizer.eos_token_id
        params = SamplingParams(temperature=temperature, top_p=1.0 if temperature == 0 else top_p,
                                max_new_tokens=max_new_tokens, stop_token_ids=(eos,) if eos is not None else (),
                                seed=request_seed(self.engine, seed))
        outputs = self.engine.generate([p for p in ids for _ in range(n)], params)
        texts = [GeneratedText(text=o.text, num_tokens=len(o.token_ids), finish_reason=o.finish_reason) for o in outputs]
        return [texts[i * n:(i + 1) * n] for i in range(len(prompts))]
