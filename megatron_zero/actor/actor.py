"""The Megatron actor: log-probs, one policy-gradient optimizer step, and offload/onload for colocation.

Why: the RL loop needs three things from the trained model, on any TP x PP layout: the log-probs of sampled
response tokens (for the old policy and, from a frozen copy, the reference), an optimizer step on the policy
loss, and, when SGLang shares the GPUs, a way to free the GPU memory between steps.

How (inside a process that called ``megatron_zero.parallel.initialize_parallel``)::

    actor = MegatronActor(ActorConfig(lr=1e-6), PolicyLossConfig(), ModelConfig(), "ckpt/mcore")
    logp, entropy = actor.compute_logprobs(batch)              # [B, S], on every pipeline rank
    ref_logp = ReferenceModel("ckpt/mcore", ModelConfig(), ActorConfig()).compute_logprobs(batch)
    metrics = actor.train_step(dataclasses.replace(batch, old_logp=logp, advantages=adv, ref_logp=ref_logp))
    actor.offload(); ...rollout...; actor.onload()

Design choices:
* Packed rows by default (``packing.py``): each microbatch is one row of sequences end to end, attention kept
  within each sequence by TE's THD ``PackedSeqParams`` on GPU or a block-diagonal mask on CPU. Without packing
  (``actor.pack_sequences=false``, or a sliding-window model on CPU) rows are right-padded and get no mask:
  every real token's causal window then holds only real tokens, so megatron's built-in causal (or
  sliding-window) mask is exact for them; outputs at padding positions are computed and dropped.
* Microbatches by token budget (``batching.split_by_token_budget``), packed or padded to their own longest row,
  and with FP8 padded further to Transformer Engine's token multiple (``batching.fp8_token_multiple``).
  The pipeline schedule then sends activations of different shapes between stages, so models are built with
  ``variable_seq_lengths=True``: megatron's p2p layer exchanges each tensor's shape before the tensor.
* Loss normalisation: each microbatch's loss is ``sum / global normaliser`` (``losses.py``), the normaliser
  summed over all microbatches and data-parallel ranks, so microbatching and DP do not change the loss. The
  schedule divides every microbatch loss by the number of microbatches and DDP averages gradients over DP,
  so the loss handed to the schedule is multiplied by both to cancel them.
* Offload frees the storages of weights, gradient buffers and optimizer state in place (``memory.py``).
"""

from __future__ import annotations

import functools
import logging
from pathlib import Path
from typing import Any, Callable, Optional

import torch
import torch.distributed as dist

from megatron_zero.actor.batching import ActorBatch, fp8_token_multiple, split_by_token_budget
from megatron_zero.actor.checkpointing import load_actor_checkpoint, save_actor_checkpoint
from megatron_zero.actor.logprobs import vocab_parallel_logprobs_entropy
from megatron_zero.actor.losses import aggregation_normaliser, compute_policy_loss
from megatron_zero.actor.memory import MemoryMove, StorageOffloader, drop_fp8_workspaces, unique_storages_by_kind
from megatron_zero.actor.packing import packed_attention_inputs, packing_format
from megatron_zero.config.actor import ActorConfig
from megatron_zero.config.algorithm import PolicyLossConfig
from megatron_zero.config.model import ModelConfig
from megatron_zero.parallel.init import compute_device
from megatron_zero.parallel.pipeline import broadcast_from_last_stage, forward_backward

logger = logging.getLogger(__name__)

_TORCH_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
# Metrics of compute_policy_loss that are aggregated like the loss (sum over microbatches and DP ranks) and
# those that are means over a microbatch's tokens (averaged weighted by num_tokens).
_SUMMED_METRICS = ("loss", "pg_loss", "kl_ref", "entropy")
_TOKEN_MEAN_METRICS = ("clip_fraction", "approx_kl", "dual_clip_fraction", "tis_weight_mean", "tis_capped_fraction")


# --------------------------------------------------------------------------- models


class TokenCounter:
    """Counts the token positions a model's forward passes ran on, read from the inputs the model received.

    Packed rows count their real tokens, padded rows their padding too (the model computes it), and both count
    FP8's padding to a token multiple. Counted from the
    model's own inputs, not from the batch handed in, so a claim that each data-parallel replica ran 1/DP of a
    batch is checked against what its model did.
    """

    def __init__(self, model: torch.nn.Module) -> None:
        self.num_tokens = 0
        model.register_forward_pre_hook(self._count, with_kwargs=True)

    def _count(self, module: torch.nn.Module, args: tuple, kwargs: dict) -> None:
        input_ids = kwargs["input_ids"] if "input_ids" in kwargs else args[0]
        self.num_tokens += int(input_ids.numel())


def load_model(mcore_dir: str | Path, model_config: ModelConfig) -> tuple[torch.nn.Module, Any]:
    """This rank's pipeline stage of a megatron-zero checkpoint; returns (GPTModel, checkpoint info)."""
    from megatron_zero.models.mcore_checkpoint import load_mcore_weights, read_checkpoint_info

    info = read_checkpoint_info(mcore_dir)
    if model_config.vocab_pad_multiple != info.vocab_pad_multiple:
        raise ValueError(f"model.vocab_pad_multiple={model_config.vocab_pad_multiple} differs from the checkpoint's "
                         f"{info.vocab_pad_multiple} ({mcore_dir}); set it to {info.vocab_pad_multiple}")
    # variable_seq_lengths: microbatches differ in shape (module docstring). megatron-core (0.16.1 and 0.19.2)
    # rejects it with its default MoE dispatcher "allgather" even for dense models, where the dispatcher is never
    # built; naming another one is harmless in any version, so it is not switched by version (mcore_bugs.py).
    model = info.bridge.build_model(info.arch, model_config, variable_seq_lengths=True,
                                    moe_token_dispatcher_type="alltoall")
    load_mcore_weights(model, mcore_dir)
    return model, info


class ReferenceModel:
    """The frozen reference policy (the initial checkpoint) for the KL term.

    With ``actor.offload_reference`` its weights wait in host memory and visit the device only for its
    log-prob pass: one host-to-device copy of the weights per step buys that much device memory for the
    actor and a colocated engine the rest of the time.
    """

    def __init__(self, mcore_dir: str | Path, model_config: ModelConfig, actor_config: ActorConfig) -> None:
        self.model, info = load_model(mcore_dir, model_config)
        self.tokens = TokenCounter(self.model)
        self.model.eval()
        self.model.requires_grad_(False)
        self.vocab_size = info.arch.vocab_size
        self.packing = packing_format(model_config, info.arch, enabled=actor_config.pack_sequences)
        self.token_multiple = fp8_token_multiple(model_config)
        self.config = actor_config
        self._memory = StorageOffloader("reference model")
        if actor_config.offload_reference:
            self.offload()

    @property
    def offloaded(self) -> bool:
        return self._memory.offloaded

    def compute_logprobs(self, batch: ActorBatch) -> torch.Tensor:
        """Reference log-probs [B, S] of ``batch``'s response tokens (see ``compute_logprobs``)."""
        keep_offloaded = self.offloaded
        if keep_offloaded:
            self.onload()
        try:
            logp, _ = compute_logprobs(self.model, batch, temperature=self.config.temperature,
                                       max_tokens_per_microbatch=self.config.max_tokens_per_microbatch,
                                       vocab_size=self.vocab_size, packing=self.packing,
                                       token_multiple=self.token_multiple)
        finally:
            if keep_offloaded:
                self.offload()
        return logp

    def offload(self) -> MemoryMove:
        drop_fp8_workspaces(self.model)
        tensors = [*self.model.parameters(), *self.model.buffers()]
        return self._memory.offload(unique_storages_by_kind({"weights": tensors}))

    def onload(self) -> MemoryMove:
        return self._memory.onload()


# --------------------------------------------------------------------------- forward passes


def _model_tokens(microbatch: dict[str, torch.Tensor]) -> torch.Tensor:
    """The token rows the model runs on: the packed row, or the padded rows (both with any FP8 padding)."""
    return microbatch.get("model_tokens", microbatch["tokens"])


def _make_microbatches(batch: ActorBatch, max_tokens: int, packing: Optional[str],
                       token_multiple: int) -> tuple[list[list[int]], list]:
    """Row groups by token budget and their microbatches on the compute device, packed unless ``packing`` is None,
    the rows the model runs on padded to ``token_multiple`` tokens."""
    packed = packing is not None
    groups = split_by_token_budget(batch.lengths, max_tokens, packed=packed, token_multiple=token_multiple)
    device = compute_device()
    return groups, [{name: tensor.to(device)
                     for name, tensor in batch.microbatch(group, packed=packed, token_multiple=token_multiple).items()}
                    for group in groups]


def _call_model(model: torch.nn.Module, microbatch: dict[str, torch.Tensor], packing: Optional[str]) -> torch.Tensor:
    tokens = _model_tokens(microbatch)
    position_ids = torch.arange(tokens.shape[1], device=tokens.device).unsqueeze(0).expand_as(tokens)
    if packing is not None:
        return model(input_ids=tokens, position_ids=position_ids,
                     **packed_attention_inputs(microbatch["cu_seqlens"], packing))
    # attention_mask=None: megatron's causal mask is exact for right-padded rows (module docstring).
    return model(input_ids=tokens, position_ids=position_ids, attention_mask=None)


def _token_logprobs(logits: torch.Tensor, microbatch: dict[str, torch.Tensor], temperature: float,
                    vocab_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Log-prob and entropy [b, s - 1] of tokens 1..s-1 of the padded rows, vocab-parallel over TP.

    Computed from the logits at 0..s-2 of the rows the model ran on; for a packed row, the values at sequence
    boundaries (predicting the next sequence's first token) and FP8 padding are computed and dropped by
    ``logp_index``; padded rows' FP8 padding columns are cut off.
    """
    from megatron.core import parallel_state

    tokens = _model_tokens(microbatch)
    if "logp_index" not in microbatch:
        width = microbatch["tokens"].shape[1]
        logits, tokens = logits[:, :width], tokens[:, :width]
    logp, entropy = vocab_parallel_logprobs_entropy(
        logits[:, :-1], tokens[:, 1:], parallel_state.get_tensor_model_parallel_group(),
        temperature=temperature, vocab_size=vocab_size,
    )
    if "logp_index" in microbatch:
        logp, entropy = logp[0][microbatch["logp_index"]], entropy[0][microbatch["logp_index"]]
    return logp, entropy


def _run_microbatches(model: torch.nn.Module, microbatches: list[dict[str, torch.Tensor]], packing: Optional[str],
                      output_fn: Callable, forward_only: bool) -> list[dict[str, Any]]:
    return forward_backward(
        model, microbatches,
        seq_length=max(_model_tokens(mb).shape[1] for mb in microbatches),
        micro_batch_size=max(_model_tokens(mb).shape[0] for mb in microbatches),
        call_model=functools.partial(_call_model, packing=packing), output_fn=output_fn, forward_only=forward_only,
    )


def compute_logprobs(model: torch.nn.Module, batch: ActorBatch, *, temperature: float,
                     max_tokens_per_microbatch: int, vocab_size: int, packing: Optional[str] = None,
                     token_multiple: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """Log-prob and entropy [B, S] (float32) of each response token, aligned with ``batch.tokens``.

    Entry [i, t] is log p(tokens[i, t] | tokens[i, :t]) under softmax(logits / temperature) over the true
    vocabulary (``vocab_size``); 0 where ``batch.response_mask`` is False. Returned on every pipeline rank.
    ``packing``: None for padded rows, else the ``packing.packing_format`` of this model; ``token_multiple``:
    ``batching.fp8_token_multiple`` of this model.
    """
    groups, microbatches = _make_microbatches(batch, max_tokens_per_microbatch, packing, token_multiple)

    def output_fn(logits: torch.Tensor, microbatch: dict[str, torch.Tensor]):
        logp, entropy = _token_logprobs(logits, microbatch, temperature, vocab_size)
        return logits.new_zeros(()), {"logp": logp.float(), "entropy": entropy.float()}

    was_training = model.training
    model.eval()
    with torch.no_grad():
        outputs = _run_microbatches(model, microbatches, packing, output_fn, forward_only=True)
    model.train(was_training)

    result = None
    if outputs:  # the last pipeline stage
        logp = torch.zeros(batch.tokens.shape, dtype=torch.float32)
        entropy = torch.zeros(batch.tokens.shape, dtype=torch.float32)
        for group, out in zip(groups, outputs):
            index = torch.as_tensor(group, dtype=torch.long)
            width = out["logp"].shape[1]
            logp[index, 1 : width + 1] = out["logp"].cpu()
            entropy[index, 1 : width + 1] = out["entropy"].cpu()
        mask = batch.response_mask.bool()
        result = (logp.masked_fill(~mask, 0.0), entropy.masked_fill(~mask, 0.0))
    return broadcast_from_last_stage(result)


# --------------------------------------------------------------------------- the actor


class MegatronActor:
    """Policy model wrapped in megatron-core DDP, with the distributed optimizer and an LR schedule."""

    def __init__(self, config: ActorConfig, policy_loss: PolicyLossConfig, model_config: ModelConfig,
                 mcore_dir: str | Path) -> None:
        from megatron.core.distributed import (DistributedDataParallel, DistributedDataParallelConfig,
                                               finalize_model_grads)
        from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
        from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler

        self.config = config
        self.policy_loss = policy_loss
        module, info = load_model(mcore_dir, model_config)
        self.tokens = TokenCounter(module)
        self.vocab_size = info.arch.vocab_size
        # How microbatches are laid out (packing.py): "thd", "dense_mask", or None for padded rows.
        self.packing = packing_format(model_config, info.arch, enabled=config.pack_sequences)
        self.token_multiple = fp8_token_multiple(model_config)
        # The distributed optimizer shards Adam state over DP ranks (on CPU too, through the CPU adapter).
        ddp_config = DistributedDataParallelConfig(grad_reduce_in_fp32=True, overlap_grad_reduce=False,
                                                   use_distributed_optimizer=True)
        self.model = DistributedDataParallel(config=module.config, ddp_config=ddp_config, module=module)
        params_dtype = _TORCH_DTYPES[model_config.params_dtype]
        self.optimizer = get_megatron_optimizer(
            OptimizerConfig(optimizer="adam", lr=config.lr, min_lr=config.min_lr, weight_decay=config.weight_decay,
                            adam_beta1=config.adam_beta1, adam_beta2=config.adam_beta2, adam_eps=config.adam_eps,
                            clip_grad=config.clip_grad, use_distributed_optimizer=True,
                            bf16=params_dtype == torch.bfloat16, fp16=params_dtype == torch.float16,
                            params_dtype=params_dtype),
            [self.model],
        )
        self.scheduler = OptimizerParamScheduler(
            self.optimizer, init_lr=0.0 if config.lr_warmup_steps else config.lr, max_lr=config.lr,
            min_lr=config.min_lr, lr_warmup_steps=config.lr_warmup_steps,
            # megatron (0.16.1 and 0.19.2) requires decay steps > warmup steps even for the constant schedule,
            # which ignores them.
            lr_decay_steps=config.lr_decay_steps or config.lr_warmup_steps + 1, lr_decay_style=config.lr_schedule,
            start_wd=config.weight_decay, end_wd=config.weight_decay, wd_incr_steps=1, wd_incr_style="constant",
        )
        # What megatron's training loop wires up: DP / tied-embedding gradient reduction after the last
        # microbatch and the optimizer's loss scale (1 without fp16).
        self.model.config.finalize_model_grads_func = finalize_model_grads
        self.model.config.grad_scale_func = self.optimizer.scale_loss
        self.num_steps = 0
        self._memory = StorageOffloader("actor")

    # ---- log-probs -------------------------------------------------------------------------------

    def compute_logprobs(self, batch: ActorBatch) -> tuple[torch.Tensor, torch.Tensor]:
        self._check_on_device("compute_logprobs")
        return compute_logprobs(self.model, batch, temperature=self.config.temperature,
                                max_tokens_per_microbatch=self.config.max_tokens_per_microbatch,
                                vocab_size=self.vocab_size, packing=self.packing, token_multiple=self.token_multiple)

    # ---- training --------------------------------------------------------------------------------

    def _check_train_batch(self, batch: ActorBatch) -> None:
        required = {"old_logp": True, "advantages": True, "ref_logp": self.policy_loss.kl_coef > 0,
                    "rollout_logp": self.policy_loss.tis_cap is not None}
        missing = [name for name, needed in required.items() if needed and getattr(batch, name) is None]
        if missing:
            raise ValueError(f"train_step batch lacks {missing}: the policy loss config (kl_coef="
                             f"{self.policy_loss.kl_coef}, tis_cap={self.policy_loss.tis_cap}) needs them")

    def train_step(self, batch: ActorBatch, max_response_length: Optional[int] = None) -> dict[str, float]:
        """One optimizer step on the policy loss over ``batch`` (this DP rank's share); returns metrics.

        ``max_response_length`` is the constant of the "seq-mean-token-sum-norm" aggregation. Metrics: loss,
        pg_loss, kl_ref, entropy (as aggregated in the loss), clip_fraction, approx_kl (token means),
        grad_norm, lr, num_tokens, num_microbatches; identical on every rank.
        """
        from megatron.core import parallel_state

        self._check_on_device("train_step")
        self._check_train_batch(batch)
        _, microbatches = _make_microbatches(batch, self.config.max_tokens_per_microbatch, self.packing,
                                             self.token_multiple)
        dp_group = parallel_state.get_data_parallel_group()
        dp_size = dist.get_world_size(dp_group)
        normaliser = sum(aggregation_normaliser(mb["response_mask"][:, 1:], self.policy_loss.aggregation,
                                                max_response_length) for mb in microbatches)
        normaliser = torch.as_tensor(normaliser, dtype=torch.float64, device=compute_device())
        dist.all_reduce(normaliser, group=dp_group)
        # Cancels the schedule's division by the number of microbatches and DDP's average over DP (docstring).
        schedule_scale = len(microbatches) * dp_size

        def output_fn(logits: torch.Tensor, microbatch: dict[str, torch.Tensor]):
            logp, entropy = _token_logprobs(logits, microbatch, self.config.temperature, self.vocab_size)
            shifted = {name: microbatch[name][:, 1:] for name in ("ref_logp", "rollout_logp") if name in microbatch}
            loss, metrics = compute_policy_loss(
                logp, microbatch["old_logp"][:, 1:], microbatch["advantages"][:, 1:],
                microbatch["response_mask"][:, 1:], self.policy_loss,
                ref_logp_NT=shifted.get("ref_logp"), entropy_NT=entropy, rollout_logp_NT=shifted.get("rollout_logp"),
                normaliser=normaliser, max_response_length=max_response_length,
            )
            metrics["loss"] = loss.detach()
            return loss * schedule_scale, metrics

        self.model.train()
        self.model.zero_grad_buffer()
        self.optimizer.zero_grad()
        outputs = _run_microbatches(self.model, microbatches, self.packing, output_fn, forward_only=False)
        lr = self.optimizer.param_groups[0]["lr"]
        update_successful, grad_norm, _ = self.optimizer.step()
        if not update_successful:
            raise FloatingPointError(f"optimizer step {self.num_steps} skipped: non-finite gradients (grad_norm="
                                     f"{grad_norm})")
        self.scheduler.step(increment=1)
        self.num_steps += 1

        metrics = broadcast_from_last_stage(self._reduce_metrics(outputs, dp_group) if outputs else None)
        metrics.update(grad_norm=float(grad_norm), lr=float(lr), num_microbatches=float(len(microbatches)))
        return metrics

    @staticmethod
    def _reduce_metrics(outputs: list[dict[str, torch.Tensor]], dp_group: dist.ProcessGroup) -> dict[str, float]:
        """Sum the loss-like metrics and token-weight the per-token means over microbatches and DP ranks."""
        names = [name for name in (*_SUMMED_METRICS, *_TOKEN_MEAN_METRICS) if name in outputs[0]]
        totals = torch.zeros(len(names) + 1, dtype=torch.float64, device=compute_device())
        for out in outputs:
            num_tokens = float(out["num_tokens"])
            for i, name in enumerate(names):
                weight = num_tokens if name in _TOKEN_MEAN_METRICS else 1.0
                totals[i] += float(out[name]) * weight
            totals[-1] += num_tokens
        dist.all_reduce(totals, group=dp_group)
        num_tokens = float(totals[-1])
        metrics = {name: float(totals[i]) / (max(num_tokens, 1.0) if name in _TOKEN_MEAN_METRICS else 1.0)
                   for i, name in enumerate(names)}
        metrics["num_tokens"] = num_tokens
        return metrics

    # ---- checkpoints -----------------------------------------------------------------------------

    def save_checkpoint(self, checkpoint_dir: Path) -> None:
        """Weights, optimizer state, LR schedule and step count (``checkpointing.save_actor_checkpoint``)."""
        self._check_on_device("save_checkpoint")
        save_actor_checkpoint(self, checkpoint_dir)

    def load_checkpoint(self, checkpoint_dir: Path) -> None:
        self._check_on_device("load_checkpoint")
        load_actor_checkpoint(self, checkpoint_dir)

    @property
    def distributed_optimizers(self) -> list[Any]:
        """megatron-core's DistributedOptimizer(s): one, or those a ChainedOptimizer holds (e.g. for experts)."""
        return getattr(self.optimizer, "chained_optimizers", [self.optimizer])

    # ---- memory phases ---------------------------------------------------------------------------

    @property
    def offloaded(self) -> bool:
        return self._memory.offloaded

    def _check_on_device(self, what: str) -> None:
        if self.offloaded:
            raise RuntimeError(f"{what}: the actor is offloaded; call onload() first")

    def _storages_by_kind(self) -> dict[str, list[torch.UntypedStorage]]:
        """Storages of weights, gradient buffers and optimizer state (shared views counted once)."""
        weights = [param.data for param in self.model.parameters()]
        grads = []
        for buffer in [*self.model.buffers, *self.model.expert_parallel_buffers]:
            weights.append(buffer.param_data)
            grads.append(buffer.grad_data)
        optimizer_state = []
        for optimizer in self.distributed_optimizers:
            inner = optimizer.optimizer
            optimizer_state += [param.data for group in inner.param_groups for param in group["params"]]
            optimizer_state += [value for state in inner.state.values() for value in state.values()]
        return unique_storages_by_kind({"weights": weights, "grads": grads, "optimizer": optimizer_state})

    def offload(self) -> MemoryMove:
        """Copy weights, grads and optimizer state to host memory and free their device storage; drop TE's cached
        FP8 weight copies (recast at the next step)."""
        drop_fp8_workspaces(self.model)
        return self._memory.offload(self._storages_by_kind())

    def onload(self) -> MemoryMove:
        """Reallocate the device storages freed by ``offload`` and copy their contents back."""
        return self._memory.onload()
