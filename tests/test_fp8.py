"""Transformer Engine and FP8 paths, checked on CPU up to where TE itself would run.

* Checkpoints load into layers that carry ``_extra_state`` as TE's do (``models/common/spec.py``): only
  ``._extra_state`` entries may be missing or unexpected, every other key stays strict. TE needs CUDA, so the
  stand-in is megatron-core's own local attention with TE's ``get_extra_state`` / ``set_extra_state`` contract
  (``TransformerEngineBaseModule`` in TE 2.x's ``transformer_engine/pytorch/module/base.py``: a uint8 tensor,
  empty without FP8 state), left out of the sharded state dict as megatron's ``TEDotProductAttention`` leaves it.
* FP8 microbatch padding (``actor/batching.py``): the model's rows are multiples of the recipe's token multiple,
  the loss layout is unchanged, and an actor step on padded microbatches gives the loss, log-probs and gradients
  of the unpadded one, bit for bit (megatron-core's local layers, float32). FP8 itself needs a GPU, so the
  padding a recipe asks for is set on the actor directly; ``tests/test_gpu.py`` runs the recipes on TE layers.
* ``model.fp8`` / ``model.fp8_recipe`` validation.

    python -m pytest tests/test_fp8.py -q
"""

from __future__ import annotations

import dataclasses

import pytest
import torch

from megatron_zero.actor.batching import ActorBatch, fp8_token_multiple, split_by_token_budget
from megatron_zero.config.model import FP8_RECIPE_TOKEN_MULTIPLES, ModelConfig
from megatron_zero.config.parallel import ParallelConfig
from megatron_zero.parallel.local_launch import run_local_workers

# Rows of 9, 14, 6 and 12 tokens (41 in all): none is a multiple of 16.
LENGTHS = (9, 14, 6, 12)
MULTIPLES = (1, 16, 128)
# One microbatch at every multiple, packed (41 -> 48 or 128 tokens) or padded (4 rows x 14 -> 16 or 128 columns).
BUDGET = 512


def make_batch() -> ActorBatch:
    generator = torch.Generator().manual_seed(0)
    lengths = torch.tensor(LENGTHS)
    positions = torch.arange(16).unsqueeze(0)
    tokens = torch.randint(1, 251, (4, 16), generator=generator).masked_fill(positions >= lengths.unsqueeze(1), 0)
    response_mask = (positions >= 3) & (positions < lengths.unsqueeze(1))
    return ActorBatch(tokens=tokens, lengths=lengths, response_mask=response_mask,
                      advantages=torch.randn(4, 16, generator=generator))


class _ExtraStateModule(torch.nn.Module):
    """A linear layer with extra state as TE's modules keep it (module docstring)."""

    def __init__(self) -> None:
        super().__init__()
        self.weight = torch.nn.Parameter(torch.randn(4, 4))
        self.loaded_extra_state: list = []

    def get_extra_state(self) -> torch.Tensor:
        return torch.empty(0, dtype=torch.uint8)

    def set_extra_state(self, state) -> None:
        self.loaded_extra_state.append(state)


# --------------------------------------------------------------------------- in-process checks


def test_state_dict_load_allows_only_extra_state_to_differ():
    from megatron_zero.models.common.spec import load_state_dict_allowing_extra_state

    source = torch.nn.ModuleDict({"a": _ExtraStateModule(), "b": torch.nn.Linear(4, 4)})
    weights = {key: value for key, value in source.state_dict().items() if not key.endswith("._extra_state")}
    assert "a._extra_state" in source.state_dict() and "a._extra_state" not in weights
    with pytest.raises(RuntimeError, match=r'Missing key\(s\) in state_dict: "a._extra_state"'):
        torch.nn.ModuleDict({"a": _ExtraStateModule(), "b": torch.nn.Linear(4, 4)}).load_state_dict(weights)

    target = torch.nn.ModuleDict({"a": _ExtraStateModule(), "b": torch.nn.Linear(4, 4)})
    load_state_dict_allowing_extra_state(target, {**weights, "gone._extra_state": torch.empty(0)})
    assert all(torch.equal(target.state_dict()[key], value) for key, value in weights.items())
    assert target["a"].loaded_extra_state == []  # none in the checkpoint: the module keeps its own
    saved = torch.arange(3, dtype=torch.uint8)
    load_state_dict_allowing_extra_state(target, {**weights, "a._extra_state": saved})
    assert target["a"].loaded_extra_state == [saved]

    for broken, name in (({k: v for k, v in weights.items() if k != "b.bias"}, "lacks: ['b.bias']"),
                         ({**weights, "c.weight": torch.zeros(1)}, "model lacks: ['c.weight']")):
        with pytest.raises(KeyError, match=name.replace("[", r"\[").replace("]", r"\]")):
            load_state_dict_allowing_extra_state(target, broken)
    with pytest.raises(RuntimeError, match="size mismatch for b.weight"):
        load_state_dict_allowing_extra_state(target, {**weights, "b.weight": torch.zeros(4, 5)})


def test_fp8_recipe_config():
    # Every recipe megatron-core's TransformerConfig takes (but "custom"), each with its TE token multiple.
    assert FP8_RECIPE_TOKEN_MULTIPLES == {"delayed": 16, "tensorwise": 16, "mxfp8": 32, "blockwise": 128}
    for recipe, multiple in FP8_RECIPE_TOKEN_MULTIPLES.items():
        config = ModelConfig(fp8="hybrid", fp8_recipe=recipe)
        assert fp8_token_multiple(config) == multiple
    assert fp8_token_multiple(ModelConfig()) == 1
    with pytest.raises(ValueError, match=r"model.fp8_recipe='current' is not supported; use one of \['delayed', "
                                         r"'tensorwise', 'mxfp8', 'blockwise'\]"):
        ModelConfig(fp8="e4m3", fp8_recipe="current")
    with pytest.raises(ValueError, match=r"model.fp8_recipe='mxfp8' has no effect without model.fp8; set model.fp8 "
                                         r"to one of \['e4m3', 'hybrid'\]"):
        ModelConfig(fp8_recipe="mxfp8")
    with pytest.raises(ValueError, match=r"model.fp8='e5m2' is not supported"):
        ModelConfig(fp8="e5m2")


@pytest.mark.parametrize("multiple", [16, 32, 128])
def test_microbatch_padding_layout(multiple):
    batch, rows = make_batch(), [1, 2, 0, 3]
    packed, plain = batch.microbatch(rows, packed=True, token_multiple=multiple), batch.microbatch(rows, packed=True)
    # The packed row: a multiple of tokens, the real ones as before, then one sequence of padding (token 0).
    num_tokens = sum(LENGTHS)
    padded_tokens = -(-num_tokens // multiple) * multiple
    assert packed["model_tokens"].shape == (1, padded_tokens)
    assert torch.equal(packed["model_tokens"][:, :num_tokens], plain["model_tokens"])
    assert packed["model_tokens"][0, num_tokens:].eq(0).all()
    assert packed["cu_seqlens"].tolist() == [*plain["cu_seqlens"].tolist(), padded_tokens]
    # The loss layout is the unpadded one, so the padding has no loss mask at all; no loss entry reads the padding.
    for name in ("tokens", "response_mask", "advantages", "logp_index"):
        assert torch.equal(packed[name], plain[name]), name
    assert int(packed["logp_index"].max()) + 1 < num_tokens

    padded, unpadded = batch.microbatch(rows, token_multiple=multiple), batch.microbatch(rows)
    assert padded["model_tokens"].shape == (4, multiple) and padded["model_tokens"].numel() % multiple == 0
    assert torch.equal(padded["model_tokens"][:, :14], unpadded["tokens"])
    assert padded["model_tokens"][:, 14:].eq(0).all()
    assert padded.keys() - {"model_tokens"} == unpadded.keys()
    assert all(torch.equal(padded[name], unpadded[name]) for name in unpadded)
    # Without FP8 nothing changes.
    assert "model_tokens" not in unpadded


def test_token_budget_counts_fp8_padding():
    # Packed: 14 + 12 = 26 tokens pad to 32 > 31, so 12 goes elsewhere.
    assert split_by_token_budget(LENGTHS, 31, packed=True) == [[1, 3], [0, 2]]
    assert split_by_token_budget(LENGTHS, 31, packed=True, token_multiple=16) == [[1], [3], [0, 2]]
    # Padded rows: two rows of 14 pad to 2 x 16 = 32 > 31.
    assert split_by_token_budget(LENGTHS, 31) == [[1, 3], [0, 2]]
    assert split_by_token_budget(LENGTHS, 31, token_multiple=16) == [[1], [3], [0], [2]]
    with pytest.raises(ValueError, match=r"max_tokens_per_microbatch=100 is smaller than one sequence of 14 tokens "
                                         r"\(row 1\), 128 once padded to FP8's multiple of 128; raise it to at least "
                                         r"max prompt \+ max response length, rounded up to that multiple"):
        split_by_token_budget(LENGTHS, 100, token_multiple=128)


# --------------------------------------------------------------------------- megatron-core on CPU (one job)


def _cpu_job(mcore_dir: str) -> dict:
    """Worker (one process): the extra-state checkpoint loads and the FP8-padded actor steps."""
    from megatron.core.dist_checkpointing.core import CheckpointingException
    from megatron.core.dist_checkpointing.mapping import ShardedObject, ShardedTensor
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
    from megatron.core.transformer.dot_product_attention import DotProductAttention

    import megatron_zero.models.common.bridge as bridge_module
    from megatron_zero.actor.actor import MegatronActor
    from megatron_zero.config.actor import ActorConfig
    from megatron_zero.config.algorithm import PolicyLossConfig
    from megatron_zero.models.common.spec import load_checkpoint_allowing_extra_state
    from megatron_zero.models.mcore_checkpoint import load_mcore_weights, read_checkpoint_info

    result: dict = {}
    info = read_checkpoint_info(mcore_dir)
    model_config = ModelConfig(params_dtype="float32")

    class ExtraStateAttention(DotProductAttention):
        """megatron's local attention with TE's extra-state contract (module docstring)."""

        def get_extra_state(self) -> torch.Tensor:
            return torch.empty(0, dtype=torch.uint8)

        def set_extra_state(self, state) -> None:
            self.loaded_extra_state = state

    class ExtraParameterAttention(DotProductAttention):
        """One more weight that no checkpoint has: must not load silently."""

        def __init__(self, *args, **kwargs) -> None:
            super().__init__(*args, **kwargs)
            self.extra_scale = torch.nn.Parameter(torch.ones(4))

    def build(core_attention: type):
        spec = get_gpt_layer_local_spec(normalization="RMSNorm")
        spec.submodules.self_attention.submodules.core_attention = core_attention
        original, bridge_module.gpt_layer_spec = bridge_module.gpt_layer_spec, lambda config: spec
        try:
            return info.bridge.build_model(info.arch, model_config)
        finally:
            bridge_module.gpt_layer_spec = original

    reference = info.bridge.build_model(info.arch, model_config)
    load_mcore_weights(reference, mcore_dir)
    with_extra_state = build(ExtraStateAttention)
    keys = set(with_extra_state.state_dict())
    result["extra_state_keys"] = sorted(keys - set(reference.state_dict()))
    try:  # what the loader did before: strict torch loading of what the checkpoint has
        with_extra_state.load_state_dict(reference.state_dict(), strict=True)
    except RuntimeError as error:
        result["strict_error"] = str(error)
    load_mcore_weights(with_extra_state, mcore_dir)
    result["weights_equal"] = all(torch.equal(value, with_extra_state.state_dict()[key])
                                  for key, value in reference.state_dict().items() if not key.endswith("_extra_state"))
    result["extra_state_set"] = [hasattr(layer.self_attention.core_attention, "loaded_extra_state")
                                 for layer in with_extra_state.decoder.layers]
    try:
        load_mcore_weights(build(ExtraParameterAttention), mcore_dir)
    except KeyError as error:
        result["extra_parameter_error"] = error.args[0]
    # At the dist_checkpointing level: a requested object the checkpoint lacks is allowed for extra state only.
    sharded = reference.sharded_state_dict()
    sharded["decoder.final_layernorm._extra_state"] = ShardedObject("decoder.final_layernorm._extra_state", None,
                                                                    (1,), (0,), replica_id=0)
    load_checkpoint_allowing_extra_state(sharded, mcore_dir)
    sharded["decoder.final_layernorm.extra"] = ShardedTensor.from_rank_offsets("decoder.final_layernorm.extra",
                                                                               torch.zeros(4), replica_id=0)
    try:
        load_checkpoint_allowing_extra_state(sharded, mcore_dir)
    except CheckpointingException as error:
        result["extra_tensor_error"] = str(error)

    # FP8 padding: the same step at every token multiple, from the same weights.
    batch = make_batch()
    for pack in (True, False):
        actor = MegatronActor(ActorConfig(lr=1e-3, clip_grad=0.0, max_tokens_per_microbatch=BUDGET,
                                          pack_sequences=pack), PolicyLossConfig(kl_coef=0.0), model_config, mcore_dir)
        initial = [param.detach().clone() for param in actor.model.parameters()]
        shapes: list = []
        actor.model.module.register_forward_pre_hook(
            lambda module, args, kwargs: shapes.append(tuple(kwargs["input_ids"].shape)), with_kwargs=True)
        old_logp = actor.compute_logprobs(batch)[0]
        for multiple in MULTIPLES:
            with torch.no_grad():
                for param, value in zip(actor.model.parameters(), initial):
                    param.copy_(value)
            # The multiple fp8_token_multiple gives an FP8 recipe, on layers that run here.
            actor.token_multiple = multiple
            shapes.clear()
            logp = actor.compute_logprobs(batch)[0]
            metrics = actor.train_step(dataclasses.replace(batch, old_logp=old_logp))
            result[pack, multiple] = {"logp": logp, "loss": metrics["loss"], "num_tokens": metrics["num_tokens"],
                                      "grads": torch.cat([buffer.grad_data.clone() for buffer in actor.model.buffers]),
                                      "shapes": list(shapes)}
        # The control: another advantage on one response token moves the gradients well beyond the tolerance.
        with torch.no_grad():
            for param, value in zip(actor.model.parameters(), initial):
                param.copy_(value)
        actor.token_multiple = 1
        advantages = batch.advantages.clone()
        advantages[1, 5] += 1.0
        actor.train_step(dataclasses.replace(batch, old_logp=old_logp, advantages=advantages))
        result[pack, "control"] = torch.cat([buffer.grad_data.clone() for buffer in actor.model.buffers])
    return result


@pytest.fixture(scope="module")
def cpu_run(tiny_qwen2) -> dict:
    return run_local_workers(_cpu_job, ParallelConfig(), args=(tiny_qwen2[1],))[0]


def test_converted_checkpoint_loads_into_layers_with_extra_state(cpu_run):
    # The stand-in has the state TE's attention has, and the converted checkpoint lacks it: strict loading failed.
    assert cpu_run["extra_state_keys"] == [f"decoder.layers.{i}.self_attention.core_attention._extra_state"
                                           for i in range(2)]
    assert "Missing key(s) in state_dict: \"decoder.layers.0.self_attention.core_attention._extra_state\"" in \
        cpu_run["strict_error"]
    assert cpu_run["weights_equal"]
    assert cpu_run["extra_state_set"] == [False, False]  # nothing to load: the layers keep their own


def test_any_other_missing_key_still_fails(cpu_run):
    assert "keys the model has and the checkpoint lacks: ['decoder.layers.0.self_attention.core_attention." \
           "extra_scale', 'decoder.layers.1.self_attention.core_attention.extra_scale']" in cpu_run[
               "extra_parameter_error"]
    assert "keys the model has and the checkpoint lacks: ['decoder.final_layernorm.extra']" in \
        cpu_run["extra_tensor_error"]


@pytest.mark.parametrize("pack", [True, False], ids=["packed", "padded"])
def test_fp8_padding_changes_neither_loss_nor_gradients(cpu_run, pack):
    unpadded = cpu_run[pack, 1]
    difference = (cpu_run[pack, "control"] - unpadded["grads"]).abs().max()
    for multiple in MULTIPLES[1:]:
        padded = cpu_run[pack, multiple]
        # The model ran on multiples of the FP8 token count: one microbatch for log-probs, one for the step.
        assert len(padded["shapes"]) == 2 and all(rows * columns % multiple == 0 for rows, columns in padded["shapes"])
        assert padded["shapes"] != unpadded["shapes"]
        assert padded["num_tokens"] == unpadded["num_tokens"] == make_batch().response_mask.sum()
        # The real tokens' arithmetic is the same and the padding's is dropped: equal up to float32 rounding. Not bit
        # for bit: a longer padded row is a longer reduction in attention (masked keys add exact zeros), and MKL may
        # block it differently by length; on an AMD EPYC (avx512) CI machine the loss moved by 3.7e-7 relative,
        # already before this test's code changed. The control below shows what a leak of the padding would do.
        scale = unpadded["grads"].abs().max()
        assert padded["loss"] == pytest.approx(unpadded["loss"], rel=1e-5)
        torch.testing.assert_close(padded["logp"], unpadded["logp"], rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(padded["grads"], unpadded["grads"], rtol=1e-5, atol=1e-5 * float(scale))
    assert difference > 0.1 * unpadded["grads"].abs().max()
