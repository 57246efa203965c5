"""Configs of the rollout: which engine samples responses, how it samples, and the embedded torch engine's knobs.

Why: the trainer builds one rollout engine per run, either SGLang servers (GPU, ``SGLangConfig`` in
``megatron_zero/config/sglang.py``) or the embedded torch engine (``megatron_zero.rollout.torch_engine``: CPU
demo, tests, debugging). Validating the choice here makes a typo fail before any model is loaded. Sampling
defaults are the SimpleRL-Zoo recipe (shared/reference/RECIPE.md): 8 samples per prompt, temperature 1.0,
max response 3072 tokens (the script default).

How: ``RolloutConfig(engine="torch", torch=TorchEngineConfig(max_batch_size=64))`` or
``OmegaConf.structured(RolloutConfig)``.
"""

from __future__ import annotations

import dataclasses
from typing import Optional

from megatron_zero.config.problems import raise_problems
from megatron_zero.config.sglang import SGLangConfig

ROLLOUT_ENGINES = ("torch", "sglang")
# rollout.quantization values besides None (the actor's weights as they are).
ROLLOUT_QUANTIZATIONS = ("fp8",)
TORCH_ENGINE_DTYPES = ("float32", "bfloat16", "float64")


@dataclasses.dataclass(kw_only=True, frozen=True)
class TorchEngineConfig:
    # Sequences decoded together; a larger request is processed in chunks of this size, one after the other.
    max_batch_size: int = 256
    # Weight dtype; weight updates must send tensors of this dtype (the engine never casts silently).
    dtype: str = "float32"
    # torch device of the model and the KV cache: "cpu", "cuda" or "cuda:<index>".
    device: str = "cpu"

    def __post_init__(self) -> None:
        problems: list[str] = []  # every value problem of this config, raised together
        if not (isinstance(self.max_batch_size, int) and self.max_batch_size >= 1):
            problems.append(f"rollout.torch.max_batch_size={self.max_batch_size!r} must be an integer >= 1")
        if self.dtype not in TORCH_ENGINE_DTYPES:
            problems.append(f"rollout.torch.dtype={self.dtype!r} is unknown; use one of {list(TORCH_ENGINE_DTYPES)}")
        if not (self.device == "cpu" or self.device == "cuda" or self.device.startswith("cuda:")):
            problems.append(f"rollout.torch.device={self.device!r} must be 'cpu', 'cuda' or 'cuda:<index>'")
        raise_problems(problems)


@dataclasses.dataclass(kw_only=True, frozen=True)
class RolloutConfig:
    # "torch": the embedded engine (rollout.torch); "sglang": SGLang servers (rollout.sglang).
    engine: str = "torch"
    # Responses sampled per prompt (one GRPO group).
    num_samples_per_prompt: int = 8
    # The actor computes log-probs with the same temperature (actor.temperature must equal it).
    temperature: float = 1.0
    top_p: float = 1.0
    # -1 disables top-k.
    top_k: int = -1
    max_new_tokens: int = 3072
    torch: TorchEngineConfig = dataclasses.field(default_factory=TorchEngineConfig)
    # Required when engine="sglang"; SGLangConfig has no usable default (its model_path must be set).
    sglang: Optional[SGLangConfig] = None
    # "fp8": the engines hold block-FP8 linear weights (e4m3, one float32 scale per 128x128 block, the layout of
    # SGLang's FP8 loader; rollout/fp8_weights.py). Every sync quantizes them on the sender, about half the bytes of
    # bf16; SGLang servers start from an FP8 checkpoint the trainer writes; the torch engine dequantizes what it
    # receives, so it runs exactly the weights an FP8 engine holds. Norms, embeddings and lm_head stay as they are.
    # The engine then samples from a policy slightly off the actor's: the run's gap bounds become reduced-precision
    # ones (config/trainer.py). None: the actor's weights unchanged.
    quantization: Optional[str] = None
    # 1: one-step off-policy rollout. While the actor trains on step k's batch, the engines generate step k+1's with
    # the weights they hold (the policy after step k-1); the sync follows the generation. The loss corrects the
    # staleness with truncated importance sampling on the engine's log-probs (loss.tis_cap, required), and the
    # health check re-scores each batch on the engine after the sync, when engine and actor hold the same policy.
    # Needs engines that run beside the actor (cluster.colocate=false). 0: generate, then train (on-policy).
    off_policy_steps: int = 0

    def __post_init__(self) -> None:
        problems: list[str] = []  # every value problem of this config, raised together
        if self.engine not in ROLLOUT_ENGINES:
            problems.append(f"rollout.engine={self.engine!r} is unknown; use one of {list(ROLLOUT_ENGINES)}")
        if self.quantization is not None and self.quantization not in ROLLOUT_QUANTIZATIONS:
            problems.append(f"rollout.quantization={self.quantization!r} is unknown; use null or one of "
                            f"{list(ROLLOUT_QUANTIZATIONS)}")
        if self.off_policy_steps not in (0, 1):
            problems.append(f"rollout.off_policy_steps={self.off_policy_steps!r} must be 0 (on-policy) or 1 (the next "
                            "batch generated while this one trains)")
        if self.engine == "sglang" and self.sglang is None:
            problems.append("rollout.engine='sglang' needs rollout.sglang (an SGLangConfig with model_path set)")
        if not (isinstance(self.num_samples_per_prompt, int) and self.num_samples_per_prompt >= 1):
            problems.append(f"rollout.num_samples_per_prompt={self.num_samples_per_prompt!r} must be an integer >= 1 "
                            "(recipe: 8)")
        if not self.temperature > 0:
            problems.append(f"rollout.temperature={self.temperature} must be > 0 for RL sampling (recipe: 1.0)")
        if not 0 < self.top_p <= 1:
            problems.append(f"rollout.top_p={self.top_p} must be in (0, 1] (1 disables it)")
        if self.top_k == 0 or self.top_k < -1:
            problems.append(f"rollout.top_k={self.top_k} must be -1 (off) or >= 1")
        if not (isinstance(self.max_new_tokens, int) and self.max_new_tokens >= 1):
            problems.append(f"rollout.max_new_tokens={self.max_new_tokens!r} must be an integer >= 1 "
                            "(recipe script: 3072)")
        raise_problems(problems)
