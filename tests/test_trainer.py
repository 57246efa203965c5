"""The zero-RL loop end to end at smoke size: the demo's config (Ray, Megatron TP=2 over gloo, torch
engine, real math reward, the shipped demo model), shrunk to a few small steps.

Checks: an uninterrupted run; a run stopped by SIGTERM and resumed gives the same metrics; the
engine/actor log-prob gap stays at float32 rounding level while a skipped weight sync trips the
health check; wandb offline writes its run files; config validation names the field.
"""

import html
import json
import os
import shutil
import signal
import threading

import pytest

from megatron_zero.trainer.demo import demo_config

# Smoke size: 8 prompts x 4 samples, 24 new tokens; checkpoint every 2 steps.
SMOKE = ["data.sampler.batch_size=8", "rollout.num_samples_per_prompt=4", "rollout.max_new_tokens=24",
         "eval.max_new_tokens=24", "eval.max_problems=8", "run.save_every=2", "run.num_minibatches=2",
         "reward.num_workers=1"]
# Timings differ between runs; everything else must be identical.
VOLATILE = ("seconds", "per_s", "weight_sync")


@pytest.fixture(scope="module")
def train_file(tmp_path_factory):
    """16 prompts: with 8 per step an epoch ends exactly at step 2, where the preempted run checkpoints."""
    from megatron_zero.demo import TRAIN_PROMPTS_PATH

    path = tmp_path_factory.mktemp("data") / "train.jsonl"
    path.write_text("".join(TRAIN_PROMPTS_PATH.read_text().splitlines(keepends=True)[:16]))
    return str(path)


@pytest.fixture(scope="module", autouse=True)
def ray_cluster():
    import ray

    yield
    ray.shutdown()


def _run(output_dir, base_mcore, num_steps, extra=(), stop_after_step=None, patch=None, train_file=None):
    from megatron_zero.trainer.loop import Trainer

    data = [f"data.train.path={train_file}"] if train_file else []
    config = demo_config(str(output_dir), num_steps, [*SMOKE, f"mcore_path={base_mcore}", *data, *extra])
    trainer = Trainer(config)
    if patch:
        patch(trainer)
    try:
        if stop_after_step is not None:
            original = trainer.train_one_step

            def step_then_sigterm():
                record = original()
                if trainer.step == stop_after_step:
                    # Preemption arrives while the step runs; the loop must save after it and stop.
                    threading.Thread(target=os.kill, args=(os.getpid(), signal.SIGTERM)).start()
                    threading.Event().wait(0.5)
                return record

            trainer.train_one_step = step_then_sigterm
        trainer.fit()
        return trainer
    finally:
        trainer.close()


def _metrics(output_dir):
    lines = (output_dir / "metrics.jsonl").read_text().splitlines()
    return [{k: v for k, v in json.loads(line).items() if not any(tag in k for tag in VOLATILE)} for line in lines]


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory, base_mcore, train_file):
    out = tmp_path_factory.mktemp("uninterrupted")
    _run(out, base_mcore, num_steps=4, train_file=train_file)
    return out


def _response_tokens(output_dir, step: int) -> int:
    """The step's real response tokens, from its samples file (each sample once)."""
    return sum(json.loads(line)["num_tokens"]
               for line in (output_dir / "samples" / f"step_{step}.jsonl").read_text().splitlines())


def test_run_logs_every_step_with_a_tight_logprob_gap(uninterrupted):
    records = _metrics(uninterrupted)
    assert [r["step"] for r in records] == [1, 2, 3, 4]
    for record in records:
        assert record["num_samples"] == 32
        # TP=2 on two ranks: one data-parallel replica; the loss saw every response token once.
        assert record["num_tokens"] == _response_tokens(uninterrupted, record["step"])
        assert record["dp_token_imbalance"] == 1.0
        # Engine and actor compute the same float32 model in different code: rounding only.
        assert record["logprob_gap_max"] < 1e-4
        assert 0.0 <= record["accuracy"] <= 1.0
        assert sum(v for k, v in record.items() if k.startswith("grader_")) == 32
    raw = [json.loads(line) for line in (uninterrupted / "metrics.jsonl").read_text().splitlines()]
    assert all(record["tokens_per_s_per_gpu"] > 0 for record in raw)
    # Groups with mixed rewards give a gradient (all-equal groups give none, by construction of GRPO).
    assert any(record["grad_norm"] > 0 for record in records)
    assert (uninterrupted / "samples" / "step_4.jsonl").is_file()
    assert (uninterrupted / "checkpoints" / "step_000004" / "COMPLETE").is_file()


def test_sigterm_then_resume_reproduces_the_uninterrupted_metrics(tmp_path, base_mcore, uninterrupted, train_file):
    """Preempted after step 2 (an epoch boundary: 16 prompts, 8 per step), resumed: steps 3-4 match exactly."""
    out = tmp_path / "preempted"
    first = _run(out, base_mcore, num_steps=4, stop_after_step=2, extra=["run.save_every=0"], train_file=train_file)
    assert first.step == 2 and (out / "checkpoints" / "step_000002" / "COMPLETE").is_file()
    second = _run(out, base_mcore, num_steps=4, train_file=train_file)
    assert second.resumed_from.name == "step_000002" and second.step == 4
    assert _metrics(out) == _metrics(uninterrupted)
    # Every prompt of epoch 1 was used exactly once: none replayed or skipped across the resume.
    epoch = [json.loads(line)["prompt"] for step in (1, 2)
             for line in (out / "samples" / f"step_{step}.jsonl").read_text().splitlines()]
    assert len(set(epoch)) == 16


def test_resume_at_another_parallel_layout(tmp_path, base_mcore, uninterrupted, train_file):
    """The TP=2 run's step-2 checkpoint resumed at TP=1 x DP=2 (each replica trains its half of every
    mini-batch): steps 3-4 continue the same run."""
    out = tmp_path / "relayout"
    (out / "checkpoints").mkdir(parents=True)
    shutil.copytree(uninterrupted / "checkpoints" / "step_000002", out / "checkpoints" / "step_000002")
    resumed = _run(out, base_mcore, num_steps=4, extra=["parallel.tensor_parallel_size=1", "run.save_every=0"],
                   train_file=train_file)
    assert resumed.resumed_from.name == "step_000002" and resumed.step == 4
    # Step 3's rollout comes from the loaded weights (the saved values), step 4's from step 3's update, which
    # needs the optimizer state (Adam moments, step, LR) to have been resharded too; the TP=1 x DP=2 update
    # differs from TP=2's only by reduction-order rounding, far too little to change a sampled token.
    for ours, theirs in zip(_metrics(out), _metrics(uninterrupted)[2:], strict=True):
        for name in ("reward_mean", "accuracy", "response_length", "clip_ratio", "box_ratio"):
            assert ours[name] == theirs[name], (ours["step"], name)
        for name in ("loss", "pg_loss", "entropy", "grad_norm", "lr"):
            assert ours[name] == pytest.approx(theirs[name], rel=1e-4, abs=1e-7), (ours["step"], name)
        # Two replicas split each mini-batch (16 rows) by cost: the loss still counts each response token once,
        # and neither replica's model ran much more than half the token positions (longest-first balancing ends
        # within one row of the mean).
        assert ours["num_tokens"] == _response_tokens(out, ours["step"])
        assert 1.0 <= ours["dp_token_imbalance"] < 1.3


def test_incomplete_checkpoint_is_not_resumed(tmp_path, base_mcore, uninterrupted):
    from megatron_zero.trainer.checkpoint import latest_checkpoint

    out = tmp_path / "copy"
    shutil.copytree(uninterrupted / "checkpoints", out / "checkpoints")
    (out / "checkpoints" / "step_000004" / "COMPLETE").unlink()
    assert latest_checkpoint(out).name == "step_000002"


def test_skipped_weight_sync_trips_the_health_check(tmp_path, base_mcore):
    from megatron_zero.trainer.health import HealthCheckFailed

    def skip_sync(trainer):
        trainer.sync_weights = lambda: {}

    with pytest.raises(HealthCheckFailed, match="stale or broken weight sync"):
        _run(tmp_path / "stale", base_mcore, num_steps=3, extra=["run.save_every=0", "actor.lr=1e-3"], patch=skip_sync)


OFF_POLICY = ["rollout.off_policy_steps=1", "loss.tis_cap=2.0"]


@pytest.fixture(scope="module")
def off_policy(tmp_path_factory, base_mcore, train_file):
    out = tmp_path_factory.mktemp("off_policy")
    _run(out, base_mcore, num_steps=4, extra=OFF_POLICY, train_file=train_file)
    return out


def test_off_policy_rollout_trains_on_the_batch_of_the_policy_one_step_back(off_policy, uninterrupted):
    """rollout.off_policy_steps=1: step k+1's batch is generated (during step k's training) by the policy after
    step k-1, and carries that step; the engine re-scores each batch after the sync, when it holds the actor's
    policy, so the health gap stays at float32 rounding, while the behaviour gap (what TIS corrects) is the
    one-step policy change. The on-policy run generates every batch with the policy it trains."""
    on_policy = [json.loads(line) for line in (uninterrupted / "metrics.jsonl").read_text().splitlines()]
    assert [r["rollout_policy_step"] for r in on_policy] == [0, 1, 2, 3]
    assert not any("behaviour_logprob_gap_mean" in r or "seconds_rescore" in r for r in on_policy)
    records = [json.loads(line) for line in (off_policy / "metrics.jsonl").read_text().splitlines()]
    assert [r["rollout_policy_step"] for r in records] == [0, 0, 1, 2]
    first, *later = records
    assert "overlapped_seconds_generate" not in first and first["seconds_generate"] > 0  # generated in its own step
    for record in later:
        assert record["overlapped_seconds_generate"] > 0 and "seconds_generate" not in record
        assert record["seconds_rescore"] > 0 and record["seconds_wait_rollout"] >= 0
        assert record["logprob_gap_max"] < 1e-4  # engine re-scored with the policy the actor holds
        assert record["behaviour_logprob_gap_mean"] > 10 * record["logprob_gap_mean"]
        assert 0 < record["tis_weight_mean"] <= 2.0 and 0 <= record["tis_capped_fraction"] <= 1
        assert record["num_samples"] == 32


def test_off_policy_resume_keeps_the_batch_generated_before_the_stop(tmp_path, base_mcore, off_policy, train_file):
    """The checkpoint of step 2 holds step 3's batch (generated during step 2, from prompts the sampler has moved
    past); a run resumed from it trains on that batch and then goes on exactly as the uninterrupted run. (Saving
    on SIGTERM goes through the same save_checkpoint: test_sigterm_then_resume_reproduces_the_uninterrupted_metrics.)"""
    import torch

    checkpoint = off_policy / "checkpoints" / "step_000002"
    pending = torch.load(checkpoint / "trainer.pt", weights_only=False)["pending_rollout"]
    assert pending.policy_step == 1 and len(pending.batch) == 32
    out = tmp_path / "resumed"
    shutil.copytree(checkpoint, out / "checkpoints" / "step_000002")
    resumed = _run(out, base_mcore, num_steps=4, extra=OFF_POLICY, train_file=train_file)
    assert resumed.resumed_from.name == "step_000002" and resumed.step == 4
    assert _metrics(out) == _metrics(off_policy)[2:]


def test_off_policy_skipped_sync_trips_the_health_check(tmp_path, base_mcore):
    from megatron_zero.trainer.health import HealthCheckFailed

    def skip_sync(trainer):
        trainer.sync_weights = lambda: {}

    with pytest.raises(HealthCheckFailed, match="stale or broken weight sync"):
        _run(tmp_path / "stale", base_mcore, num_steps=3, extra=["run.save_every=0", "actor.lr=1e-3", *OFF_POLICY],
             patch=skip_sync)


def test_fp8_rollout_weights_move_the_gap_into_the_reduced_precision_bounds(tmp_path, base_mcore, uninterrupted):
    """rollout.quantization=fp8: every sync sends FP8 linear weights (the bytes of the FP8 checkpoint layout, not of
    the float32 one) and the torch engine runs their dequantization, so its log-probs leave float32 rounding (the
    mean gap is over 100x the float32 run's: quantization is on) and stay inside the reduced-precision bounds the
    run uses. (Not the fp32 bound 1e-3: the 2026-12-07 demo model's FP8 mean gap is 8e-4, the previous one's
    was above 1e-3; the float32 runs' mean gaps are ~1e-7.)"""
    from megatron_zero.models.hf_io import HFCheckpointReader
    from megatron_zero.rollout.fp8_weights import encode_bucket

    out = tmp_path / "fp8"
    trainer = _run(out, base_mcore, num_steps=2, extra=["run.save_every=0", "rollout.quantization=fp8"])
    assert trainer.config.logprob_precision == "16bit"
    max_mean, max_max = trainer.config.logprob_gap_bounds
    reader = HFCheckpointReader(trainer.config.model_path)
    tensors = [(name, reader.get(name)) for name in reader.names()]
    nbytes = lambda bucket: float(sum(t.numel() * t.element_size() for _, t in bucket))  # noqa: E731
    fp32_run = [json.loads(line) for line in (uninterrupted / "metrics.jsonl").read_text().splitlines()]
    assert {record["weight_sync_bytes"] for record in fp32_run} == {nbytes(tensors)}
    fp32_gap = max(record["logprob_gap_mean"] for record in fp32_run)
    for record in (json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()):
        assert record["weight_sync_bytes"] == nbytes(encode_bucket(tensors, "fp8")) < nbytes(tensors) / 2
        assert 100 * fp32_gap < record["logprob_gap_mean"] < max_mean and record["logprob_gap_max"] < max_max


def test_wandb_offline_and_tensorboard_write_run_files(tmp_path, base_mcore, monkeypatch):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.setenv("WANDB_MODE", "offline")
    out = tmp_path / "wandb"
    _run(out, base_mcore, num_steps=1, extra=["run.wandb_project=megatron-zero-test", "run.save_every=0",
                                              "run.tensorboard=true"])
    runs = list((out / "wandb").glob("offline-run-*"))
    assert runs and any(f.suffix == ".wandb" for f in runs[0].iterdir())
    events = EventAccumulator(str(out / "tensorboard"))
    events.Reload()
    accuracy = events.Scalars("accuracy")
    assert [event.step for event in accuracy] == [1]
    assert accuracy[0].value == pytest.approx(_metrics(out)[0]["accuracy"])


def test_dynamic_sampling_keeps_only_groups_with_mixed_rewards(tmp_path, base_mcore):
    out = tmp_path / "dynamic"
    _run(out, base_mcore, num_steps=2, extra=["data.dynamic_sampling.enabled=true", "run.save_every=0"])
    for record, step in zip(_metrics(out), (1, 2)):
        samples = [json.loads(line) for line in (out / "samples" / f"step_{step}.jsonl").read_text().splitlines()]
        groups = {}
        for sample in samples:
            groups.setdefault(sample["prompt"], []).append(sample["reward"])
        assert all(len(set(rewards)) > 1 for rewards in groups.values())
        assert record["dynamic_sampling_kept"] == len(groups) and record["num_samples"] == 4 * len(groups)


def test_export_writes_a_loadable_hf_model(tmp_path, uninterrupted):
    import torch
    from transformers import AutoModelForCausalLM

    from megatron_zero.cli import main
    from megatron_zero.demo import BASE_MODEL_PATH

    assert main(["export", "--checkpoint", str(uninterrupted / "checkpoints" / "step_000004"),
                 "--out", str(tmp_path / "hf")]) == 0
    trained = AutoModelForCausalLM.from_pretrained(str(tmp_path / "hf")).state_dict()
    base = AutoModelForCausalLM.from_pretrained(str(BASE_MODEL_PATH)).state_dict()
    assert sorted(trained) == sorted(base)
    assert any(not torch.equal(trained[name], base[name]) for name in base)
    assert main(["export", "--checkpoint", str(tmp_path), "--out", str(tmp_path / "x")]) == 2


def test_colocated_phases_switch_memory_and_keep_the_metrics(tmp_path, base_mcore, uninterrupted, train_file):
    """cluster.colocate: engine released / actor onloaded for training, the reverse for rollout, every step."""
    out = tmp_path / "colocated"
    calls = []

    def record_phases(trainer):
        # Every memory move of the engine and the actor, in order.
        def recorded(name, method):
            def call(*args, **kwargs):
                calls.append(name)
                return method(*args, **kwargs)
            return call

        for name in ("release_memory", "resume_weights", "resume_kv_cache", "begin_weight_update"):
            setattr(trainer.engine, name, recorded(name, getattr(trainer.engine, name)))
        run = trainer.group.run
        trainer.group.run = lambda method, *args, **kwargs: (calls.append(method) if method in ("onload", "offload")
                                                              else None) or run(method, *args, **kwargs)

    _run(out, base_mcore, num_steps=2, extra=["cluster.colocate=true", "run.save_every=0"], train_file=train_file,
         patch=record_phases)
    # The engine frees its memory before the actor onloads; the weights return for the sync while the actor is
    # still there; the KV cache only after the actor left. Once per step (2), once more for the final checkpoint.
    assert calls == 3 * ["release_memory", "onload", "resume_weights", "begin_weight_update", "offload",
                         "resume_kv_cache"]
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    for record in records:
        assert record["onload_bytes_weights"] > 0 and record["offload_bytes_weights"] == record["onload_bytes_weights"]
        assert record["offload_bytes_optimizer"] > 0
    # Moving memory changes nothing numerically: the steps equal the plain run's.
    plain = _metrics(uninterrupted)[:2]
    assert [{k: v for k, v in r.items() if "bytes" not in k} for r in _metrics(out)] == plain


def test_a_reference_that_differs_from_the_policy_at_step_0_stops_the_run(tmp_path, base_mcore):
    """Policy and reference start from one checkpoint, so their step-0 KL is ~0 (the uninterrupted run passes the
    check); a reference that scores the responses differently (another checkpoint) must stop the run."""
    from megatron_zero.trainer.health import HealthCheckFailed

    def shifted_reference(trainer):
        original = trainer.ref_logprobs
        trainer.ref_logprobs = lambda batch, plan: original(batch, plan) - 1e-3

    with pytest.raises(HealthCheckFailed, match=r"step 0: policy and reference differ \(mean log-ratio 0.001"):
        _run(tmp_path / "other_reference", base_mcore, num_steps=1, extra=["run.save_every=0", "loss.kl_coef=1e-3"],
             patch=shifted_reference)


def test_run_demo_writes_summary_plot_and_report(tmp_path, base_mcore, train_file):
    from megatron_zero.trainer.demo import run_demo

    out = tmp_path / "demo"
    summary = run_demo(str(out), num_steps=2, overrides=[*SMOKE, f"mcore_path={base_mcore}",
                                                         f"data.train.path={train_file}", "run.save_every=0",
                                                         "run.eval_every=1"])
    written = json.loads((out / "summary.json").read_text())
    assert written == summary
    assert 0.0 <= written["accuracy_before"] <= 1.0 and 0.0 <= written["accuracy_after"] <= 1.0
    # A held-out curve: before step 1 and after every step.
    assert [point["step"] for point in written["eval_history"]] == [0, 1, 2]
    assert len((out / "metrics.jsonl").read_text().splitlines()) == 2
    assert (out / "training.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    report = (out / "analysis" / "report.html").read_text()
    assert "<html" in report.lower() and "Responses, early and late" in report
    # Real responses of the last step are on the page (escaped as the template escapes them).
    last = [json.loads(line)["response"] for line in (out / "samples" / "step_2.jsonl").read_text().splitlines()]
    assert any(html.escape(response, quote=False) in report for response in last if response.strip())


@pytest.mark.slow
def test_the_default_demo_tells_the_papers_story(tmp_path):
    """The whole default `megatron-zero demo` (60 steps, ~3 min on 2 cores): held-out accuracy gains >= 0.30 on a
    curve of >= 4 points; from the first to the last steps the rule judge's verification rate rises by >= 0.10,
    and the box ratio and the length of correct responses rise (docs/benchmarks.md has the measured table)."""
    from megatron_zero.demo.story import demo_story
    from megatron_zero.trainer.demo import run_demo

    summary = run_demo(str(tmp_path / "demo"))
    assert len(summary["eval_history"]) >= 4
    assert summary["accuracy_after"] - summary["accuracy_before"] >= 0.30
    story = demo_story(tmp_path / "demo", window=5)
    first, last = story["first"], story["last"]
    assert last["verification"] - first["verification"] >= 0.10
    assert last["box_ratio"] > first["box_ratio"] and last["length_correct"] > first["length_correct"]
    report = (tmp_path / "demo" / "analysis" / "report.html").read_text()
    assert "late (step 60)" in report
