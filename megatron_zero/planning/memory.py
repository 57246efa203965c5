"""Per-GPU memory of a zero-RL run, phase by phase, before any node is paid for.

Why: a colocated run holds the Megatron actor (weights, gradients, Adam state, activations), the frozen reference
and an SGLang engine (weights, KV cache, CUDA graphs) on the same GPUs, in turns; whether a TP/PP/DP layout fits
depends on which of them share the device in each phase. This module adds up the bytes the way our actor and
trainer actually allocate them (docs/planning.md has every formula and how it was checked):

* model state (``model_state_bytes``): params_dtype weights in DDP's buffer, fp32 gradient buffer
  (``grad_reduce_in_fp32``), and the distributed optimizer's fp32 master copy (none for fp32 params) and two Adam
  moments, sharded over DP: 2 + 4 + 12/DP bytes per parameter in bf16, Megatron-Bridge's "6 + 12/DP".
* activations (``train_activation_bytes``, ``logprob_activation_bytes``): what autograd saves per layer for one
  packed microbatch of ``actor.max_tokens_per_microbatch`` tokens, per layer implementation (``LAYER_KERNELS``),
  times the microbatches a 1F1B pipeline stage holds, plus the vocabulary-sized working set of the log-prob head
  (``actor/logprobs.py``).
* phases (``DEPLOYMENTS``): which of those share a GPU in rollout, logprob, train and weight sync, following the
  trainer's colocated offload order (trainer/engine_layout.py ColocatedEngines: before_training, sync_weights, enter_rollout_phase).

How: ``plan_memory(plan_inputs(load_config(path, overrides), read_architecture(model_path)))`` or the CLI,
``megatron-zero plan --config examples/configs/qwen2.5-7b-zero-2node.yaml [--gpu-memory-gib 80] [--json]``.
Pure arithmetic on integers: no torch, no GPU. The terms: the actor's in planning/actor_memory.py, an SGLang
engine's in planning/engine_memory.py; this module puts them into phases and layouts.
"""

from __future__ import annotations

import abc
import dataclasses
import math
from typing import TYPE_CHECKING, Optional

from megatron_zero.planning.actor_memory import (
    BATCH_BYTES_PER_TOKEN,
    DTYPE_BYTES,
    FP8_FORWARD_WORKSPACE_BYTES,
    FP8_TRAIN_WORKSPACE_BYTES,
    FULL_RECOMPUTE,
    GIB,
    LAYER_KERNELS,
    NO_RECOMPUTE,
    Activations,
    ModelState,
    Recompute,
    StageParameters,
    logprob_activation_bytes,
    model_state_bytes,
    num_parameters,
    stage_parameters,
    train_activation_bytes,
)
from megatron_zero.planning.engine_memory import EngineInputs, EngineMemory, engine_memory, layer_linear_parameters

if TYPE_CHECKING:
    from megatron_zero.config.trainer import TrainConfig
    from megatron_zero.models.common.architecture import DecoderArchitecture

# What the planner assumes where it cannot measure (no GPU here); every one is a --flag of ``megatron-zero plan``.
# Per process on a GPU: CUDA context, NCCL buffers, allocator slack.
DEFAULT_OVERHEAD_GIB = 2.0
# SGLang's CUDA graphs and forward activations, outside its static pool (mem_fraction_static).
DEFAULT_CUDA_GRAPH_RESERVE_GIB = 3.0
DEFAULT_GPU_MEMORY_GIB = 80.0


# --------------------------------------------------------------------------- inputs and phases


@dataclasses.dataclass(frozen=True, kw_only=True)
class PlanInputs:
    """Everything the formulas read, from a TrainConfig (``plan_inputs``) or built directly."""

    arch: DecoderArchitecture
    tensor_parallel_size: int
    pipeline_parallel_size: int
    data_parallel_size: int
    params_dtype: str = "bfloat16"
    # model.fp8 is set: the actor's and the reference's TE linears cache FP8 copies of their weights.
    fp8: bool = False
    vocab_pad_multiple: int = 128
    max_tokens_per_microbatch: int = 16384
    recompute: Recompute = NO_RECOMPUTE
    # "device": the reference stays on the GPU; "offloaded": host memory except its log-prob pass; "none": no KL.
    reference: str = "device"
    # "colocated", "disaggregated" or "actor_only" (the torch engine, or a server started by hand): DEPLOYMENTS.
    deployment: str = "colocated"
    engine: Optional[EngineInputs] = None
    # Longest prompt + response, and the rows one rank gets per log-prob call (a DP shard of the rollout batch) and
    # per train call (a DP shard of one PPO mini-batch).
    max_sequence_tokens: int = 9216
    rows_per_logprob_call: int = 1
    rows_per_train_call: int = 1
    weight_bucket_bytes: int = 512 * 2**20
    kernels: str = "transformer_engine"
    device_bytes: int = int(DEFAULT_GPU_MEMORY_GIB * GIB)
    overhead_bytes: int = int(DEFAULT_OVERHEAD_GIB * GIB)
    cuda_graph_reserve_bytes: int = int(DEFAULT_CUDA_GRAPH_RESERVE_GIB * GIB)

    def __post_init__(self) -> None:
        if self.kernels not in LAYER_KERNELS:
            raise ValueError(f"kernels={self.kernels!r} is unknown; use one of {sorted(LAYER_KERNELS)}")
        if self.deployment not in DEPLOYMENTS:
            raise ValueError(f"deployment={self.deployment!r} is unknown; use one of {sorted(DEPLOYMENTS)}")
        if self.reference not in ("device", "offloaded", "none"):
            raise ValueError(f"reference={self.reference!r} must be 'device', 'offloaded' or 'none'")
        if (self.deployment == "actor_only") != (self.engine is None):
            raise ValueError(f"deployment={self.deployment!r} with engine={self.engine}: SGLang engines need "
                             "'colocated' or 'disaggregated', the actor-only deployment none")


def plan_inputs(config: TrainConfig, arch: DecoderArchitecture, **device: int) -> PlanInputs:
    """The planner's view of a validated TrainConfig; ``device`` overrides device_bytes, overhead_bytes,
    cuda_graph_reserve_bytes or kernels."""
    dp = config.cluster.check_layout(config.parallel)
    model = config.model
    samples = config.data.sampler.batch_size * config.rollout.num_samples_per_prompt
    sglang = config.rollout.sglang if config.rollout.engine == "sglang" else None
    if sglang is None or not sglang.launch:
        deployment, engine = "actor_only", None
    else:
        deployment = "colocated" if config.cluster.colocate else "disaggregated"
        engine = EngineInputs(tp_size=sglang.tp_size, mem_fraction_static=sglang.mem_fraction_static,
                              dtype=sglang.served_dtype(config.cluster.use_gpus),
                              fp8_weights=config.rollout.quantization == "fp8")
    bucket_mb = config.run.weight_sync_bucket_mb
    reference = "none" if config.loss.kl_coef == 0 else "offloaded" if config.actor.offload_reference else "device"
    return PlanInputs(
        arch=arch, tensor_parallel_size=config.parallel.tensor_parallel_size,
        pipeline_parallel_size=config.parallel.pipeline_parallel_size, data_parallel_size=dp,
        params_dtype=model.params_dtype, fp8=model.fp8 is not None, vocab_pad_multiple=model.vocab_pad_multiple,
        max_tokens_per_microbatch=config.actor.max_tokens_per_microbatch,
        recompute=Recompute(granularity=model.recompute_granularity, method=model.recompute_method,
                            num_layers=model.recompute_num_layers),
        reference=reference, deployment=deployment, engine=engine,
        max_sequence_tokens=(config.data.train.max_prompt_tokens or 0) + config.rollout.max_new_tokens,
        rows_per_logprob_call=math.ceil(samples / dp),
        rows_per_train_call=math.ceil(samples / config.run.num_minibatches / dp),
        weight_bucket_bytes=bucket_mb * 2**20, **device)


@dataclasses.dataclass(frozen=True)
class PhaseMemory:
    """Bytes by term on one GPU in one phase; ``gpu``: "actor" (the ranks'), "rollout" (a disaggregated engine's)
    or "shared" (colocated engine and rank)."""

    name: str
    gpu: str
    stage: int
    terms: dict[str, int]

    @property
    def total(self) -> int:
        return sum(self.terms.values())


@dataclasses.dataclass(frozen=True)
class ActorTerms:
    """The actor-side quantities of the worst pipeline stage, shared by every deployment's phases."""

    stage: int
    model_state: ModelState
    reference: int
    # TE's cached FP8 weight copies (model.fp8; 0 without): as a train step leaves them, and as a log-prob pass
    # casts them anew after the offload dropped them (actor/memory.py drop_fp8_workspaces).
    fp8_workspaces: int
    fp8_forward_workspaces: int
    train: Activations
    logprob: Activations
    train_batch: int
    logprob_batch: int


class Deployment(abc.ABC):
    """Which memory shares a GPU in each phase; one object per trainer deployment (cluster.colocate etc.)."""

    name: str

    @abc.abstractmethod
    def phases(self, actor: ActorTerms, engine: Optional[EngineMemory], inputs: PlanInputs) -> list[PhaseMemory]:
        ...


def _fp8_workspace_term(inputs: PlanInputs, num_bytes: int) -> dict[str, int]:
    return {"fp8_workspaces": num_bytes} if inputs.fp8 else {}


def _actor_phases(actor: ActorTerms, inputs: PlanInputs, reference_between: bool, process_overheads: int,
                  logprob_workspaces: int) -> list[PhaseMemory]:
    """logprob and train on the actor's GPU. ``reference_between``: the reference occupies the GPU outside its own
    pass. The offloaded reference visits only during the log-prob phase (its pass); offload empties the cache.
    ``logprob_workspaces``: the actor's cached FP8 weight copies during its log-prob pass."""
    state, overhead = actor.model_state, process_overheads * inputs.overhead_bytes
    common = {"weights": state.weights, "grads": state.grads, "optimizer": state.optimizer}
    reference_train = actor.reference if reference_between else 0
    logprob = PhaseMemory("logprob", "actor", actor.stage, {
        **common, **_fp8_workspace_term(inputs, logprob_workspaces), "reference": actor.reference,
        "activations": actor.logprob.total, "batch": actor.logprob_batch, "overhead": overhead})
    train = PhaseMemory("train", "actor", actor.stage, {
        **common, **_fp8_workspace_term(inputs, actor.fp8_workspaces), "reference": reference_train,
        "activations": actor.train.total, "batch": actor.train_batch, "overhead": overhead})
    return [logprob, train]


def _cached_activations(actor: ActorTerms) -> int:
    # PyTorch's caching allocator keeps the blocks of the train step's activations until the actor offloads (the
    # only empty_cache call, actor/memory.py), so whatever runs after train in the same phase sees them as used.
    return max(actor.train.total, actor.logprob.total) + max(actor.train_batch, actor.logprob_batch)


class ColocatedDeployment(Deployment):
    """cluster.colocate: engine and actor rank on every GPU. Rollout: the actor is offloaded, the engine holds its
    static fraction and CUDA graphs. logprob / train: the engine released everything (only its process context
    stays). Sync: the engine's weights come back while the actor (and its cached activations) is still on the GPU,
    then the actor leaves before the KV cache returns (trainer/engine_layout.py enter_rollout_phase)."""

    name = "colocated"

    def phases(self, actor, engine, inputs):
        reference_between = inputs.reference == "device"
        overhead = 2 * inputs.overhead_bytes
        rollout = PhaseMemory("rollout", "shared", actor.stage, {
            "engine_static": int(inputs.device_bytes * inputs.engine.mem_fraction_static),
            "cuda_graphs": engine.cuda_graph_reserve,
            "reference": actor.reference if reference_between else 0,
            # The engine's own context is inside its static fraction (it was free memory it measured).
            "overhead": inputs.overhead_bytes})
        state = actor.model_state
        sync = PhaseMemory("sync", "shared", actor.stage, {
            "weights": state.weights, "grads": state.grads, "optimizer": state.optimizer,
            **_fp8_workspace_term(inputs, actor.fp8_workspaces),
            "reference": actor.reference if reference_between else 0, "activations": _cached_activations(actor),
            "engine_weights": engine.weights, "buckets": 2 * inputs.weight_bucket_bytes, "overhead": overhead})
        # The offload before rollout dropped the FP8 copies; the log-prob pass casts row-wise ones only.
        return [rollout, *_actor_phases(actor, inputs, reference_between, 2, actor.fp8_forward_workspaces), sync]


class DisaggregatedDeployment(Deployment):
    """cluster.rollout_num_gpus: engines on GPUs of their own (memory never released), weights broadcast from rank
    0 bucket by bucket; the actor's GPUs run logprob, train and sync."""

    name = "disaggregated"

    def phases(self, actor, engine, inputs):
        rollout = PhaseMemory("rollout", "rollout", 0, {
            "engine_static": int(inputs.device_bytes * inputs.engine.mem_fraction_static),
            "cuda_graphs": engine.cuda_graph_reserve})
        return [rollout, *_actor_phases(actor, inputs, inputs.reference != "none", 1, actor.fp8_workspaces),
                _sync_without_engine(actor, inputs)]


class ActorOnlyDeployment(Deployment):
    """The torch engine (in the driver) or a hand-started server: only the actor's phases are on these GPUs."""

    name = "actor_only"

    def phases(self, actor, engine, inputs):
        return [*_actor_phases(actor, inputs, inputs.reference != "none", 1, actor.fp8_workspaces),
                _sync_without_engine(actor, inputs)]


def _sync_without_engine(actor: ActorTerms, inputs: PlanInputs) -> PhaseMemory:
    state = actor.model_state
    return PhaseMemory("sync", "actor", actor.stage, {
        "weights": state.weights, "grads": state.grads, "optimizer": state.optimizer,
        **_fp8_workspace_term(inputs, actor.fp8_workspaces),
        "reference": actor.reference if inputs.reference == "device" else 0,
        "activations": _cached_activations(actor), "buckets": 2 * inputs.weight_bucket_bytes,
        "overhead": inputs.overhead_bytes})


DEPLOYMENTS: dict[str, Deployment] = {d.name: d for d in (ColocatedDeployment(), DisaggregatedDeployment(),
                                                          ActorOnlyDeployment())}


# --------------------------------------------------------------------------- the plan


@dataclasses.dataclass(frozen=True)
class MemoryPlan:
    inputs: PlanInputs
    num_parameters: int
    phases: list[PhaseMemory]
    engine: Optional[EngineMemory]
    # Train activations of the worst stage without recompute and with full recompute of every layer.
    activations_no_recompute: int
    activations_full_recompute: int

    @property
    def peak(self) -> PhaseMemory:
        return max(self.phases, key=lambda phase: phase.total)

    @property
    def problems(self) -> list[str]:
        device = self.inputs.device_bytes
        found = [f"{phase.name} phase on the {phase.gpu} GPU needs {phase.total / GIB:.1f} GiB > "
                 f"{device / GIB:.1f} GiB" for phase in self.phases if phase.total > device]
        if self.engine is not None and self.engine.kv_tokens < self.inputs.max_sequence_tokens:
            found.append(f"SGLang KV cache holds {self.engine.kv_tokens} tokens per engine rank, less than one "
                         f"sequence of {self.inputs.max_sequence_tokens}; raise mem_fraction_static or tp_size")
        return found

    @property
    def fits(self) -> bool:
        return not self.problems

    def to_dict(self) -> dict:
        inputs = self.inputs
        return {
            "model_type": inputs.arch.model_type, "num_parameters": self.num_parameters,
            "layout": {"tp": inputs.tensor_parallel_size, "pp": inputs.pipeline_parallel_size,
                       "dp": inputs.data_parallel_size, "engine_tp": inputs.engine.tp_size if inputs.engine else None,
                       "deployment": inputs.deployment, "kernels": inputs.kernels,
                       "recompute": dataclasses.asdict(inputs.recompute), "reference": inputs.reference},
            "device_bytes": inputs.device_bytes,
            "phases": [{"name": p.name, "gpu": p.gpu, "stage": p.stage, "total": p.total, "terms": p.terms}
                       for p in self.phases],
            "peak": self.peak.name,
            "activations_no_recompute": self.activations_no_recompute,
            "activations_full_recompute": self.activations_full_recompute,
            "engine": None if self.engine is None else {**dataclasses.asdict(self.engine),
                                                        "kv_tokens": self.engine.kv_tokens},
            "fits": self.fits, "problems": self.problems,
        }


def _actor_terms(inputs: PlanInputs, stage: StageParameters) -> ActorTerms:
    arch, kernels = inputs.arch, LAYER_KERNELS[inputs.kernels]
    e = DTYPE_BYTES[inputs.params_dtype]
    shape = dict(tensor_parallel_size=inputs.tensor_parallel_size, pipeline_parallel_size=inputs.pipeline_parallel_size,
                 stage=stage.stage, num_tokens=inputs.max_tokens_per_microbatch, e=e,
                 vocab_pad_multiple=inputs.vocab_pad_multiple)
    # Elements of the stage's linear weights on this TP rank, which TE casts to FP8 (0 without model.fp8).
    fp8_linear = stage.num_layers * layer_linear_parameters(arch, inputs.tensor_parallel_size) if inputs.fp8 else 0
    return ActorTerms(
        stage=stage.stage,
        model_state=model_state_bytes(stage.num_parameters, inputs.params_dtype, inputs.data_parallel_size),
        # The reference's forward-only passes cache row-wise FP8 copies, kept while it is on the device.
        reference=(0 if inputs.reference == "none"
                   else stage.num_parameters * e + FP8_FORWARD_WORKSPACE_BYTES * fp8_linear),
        fp8_workspaces=FP8_TRAIN_WORKSPACE_BYTES * fp8_linear,
        fp8_forward_workspaces=FP8_FORWARD_WORKSPACE_BYTES * fp8_linear,
        train=train_activation_bytes(arch, kernels, recompute=inputs.recompute, **shape),
        logprob=logprob_activation_bytes(arch, kernels, **shape),
        train_batch=inputs.rows_per_train_call * inputs.max_sequence_tokens * BATCH_BYTES_PER_TOKEN,
        logprob_batch=inputs.rows_per_logprob_call * inputs.max_sequence_tokens * BATCH_BYTES_PER_TOKEN,
    )


def plan_memory(inputs: PlanInputs) -> MemoryPlan:
    """Every phase's per-GPU bytes at the worst pipeline stage (the one with the largest peak)."""
    arch = inputs.arch
    engine = None if inputs.engine is None else engine_memory(
        arch, inputs.engine, device_bytes=inputs.device_bytes, overhead_bytes=inputs.overhead_bytes,
        cuda_graph_reserve_bytes=inputs.cuda_graph_reserve_bytes, vocab_pad_multiple=inputs.vocab_pad_multiple)
    deployment = DEPLOYMENTS[inputs.deployment]
    stages = stage_parameters(arch, inputs.tensor_parallel_size, inputs.pipeline_parallel_size,
                              inputs.vocab_pad_multiple)
    per_stage = [deployment.phases(_actor_terms(inputs, stage), engine, inputs) for stage in stages]
    phases = [max(candidates, key=lambda phase: phase.total) for candidates in zip(*per_stage, strict=True)]

    def worst_train(recompute: Recompute) -> int:
        return max(_actor_terms(dataclasses.replace(inputs, recompute=recompute), stage).train.total
                   for stage in stages)

    return MemoryPlan(inputs=inputs, num_parameters=num_parameters(arch), phases=phases, engine=engine,
                      activations_no_recompute=worst_train(NO_RECOMPUTE),
                      activations_full_recompute=worst_train(FULL_RECOMPUTE))
