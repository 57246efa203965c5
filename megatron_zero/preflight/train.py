"""Every file a training run reads, checked before Ray starts (``train``, ``train --dry-run``, ``launch prepare``).

Why: moved out of ``TrainConfig`` so that ``config/`` validates values only. A run stops at the first missing file
(``MissingFiles(collect=False)``); a dry run lists every missing file in one block after printing the whole plan
(``collect=True``), so a login node without the downloads still sees the layout, memory and server commands.

How: ``arch = check_train_inputs(config)`` (raises), or ``missing = MissingFiles(collect=True);
resolved = check_train_inputs(config, missing, model_config=PATH)`` then ``missing.lines``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional

from megatron_zero.config.problems import raise_problems
from megatron_zero.config.trainer import TrainConfig
from megatron_zero.preflight.architecture import ResolvedArchitecture
from megatron_zero.preflight.generation import (GenerationInputs, MissingFiles, PromptBound,
                                                check_generation_inputs)
from megatron_zero.preflight.names import name_problems


def check_train_inputs(config: TrainConfig, missing: Optional[MissingFiles] = None,
                       model_config: Optional[str] = None) -> ResolvedArchitecture:
    """File checks of ``config``; raise naming the field and the path. Returns the architecture checked against.
    Also the names its fields take (a config built in Python has not been through ``load_config``)."""
    raise_problems(name_problems(config))
    missing = missing if missing is not None else MissingFiles()
    resolved = check_generation_inputs(generation_inputs(config), lambda: prompt_bound(config), missing, model_config)
    arch = resolved.arch
    if config.parallel.expert_parallel_size > 1:
        # Every supported family is dense (models/registry.py): there are no experts to place.
        raise ValueError(f"parallel.expert_parallel_size={config.parallel.expert_parallel_size} needs a mixture-of-"
                         f"experts model, but model_type={arch.model_type!r} ({config.model_path}) is dense; set it "
                         "to 1")
    arch.check_parallel_sizes(config.parallel.tensor_parallel_size, config.parallel.pipeline_parallel_size,
                              config.model.vocab_pad_multiple)
    if Path(config.run.output_dir).exists() and not Path(config.run.output_dir).is_dir():
        raise ValueError(f"run.output_dir={config.run.output_dir!r} is a file; choose a directory")
    if config.rollout.quantization == "fp8" and config.rollout.engine == "sglang":
        _check_fp8_rollout(config, resolved, missing)
    if config.mcore_path is not None and not Path(config.mcore_path, "megatron_zero.json").is_file():
        missing.add(f"mcore_path={config.mcore_path!r} is not a converted checkpoint (no megatron_zero.json); omit it "
                    "to convert model_path automatically")
    if not config.data.train.path:
        raise ValueError("data.train.path is empty; set it to a JSONL/Parquet file or dataset directory")
    if not Path(config.data.train.path).exists():
        missing.add(f"data.train.path={config.data.train.path!r} does not exist")
    if config.eval.path is not None and not Path(config.eval.path).exists():
        missing.add(f"eval.path={config.eval.path!r} does not exist")
    table = config.data.pass_rate_filter.pass_rate_file
    if table is not None and not Path(table).is_file():
        # Whether it matches the data is checked when the problems are read, also before Ray starts.
        uid = f" --uid-field {config.data.train.uid_field}" if config.data.train.uid_field else ""
        missing.add(f"data.pass_rate_filter.pass_rate_file={table!r} does not exist; write it with `megatron-zero "
                    f"difficulty --model {config.model_path} --data {config.data.train.path}{uid} --out {table}`")
    from megatron_zero.trainer.checkpoint import check_resume_point

    # Last: it reads every byte of the checkpoint a run would resume from (once, before Ray starts).
    check_resume_point(config.run)
    return resolved


def generation_inputs(config: TrainConfig) -> GenerationInputs:
    """What a run sends its engines: rollouts, and the held-out set's greedy decoding (its prompts are read with
    data.train's settings, the same length limit)."""
    generations = [("rollout.max_new_tokens", config.rollout.max_new_tokens)]
    if config.eval.path is not None:
        generations.append(("eval.max_new_tokens", config.eval.max_new_tokens))
    sglang = config.rollout.sglang if config.rollout.engine == "sglang" else None
    return GenerationInputs(model_path=config.model_path, model_key="model_path", generations=tuple(generations),
                            sglang=sglang, sglang_on_gpus=config.cluster.use_gpus)


def prompt_bound(config: TrainConfig) -> PromptBound:
    max_prompt_tokens = config.data.train.max_prompt_tokens
    return None if max_prompt_tokens is None else (f"data.train.max_prompt_tokens={max_prompt_tokens}",
                                                   max_prompt_tokens)


def _check_fp8_rollout(config: TrainConfig, resolved: ResolvedArchitecture, missing: MissingFiles) -> None:
    """SGLang must be able to load FP8 weights of this model, and a server started by hand must serve them."""
    from megatron_zero.rollout.fp8_weights import check_sglang_block_alignment, is_fp8_checkpoint

    sglang = config.rollout.sglang
    if not sglang.launch:
        if not Path(sglang.model_path).is_dir():
            missing.add(f"rollout.sglang.model_path={sglang.model_path!r} does not exist")
        elif not is_fp8_checkpoint(sglang.model_path):
            raise ValueError(f"rollout.quantization='fp8' sends FP8 weights, but rollout.sglang.model_path="
                             f"{sglang.model_path!r} (the server started by hand) is not an FP8 checkpoint; start the "
                             "server from `python tools/convert_checkpoint.py hf-to-fp8 --hf MODEL --out DIR`")
    try:
        check_sglang_block_alignment(resolved.arch, sglang.tp_size, "rollout.sglang.tp_size")
    except ValueError as error:
        raise ValueError(f"rollout.quantization='fp8' ({config.model_path}): {error}; or sync unquantized weights "
                         "(rollout.quantization=null)") from None
