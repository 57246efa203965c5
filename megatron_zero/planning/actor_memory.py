"""The Megatron actor's bytes on one GPU: parameters per pipeline stage, model state (weights, gradients, Adam
state under the distributed optimizer), and the activations a train or log-prob call saves per layer
implementation. Part of the memory planner (planning/memory.py puts the terms into phases); formulas and how they
were checked: docs/planning.md.
"""

from __future__ import annotations

import abc
import dataclasses
import math
from typing import TYPE_CHECKING, Optional

if TYPE_CHECKING:
    from megatron_zero.models.common.architecture import DecoderArchitecture

GIB = 2**30
DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}
# Bytes per token position of the batch tensors a rank holds on the device during a log-prob or train call: every
# microbatch of the call is moved there at once (actor.py _make_microbatches): token ids (int64), the response
# mask, old / reference / rollout log-probs and advantages (float32), their packed copies, and the log-prob and
# entropy outputs (float32) kept until the call returns.
BATCH_BYTES_PER_TOKEN = 48
# The log-prob head's peak per (token, local vocabulary entry), beyond the logits themselves (params_dtype): the
# max-shifted float32 copy, its exp, and the exp * x product of the entropy, all alive at once in
# _VocabParallelLogprobsEntropy.forward; backward needs less (probs, grad and the params_dtype gradient).
HEAD_FP32_WORKING_COPIES = 3
# model.fp8: bytes per linear weight element of Transformer Engine's cached FP8 copies (each TE module's
# ``_fp8_workspaces``, kept between microbatches because megatron-core passes ``is_first_microbatch``). A training
# forward casts a row-wise copy for its GEMM and a column-wise one for the backward GEMMs (TE module/linear.py:
# columnwise usage when grad is enabled); a forward without grad only the row-wise one. Block scales are left out
# (at most one byte per 32 elements, mxfp8).
FP8_TRAIN_WORKSPACE_BYTES = 2
FP8_FORWARD_WORKSPACE_BYTES = 1


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
