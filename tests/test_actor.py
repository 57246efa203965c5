"""Tests of the Megatron actor: log-probs vs HF transformers, optimizer steps across layouts, offload, configs.

Each layout runs once in one spawned job that returns everything the checks need (spawning costs ~5 s of
imports per process). The reference log-probs come from HF transformers in this process, in float64 from
float32 logits; the TP=2 x PP=2 training run must reproduce the TP=1 run with a different token budget, which
also checks that microbatching does not change the loss.

    python -m pytest tests/test_actor.py -q
"""

from __future__ import annotations

import dataclasses

import pytest
import torch

from megatron_zero.actor.batching import ActorBatch, split_by_token_budget
from megatron_zero.config.actor import ActorConfig
from megatron_zero.config.parallel import ParallelConfig
from megatron_zero.parallel.local_launch import run_local_workers

TEMPERATURE = 0.7
NUM_STEPS = 3
SEQ_LENGTH = 16


def make_batch() -> ActorBatch:
    """Right-padded rows with different prompt and response lengths."""
    generator = torch.Generator().manual_seed(0)
    lengths = torch.tensor([9, 14, 6, 12])
    prompt_lengths = torch.tensor([3, 5, 2, 4])
    positions = torch.arange(SEQ_LENGTH).unsqueeze(0)
    tokens = torch.randint(0, 251, (4, SEQ_LENGTH), generator=generator)
    tokens = tokens.masked_fill(positions >= lengths.unsqueeze(1), 0)
    response_mask = (positions >= prompt_lengths.unsqueeze(1)) & (positions < lengths.unsqueeze(1))
    return ActorBatch(tokens=tokens, lengths=lengths, response_mask=response_mask)


def _actor_job(mcore_dir: str, max_tokens_per_microbatch: int, train: bool, pack: bool, model_fields: dict) -> dict:
    """Worker: initial log-probs; with ``train``, NUM_STEPS steps, log-probs after step 1, offload checks."""
    from megatron_zero.actor.actor import MegatronActor, ReferenceModel
    from megatron_zero.config.algorithm import PolicyLossConfig
    from megatron_zero.config.model import ModelConfig

    model_config = ModelConfig(**{"params_dtype": "float32", **model_fields})
    # The full path: DDP, distributed optimizer, gradient clipping at the recipe's 1.0, LR scheduler.
    config = ActorConfig(lr=1e-3, clip_grad=1.0, temperature=TEMPERATURE,
                         max_tokens_per_microbatch=max_tokens_per_microbatch, pack_sequences=pack)
    actor = MegatronActor(config, PolicyLossConfig(kl_coef=1e-2), model_config, mcore_dir)
    batch = make_batch()
    logp, entropy = actor.compute_logprobs(batch)
    result = {"logp": logp, "entropy": entropy, "packing": actor.packing,
              "recompute": actor.model.module.config.recompute_granularity}
    if not train:
        return result
    # Kept in host memory between passes; another token budget than the actor's.
    reference = ReferenceModel(mcore_dir, model_config, dataclasses.replace(
        config, max_tokens_per_microbatch=2 * max_tokens_per_microbatch, offload_reference=True))
    # Stand-ins for Transformer Engine's cached FP8 weight copies (a TE module's _fp8_workspaces dict; the CPU run
    # has megatron-core's local layers): the offload after the reference's pass must drop them.
    reference_cached = next(module for module in reference.model.modules() if hasattr(module, "weight"))
    reference_cached._fp8_workspaces = {"weight": torch.empty(8)}
    ref_logp = reference.compute_logprobs(batch)
    result["reference_offloaded_after_pass"] = reference.offloaded
    result["reference_fp8_workspaces_after_pass"] = dict(reference_cached._fp8_workspaces)
    advantages = torch.randn(batch.tokens.shape, generator=torch.Generator().manual_seed(1))
    train_batch = dataclasses.replace(batch, old_logp=logp, advantages=advantages, ref_logp=ref_logp)
    result.update(ref_logp=ref_logp, metrics=[])
    for step in range(NUM_STEPS):
        result["metrics"].append(actor.train_step(train_batch))
        if step == 0:
            result["logp_after_step"] = actor.compute_logprobs(batch)[0]

    before_offload = actor.compute_logprobs(batch)[0]
    cached = [module for module in actor.model.modules() if hasattr(module, "weight")][-1]
    cached._fp8_workspaces = {"weight": torch.empty(8)}
    result["offload"] = actor.offload()
    result["fp8_workspaces_after_offload"] = dict(cached._fp8_workspaces)
    result["params_freed"] = all(p.untyped_storage().nbytes() == 0 for p in actor.model.parameters())
    result["num_params"] = sum(p.numel() for p in actor.model.parameters())
    errors = {}
    for name, call in (("offload", actor.offload), ("logprobs", lambda: actor.compute_logprobs(batch))):
        try:
            call()
        except RuntimeError as error:
            errors[name] = str(error)
    result["offloaded_errors"] = errors
    result["onload"] = actor.onload()
    result["logp_after_onload_diff"] = float((actor.compute_logprobs(batch)[0] - before_offload).abs().max())
    # Training continues after a round trip (grads and optimizer state came back too).
    result["step_after_onload"] = actor.train_step(train_batch)
    return result


def _run(mcore_dir: str, tp: int, pp: int, max_tokens: int, train: bool, pack: bool = True,
         model_fields: dict | None = None) -> dict:
    per_rank = run_local_workers(_actor_job, ParallelConfig(tensor_parallel_size=tp, pipeline_parallel_size=pp),
                                 args=(mcore_dir, max_tokens, train, pack, model_fields or {}))
    # Every rank must hold the same result (broadcast from the last stage); rank 0 is the first stage.
    for other in per_rank[1:]:
        assert torch.equal(other["logp"], per_rank[0]["logp"])
    return per_rank[0]


@pytest.fixture(scope="module")
def hf_reference(tiny_qwen2):
    return hf_logprobs(tiny_qwen2[0])


def hf_logprobs(hf_dir: str) -> tuple[torch.Tensor, torch.Tensor]:
    """HF transformers log-probs and entropy of make_batch() at TEMPERATURE, float64, zero outside the response."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(hf_dir), dtype=torch.float32).eval()
    batch = make_batch()
    attention_mask = (torch.arange(SEQ_LENGTH).unsqueeze(0) < batch.lengths.unsqueeze(1)).long()
    with torch.no_grad():
        logits = model(input_ids=batch.tokens, attention_mask=attention_mask).logits.double()
    log_probs = torch.log_softmax(logits[:, :-1] / TEMPERATURE, dim=-1)
    logp = log_probs.gather(-1, batch.tokens[:, 1:].unsqueeze(-1)).squeeze(-1)
    entropy = -(log_probs.exp() * log_probs).sum(-1)
    zero = torch.zeros(batch.num_rows, 1, dtype=torch.float64)
    mask = batch.response_mask
    return torch.cat([zero, logp], 1) * mask, torch.cat([zero, entropy], 1) * mask


@pytest.fixture(scope="module")
def trained(tiny_qwen2):
    # Rows of 9, 14, 6 and 12 tokens. TP=1, padded rows, budget 32: microbatches {14, 12} and {9, 6}.
    # TP=2 x PP=2, packed, budget 21: rows {14, 6} and {12, 9}. The two must train identically.
    return {(1, 1): _run(tiny_qwen2[1], 1, 1, 32, train=True, pack=False),
            (2, 2): _run(tiny_qwen2[1], 2, 2, 21, train=True, pack=True)}


def _assert_matches_hf(result: dict, hf_reference) -> None:
    hf_logp, hf_entropy = hf_reference
    assert (result["logp"].double() - hf_logp).abs().max() < 1e-4
    assert (result["entropy"].double() - hf_entropy).abs().max() < 1e-4
    assert result["logp"][make_batch().response_mask].lt(0).all()


@pytest.mark.parametrize("layout", [(1, 1), (2, 2)])
def test_logprobs_match_hf_trained_layouts(trained, hf_reference, layout):
    assert trained[layout]["packing"] == (None if layout == (1, 1) else "dense_mask")
    _assert_matches_hf(trained[layout], hf_reference)
    # The frozen reference model (a second GPTModel from the same checkpoint) gives the same log-probs.
    # It went back to host memory after its pass (actor.offload_reference).
    assert torch.allclose(trained[layout]["ref_logp"], trained[layout]["logp"], atol=1e-6)
    assert trained[layout]["reference_offloaded_after_pass"]


@pytest.mark.parametrize("tp, pp", [(2, 1), (1, 2)])
def test_logprobs_match_hf(tiny_qwen2, hf_reference, tp, pp):
    # Packed, budget 20: rows {14, 6}, {12}, {9}.
    _assert_matches_hf(_run(tiny_qwen2[1], tp, pp, 20, train=False), hf_reference)


def test_optimizer_step_is_layout_packing_and_microbatch_independent(trained):
    single, parallel = trained[(1, 1)], trained[(2, 2)]
    assert [m["num_microbatches"] for m in (single["metrics"][0], parallel["metrics"][0])] == [2.0, 2.0]
    # The step moved the weights, and equally at both layouts.
    assert (single["logp_after_step"] - single["logp"]).abs().max() > 1e-2
    assert (single["logp_after_step"] - parallel["logp_after_step"]).abs().max() < 1e-4
    for ours, theirs in zip(single["metrics"], parallel["metrics"]):
        for name in ("loss", "pg_loss", "kl_ref", "entropy", "clip_fraction", "grad_norm"):
            assert ours[name] == pytest.approx(theirs[name], rel=1e-4, abs=1e-6), name


def test_activation_recomputation_trains_identically(tiny_qwen2, trained):
    # megatron-core's full recomputation reruns each layer's forward in backward: same gradients, less memory.
    recomputed = _run(tiny_qwen2[1], 1, 1, 64, train=True, pack=True,
                      model_fields=dict(recompute_granularity="full", recompute_method="uniform", recompute_num_layers=1))
    assert recomputed["recompute"] == "full" and trained[(1, 1)]["recompute"] is None
    assert (recomputed["logp_after_step"] - trained[(1, 1)]["logp_after_step"]).abs().max() < 1e-5
    assert recomputed["metrics"][-1]["loss"] == pytest.approx(trained[(1, 1)]["metrics"][-1]["loss"], rel=1e-4)


def test_loss_goes_down_and_metrics(trained, hf_reference):
    metrics = trained[(1, 1)]["metrics"]
    losses = [m["loss"] for m in metrics]
    assert losses[0] > losses[1] > losses[2]
    first = metrics[0]
    mask = make_batch().response_mask
    assert first["num_tokens"] == mask.sum()
    # At step 1 the policy is the old policy and the reference: ratio 1, nothing clipped, KL 0, and the
    # token-mean entropy is the HF entropy's mean over response tokens.
    assert first["clip_fraction"] == 0 and first["kl_ref"] == pytest.approx(0, abs=1e-7)
    assert first["entropy"] == pytest.approx(float(hf_reference[1][mask].mean()), rel=1e-5)
    assert metrics[1]["kl_ref"] > 0 and metrics[1]["clip_fraction"] > 0
    assert first["lr"] == 1e-3 and first["grad_norm"] > 0


def test_offload_onload(trained):
    result = trained[(1, 1)]
    offload, onload = result["offload"], result["onload"]
    assert result["params_freed"]
    assert offload.total_bytes == onload.total_bytes and offload.bytes_by_kind == onload.bytes_by_kind
    # fp32: weights and grad buffer the same size (DDP pads its buffers, so at least 4 bytes per parameter);
    # the distributed optimizer's Adam keeps exp_avg and exp_avg_sq (8 bytes per parameter at DP=1) plus
    # small per-group scalars (step counters).
    weights, num_params = offload.bytes_by_kind["weights"], result["num_params"]
    assert weights >= 4 * num_params and offload.bytes_by_kind["grads"] == weights
    assert 0 <= offload.bytes_by_kind["optimizer"] - 8 * num_params <= 8 * offload.num_storages
    assert "already offloaded" in result["offloaded_errors"]["offload"]
    # TE's cached FP8 weight copies (stand-ins here) leave the GPU with the models.
    assert result["fp8_workspaces_after_offload"] == {} == result["reference_fp8_workspaces_after_pass"]
    assert "onload() first" in result["offloaded_errors"]["logprobs"]
    assert result["logp_after_onload_diff"] == 0.0
    assert result["step_after_onload"]["loss"] < result["metrics"][-1]["loss"]


# --------------------------------------------------------------------------- in-process checks


def test_split_by_token_budget_respects_budget():
    generator = torch.Generator().manual_seed(3)
    lengths = torch.randint(1, 50, (37,), generator=generator).tolist()
    for budget in (50, 64, 200, 10_000):
        groups = split_by_token_budget(lengths, budget)
        assert sorted(i for group in groups for i in group) == list(range(len(lengths)))
        assert all(len(group) * max(lengths[i] for i in group) <= budget for group in groups)
    assert len(split_by_token_budget(lengths, 10_000)) == 1
    # A budget of exactly the longest row puts that row alone; rows of half its length pair up.
    assert split_by_token_budget([8, 4, 4, 3], 8) == [[0], [1, 2], [3]]


def test_packed_split_and_microbatch_layout():
    generator = torch.Generator().manual_seed(4)
    lengths = torch.randint(1, 50, (37,), generator=generator).tolist()
    for budget in (50, 64, 200):
        groups = split_by_token_budget(lengths, budget, packed=True)
        assert sorted(i for group in groups for i in group) == list(range(len(lengths)))
        assert all(sum(lengths[i] for i in group) <= budget for group in groups)
    assert split_by_token_budget([9, 14, 6, 12], 21, packed=True) == [[1, 2], [3, 0]]

    batch = make_batch()
    rows = [1, 2, 0]
    microbatch = batch.microbatch(rows, packed=True)
    expected_row = torch.cat([batch.tokens[i, : batch.lengths[i]] for i in rows])
    assert torch.equal(microbatch["model_tokens"], expected_row.unsqueeze(0))
    assert microbatch["cu_seqlens"].tolist() == [0, 14, 20, 29]
    # Brute force: padded entry [k, c] predicts token c + 1 of row k; the packed log-prob j predicts packed
    # token j + 1, so the index must point at that same token.
    for k, row in enumerate(rows):
        for c in range(int(batch.lengths[row]) - 1):
            j = int(microbatch["logp_index"][k, c])
            assert microbatch["model_tokens"][0, j + 1] == batch.tokens[row, c + 1]
            assert j + 1 < int(microbatch["cu_seqlens"][k + 1])  # never reaches into the next sequence


def test_block_causal_mask_matches_brute_force():
    from megatron_zero.actor.packing import block_causal_mask

    cu_seqlens = torch.tensor([0, 3, 4, 8])
    segment = [0, 0, 0, 1, 2, 2, 2, 2]
    mask = block_causal_mask(cu_seqlens)
    assert mask.shape == (1, 1, 8, 8)
    for i in range(8):
        for j in range(8):
            assert bool(mask[0, 0, i, j]) == (j > i or segment[i] != segment[j])


def test_packing_format_and_thd_inputs(caplog):
    from megatron_zero.actor.packing import packed_attention_inputs, packing_format
    from megatron_zero.config.model import ModelConfig
    from megatron_zero.models.registry import get_bridge
    from megatron_zero.models.tiny import tiny_config

    def architecture(name: str, **overrides):
        hf_config = tiny_config(name, **overrides).to_dict()
        return get_bridge(hf_config).parse(hf_config)

    qwen2 = architecture("qwen2")
    assert packing_format(ModelConfig(), qwen2, enabled=True) == "dense_mask"  # no GPU: local layers
    assert packing_format(ModelConfig(), qwen2, enabled=False) is None
    # megatron's local softmax would replace the packing mask by its window mask: padded rows instead.
    assert packing_format(ModelConfig(), architecture("mistral", sliding_window=4096), enabled=True) is None
    assert "sliding window (4096); using padded rows" in caplog.text
    # The GPU path up to the CUDA boundary: the THD parameters TE receives.
    params = packed_attention_inputs(torch.tensor([0, 3, 4, 8]), "thd")["packed_seq_params"]
    assert params.qkv_format == "thd" and params.cu_seqlens_q.dtype == torch.int32
    assert params.cu_seqlens_q.tolist() == params.cu_seqlens_kv.tolist() == [0, 3, 4, 8]
    assert params.max_seqlen_q == params.max_seqlen_kv == 4
    with pytest.raises(ValueError, match="unknown packing format 'bshd'"):
        packed_attention_inputs(torch.tensor([0, 3]), "bshd")


def test_fp8_without_transformer_engine_fails_before_building():
    from megatron_zero.config.model import ModelConfig
    from megatron_zero.models.registry import get_bridge
    from megatron_zero.models.tiny import tiny_config

    hf_config = tiny_config("qwen2").to_dict()
    bridge = get_bridge(hf_config)
    with pytest.raises(ValueError, match=r"model.fp8='e4m3' needs Transformer Engine layers on a GPU.*resolves to 'local'"):
        bridge.transformer_config(bridge.parse(hf_config), ModelConfig(fp8="e4m3"))


def test_budget_smaller_than_a_sequence_fails_fast():
    with pytest.raises(ValueError, match=r"max_tokens_per_microbatch=10 is smaller than one sequence of 14 tokens"):
        split_by_token_budget(make_batch().lengths, 10)


@pytest.mark.parametrize("fields, message", [
    (dict(lr=0.0), r"actor.lr=0.0 must be > 0"),
    (dict(lr=1e-6, min_lr=1e-5), r"actor.min_lr=1e-05 must be in \[0, actor.lr"),
    (dict(adam_beta2=1.0), r"actor.adam_beta2=1.0 must be in \[0, 1\)"),
    (dict(clip_grad=-1.0), r"actor.clip_grad=-1.0 must be >= 0"),
    (dict(lr_schedule="linear"), r"actor.lr_schedule='linear' is unknown; use one of \['constant', 'cosine'\]"),
    (dict(lr_schedule="cosine"), r"actor.lr_schedule='cosine' needs actor.lr_decay_steps"),
    (dict(max_tokens_per_microbatch=0), r"actor.max_tokens_per_microbatch=0 must be an integer >= 1"),
    (dict(temperature=0.0), r"actor.temperature=0.0 must be > 0"),
])
def test_bad_config_names_field_and_fix(fields, message):
    with pytest.raises(ValueError, match=message):
        ActorConfig(**fields)


def test_config_works_with_omegaconf():
    from omegaconf import OmegaConf

    config = OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(ActorConfig), {"lr": 1e-6}))
    assert config == ActorConfig(lr=1e-6)


def test_bad_batch_fails_fast():
    batch = make_batch()
    with pytest.raises(ValueError, match="response_mask row 0 marks position 0 or padding"):
        dataclasses.replace(batch, response_mask=batch.response_mask.clone().index_fill_(1, torch.tensor([0]), True))
    with pytest.raises(ValueError, match=r"batch.old_logp.shape=\(4, 3\) must equal tokens.shape=\(4, 16\)"):
        dataclasses.replace(batch, old_logp=torch.zeros(4, 3))
