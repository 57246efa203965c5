"""Tests of actor checkpoints: saved at one TP x PP layout, resumed at another, the run continues exactly.

Every run trains a tiny tied Qwen2 actor on one fixed batch. Uninterrupted runs at TP=1 x DP=2 and TP=2
save after step 1 and go on to step 2; runs at TP=2 x PP=2 and TP=1 x PP=2 load those checkpoints (and one
re-saved at TP=2 x PP=2) and train step 2. The gathered HF weights after step 2 must match the
uninterrupted run's to float32 rounding, relative to what the two steps changed, which needs the Adam
moments, the Adam step, the cosine LR schedule and the step count to have come back; a resume with
Adam's state forgotten (the negative control) differs at the scale of the update. Spawning costs ~5 s of
imports per process, so each layout is one job that runs a short script of steps, saves and loads.

Where megatron-core itself has a bug on this path, ``test_megatron_core_bugs_match_their_switches`` shows it
present exactly where ``megatron_zero.actor.mcore_bugs`` switches its workaround on, on each CI stack.

    python -m pytest tests/test_actor_checkpoint.py -q
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Optional

import pytest
import torch

from megatron_zero.actor.batching import ActorBatch
from megatron_zero.config.actor import ActorConfig
from megatron_zero.config.parallel import ParallelConfig
from megatron_zero.parallel.local_launch import run_local_workers

# Cosine decay over 3 steps: step 2 runs at a lower LR than step 1, so a lost schedule shows. adam_eps=1e-3
# (about the median gradient): Adam moves an element by at most lr/eps times its gradient. With the default
# 1e-8, elements whose gradient is at float32 rounding level change sign between layouts (other reduction
# orders) and move by about +-lr either way, which no checkpoint can fix (measured: uninterrupted runs at
# TP=2 and PP=2 differ by 1e-2 of the update at eps=1e-8, by 2e-5 at eps=1e-3).
ACTOR_CONFIG = ActorConfig(lr=1e-3, clip_grad=1.0, lr_schedule="cosine", lr_decay_steps=3, adam_eps=1e-3,
                           max_tokens_per_microbatch=32)
# Resumed vs uninterrupted, as a fraction of the largest weight change of the two steps. Measured: 2e-5 to
# 4e-5, as between uninterrupted runs at two layouts; the forgotten-Adam control is at 0.6.
TOLERANCE = 3e-4


def make_batch() -> ActorBatch:
    generator = torch.Generator().manual_seed(0)
    lengths = torch.tensor([9, 14, 6, 12])
    positions = torch.arange(16).unsqueeze(0)
    tokens = torch.randint(0, 251, (4, 16), generator=generator).masked_fill(positions >= lengths.unsqueeze(1), 0)
    response_mask = (positions >= 3) & (positions < lengths.unsqueeze(1))
    return ActorBatch(tokens=tokens, lengths=lengths, response_mask=response_mask,
                      advantages=torch.randn(4, 16, generator=generator))


def _gather_weights(actor, mcore_dir: str) -> Optional[dict[str, torch.Tensor]]:
    """The full model in HF names on rank 0 (None elsewhere)."""
    from megatron_zero.models.mcore_checkpoint import read_checkpoint_info
    from megatron_zero.parallel.reshard import HFWeightStream

    info = read_checkpoint_info(mcore_dir)
    stream = HFWeightStream(actor.model, info.arch, info.bridge, bucket_bytes=1 << 30)
    weights = {name: tensor.clone() for bucket in stream for name, tensor in bucket}
    return weights if stream.is_sender else None


def _save_old_format(actor, checkpoint_dir: Path) -> None:
    """What megatron-zero wrote before: the "dp_reshardable" optimizer format, no content metadata."""
    from megatron.core import dist_checkpointing

    model_state = actor.model.module.sharded_state_dict()
    optimizer_state = actor.optimizer.sharded_state_dict(
        model_state, metadata={"distrib_optim_sharding_type": "dp_reshardable"})
    checkpoint_dir.mkdir(parents=True, exist_ok=True)
    dist_checkpointing.save({"model": model_state, "optimizer": optimizer_state,
                             "scheduler": actor.scheduler.state_dict(), "num_steps": actor.num_steps},
                            str(checkpoint_dir))


def _convert(pairs: list[tuple[str, str]]) -> None:
    """Worker (one process): convert each (HF dir, Megatron dir) pair."""
    from megatron_zero.models.mcore_checkpoint import convert_hf_to_mcore

    for hf_dir, mcore_dir in pairs:
        convert_hf_to_mcore(hf_dir, mcore_dir)


def _script_job(mcore_dir: str, batch: Optional[ActorBatch], script: list[tuple[str, str]]) -> dict:
    """Worker: build the actor, then run ``script``, a list of
    (action, argument): ("step", name) trains one step and records it under ``name`` if not empty (weights,
    LR, step count); ("save" | "save_old_format" | "load", dir); ("forget_adam", ""); ("load_fails", dir)
    records the ValueError's message under ``dir``; ("build", mcore_dir) replaces the actor. Without
    ``batch`` the fixed batch is made here, with the initial policy's log-probs."""
    from megatron_zero.actor.actor import MegatronActor
    from megatron_zero.config.algorithm import PolicyLossConfig
    from megatron_zero.config.model import ModelConfig

    def build(model_dir: str) -> MegatronActor:
        return MegatronActor(ACTOR_CONFIG, PolicyLossConfig(kl_coef=0.0), ModelConfig(params_dtype="float32"),
                             model_dir)

    actor = build(mcore_dir)
    result: dict = {}
    if batch is None:
        batch = dataclasses.replace(make_batch(), old_logp=actor.compute_logprobs(make_batch())[0])
        result.update(batch=batch, initial=_gather_weights(actor, mcore_dir))
    for action, argument in script:
        if action == "step":
            lr = actor.train_step(batch)["lr"]
            if argument:
                result[argument] = {"weights": _gather_weights(actor, mcore_dir), "lr": lr,
                                    "num_steps": actor.num_steps}
        elif action == "save":
            actor.save_checkpoint(Path(argument))
        elif action == "save_old_format":
            _save_old_format(actor, Path(argument))
        elif action == "load":
            actor.load_checkpoint(Path(argument))
        elif action == "forget_adam":
            for optimizer in actor.optimizer.chained_optimizers:
                optimizer.optimizer.state.clear()
        elif action == "build":
            actor = build(argument)
        elif action == "load_fails":
            try:
                actor.load_checkpoint(Path(argument))
            except ValueError as error:
                result[argument] = str(error)
        else:
            raise ValueError(f"unknown script action {action!r}")
    return result


def _run(mcore_dir: str, tp: int, pp: int, script: list[tuple[str, str]], batch: Optional[ActorBatch] = None,
         dp: int = 1) -> dict:
    # Every data-parallel rank gets the same batch: the global batch is it repeated, the same gradient.
    return run_local_workers(_script_job, ParallelConfig(tensor_parallel_size=tp, pipeline_parallel_size=pp),
                             world_size=tp * pp * dp, args=(mcore_dir, batch, script))[0]


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict[str, dict]:
    from megatron_zero.models.tiny import save_tiny_model

    root = tmp_path_factory.mktemp("actor_checkpoint")
    # Tied embeddings: at PP=2 the output layer is a second copy of the embedding, on the last stage, and the
    # embedding gets a DDP bucket of its own (which megatron-core 0.16.1's save got wrong, see checkpointing).
    hf_dir = save_tiny_model("qwen2", root / "hf")
    # Another model: the same but a wider MLP.
    wide_hf_dir = save_tiny_model("qwen2", root / "wide_hf", intermediate_size=128)
    names = ("mcore", "wide_mcore", "dp2", "tp2", "tp2pp2", "old")
    mcore, wide_mcore, dp2, tp2, tp2pp2, old = (str(root / name) for name in names)
    run_local_workers(_convert, ParallelConfig(), args=([(str(hf_dir), mcore), (str(wide_hf_dir), wide_mcore)],))
    # TP=1 x PP=1 at DP=2: the distributed optimizer's state is split over the two ranks.
    runs = {"dp2": _run(mcore, 1, 1, [("step", ""), ("save", dp2), ("step", "step2"), ("load", dp2),
                                      ("step", "reloaded_step2")], dp=2)}
    batch = runs["dp2"]["batch"]
    runs["tp2"] = _run(mcore, 2, 1, [("step", ""), ("save", tp2), ("save_old_format", old), ("step", "step2")],
                       batch)
    runs["tp2pp2"] = _run(mcore, 2, 2, [("load", dp2), ("save", tp2pp2), ("step", "from_dp2"), ("load", dp2),
                                        ("forget_adam", ""), ("step", "forgot_adam")], batch)
    runs["tp1pp2"] = _run(mcore, 1, 2, [("load", tp2), ("step", "from_tp2"), ("load", tp2pp2),
                                        ("step", "from_tp2pp2"), ("load_fails", old), ("build", wide_mcore),
                                        ("load_fails", tp2)], batch)
    runs["paths"] = {"old": old, "tp2": tp2}
    return runs


def _relative_difference(weights: dict[str, torch.Tensor], reference: dict[str, torch.Tensor],
                         initial: dict[str, torch.Tensor]) -> float:
    """max |weights - reference| over all tensors, over the largest change of the reference from ``initial``."""
    assert weights.keys() == reference.keys() == initial.keys()
    difference = max(float((weights[name] - reference[name]).abs().max()) for name in reference)
    change = max(float((reference[name] - initial[name]).abs().max()) for name in reference)
    assert change > 1e-4, "the two steps did not move the weights"
    return difference / change


@pytest.mark.parametrize("resumed, uninterrupted", [
    (("tp2pp2", "from_dp2"), "dp2"),     # TP=1 x PP=1 x DP=2 -> TP=2 x PP=2
    (("tp1pp2", "from_tp2"), "tp2"),     # TP=2 x PP=1 -> TP=1 x PP=2
    (("tp1pp2", "from_tp2pp2"), "dp2"),  # DP=2 -> TP=2 x PP=2 (re-saved there) -> TP=1 x PP=2
], ids=["tp1dp2-to-tp2pp2", "tp2-to-tp1pp2", "tp2pp2-to-tp1pp2"])
def test_resume_at_another_layout_continues_exactly(runs, resumed, uninterrupted):
    step, reference = runs[resumed[0]][resumed[1]], runs[uninterrupted]["step2"]
    assert step["num_steps"] == reference["num_steps"] == 2
    # The cosine schedule went on from step 1: step 2's LR, lower than step 1's.
    assert step["lr"] == reference["lr"] < ACTOR_CONFIG.lr
    assert _relative_difference(step["weights"], reference["weights"], runs["dp2"]["initial"]) < TOLERANCE


def test_forgotten_adam_state_is_caught(runs):
    """The negative control: the same weights, LR and step count, but Adam's moments and step lost."""
    step, reference = runs["tp2pp2"]["forgot_adam"], runs["dp2"]["step2"]
    assert step["lr"] == reference["lr"]
    assert _relative_difference(step["weights"], reference["weights"], runs["dp2"]["initial"]) > 100 * TOLERANCE


def test_tolerance_is_the_layouts_and_same_layout_reload_is_exact(runs):
    # Uninterrupted runs at TP=1 x DP=2 and TP=2 agree to the tolerance: it is about layout, not resumption...
    initial, dp2 = runs["dp2"]["initial"], runs["dp2"]["step2"]["weights"]
    assert _relative_difference(runs["tp2"]["step2"]["weights"], dp2, initial) < TOLERANCE
    # ...and at the same layout a reloaded step 2 (loaded into the actor that had gone on) is bit for bit.
    reloaded = runs["dp2"]["reloaded_step2"]["weights"]
    assert all(torch.equal(reloaded[name], dp2[name]) for name in dp2)


def test_old_format_checkpoint_fails_clearly(runs):
    message = runs["tp1pp2"][runs["paths"]["old"]]
    assert "format 'dp_reshardable', written at an unrecorded layout" in message
    assert "this actor (TP=1 x PP=2 x DP=1) loads only the 'fully_reshardable' checkpoints" in message


def test_checkpoint_of_another_model_fails_clearly(runs):
    message = runs["tp1pp2"][runs["paths"]["tp2"]]
    assert "(saved at TP=2 x PP=1 x DP=1) does not fit this actor at TP=1 x PP=2 x DP=1" in message
    assert "decoder.layers.mlp.linear_fc1.weight" in message


def _megatron_bugs_job(mcore_dir: str) -> dict:
    """Worker (one process): run megatron-core's own code where ``mcore_bugs`` names a bug; return what it did."""
    import megatron.core
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig
    from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
    from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler

    from megatron_zero.actor.actor import load_model
    from megatron_zero.actor.checkpointing import _param_state
    from megatron_zero.config.model import ModelConfig

    module, _ = load_model(mcore_dir, ModelConfig(params_dtype="float32"))
    # Small buckets: several per buffer, each padded at its end (the actor's DDP has one bucket at PP=1; the tied
    # embedding's own bucket at PP > 1 is the case that corrupted a checkpoint).
    ddp = DistributedDataParallel(config=module.config, module=module, ddp_config=DistributedDataParallelConfig(
        use_distributed_optimizer=True, overlap_grad_reduce=True, bucket_size=20_000))
    chained = get_megatron_optimizer(OptimizerConfig(optimizer="adam", lr=1e-3, min_lr=0.0, params_dtype=torch.float32,
                                                     use_distributed_optimizer=True), [ddp])
    (optimizer,) = chained.chained_optimizers
    optimizer._init_optimizer_states_with_dummy_values()
    seen: dict = {"version": megatron.core.__version__, "num_buckets": len(optimizer.buffers[0].buckets)}

    names = {param: name for name, param in module.named_parameters()}
    in_state_order = [param for buffer in optimizer.buffers for param in buffer.param_index_map]
    model_state = module.sharded_state_dict()

    def misplaced(param_state: dict) -> list[str]:
        # Without mixed precision the saved main param of each parameter is the parameter itself.
        return [names[param] for param, tensors in zip(in_state_order, param_state.values(), strict=True)
                if not torch.equal(tensors["param"].data, param.data)]

    seen["megatron_misplaced"] = misplaced(optimizer.sharded_param_state_fully_reshardable(model_state, metadata={}))
    ours = _param_state(optimizer, model_state, is_loading=False)
    seen["ours_misplaced"] = misplaced(ours)
    try:
        optimizer.load_parameter_state_from_fully_reshardable(
            {index: {name: tensor.data.clone() for name, tensor in tensors.items()} for index, tensors in ours.items()})
        seen["param_state_load_error"] = None
    except KeyError as error:
        seen["param_state_load_error"] = repr(error)
    chained.load_state_dict(chained.state_dict())
    steps = [state["step"] for state in optimizer.optimizer.state.values()]
    seen["num_steps"], seen["num_step_tensors"] = len(steps), len({id(step) for step in steps})

    scheduler = OptimizerParamScheduler(chained, init_lr=0.0, max_lr=1e-3, min_lr=0.0, lr_warmup_steps=1,
                                        lr_decay_steps=10, lr_decay_style="cosine", start_wd=0.0, end_wd=0.0,
                                        wd_incr_steps=1, wd_incr_style="constant")
    scheduler.step(increment=3)
    saved = scheduler.state_dict()
    scheduler.step(increment=2)
    scheduler.load_state_dict(saved)
    seen["scheduler_steps_after_loading_3"] = scheduler.num_steps
    return seen


def test_megatron_core_bugs_match_their_switches(tiny_qwen2):
    """Each bug ``mcore_bugs`` switches a workaround on for is present in this megatron-core, and absent where
    the switch is off: a release that fixes one fails here (set its ``fixed_in``) instead of running a workaround
    nobody needs, and one the switch wrongly calls fixed fails here before it corrupts a resume."""
    from packaging.version import Version

    from megatron_zero.actor import mcore_bugs

    seen = run_local_workers(_megatron_bugs_job, ParallelConfig(), args=(tiny_qwen2[1],))[0]
    version = seen["version"]
    # megatron-core appends `git rev-parse HEAD` of whatever checkout its files sit in (CI's venv lives inside
    # ours, so it reads "0.19.2+<our commit>"); the release is what the switches are keyed on.
    assert Version(version).release == mcore_bugs.MCORE_VERSION.release
    assert seen["num_buckets"] > 1
    assert seen["ours_misplaced"] == []  # our cut is right whatever megatron-core does
    assert bool(seen["megatron_misplaced"]) == mcore_bugs.FULLY_RESHARDABLE_SAVE_SHIFTS_PARAMS, (
        f"megatron-core {version}'s fully_reshardable save misplaced {seen['megatron_misplaced']}")
    copies_step = mcore_bugs.PARAM_STATE_LOAD_COPIES_ADAM_STEP
    assert seen["param_state_load_error"] == ("KeyError('step')" if copies_step else None), (
        f"megatron-core {version}'s param state load raised {seen['param_state_load_error']}")
    assert seen["num_steps"] > 1
    shares_step = mcore_bugs.OPTIMIZER_LOAD_SHARES_ADAM_STEP
    assert seen["num_step_tensors"] == (1 if shares_step else seen["num_steps"]), (
        f"megatron-core {version} loaded {seen['num_steps']} parameters' steps into {seen['num_step_tensors']} tensors")
    assert seen["scheduler_steps_after_loading_3"] == (5 + 3 if mcore_bugs.SCHEDULER_LOAD_ADDS_STEPS else 3), (
        f"megatron-core {version}'s scheduler, at step 5, is at {seen['scheduler_steps_after_loading_3']} after "
        "loading a state saved at step 3")
