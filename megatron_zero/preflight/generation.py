"""The checks every command that generates shares: the model's files, and one prompt + response fits every limit.

Why: a sequence longer than the model's context (max_position_embeddings) or the SGLang server's
(--context-length, the KV pool of --max-total-tokens) is cut or refused by the engine, and the command then scores
silently wrong (2% on a model that scores 83%). ``train``, ``eval`` and ``difficulty`` call ``check_generation``
with the prompt bound they have (a configured maximum, or the longest prompt they read) before any engine or Ray
starts, and get one error listing every limit the longest sequence exceeds.

How::

    limits = model_limits(arch, source) + engine_limits(sglang, on_gpus, keys=TRAIN_SGLANG_KEYS)
    check_generation(("data.train.max_prompt_tokens=1024", 1024), [("rollout.max_new_tokens", 8192)], limits)
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from megatron_zero.config.sglang import SGLangConfig
from megatron_zero.models.common.architecture import DecoderArchitecture
from megatron_zero.models.hf_io import INDEX_NAME, SINGLE_NAME

TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json")
# How the SGLang limits are typed in a training config (eval and difficulty pass their flags instead).
TRAIN_SGLANG_KEYS = {"context_length": "rollout.sglang.context_length",
                     "max_total_tokens": "rollout.sglang.max_total_tokens"}
CLI_SGLANG_KEYS = {"context_length": "--context-length", "max_total_tokens": "--sglang-arg=--max-total-tokens"}


@dataclass(frozen=True)
class ContextLimit:
    """The most tokens one prompt + response may hold, and what sets it (named as the user would change it)."""

    tokens: int
    what: str


def model_limits(arch: DecoderArchitecture, source: Path | str) -> list[ContextLimit]:
    return [ContextLimit(arch.max_position_embeddings,
                         f"the model's context, max_position_embeddings={arch.max_position_embeddings} ({source})")]


def engine_limits(sglang: Optional[SGLangConfig], on_gpus: bool, keys: dict[str, str]) -> list[ContextLimit]:
    """SGLang's own limits where configured: --context-length, and the KV pool (a sequence longer than the whole
    pool can never be scheduled). None (the torch engine) has no limit beyond the model's."""
    if sglang is None:
        return []
    limits = []
    if sglang.context_length is not None:
        limits.append(ContextLimit(sglang.context_length,
                                   f"the SGLang server's context, {keys['context_length']}={sglang.context_length}"))
    pool = sglang.served_max_total_tokens(on_gpus)
    if pool is not None:
        limits.append(ContextLimit(pool, f"the SGLang server's KV pool, {keys['max_total_tokens']}={pool}"))
    return limits


def check_generation(prompt: tuple[str, int], generations: list[tuple[str, int]], limits: list[ContextLimit]) -> None:
    """Raise one ValueError listing every (generation, limit) pair the longest sequence exceeds. ``prompt``: the
    prompt bound as the user would read it ("data.train.max_prompt_tokens=1024", "the longest prompt (math500 row 3,
    612 tokens)") and its tokens; ``generations``: each max_new_tokens key and value the command uses."""
    prompt_name, prompt_tokens = prompt
    problems = []
    for name, max_new_tokens in generations:
        longest = prompt_tokens + max_new_tokens
        for limit in limits:
            if longest > limit.tokens:
                problems.append(f"{prompt_name} + {name}={max_new_tokens} = {longest} tokens exceed "
                                f"{limit.what}")
    if len(problems) == 1:
        raise ValueError(f"{problems[0]}; lower one of them")
    if problems:
        raise ValueError("the longest sequence does not fit:\n  " + "\n  ".join(problems) + "\nlower the prompt or "
                         "response budget (or raise the engine's limits)")


def check_model_files(model_path: str, key: str) -> list[str]:
    """What a generating command needs in an HF model directory: config.json, safetensors weights and a tokenizer.
    Returns one line per missing part (``key`` names the path as the user typed it: ``model_path``, ``--model``)."""
    folder = Path(model_path)
    if not folder.is_dir():
        return [f"{key}={model_path!r}: no config.json there (no such folder)"]
    names = {path.name for path in folder.iterdir()}
    missing = []
    if "config.json" not in names:
        missing.append(f"{key}={model_path!r}: no config.json there")
    if not names & {SINGLE_NAME, INDEX_NAME}:
        missing.append(f"{key}={model_path!r} has no weights ({SINGLE_NAME} or {INDEX_NAME}); only safetensors "
                       "checkpoints are supported")
    if not names & set(TOKENIZER_FILES):
        missing.append(f"{key}={model_path!r} has no tokenizer (tokenizer.json, tokenizer.model or vocab.json); "
                       "copy the base model's tokenizer files there")
    return missing


def check_model_for_generation(model_path: str, key: str = "--model") -> DecoderArchitecture:
    """``eval`` / ``difficulty``: the model directory is whole; its architecture. Raises FileNotFoundError listing
    every missing part."""
    from megatron_zero.preflight.architecture import resolve_architecture

    missing = check_model_files(model_path, key)
    if missing:
        raise FileNotFoundError("; ".join(missing) + ("; pass a Hugging Face model directory" if len(missing) == 1
                                                      else ""))
    return resolve_architecture(model_path).arch
