"""Vocab-parallel log-probs and entropy vs a float64 full-vocabulary torch.log_softmax reference.

Two gloo processes split the vocabulary (TP=2) and compare values and gradients against the reference; the
single-process path (tp_group=None) is checked the same way and with gradcheck.
Run: python -m pytest tests/test_logprobs.py -q
"""

import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from megatron_zero.actor.logprobs import (
    vocab_parallel_entropy,
    vocab_parallel_logprobs,
    vocab_parallel_logprobs_entropy,
)

# (padded vocab, true vocab, temperature): no padding; padding inside rank 1's slice at T != 1; rank 1 all padding.
TP_CASES = [(16, 16, 1.0), (16, 13, 0.7), (16, 7, 1.3)]


def reference_logp_entropy(
    logits_full: torch.Tensor, target_ids: torch.Tensor, temperature: float, vocab_size: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Plain float64 full-vocabulary log_softmax over the true vocabulary."""
    logprobs = torch.log_softmax(logits_full[..., :vocab_size].double() / temperature, dim=-1)
    logp = logprobs.gather(-1, target_ids.unsqueeze(-1)).squeeze(-1)
    entropy = -(logprobs.exp() * logprobs).sum(dim=-1)
    return logp, entropy


def make_case(padded_vocab: int, vocab_size: int, seed: int) -> tuple[torch.Tensor, ...]:
    generator = torch.Generator().manual_seed(seed)
    logits = 3 * torch.randn(2, 5, padded_vocab, dtype=torch.float64, generator=generator)
    # Garbage in the padding columns must not leak into the result.
    logits[..., vocab_size:] = 50.0
    target_ids = torch.randint(0, vocab_size, (2, 5), generator=generator)
    weight_logp = torch.randn(2, 5, dtype=torch.float64, generator=generator)
    weight_entropy = torch.randn(2, 5, dtype=torch.float64, generator=generator)
    return logits, target_ids, weight_logp, weight_entropy


def check_against_reference(
    logits_local: torch.Tensor, case: tuple[torch.Tensor, ...], temperature: float, vocab_size: int, tp_group, rank
) -> None:
    """Values and the gradient of a random weighted sum, on this rank's vocabulary slice."""
    logits_full, target_ids, weight_logp, weight_entropy = case
    num_local = logits_local.shape[-1]
    columns = slice(rank * num_local, (rank + 1) * num_local)

    full = logits_full.clone().requires_grad_(True)
    ref_logp, ref_entropy = reference_logp_entropy(full, target_ids, temperature, vocab_size)
    ((weight_logp * ref_logp).sum() + (weight_entropy * ref_entropy).sum()).backward()
    ref_grad_local = full.grad[..., columns]

    local = logits_local.clone().requires_grad_(True)
    logp, entropy = vocab_parallel_logprobs_entropy(
        local, target_ids, tp_group, temperature=temperature, vocab_size=vocab_size
    )
    ((weight_logp * logp).sum() + (weight_entropy * entropy).sum()).backward()
    label = f"rank {rank} vocab {vocab_size} T {temperature}"
    torch.testing.assert_close(logp, ref_logp, rtol=1e-12, atol=1e-12, msg=f"logp, {label}")
    torch.testing.assert_close(entropy, ref_entropy, rtol=1e-12, atol=1e-12, msg=f"entropy, {label}")
    torch.testing.assert_close(local.grad, ref_grad_local, rtol=1e-10, atol=1e-12, msg=f"grad, {label}")

    # The one-output wrappers agree with the joint function, and their gradients with the reference's pieces.
    only_logp = local.detach().clone().requires_grad_(True)
    lp = vocab_parallel_logprobs(only_logp, target_ids, tp_group, temperature=temperature, vocab_size=vocab_size)
    (weight_logp * lp).sum().backward()
    ref_only = logits_full.clone().requires_grad_(True)
    (weight_logp * reference_logp_entropy(ref_only, target_ids, temperature, vocab_size)[0]).sum().backward()
    torch.testing.assert_close(only_logp.grad, ref_only.grad[..., columns], rtol=1e-10, atol=1e-12, msg=label)

    only_entropy = local.detach().clone().requires_grad_(True)
    ent = vocab_parallel_entropy(only_entropy, tp_group, temperature=temperature, vocab_size=vocab_size)
    (weight_entropy * ent).sum().backward()
    ref_only = logits_full.clone().requires_grad_(True)
    (weight_entropy * reference_logp_entropy(ref_only, target_ids, temperature, vocab_size)[1]).sum().backward()
    torch.testing.assert_close(ent, ref_entropy, rtol=1e-12, atol=1e-12, msg=label)
    torch.testing.assert_close(only_entropy.grad, ref_only.grad[..., columns], rtol=1e-10, atol=1e-12, msg=label)


def _tp_worker(rank: int, world_size: int, init_file: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world_size)
    try:
        # An explicit subgroup, as megatron passes its TP group.
        tp_group = dist.new_group(list(range(world_size)))
        for seed, (padded_vocab, vocab_size, temperature) in enumerate(TP_CASES):
            case = make_case(padded_vocab, vocab_size, seed)
            num_local = padded_vocab // world_size
            logits_local = case[0][..., rank * num_local : (rank + 1) * num_local]
            check_against_reference(logits_local, case, temperature, vocab_size, tp_group, rank)
    finally:
        dist.destroy_process_group()


def test_tensor_parallel_two_ranks_match_full_vocab_reference(tmp_path):
    init_file = os.path.join(tmp_path, "dist_init")
    mp.spawn(_tp_worker, args=(2, init_file), nprocs=2, join=True)


@pytest.mark.parametrize("padded_vocab, vocab_size, temperature", TP_CASES)
def test_single_process_matches_reference(padded_vocab, vocab_size, temperature):
    case = make_case(padded_vocab, vocab_size, seed=11)
    check_against_reference(case[0], case, temperature, vocab_size, tp_group=None, rank=0)


def test_gradcheck_single_process_with_temperature_and_padding():
    logits, target_ids, _, _ = make_case(12, 10, seed=3)
    logits = (logits / 3).requires_grad_(True)

    def both(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return vocab_parallel_logprobs_entropy(x, target_ids, None, temperature=0.8, vocab_size=10)

    assert torch.autograd.gradcheck(both, (logits,))


def test_extreme_logits_give_finite_values_and_gradients():
    # exp underflows to exactly 0 for most of the vocabulary: p log p must count as 0, not nan.
    logits = torch.tensor([[0.0, -2000.0, -3000.0, 5.0]], dtype=torch.float32, requires_grad=True)
    target_ids = torch.tensor([1])
    logp, entropy = vocab_parallel_logprobs_entropy(logits, target_ids)
    (logp.sum() + entropy.sum()).backward()
    ref_logp, ref_entropy = reference_logp_entropy(logits.detach(), target_ids, 1.0, 4)
    torch.testing.assert_close(logp.double(), ref_logp)
    torch.testing.assert_close(entropy.double(), ref_entropy)
    assert torch.isfinite(logits.grad).all()


def test_bfloat16_logits_computed_in_float32_and_gradient_in_bfloat16():
    logits, target_ids, _, _ = make_case(16, 16, seed=5)
    logits_bf16 = logits.to(torch.bfloat16).requires_grad_(True)
    logp, entropy = vocab_parallel_logprobs_entropy(logits_bf16, target_ids)
    assert logp.dtype == torch.float32 and entropy.dtype == torch.float32
    ref_logp, _ = reference_logp_entropy(logits_bf16.detach(), target_ids, 1.0, 16)
    torch.testing.assert_close(logp.double(), ref_logp, rtol=1e-5, atol=1e-5)
    logp.sum().backward()
    assert logits_bf16.grad.dtype == torch.bfloat16


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"temperature": 0.0}, "temperature=0.0"),
        ({"vocab_size": 17}, "vocab_size=17"),
        ({"vocab_size": 0}, "vocab_size=0"),
        ({"target_ids": torch.zeros(2, 4, dtype=torch.long)}, "target_ids.shape"),
        ({"target_ids": torch.zeros(2, 5)}, "target_ids.dtype"),
        ({"target_ids": None, "compute_entropy": False}, "nothing to compute"),
    ],
)
def test_bad_arguments_raise_naming_the_problem(kwargs, message):
    logits, target_ids, _, _ = make_case(16, 16, seed=0)
    call = {"target_ids": target_ids, **kwargs}
    with pytest.raises(ValueError, match=message):
        vocab_parallel_logprobs_entropy(logits, call.pop("target_ids"), None, **call)
