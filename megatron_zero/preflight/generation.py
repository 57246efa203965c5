"""The checks every command that generates shares: the model's files, and one prompt + response fits every limit.

Why: a sequence longer than the model's context (max_position_embeddings) or the SGLang server's
(--context-length, the KV pool of --max-total-tokens) is cut or refused by the engine, and the command then scores
silently wrong (2% on a model that scores 83%). ``train``, ``eval`` and ``difficulty`` call ``check_generation``
with the prompt bound they have (a configured maximum, or the longest prompt they read) before any engine or Ray
starts, and get one error listing every limit the longest sequence exceeds.

How::

    inputs = GenerationInputs.for_engine(model_path, engine_config, (("--max-new-tokens", 3072),))
    resolved = check_generation_inputs(inputs, lambda: ("--max-prompt-tokens=1024", 1024))
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from megatron_zero.config.evaluation import EngineConfig
from megatron_zero.config.sglang import SGLangConfig
from megatron_zero.models.common.architecture import DecoderArchitecture
from megatron_zero.models.hf_io import INDEX_NAME, SINGLE_NAME
from megatron_zero.preflight.architecture import ResolvedArchitecture, resolve_architecture
from megatron_zero.preflight.model_files import damaged_model_files

TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json")
# How the SGLang limits are typed in a training config (eval and difficulty pass their flags instead).
TRAIN_SGLANG_KEYS = {"context_length": "rollout.sglang.context_length",
                     "max_total_tokens": "rollout.sglang.max_total_tokens"}
CLI_SGLANG_KEYS = {"context_length": "--context-length", "max_total_tokens": "--max-total-tokens"}


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
    """What a generating command needs in an HF model directory: config.json, safetensors weights and a tokenizer,
    whole. Returns one line per missing or damaged part (``key`` names the path as the user typed it:
    ``model_path``, ``--model``)."""
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
    return missing + damaged_model_files(folder, key)


class MissingFiles:
    """Where a missing input goes: raised at once (a command about to run) or listed for the end of a dry run."""

    def __init__(self, collect: bool = False) -> None:
        self.collect = collect
        self.lines: list[str] = []

    def add(self, message: str) -> None:
        if not self.collect:
            raise FileNotFoundError(message)
        self.lines.append(message)


@dataclass(frozen=True)
class GenerationInputs:
    """What a generating command will send an engine, as its user named it."""

    model_path: str
    # How the model directory was given: "model_path" (train), "--model" (eval, difficulty).
    model_key: str
    # Each response budget the command uses, e.g. (("rollout.max_new_tokens", 8192), ("eval.max_new_tokens", 256)).
    generations: tuple[tuple[str, int], ...]
    # Launched SGLang servers (None: the torch engine, or a server started by hand whose limits are its own).
    sglang: Optional[SGLangConfig] = None
    sglang_on_gpus: bool = True
    sglang_keys: tuple[tuple[str, str], ...] = tuple(TRAIN_SGLANG_KEYS.items())

    @classmethod
    def for_engine(cls, model_path: str, engine: EngineConfig, generations: tuple[tuple[str, int], ...]
                   ) -> "GenerationInputs":
        """``eval`` / ``difficulty``: the model at --model, on the engine their --engine flags built."""
        launched = engine.sglang if engine.engine == "sglang" and engine.sglang.launch else None
        return cls(model_path=model_path, model_key="--model", generations=generations, sglang=launched,
                   sglang_on_gpus=engine.sglang_device == "cuda", sglang_keys=tuple(CLI_SGLANG_KEYS.items()))


# The prompt bound as the user reads it and its tokens, or None (no bound configured: nothing to check).
PromptBound = Optional[tuple[str, int]]


def check_generation_inputs(inputs: GenerationInputs, prompt_bound: Callable[[], PromptBound],
                            missing: Optional[MissingFiles] = None, model_config: Optional[str] = None
                            ) -> ResolvedArchitecture:
    """The one check `train`, `eval` and `difficulty` run before any engine or Ray starts: the model directory is
    whole (``missing`` collects what is not, for a dry run; by default the first missing part raises), then the
    longest prompt + every response budget fits the model's context and the SGLang servers' limits. Returns the
    architecture checked against. ``prompt_bound`` is called once the model's files are known to be there (eval
    measures its prompts with the model's tokenizer)."""
    missing = missing if missing is not None else MissingFiles()
    for line in check_model_files(inputs.model_path, inputs.model_key):
        missing.add(line)
    resolved = resolve_architecture(inputs.model_path, model_config)
    bound = prompt_bound()
    if bound is not None:
        source = (f"{inputs.model_path}/config.json" if resolved.from_checkpoint else str(resolved.source))
        limits = model_limits(resolved.arch, source) + engine_limits(inputs.sglang, inputs.sglang_on_gpus,
                                                                     dict(inputs.sglang_keys))
        check_generation(bound, list(inputs.generations), limits)
    return resolved
