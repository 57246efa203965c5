"""Config of the Megatron actor: optimizer, learning-rate schedule, microbatching and sampling temperature.

Why: the actor (``megatron_zero/actor/actor.py``) turns these values into megatron-core's OptimizerConfig,
OptimizerParamScheduler and its token-budget microbatching; validating them here makes a typo fail before a
model is built. Defaults are the SimpleRL-Zoo recipe (shared/reference/RECIPE.md): Adam, LR 5e-7 constant,
grad clip 1.0, temperature 1.0.

How: ``ActorConfig(lr=1e-6, max_tokens_per_microbatch=8192)`` or ``OmegaConf.structured(ActorConfig)``.
"""

from __future__ import annotations

import dataclasses
from typing import Optional

from megatron_zero.config.problems import raise_problems

LR_SCHEDULES = ("constant", "cosine")


@dataclasses.dataclass(kw_only=True, frozen=True)
class ActorConfig:
    lr: float = 5e-7
    # Floor of the cosine schedule; ignored by "constant".
    min_lr: float = 0.0
    weight_decay: float = 0.0
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    adam_eps: float = 1e-8
    # Global gradient-norm clip; 0 disables clipping.
    clip_grad: float = 1.0
    # "constant" or "cosine" (decays from lr to min_lr over lr_decay_steps optimizer steps after warmup).
    lr_schedule: str = "constant"
    # Linear warmup from 0 to lr over this many optimizer steps.
    lr_warmup_steps: int = 0
    # Optimizer steps of the whole run; required by "cosine".
    lr_decay_steps: Optional[int] = None
    # Token budget of one microbatch: sequences are grouped so that (number of sequences) x (longest
    # sequence of the group) stays within it. Must hold the longest prompt + response.
    max_tokens_per_microbatch: int = 16384
    # Pack several sequences into each microbatch row (actor/packing.py) instead of padding rows to the
    # longest one. On CPU (megatron-core's local layers) packing uses a dense block-diagonal mask whose cost
    # grows with the square of the row length; turn it off there when speed matters more than padding.
    pack_sequences: bool = True
    # Keep the frozen reference model (KL term) in host memory except during its log-prob pass: frees its
    # device memory for the actor and a colocated engine, at one host-to-device copy of its weights per step.
    offload_reference: bool = False
    # The rollout's sampling temperature: log-probs are computed from logits / temperature, as sampled.
    temperature: float = 1.0

    def __post_init__(self) -> None:
        problems: list[str] = []  # every value problem of this config, raised together
        if not self.lr > 0:
            problems.append(f"actor.lr={self.lr} must be > 0 (recipe: 5e-7)")
        if not 0 <= self.min_lr <= self.lr:
            problems.append(f"actor.min_lr={self.min_lr} must be in [0, actor.lr={self.lr}]")
        if not self.weight_decay >= 0:
            problems.append(f"actor.weight_decay={self.weight_decay} must be >= 0 (recipe: 0)")
        for name in ("adam_beta1", "adam_beta2"):
            value = getattr(self, name)
            if not 0 <= value < 1:
                problems.append(f"actor.{name}={value} must be in [0, 1) (default 0.9 / 0.999)")
        if not self.adam_eps > 0:
            problems.append(f"actor.adam_eps={self.adam_eps} must be > 0 (default 1e-8)")
        if not self.clip_grad >= 0:
            problems.append(f"actor.clip_grad={self.clip_grad} must be >= 0 (0 disables clipping; recipe: 1.0)")
        if self.lr_schedule not in LR_SCHEDULES:
            problems.append(f"actor.lr_schedule={self.lr_schedule!r} is unknown; use one of {list(LR_SCHEDULES)}")
        if not (isinstance(self.lr_warmup_steps, int) and self.lr_warmup_steps >= 0):
            problems.append(f"actor.lr_warmup_steps={self.lr_warmup_steps!r} must be an integer >= 0")
        if self.lr_schedule == "cosine":
            if self.lr_decay_steps is None or self.lr_decay_steps <= self.lr_warmup_steps:
                problems.append(
                    f"actor.lr_schedule='cosine' needs actor.lr_decay_steps (the run's optimizer steps) > "
                    f"actor.lr_warmup_steps={self.lr_warmup_steps}, got lr_decay_steps={self.lr_decay_steps}"
                )
        elif self.lr_decay_steps is not None and self.lr_decay_steps < 1:
            problems.append(f"actor.lr_decay_steps={self.lr_decay_steps} must be >= 1 or None")
        if not (isinstance(self.max_tokens_per_microbatch, int) and self.max_tokens_per_microbatch >= 1):
            problems.append(
                f"actor.max_tokens_per_microbatch={self.max_tokens_per_microbatch!r} must be an integer >= 1, "
                "at least max prompt + max response length"
            )
        if not self.temperature > 0:
            problems.append(f"actor.temperature={self.temperature} must be > 0 (the rollout's sampling temperature)")
        raise_problems(problems)
