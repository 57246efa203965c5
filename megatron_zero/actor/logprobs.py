"""Token log-probabilities and entropy from vocab-parallel logits, without gathering the vocabulary.

Why: megatron-core's output layer is vocab-parallel, so each tensor-parallel (TP) rank holds the logits of a
contiguous slice ``[rank * V_local, (rank + 1) * V_local)`` of the padded vocabulary. Gathering full-vocabulary
logits for every response token (8k tokens x 150k vocab) would cost gigabytes, so the softmax statistics are
reduced across TP ranks instead: one all-reduce(MAX) for the max logit and one all-reduce(SUM) that carries the
sum of exponentials, the target logit (picked on the owning rank, zero elsewhere) and, for the entropy, the
exp-weighted sum of logits.

How: ``vocab_parallel_logprobs_entropy(logits_local, target_ids, tp_group, temperature=..., vocab_size=...)``.
Logits are divided by the sampling temperature before the softmax, the same way the rollout engine samples.
``vocab_size`` (the true, unpadded vocabulary) excludes megatron's padding columns from the softmax, so the
result matches a HF model's log-probs over its real vocabulary. The gradient is hand-written (no autograd graph
over the vocabulary) and only the local softmax is kept for backward. Tested against a float64 full-vocabulary
``torch.log_softmax`` in ``tests/test_logprobs.py`` (2 gloo processes and single-process gradcheck).
"""

from typing import Optional

import torch
import torch.distributed as dist


def _tp_rank_and_size(tp_group: Optional[dist.ProcessGroup]) -> tuple[int, int]:
    # tp_group=None means "not sharded" (single process), not torch.distributed's default group.
    if tp_group is None:
        return 0, 1
    return dist.get_rank(tp_group), dist.get_world_size(tp_group)


def _all_reduce(tensor: torch.Tensor, op: dist.ReduceOp, tp_group: Optional[dist.ProcessGroup]) -> None:
    if tp_group is not None and dist.get_world_size(tp_group) > 1:
        dist.all_reduce(tensor, op=op, group=tp_group)


class _VocabParallelLogprobsEntropy(torch.autograd.Function):
    """Forward: log p(target) and entropy of softmax(logits / T); backward: the analytic gradients.

    With x = z / T, p = softmax(x), H = logsumexp(x) - sum_j p_j x_j:
        d logp / d z_j = (onehot_j - p_j) / T
        d H / d z_j    = -p_j (x_j - sum_k p_k x_k) / T = -p_j (log p_j + H) / T
    The second form needs only p and H, so p is the one vocabulary-sized tensor saved for backward.
    """

    @staticmethod
    def forward(
        ctx,
        logits_local: torch.Tensor,
        target_ids: Optional[torch.Tensor],
        tp_group: Optional[dist.ProcessGroup],
        temperature: float,
        num_valid_local: int,
        vocab_start: int,
        compute_entropy: bool,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        # Softmax statistics in at least float32 even for bf16 logits; float64 stays float64 (gradcheck).
        compute_dtype = torch.promote_types(logits_local.dtype, torch.float32)
        # Padding columns are a suffix of the global vocabulary, hence a suffix of each local slice: a view
        # drops them without a mask.
        z = logits_local[..., :num_valid_local]
        leading_shape = z.shape[:-1]
        if num_valid_local > 0:
            max_z = z.max(dim=-1).values.to(compute_dtype)
        else:
            max_z = torch.full(leading_shape, float("-inf"), dtype=compute_dtype, device=z.device)
        _all_reduce(max_z, dist.ReduceOp.MAX, tp_group)
        # x = (z - max z) / T; max(z / T) = max(z) / T for T > 0. The subtraction allocates the one working
        # copy, already in compute_dtype by type promotion.
        x = torch.sub(z, max_z.unsqueeze(-1))
        if temperature != 1.0:
            x.div_(temperature)
        exp_x = x.exp()

        # One SUM all-reduce for all per-token partial sums: [sum exp, target logit, sum exp * x].
        partial_sums = [exp_x.sum(dim=-1)]
        if target_ids is not None:
            local_ids = target_ids - vocab_start
            owned = (local_ids >= 0) & (local_ids < num_valid_local)
            if num_valid_local > 0:
                picked = x.gather(-1, local_ids.clamp(0, num_valid_local - 1).unsqueeze(-1)).squeeze(-1)
                partial_sums.append(torch.where(owned, picked, torch.zeros_like(picked)))
            else:
                partial_sums.append(torch.zeros(leading_shape, dtype=compute_dtype, device=x.device))
        if compute_entropy:
            partial_sums.append((exp_x * x).sum(dim=-1))
        del x
        sums = torch.stack(partial_sums)
        _all_reduce(sums, dist.ReduceOp.SUM, tp_group)

        sum_exp = sums[0]
        log_sum_exp = sum_exp.log()  # logsumexp of the max-shifted logits
        logp = sums[1] - log_sum_exp if target_ids is not None else torch.zeros_like(sum_exp)
        entropy = log_sum_exp - sums[-1] / sum_exp if compute_entropy else torch.zeros_like(sum_exp)

        probs = exp_x.div_(sum_exp.unsqueeze(-1))
        ctx.save_for_backward(probs, entropy, target_ids)
        ctx.has_target = target_ids is not None
        ctx.compute_entropy = compute_entropy
        ctx.temperature = temperature
        ctx.vocab_start = vocab_start
        ctx.num_valid_local = num_valid_local
        ctx.logits_shape = logits_local.shape
        ctx.logits_dtype = logits_local.dtype
        # Unused outputs (entropy-only or logp-only callers) then arrive as None grads and cost nothing.
        ctx.set_materialize_grads(False)
        return logp, entropy

    @staticmethod
    def backward(ctx, grad_logp: Optional[torch.Tensor], grad_entropy: Optional[torch.Tensor]):
        probs, entropy, target_ids = ctx.saved_tensors
        inv_temperature = 1.0 / ctx.temperature
        use_logp = grad_logp is not None and ctx.has_target
        use_entropy = grad_entropy is not None and ctx.compute_entropy
        # Both gradients are -p_j * (per-token coefficient) plus, for the entropy, -g_H p_j log p_j / T:
        # accumulate the coefficient first so the vocabulary-sized work is one or two passes.
        coef = torch.zeros_like(entropy)
        if use_logp:
            coef = coef + grad_logp
        if use_entropy:
            coef = coef + grad_entropy * entropy
            # xlogy keeps p log p = 0 where p underflowed to 0 instead of 0 * -inf = nan.
            grad_x = torch.xlogy(probs, probs).mul_((-inv_temperature * grad_entropy).unsqueeze(-1))
            grad_x.addcmul_(probs, coef.unsqueeze(-1), value=-inv_temperature)
        else:
            grad_x = probs * (-inv_temperature * coef).unsqueeze(-1)
        if use_logp and ctx.num_valid_local > 0:
            local_ids = target_ids - ctx.vocab_start
            owned = (local_ids >= 0) & (local_ids < ctx.num_valid_local)
            onehot_grad = torch.where(owned, grad_logp * inv_temperature, torch.zeros_like(grad_logp))
            grad_x.scatter_add_(
                -1, local_ids.clamp(0, ctx.num_valid_local - 1).unsqueeze(-1), onehot_grad.unsqueeze(-1)
            )

        grad_logits = grad_x.to(ctx.logits_dtype)
        num_padded_local = ctx.logits_shape[-1] - ctx.num_valid_local
        if num_padded_local > 0:
            grad_logits = torch.nn.functional.pad(grad_logits, (0, num_padded_local))
        return grad_logits, None, None, None, None, None, None


def vocab_parallel_logprobs_entropy(
    logits_local: torch.Tensor,
    target_ids: Optional[torch.Tensor],
    tp_group: Optional[dist.ProcessGroup] = None,
    *,
    temperature: float = 1.0,
    vocab_size: Optional[int] = None,
    compute_entropy: bool = True,
) -> tuple[Optional[torch.Tensor], Optional[torch.Tensor]]:
    """Log-probability of ``target_ids`` and entropy under softmax(logits / temperature), vocab-parallel.

    Args:
        logits_local: [..., V_local] this TP rank's slice of the (padded) vocabulary, rank r holding columns
            [r * V_local, (r + 1) * V_local). Any float dtype; statistics run in at least float32.
        target_ids: [...] int64 token ids in the global vocabulary, or None to compute only the entropy.
        tp_group: the tensor-parallel group (megatron's ``get_tensor_model_parallel_group()``); None means the
            logits are not sharded (single process), not torch.distributed's default group.
        temperature: the rollout sampling temperature; logits are divided by it before the softmax.
        vocab_size: the true vocabulary size; columns at or above it are megatron padding and are excluded.
            None means every column is a real token.
        compute_entropy: False skips the entropy (saves one vocabulary-sized product).

    Returns:
        (logp [...] or None, entropy [...] or None), in float32 (float64 for float64 logits). Differentiable
        with respect to ``logits_local``; the caller's loss must be identical on all TP ranks (as it is in
        megatron), since each rank back-propagates only into its own slice.
    """
    if temperature <= 0:
        raise ValueError(f"temperature={temperature} must be > 0 (it divides the logits)")
    if target_ids is None and not compute_entropy:
        raise ValueError("target_ids=None and compute_entropy=False: nothing to compute")
    if target_ids is not None:
        if target_ids.shape != logits_local.shape[:-1]:
            raise ValueError(
                f"target_ids.shape={tuple(target_ids.shape)} must equal logits_local.shape[:-1]="
                f"{tuple(logits_local.shape[:-1])}"
            )
        if target_ids.dtype not in (torch.int32, torch.int64):
            raise ValueError(f"target_ids.dtype={target_ids.dtype} must be an integer token-id dtype (int64)")
        target_ids = target_ids.long()
    tp_rank, tp_size = _tp_rank_and_size(tp_group)
    num_local = logits_local.shape[-1]
    padded_vocab_size = num_local * tp_size
    if vocab_size is None:
        vocab_size = padded_vocab_size
    if not 0 < vocab_size <= padded_vocab_size:
        raise ValueError(
            f"vocab_size={vocab_size} must be in (0, {padded_vocab_size}] (local logits width {num_local} "
            f"x tp size {tp_size})"
        )
    vocab_start = tp_rank * num_local
    num_valid_local = min(max(vocab_size - vocab_start, 0), num_local)
    logp, entropy = _VocabParallelLogprobsEntropy.apply(
        logits_local, target_ids, tp_group, float(temperature), num_valid_local, vocab_start, compute_entropy
    )
    return (logp if target_ids is not None else None), (entropy if compute_entropy else None)


def vocab_parallel_logprobs(
    logits_local: torch.Tensor,
    target_ids: torch.Tensor,
    tp_group: Optional[dist.ProcessGroup] = None,
    *,
    temperature: float = 1.0,
    vocab_size: Optional[int] = None,
) -> torch.Tensor:
    """Log-probability of ``target_ids``; see ``vocab_parallel_logprobs_entropy`` for the arguments."""
    logp, _ = vocab_parallel_logprobs_entropy(
        logits_local, target_ids, tp_group, temperature=temperature, vocab_size=vocab_size, compute_entropy=False
    )
    return logp


def vocab_parallel_entropy(
    logits_local: torch.Tensor,
    tp_group: Optional[dist.ProcessGroup] = None,
    *,
    temperature: float = 1.0,
    vocab_size: Optional[int] = None,
) -> torch.Tensor:
    """Entropy of softmax(logits / temperature); see ``vocab_parallel_logprobs_entropy`` for the arguments."""
    _, entropy = vocab_parallel_logprobs_entropy(
        logits_local, None, tp_group, temperature=temperature, vocab_size=vocab_size, compute_entropy=True
    )
    return entropy
