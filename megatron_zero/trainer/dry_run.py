"""``megatron-zero train --dry-run``: everything a run decides before it needs a GPU, printed, and nothing started.

Why: a multi-node job that fails at its first rollout has already paid for the allocation, the container pull and
the checkpoint conversion. A dry run does what a run does up to that point, on any machine and in seconds: it
validates the config and its files (including the checkpoint's tensor names against what the architecture needs),
loads the tokenizer and the data (with the pass-rate filter), lays the ranks and the SGLang engines out on the
cluster the config describes, prints the memory plan, and builds the server command lines and the first
/generate requests with the functions a run calls, so what it prints is what a run would do.

Without the downloads (a login node) it still prints the layout, the memory plan and the server commands, taking
the architecture from ``--model-config PATH`` or the shipped ``examples/model_configs/<basename of model_path>``,
then lists every missing file in one block.

How: ``megatron-zero train --config CFG --dry-run [--model-config PATH] [key=value ...]``; exit 0 when a run could
start, 1 when the memory plan does not fit, 2 when files are missing (listed last) or on a config error (an
``error:`` line). No Ray, no GPU, no weights read.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Optional

from megatron_zero.config.trainer import TrainConfig
from megatron_zero.preflight.architecture import ResolvedArchitecture
from megatron_zero.preflight.generation import MissingFiles, check_model_files
from megatron_zero.preflight.train import check_train_inputs
from megatron_zero.cluster.placement import Bundle, order_bundles

# A payload's token ids beyond this many are elided in the printout (the count stays).
_SHOWN_TOKENS = 32


@dataclass(frozen=True)
class DryRunReport:
    text: str
    fits: bool
    # One line per missing input file (model, data, tables); a run would stop on the first.
    missing: tuple[str, ...] = ()


def hypothetical_bundles(num_nodes: int, per_node: int, use_gpus: bool, *, first_node: int = 0,
                         first_gpu: int = 0) -> tuple[Bundle, ...]:
    """The bundles a placement of ``num_nodes`` x ``per_node`` would give, in rank order, on nodes named
    ``node-<i>`` (a real run gets their IPs from Ray). ``first_gpu``: disaggregated engines take the GPUs after
    the ranks' on a shared node."""
    bundles = [Bundle(index=node * per_node + slot, node_id=f"node-{first_node + node}",
                      node_ip=f"node-{first_node + node}", gpu_id=first_gpu + slot if use_gpus else None)
               for node in range(num_nodes) for slot in range(per_node)]
    return order_bundles(bundles)


def rollout_bundles(config: TrainConfig) -> tuple[Bundle, ...]:
    """Where the engines' GPUs would be: the ranks' own (colocated) or ``cluster.rollout_num_gpus`` more, filled
    node by node after the ranks' (the PACK strategy of ``create_rollout_placement``)."""
    cluster = config.cluster
    if not cluster.rollout_num_gpus:
        return hypothetical_bundles(cluster.num_nodes, cluster.workers_per_node, cluster.use_gpus)
    per_node = cluster.gpus_per_node or cluster.cpus_per_worker
    full, rest = divmod(cluster.rollout_num_gpus, per_node)
    bundles = list(hypothetical_bundles(full, per_node, cluster.use_gpus, first_node=cluster.num_nodes))
    bundles += hypothetical_bundles(1 if rest else 0, rest, cluster.use_gpus, first_node=cluster.num_nodes + full)
    return tuple(replace(bundle, index=i) for i, bundle in enumerate(bundles))


def check_checkpoint_names(config: TrainConfig) -> str:
    """The HF checkpoint at ``model_path`` lists every tensor the architecture needs (names only: the index or the
    safetensors headers, no tensor is read). Raises naming the missing tensors."""
    from megatron_zero.models.hf_io import HFCheckpointReader
    from megatron_zero.models.registry import get_bridge

    hf_config = json.loads(Path(config.model_path, "config.json").read_text())
    bridge = get_bridge(hf_config)
    arch = bridge.parse(hf_config)
    expected = {name for mapping in bridge.weight_mappings(arch) for name in mapping.hf}
    present = set(HFCheckpointReader(config.model_path).names())
    missing = sorted(expected - present)
    if missing:
        raise ValueError(f"model_path={config.model_path!r}: the checkpoint lacks {len(missing)} of the "
                         f"{len(expected)} tensors a {arch.model_type} of this config.json needs, e.g. {missing[:3]}; "
                         "is config.json from another model?")
    return f"{len(expected)} tensors named by the checkpoint, all the architecture needs"


def _shown(payload: dict[str, Any]) -> str:
    """The request as JSON, long token lists cut to their first ``_SHOWN_TOKENS`` with the total count."""
    shown = dict(payload)
    shown["input_ids"] = [ids[:_SHOWN_TOKENS] + ([f"... {len(ids)} tokens"] if len(ids) > _SHOWN_TOKENS else [])
                          for ids in payload["input_ids"]]
    return json.dumps(shown)


def _rollout_lines(config: TrainConfig, tokenizer, problems: list) -> list[str]:
    """The first step's engine requests, built by the functions the trainer and the engines call."""
    from megatron_zero.trainer.rollout_source import rollout_prompts, rollout_sampling_params

    prompts = rollout_prompts(problems, tokenizer, config.rollout.num_samples_per_prompt)
    lengths = sorted(len(ids) for ids in prompts)
    lines = [f"first step: {len(problems)} prompts x {config.rollout.num_samples_per_prompt} samples = "
             f"{len(prompts)} responses; prompt tokens min {lengths[0]}, median {lengths[len(lengths) // 2]}, "
             f"max {lengths[-1]}"]
    if config.rollout.engine == "torch":
        # The torch engine always honours seeds (RolloutEngine's default); building one would load the weights.
        params = rollout_sampling_params(config, tokenizer, honours_seeds=True, step=0)
        return lines + [f"torch engine in the driver, sampling {params}"]
    from megatron_zero.rollout.sglang_engine import SGLangEngine
    from megatron_zero.rollout.sglang_requests import generate_payload, single_requests
    from megatron_zero.rollout.engine_router import split_by_prompt_runs

    engine = SGLangEngine(config.rollout.sglang)  # no request is sent: it only answers honours_seeds
    params = rollout_sampling_params(config, tokenizer, honours_seeds=engine.honours_seeds, step=0)
    parts = split_by_prompt_runs(prompts, _num_engines(config))
    for index, part in enumerate(parts):
        if not len(part):
            lines.append(f"engine {index}: no requests (fewer prompt groups than engines)")
            continue
        payload = generate_payload([prompts[k] for k in part], params,
                                   deterministic=config.rollout.sglang.enable_deterministic_inference)
        first = next(single_requests(payload))
        lines.append(f"engine {index}: {len(part)} POST /generate requests (responses {part.start}-{part.stop - 1}),"
                     f" the first: {_shown(first)}")
    return lines


def _num_engines(config: TrainConfig) -> int:
    sglang = config.rollout.sglang
    if not sglang.launch:
        return 1
    return len(rollout_bundles(config)) // sglang.tp_size


def _layout_lines(config: TrainConfig) -> list[str]:
    cluster, parallel = config.cluster, config.parallel
    data_parallel = cluster.check_layout(parallel)
    lines = [f"cluster: {cluster.describe()}; Megatron TP={parallel.tensor_parallel_size} "
             f"PP={parallel.pipeline_parallel_size} DP={data_parallel}"]
    ranks = hypothetical_bundles(cluster.num_nodes, cluster.workers_per_node, cluster.use_gpus)
    for node in sorted({bundle.node_id for bundle in ranks}):
        on_node = [rank for rank, bundle in enumerate(ranks) if bundle.node_id == node]
        lines.append(f"  {node}: ranks {on_node[0]}-{on_node[-1]}")
    return lines


def _engine_lines(config: TrainConfig) -> list[str]:
    if config.rollout.engine == "torch":
        return []
    sglang = config.rollout.sglang
    if not sglang.launch:
        return [f"SGLang server started by hand at {sglang.url} (weights by NCCL broadcast from rank 0)"]
    from megatron_zero.rollout.sglang_servers import plan_engines, slot_server_launch
    from megatron_zero.trainer.setup import rollout_sglang_config

    sglang.check_launch(config.cluster)
    sglang = rollout_sglang_config(config)  # the FP8 copy's path under rollout.quantization=fp8 (not written here)
    slots = plan_engines(rollout_bundles(config), sglang.tp_size)
    where = "on the ranks' GPUs (colocated)" if config.cluster.colocate else "on GPUs of their own"
    lines = [f"SGLang: {len(slots)} server(s) of tp {sglang.tp_size} {where}; --host and --port shown are "
             "placeholders (a run binds each server to its node's IP and a free port)"]
    if config.rollout.quantization == "fp8":
        lines.append(f"  FP8 rollout weights: the servers load {sglang.model_path}, the block-FP8 copy of "
                     f"{config.model_path} the run writes before they start; every sync sends FP8 linear weights")
    for slot in slots:
        # The port is free_port() on the node at start; the host is the node's IP.
        command, env = slot_server_launch(sglang, slot, host=slot.node_ip, port=30000 + slot.index, base_env={})
        visible = env.get("CUDA_VISIBLE_DEVICES")
        lines.append(f"  {slot.describe()}: " + (f"CUDA_VISIBLE_DEVICES={visible} " if visible else "")
                     + " ".join(command))
    return lines


def _memory_lines(config: TrainConfig, arch) -> tuple[list[str], bool]:
    if not config.cluster.use_gpus:
        return ["memory plan: CPU mode (cluster.gpus_per_node=0), no device memory to plan"], True
    from megatron_zero.planning.memory import plan_inputs, plan_memory
    from megatron_zero.planning.report import format_plan

    plan = plan_memory(plan_inputs(config, arch))
    return [format_plan(plan)], plan.fits


def _file_lines(config: TrainConfig, resolved: ResolvedArchitecture) -> tuple[list[str], Any, Optional[list]]:
    """What needs the downloads: the checkpoint's tensor names, the tokenizer, the data (through the pass-rate
    filter) and the held-out set. Skipped, saying so, while the files are missing; returns the lines, the tokenizer
    and the first batch (None when skipped)."""
    from megatron_zero.evaluation.model_eval import load_tokenizer
    from megatron_zero.trainer.setup import load_eval_problems, load_sampler

    if check_model_files(config.model_path, "model_path"):  # listed at the end of the dry run
        return [f"architecture: {resolved.source} (model_path is not whole on this machine); checkpoint, tokenizer, "
                "data and first requests not checked"], None, None
    lines = [f"files: {check_checkpoint_names(config)}"]
    tokenizer = load_tokenizer(config.model_path)
    if not Path(config.data.train.path).exists():
        return lines + ["data: not read (missing, see below); first requests not built"], tokenizer, None
    table = config.data.pass_rate_filter.pass_rate_file
    unfiltered = ""
    if table is not None and not Path(table).is_file():
        # Listed at the end; the problems and first requests are still shown, before the band would apply.
        config = replace(config, data=replace(config.data, pass_rate_filter=replace(config.data.pass_rate_filter,
                                                                                    pass_rate_file=None)))
        unfiltered = " (not in a pass-rate band: the table is missing, see below)"
    sampler, filter_report = load_sampler(config, tokenizer)
    kept = unfiltered if filter_report is None else (
        f" in the pass-rate band [{filter_report.min_pass_rate}, {filter_report.max_pass_rate}] of "
        f"{filter_report.pass_rate_file} ({filter_report.num_dropped_hard} harder and {filter_report.num_dropped_easy}"
        " easier dropped)")
    lines.append(f"data: {config.data.train.path}: {len(sampler.problems)} problems{kept}")
    if config.eval.path is not None and Path(config.eval.path).exists():
        lines.append(f"eval: {config.eval.path}: {len(load_eval_problems(config, tokenizer))} problems")
    return lines, tokenizer, sampler.next_batch()


def dry_run(config: TrainConfig, model_config: Optional[str] = None) -> DryRunReport:
    """What a run of ``config`` would do before its first GPU kernel; raises (one line) on a config error. Missing
    files do not stop it: the plan is printed whole (the architecture from ``model_config`` or the shipped
    examples/model_configs when model_path is absent), then every missing file in one block."""
    from megatron_zero.trainer.checkpoint import resume_point

    missing = MissingFiles(collect=True)
    resolved = check_train_inputs(config, missing, model_config)
    lines = ["megatron-zero train --dry-run: nothing started (no Ray, no GPU, no weights read)"]
    file_lines, tokenizer, first_batch = _file_lines(config, resolved)
    lines += file_lines
    checkpoint = resume_point(config.run)  # checked whole by check_train_inputs
    if checkpoint is not None:
        lines.append(f"note: a run would resume from {checkpoint} (its files match its marker), not from step 0")
    lines += _layout_lines(config)
    lines.append(f"precision: engine vs actor log-prob gap bounds (mean, max) {config.logprob_gap_bounds} "
                 f"({config.logprob_precision})")
    memory, fits = _memory_lines(config, resolved.arch)
    lines += memory + _engine_lines(config)
    if first_batch is not None:
        lines += _rollout_lines(config, tokenizer, first_batch)
    if missing.lines:
        lines.append(f"dry run: {len(missing.lines)} input(s) missing; a run would stop before Ray starts:")
        lines += [f"  - {line}" for line in missing.lines]
    elif fits:
        lines.append("dry run: a run could start")
    if not fits:
        lines.append("dry run: the memory plan does not fit (see above)")
    return DryRunReport(text="\n".join(lines), fits=fits, missing=tuple(missing.lines))
