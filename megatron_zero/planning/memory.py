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
Pure arithmetic on integers: no torch, no GPU.
"""

from __future__ import annotations

import abc
import dataclasses
import itertools
import math
from typing import TYPE_CHECKING, Optional

if TYPE_CHECKING:
    from megatron_zero.config.trainer import TrainConfig
    from megatron_zero.models.common.architecture import DecoderArchitecture

GIB = 2**30
DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}
# sglang.dtype values (config/sglang.py SGLANG_DTYPES); "auto" loads the released checkpoints in bf16.
SGLANG_DTYPE_BYTES = {"auto": 2, "half": 2, "float16": 2, "bfloat16": 2, "float": 4, "float32": 4}
# Bytes per token position of the batch tensors a rank holds on the device during a log-prob or train call: every
# microbatch of the call is moved there at once (actor.py _make_microbatches): token ids (int64), the response
# mask, old / reference / rollout log-probs and advantages (float32), their packed copies, and the log-prob and
# entropy outputs (float32) kept until the call returns.
BATCH_BYTES_PER_TOKEN = 48
# The log-prob head's peak per (token, local vocabulary entry), beyond the logits themselves (params_dtype): the
# max-shifted float32 copy, its exp, and the exp * x product of the entropy, all alive at once in
# _VocabParallelLogprobsEntropy.forward; backward needs less (probs, grad and the params_dtype gradient).
HEAD_FP32_WORKING_COPIES = 3
# What the planner assumes where it cannot measure (no GPU here); every one is a --flag of ``megatron-zero plan``.
# Per process on a GPU: CUDA context, NCCL buffers, allocator slack.
DEFAULT_OVERHEAD_GIB = 2.0
# SGLang's CUDA graphs and forward activations, outside its static pool (mem_fraction_static).
DEFAULT_CUDA_GRAPH_RESERVE_GIB = 3.0
DEFAULT_GPU_MEMORY_GIB = 80.0
# model.fp8: bytes per linear weight element of Transformer Engine's cached FP8 copies (each TE module's
# ``_fp8_workspaces``, kept between microbatches because megatron-core passes ``is_first_microbatch``). A training
# forward casts a row-wise copy for its GEMM and a column-wise one for the backward GEMMs (TE module/linear.py:
# columnwise usage when grad is enabled); a forward without grad only the row-wise one. Block scales are left out
# (at most one byte per 32 elements, mxfp8).
FP8_TRAIN_WORKSPACE_BYTES = 2
FP8_FORWARD_WORKSPACE_BYTES = 1


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


# --------------------------------------------------------------------------- parameters


def layer_parameters(arch: DecoderArchitecture, tensor_parallel_size: int) -> int:
    """Parameters of one decoder layer on one TP rank, as megatron-core shards them: QKV (and its bias), the output
    projection and both MLP matrices split over TP; the two RMSNorm weights replicated."""
    q_width = arch.num_attention_heads * arch.head_dim
    kv_width = arch.num_query_groups * arch.head_dim
    qkv = (q_width + 2 * kv_width) * (arch.hidden_size + (1 if arch.qkv_bias else 0))
    sharded = qkv + q_width * arch.hidden_size + 3 * arch.hidden_size * arch.ffn_hidden_size
    return sharded // tensor_parallel_size + 2 * arch.hidden_size


@dataclasses.dataclass(frozen=True, kw_only=True)
class StageParameters:
    """One pipeline stage on one TP rank: its layers and its parameter count."""

    stage: int
    num_layers: int
    num_parameters: int


def stage_parameters(arch: DecoderArchitecture, tensor_parallel_size: int, pipeline_parallel_size: int,
                     vocab_pad_multiple: int) -> list[StageParameters]:
    """Every stage's parameters per TP rank: layers split evenly (megatron-core's default), the vocabulary-parallel
    embedding on the first stage, the final norm and output layer on the last. Tied embeddings at PP > 1 still
    cost the last stage a copy of the embedding (megatron keeps both and all-reduces their gradients)."""
    tp, pp = tensor_parallel_size, pipeline_parallel_size
    embedding = arch.padded_vocab_size(vocab_pad_multiple) * arch.hidden_size // tp
    layers = arch.num_layers // pp
    stages = []
    for stage in range(pp):
        count = layers * layer_parameters(arch, tp)
        if stage == 0:
            count += embedding
        if stage == pp - 1:
            count += arch.hidden_size
            if not arch.tie_word_embeddings or pp > 1:
                count += embedding
        stages.append(StageParameters(stage=stage, num_layers=layers, num_parameters=count))
    return stages


def num_parameters(arch: DecoderArchitecture) -> int:
    """The checkpoint's parameter count (unpadded vocabulary, tied embedding counted once): the published size."""
    embeddings = (1 if arch.tie_word_embeddings else 2) * arch.vocab_size * arch.hidden_size
    return arch.num_layers * layer_parameters(arch, 1) + arch.hidden_size + embeddings


@dataclasses.dataclass(frozen=True)
class ModelState:
    """Bytes of the actor's persistent state on one GPU."""

    weights: int
    grads: int
    optimizer: int

    @property
    def total(self) -> int:
        return self.weights + self.grads + self.optimizer


def model_state_bytes(num_params: int, params_dtype: str, data_parallel_size: int) -> ModelState:
    """Weights in params_dtype; fp32 gradient buffer (the actor reduces gradients in fp32); the distributed
    optimizer's shard of the fp32 master weights (16-bit params only: fp32 params are their own master) and the
    two Adam moments, 1/DP of each."""
    master = 0 if params_dtype == "float32" else 4
    return ModelState(weights=num_params * DTYPE_BYTES[params_dtype], grads=num_params * 4,
                      optimizer=math.ceil(num_params * (master + 8) / data_parallel_size))


# --------------------------------------------------------------------------- activations


class LayerKernels(abc.ABC):
    """What one implementation of the decoder layer saves for backward, in bytes per token position.

    ``e`` is the activation element size (params_dtype), ``t`` the TP size. Without sequence parallelism (our actor
    does not enable it) the norms' inputs and outputs are replicated on every TP rank; the attention and MLP
    widths are split.
    """

    name: str

    @abc.abstractmethod
    def norm_into_linear(self, arch: DecoderArchitecture, e: int) -> float:
        """An RMSNorm and the linear layer reading its output."""

    @abc.abstractmethod
    def attention(self, arch: DecoderArchitecture, t: int, num_tokens: int, e: int) -> tuple[float, float]:
        """(kept under selective recompute, recomputed by it): rotary, core attention and the output projection's
        input. Per token; a quadratic kernel's share grows with ``num_tokens``."""

    @abc.abstractmethod
    def mlp(self, arch: DecoderArchitecture, t: int, e: int) -> float:
        """The gated MLP after its norm: fc1 output, SwiGLU, fc2 input."""

    @abc.abstractmethod
    def forward_working(self, arch: DecoderArchitecture, t: int, num_tokens: int, e: int) -> float:
        """The most bytes alive inside one layer of a forward pass without autograd (log-prob passes)."""


class TransformerEngineKernels(LayerKernels):
    """GPU layers (TE spec): fused RMSNorm+linear saves its input, the normalised output and 1/rms (fp32); flash
    attention (TE / cuDNN) saves q, k, v (not expanded over the query groups), its output (which is also the
    projection's input) and the softmax log-sum-exp (fp32 per head); the fused SwiGLU saves fc1's output and fc2 its
    input. Read from TE's and megatron-core's autograd functions; not measured here (no GPU)."""

    name = "transformer_engine"

    def norm_into_linear(self, arch, e):
        return 2 * e * arch.hidden_size + 4

    def attention(self, arch, t, num_tokens, e):
        q_width = arch.num_attention_heads * arch.head_dim // t
        kv_width = arch.num_query_groups * arch.head_dim // t
        return e * (2 * q_width + 2 * kv_width), 4 * arch.num_attention_heads / t

    def mlp(self, arch, t, e):
        return 3 * e * arch.ffn_hidden_size / t

    def forward_working(self, arch, t, num_tokens, e):
        # Residual stream + normalised input, plus the widest intermediate: fc1's output and SwiGLU's product, or
        # QKV and the attention output.
        q_width, kv_width = arch.num_attention_heads * arch.head_dim / t, arch.num_query_groups * arch.head_dim / t
        return e * (2 * arch.hidden_size + max(3 * arch.ffn_hidden_size / t, 2 * q_width + 2 * kv_width))


class LocalKernels(LayerKernels):
    """megatron-core's local layers (the CPU path; what tests/test_memory_planner.py measures): RMSNorm computed
    through float32 saves the float32 input, the float32 normalised value and 1/rms; unfused attention saves q,
    k and v expanded to every head, the causal mask (bool), the float32 softmax and its params_dtype copy (both
    heads x tokens^2), rotary cos/sin for q and k, and the context; the MLP saves fc1's output and three
    ffn-wide SwiGLU intermediates."""

    name = "local"

    def norm_into_linear(self, arch, e):
        return 8 * arch.hidden_size + e * arch.hidden_size + 4

    def attention(self, arch, t, num_tokens, e):
        q_width = arch.num_attention_heads * arch.head_dim / t
        heads = arch.num_attention_heads / t
        kept = e * (4 * q_width + 4 * arch.head_dim)
        return kept, num_tokens * (1 + heads * (4 + e))

    def mlp(self, arch, t, e):
        return 5 * e * arch.ffn_hidden_size / t

    def forward_working(self, arch, t, num_tokens, e):
        heads = arch.num_attention_heads / t
        scores = num_tokens * heads * (4 + e)
        return 8 * arch.hidden_size + e * arch.hidden_size + max(5 * e * arch.ffn_hidden_size / t, scores)


LAYER_KERNELS: dict[str, LayerKernels] = {k.name: k for k in (TransformerEngineKernels(), LocalKernels())}


@dataclasses.dataclass(frozen=True, kw_only=True)
class Recompute:
    """model.recompute_*: None, "selective" (core attention) or "full" with method "uniform" / "block"."""

    granularity: Optional[str] = None
    method: Optional[str] = None
    num_layers: Optional[int] = None


NO_RECOMPUTE = Recompute()
FULL_RECOMPUTE = Recompute(granularity="full", method="uniform", num_layers=1)


def layer_activation_bytes(arch: DecoderArchitecture, kernels: LayerKernels, tensor_parallel_size: int,
                           num_tokens: int, e: int, selective: bool = False) -> float:
    """Bytes one decoder layer saves for backward over ``num_tokens`` token positions."""
    kept, recomputed = kernels.attention(arch, tensor_parallel_size, num_tokens, e)
    per_token = (2 * kernels.norm_into_linear(arch, e) + kept + (0 if selective else recomputed)
                 + kernels.mlp(arch, tensor_parallel_size, e))
    return per_token * num_tokens


def head_working_bytes(arch: DecoderArchitecture, tensor_parallel_size: int, num_tokens: int, e: int,
                       vocab_pad_multiple: int) -> float:
    """Peak of the output layer and log-prob head: this TP rank's logits slice (params_dtype) and the float32
    working copies of ``HEAD_FP32_WORKING_COPIES`` over the real-vocabulary columns."""
    local = arch.padded_vocab_size(vocab_pad_multiple) // tensor_parallel_size
    return num_tokens * local * (e + 4 * HEAD_FP32_WORKING_COPIES)


@dataclasses.dataclass(frozen=True)
class Activations:
    """A pipeline stage's activation bytes at its peak: decoder layers (times the microbatches in flight), the
    embedding / final norm, and the head's working set."""

    layers: float
    ends: float
    head: float

    @property
    def total(self) -> int:
        return math.ceil(self.layers + self.ends + self.head)


def in_flight_microbatches(stage: int, pipeline_parallel_size: int) -> int:
    """Microbatches whose activations stage ``stage`` holds at the 1F1B schedule's peak (the first stage
    runs PP forwards before its first backward); the run has at least PP microbatches per step."""
    return pipeline_parallel_size - stage


def train_activation_bytes(arch: DecoderArchitecture, kernels: LayerKernels, *, tensor_parallel_size: int,
                           pipeline_parallel_size: int, stage: int, num_tokens: int, e: int, recompute: Recompute,
                           vocab_pad_multiple: int) -> Activations:
    """Activation bytes of pipeline stage ``stage`` in a train step (``num_tokens`` per microbatch)."""
    tp, pp = tensor_parallel_size, pipeline_parallel_size
    num_layers = arch.num_layers // pp
    in_flight = in_flight_microbatches(stage, pp)
    per_layer = layer_activation_bytes(arch, kernels, tp, num_tokens, e, selective=recompute.granularity == "selective")
    # A checkpointed layer (or chunk) keeps only its input; the backward rematerialises one chunk at a time.
    checkpoint_input = e * arch.hidden_size * num_tokens
    if recompute.granularity == "full" and recompute.method == "uniform":
        chunk = min(recompute.num_layers, num_layers)
        layers = in_flight * math.ceil(num_layers / chunk) * checkpoint_input + chunk * per_layer
    elif recompute.granularity == "full":  # "block": the first num_layers of the stage are checkpointed
        checkpointed = min(recompute.num_layers, num_layers)
        layers = (in_flight * (checkpointed * checkpoint_input + (num_layers - checkpointed) * per_layer)
                  + (per_layer if checkpointed else 0))
    else:
        layers = in_flight * num_layers * per_layer
    ends, head = 0.0, 0.0
    if stage == 0:
        ends += in_flight * 8 * num_tokens  # token ids kept by the embedding lookup
    if stage == pp - 1:
        ends += kernels.norm_into_linear(arch, e) * num_tokens
        head = head_working_bytes(arch, tp, num_tokens, e, vocab_pad_multiple)
    return Activations(layers=layers, ends=ends, head=head)


def logprob_activation_bytes(arch: DecoderArchitecture, kernels: LayerKernels, *, tensor_parallel_size: int,
                             pipeline_parallel_size: int, stage: int, num_tokens: int, e: int,
                             vocab_pad_multiple: int) -> Activations:
    """A forward-only pass keeps nothing for backward: one layer's working set, the hidden states passed between
    stages for the microbatches in flight, and on the last stage the head's working set."""
    tp, pp = tensor_parallel_size, pipeline_parallel_size
    working = kernels.forward_working(arch, tp, num_tokens, e) * num_tokens
    passed = (in_flight_microbatches(stage, pp) if pp > 1 else 0) * e * arch.hidden_size * num_tokens
    head = head_working_bytes(arch, tp, num_tokens, e, vocab_pad_multiple) if stage == pp - 1 else 0.0
    return Activations(layers=working, ends=passed, head=head)


# --------------------------------------------------------------------------- the rollout engine


@dataclasses.dataclass(frozen=True, kw_only=True)
class EngineInputs:
    tp_size: int
    mem_fraction_static: float
    dtype: str = "bfloat16"
    # rollout.quantization="fp8": linear weights at 1 byte plus a float32 scale per 128x128 block.
    fp8_weights: bool = False


def layer_linear_parameters(arch: DecoderArchitecture, tp_size: int) -> int:
    """Weight elements of one decoder layer's linears (q/k/v/o, gate/up/down) on one TP rank, the weights FP8
    quantizes; k/v are replicated when the TP exceeds the KV heads (an SGLang engine, as in its KV cache; the
    actor's TP always divides them)."""
    q_rows = arch.num_attention_heads * arch.head_dim // tp_size
    kv_rows = max(1, arch.num_query_groups // tp_size) * arch.head_dim
    attention = arch.hidden_size * (2 * q_rows + 2 * kv_rows)  # q and o; k and v
    return attention + 3 * arch.hidden_size * arch.ffn_hidden_size // tp_size


def engine_linear_parameters(arch: DecoderArchitecture, tp_size: int) -> int:
    """Parameters of one engine rank's quantizable linears, at its TP."""
    return arch.num_layers * layer_linear_parameters(arch, tp_size)


@dataclasses.dataclass(frozen=True)
class EngineMemory:
    """One SGLang engine rank's GPU: weights at its TP, the KV cache pool, the CUDA-graph reserve."""

    tp_size: int
    weights: int
    kv_cache: int
    cuda_graph_reserve: int
    kv_bytes_per_token: int

    @property
    def kv_tokens(self) -> int:
        return max(self.kv_cache, 0) // self.kv_bytes_per_token

    @property
    def total(self) -> int:
        return self.weights + max(self.kv_cache, 0) + self.cuda_graph_reserve


def engine_memory(arch: DecoderArchitecture, engine: EngineInputs, *, device_bytes: int, overhead_bytes: int,
                  cuda_graph_reserve_bytes: int, vocab_pad_multiple: int) -> EngineMemory:
    """SGLang sizes its KV pool once, at startup, so that its static memory (weights + KV cache) is
    ``mem_fraction_static`` of the GPU: KV = free memory after loading the weights - (1 - fraction) x total
    (sglang/srt/model_executor/model_runner.py, profile_max_num_token). The engine starts before the actor
    (trainer/engine_layout.py), so the free memory then is the GPU less the engine's own context. KV heads are replicated
    when the engine's TP exceeds them."""
    e = SGLANG_DTYPE_BYTES[engine.dtype]
    weights = stage_parameters(arch, engine.tp_size, 1, vocab_pad_multiple)[0].num_parameters * e
    if engine.fp8_weights:
        linear = engine_linear_parameters(arch, engine.tp_size)
        weights -= linear * e - linear - 4 * math.ceil(linear / (128 * 128))  # 1 byte each + block scales
    kv_cache = int(device_bytes * engine.mem_fraction_static) - weights - overhead_bytes
    kv_heads = max(1, arch.num_query_groups // engine.tp_size)
    per_token = 2 * arch.num_layers * kv_heads * arch.head_dim * e
    return EngineMemory(tp_size=engine.tp_size, weights=weights, kv_cache=kv_cache,
                        cuda_graph_reserve=cuda_graph_reserve_bytes, kv_bytes_per_token=per_token)


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


# --------------------------------------------------------------------------- recommendations


def _layout_is_valid(arch: DecoderArchitecture, tp: int, pp: int, vocab_pad_multiple: int) -> bool:
    try:
        arch.check_parallel_sizes(tp, pp, vocab_pad_multiple)
    except ValueError:
        return False
    return True


def recommend_layouts(inputs: PlanInputs, *, world_size: int, gpus_per_node: int, rollout_num_gpus: int = 0,
                      limit: int = 5) -> list[MemoryPlan]:
    """Layouts of the same job that fit, least model parallelism first: actor TP (within a node) x PP over the
    world size, with and without full recompute, two token budgets (``budgets``), and every engine TP that divides
    the node (and, disaggregated, the rollout GPUs) and the attention heads. Rows per call scale with each
    layout's DP size."""
    arch = inputs.arch
    candidates = []
    # The configured token budget, and the smallest the actor accepts (one longest sequence, rounded up to 1024).
    budgets = sorted({inputs.max_tokens_per_microbatch, -(-inputs.max_sequence_tokens // 1024) * 1024}, reverse=True)
    engine_tps = [None] if inputs.engine is None else [
        tp for tp in _divisors(gpus_per_node) if arch.num_attention_heads % tp == 0
        and (not rollout_num_gpus or rollout_num_gpus % tp == 0)]
    for tp in _divisors(gpus_per_node):
        for pp in _divisors(arch.num_layers):
            if world_size % (tp * pp) or not _layout_is_valid(arch, tp, pp, inputs.vocab_pad_multiple):
                continue
            dp = world_size // (tp * pp)
            scale = inputs.data_parallel_size / dp
            for recompute, num_tokens, engine_tp in itertools.product((NO_RECOMPUTE, FULL_RECOMPUTE), budgets,
                                                                      engine_tps):
                engine = None if engine_tp is None else dataclasses.replace(inputs.engine, tp_size=engine_tp)
                plan = plan_memory(dataclasses.replace(
                    inputs, tensor_parallel_size=tp, pipeline_parallel_size=pp, data_parallel_size=dp,
                    recompute=recompute, engine=engine, max_tokens_per_microbatch=num_tokens,
                    rows_per_logprob_call=math.ceil(inputs.rows_per_logprob_call * scale),
                    rows_per_train_call=math.ceil(inputs.rows_per_train_call * scale)))
                if plan.fits:
                    candidates.append(plan)
    # Cheapest first: less model parallelism, no recompute, the larger microbatch, a smaller engine (more engines).
    candidates.sort(key=lambda p: (p.inputs.tensor_parallel_size * p.inputs.pipeline_parallel_size,
                                   p.inputs.pipeline_parallel_size, p.inputs.recompute != NO_RECOMPUTE,
                                   -p.inputs.max_tokens_per_microbatch,
                                   p.inputs.engine.tp_size if p.inputs.engine else 0))
    return candidates[:limit]


# --------------------------------------------------------------------------- report


def _gib(num_bytes: float) -> str:
    return f"{num_bytes / GIB:8.2f}"


def format_plan(plan: MemoryPlan, recommendations: Optional[list[MemoryPlan]] = None) -> str:
    """A readable report: the layout, one table per phase (GiB by term), the peak, problems and layouts that fit."""
    inputs = plan.inputs
    lines = [f"{inputs.arch.model_type}, {plan.num_parameters / 1e9:.2f}B parameters; actor "
             f"TP={inputs.tensor_parallel_size} PP={inputs.pipeline_parallel_size} DP={inputs.data_parallel_size}, "
             f"{inputs.params_dtype}, "
             f"{inputs.max_tokens_per_microbatch} tokens per microbatch, recompute={inputs.recompute.granularity}, "
             f"reference={inputs.reference}, {inputs.deployment}"
             + (f", SGLang TP={inputs.engine.tp_size} mem_fraction_static={inputs.engine.mem_fraction_static}"
                if inputs.engine else "")
             + f"; {inputs.kernels} layers; GPU {inputs.device_bytes / GIB:.1f} GiB"]
    for phase in plan.phases:
        lines.append(f"\n{phase.name} ({phase.gpu} GPU, pipeline stage {phase.stage})      GiB")
        lines += [f"  {term:<16}{_gib(value)}" for term, value in phase.terms.items()]
        lines.append(f"  {'total':<16}{_gib(phase.total)}")
    lines.append(f"\ntrain activations per GPU: {plan.activations_no_recompute / GIB:.2f} GiB without recompute, "
                 f"{plan.activations_full_recompute / GIB:.2f} GiB with full recompute")
    if plan.engine is not None:
        lines.append(f"SGLang rank: weights {plan.engine.weights / GIB:.2f} GiB, KV cache "
                     f"{max(plan.engine.kv_cache, 0) / GIB:.2f} GiB = {plan.engine.kv_tokens} tokens "
                     f"({plan.engine.kv_tokens // max(inputs.max_sequence_tokens, 1)} full-length sequences)")
    lines.append(f"peak: {plan.peak.name} phase, {plan.peak.total / GIB:.2f} GiB of {inputs.device_bytes / GIB:.1f}: "
                 + ("fits" if plan.fits else "DOES NOT FIT: " + "; ".join(plan.problems)))
    if recommendations is not None:
        lines.append("\nlayouts that fit (least model parallelism first):" if recommendations
                     else "\nno layout of this many GPUs fits; add nodes or shorten the microbatch")
        for rec in recommendations:
            r = rec.inputs
            lines.append(f"  parallel.tensor_parallel_size={r.tensor_parallel_size} "
                         f"parallel.pipeline_parallel_size={r.pipeline_parallel_size}"
                         + f" actor.max_tokens_per_microbatch={r.max_tokens_per_microbatch}"
                         + (" model.recompute_granularity=full model.recompute_method=uniform "
                            "model.recompute_num_layers=1" if r.recompute != NO_RECOMPUTE else "")
                         + (f" rollout.sglang.tp_size={r.engine.tp_size}" if r.engine else "")
                         + f"   (peak {rec.peak.name} {rec.peak.total / GIB:.1f} GiB)")
    return "\n".join(lines)
