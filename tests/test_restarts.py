"""Nothing lost on any failure path, tried as a user meets it: a real CPU demo run (`megatron-zero demo`, smoke size,
3 steps, a checkpoint at steps 2 and 3), then a damaged checkpoint, a crash, a restart.

Checks: a checkpoint whose file was truncated, deleted or overwritten stops the restart before Ray starts, in one
line that names the file and the intact checkpoint to resume from; run.resume_from resumes there; export of a
damaged checkpoint refuses in one line and leaves nothing behind. A restart after a crash keeps one history: the
records of steps logged after the checkpoint it resumes from are moved out first, so every step is logged once;
a start at step 0 moves an earlier run's records aside.
"""

import json
import shutil
import time

import pytest

from megatron_zero.cli import main

# As tests/test_trainer.py: 8 prompts x 4 samples, 24 new tokens.
SMOKE = ["data.sampler.batch_size=8", "rollout.num_samples_per_prompt=4", "rollout.max_new_tokens=24",
         "eval.max_new_tokens=24", "eval.max_problems=8", "run.num_minibatches=2", "reward.num_workers=1"]


@pytest.fixture(scope="module", autouse=True)
def ray_cluster():
    import ray

    yield
    ray.shutdown()


def _demo(output_dir, base_mcore, steps, *extra) -> int:
    return main(["demo", "--output-dir", str(output_dir), "--steps", str(steps), *SMOKE, f"mcore_path={base_mcore}",
                 *extra])


@pytest.fixture(scope="module")
def saved_run(tmp_path_factory, base_mcore):
    """3 steps with run.save_every=2: checkpoints after step 2 and (the end) step 3."""
    out = tmp_path_factory.mktemp("saved") / "run"
    assert _demo(out, base_mcore, 3, "run.save_every=2", "run.tensorboard=true") == 0
    return out


def _steps(path) -> list[int]:
    return [json.loads(line)["step"] for line in path.read_text().splitlines()]


def _metrics(output_dir) -> list[dict]:
    """metrics.jsonl without what differs between runs (timings)."""
    volatile = ("seconds", "per_s", "weight_sync")
    return [{k: v for k, v in json.loads(line).items() if not any(tag in k for tag in volatile)}
            for line in (output_dir / "metrics.jsonl").read_text().splitlines()]


def _copy(saved_run, tmp_path):
    out = tmp_path / "run"
    shutil.copytree(saved_run, out)
    return out


def _no_ray(monkeypatch):
    """Fail the test if the run gets as far as starting Ray."""
    import megatron_zero.trainer.setup as setup

    def started(*args, **kwargs):
        raise AssertionError("Ray was started before the damaged checkpoint was found")

    monkeypatch.setattr(setup, "create_placements", started)


def _error_line(capsys) -> str:
    err = capsys.readouterr().err
    assert "Traceback" not in err, err
    (line,) = [line for line in err.splitlines() if line.startswith("error: ")]
    return line


def _truncate(path, size=1000):
    with open(path, "r+b") as f:
        f.truncate(size)


def _flip_a_byte(path):
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))


@pytest.mark.parametrize("damage, name, says", [
    (_truncate, "actor/__0_0.distcp", "actor/__0_0.distcp has 1000 bytes, its COMPLETE marker recorded"),
    # Files both megatron-core 0.16.1 and 0.19.2 write (0.19.2 writes no common.pt and one .distcp per rank).
    (lambda path: path.unlink(), "actor/metadata.json", "actor/metadata.json is missing"),
    (_truncate, "trainer.pt", "trainer.pt has 1000 bytes, its COMPLETE marker recorded"),
    (_flip_a_byte, "actor/__1_0.distcp", "actor/__1_0.distcp has the recorded size but other bytes"),
])
def test_a_damaged_latest_checkpoint_stops_the_restart_before_ray_in_one_line(
        saved_run, base_mcore, tmp_path, monkeypatch, capsys, damage, name, says):
    out = _copy(saved_run, tmp_path)
    latest, intact = out / "checkpoints" / "step_000003", out / "checkpoints" / "step_000002"
    damage(latest / name)
    _no_ray(monkeypatch)
    capsys.readouterr()
    started = time.monotonic()
    assert _demo(out, base_mcore, 4, "run.save_every=2") == 2
    assert time.monotonic() - started < 30  # the preflight, not a worker's load
    line = _error_line(capsys)
    assert line.startswith(f"error: checkpoint {latest} is damaged: {says}"), line
    assert line.endswith(f"; it is not loaded: resume from the newest intact one with run.resume_from={intact}"), line
    assert (latest / "COMPLETE").is_file()  # never deleted: it can still be looked at


def test_resume_from_the_intact_checkpoint_after_the_latest_was_damaged(saved_run, base_mcore, tmp_path):
    out = _copy(saved_run, tmp_path)
    _truncate(out / "checkpoints" / "step_000003" / "actor" / "__0_0.distcp")
    intact = out / "checkpoints" / "step_000002"
    assert _demo(out, base_mcore, 3, "run.save_every=2", f"run.resume_from={intact}") == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["resumed_from"] == str(intact) and summary["num_steps"] == 3
    assert _metrics(out) == _metrics(saved_run)  # step 3 redone once, as the uninterrupted run did it

    from megatron_zero.trainer.checkpoint import verify_checkpoint

    verify_checkpoint(out / "checkpoints" / "step_000003")  # saved again, whole
    (damaged,) = (out / "superseded").glob("*/checkpoints/step_000003")  # moved out, not deleted
    assert (damaged / "actor" / "__0_0.distcp").stat().st_size == 1000


def test_resume_from_is_checked_before_ray(saved_run, base_mcore, tmp_path, monkeypatch, capsys):
    out = _copy(saved_run, tmp_path)
    _no_ray(monkeypatch)
    capsys.readouterr()
    assert _demo(out, base_mcore, 4, f"run.resume_from={out}") == 2
    assert _error_line(capsys) == (f"error: run.resume_from='{out}' is not a complete checkpoint (no COMPLETE marker "
                                   "there); point it at a checkpoints/step_N folder")
    # Left in a config after it served, it would send every later restart back: refused while newer ones are whole.
    older = out / "checkpoints" / "step_000002"
    assert _demo(out, base_mcore, 4, f"run.resume_from={older}") == 2
    assert _error_line(capsys) == (f"error: run.resume_from='{older}' (step 2) is older than the intact checkpoint "
                                   f"{out / 'checkpoints' / 'step_000003'} in run.output_dir; drop run.resume_from to "
                                   f"go on from there, or move the checkpoints after step 2 out of "
                                   f"{out / 'checkpoints'} to go back")
    _truncate(older / "trainer.pt")
    assert _demo(out, base_mcore, 4, f"run.resume_from={older}") == 2
    assert _error_line(capsys).startswith(f"error: run.resume_from: checkpoint {older} is damaged: trainer.pt has 1000 "
                                          "bytes")


def test_resume_from_with_resume_false_is_refused():
    from megatron_zero.config.trainer import RunConfig

    with pytest.raises(ValueError, match=r"run.resume_from='x' with run.resume=false: drop one"):
        RunConfig(resume=False, resume_from="x")


def test_a_checkpoint_saved_before_markers_listed_files_loads_with_a_warning(saved_run, tmp_path, caplog):
    from megatron_zero.config.trainer import RunConfig
    from megatron_zero.trainer.checkpoint import check_resume_point

    out = _copy(saved_run, tmp_path)
    (out / "checkpoints" / "step_000003" / "COMPLETE").write_text(json.dumps({"complete": True}))
    assert check_resume_point(RunConfig(output_dir=str(out))) == out / "checkpoints" / "step_000003"
    assert "cannot be verified" in caplog.text


def test_export_of_a_damaged_checkpoint_refuses_in_one_line_and_leaves_nothing(saved_run, tmp_path, capsys):
    out = _copy(saved_run, tmp_path)
    checkpoint = out / "checkpoints" / "step_000003"
    _truncate(checkpoint / "actor" / "__1_0.distcp")
    exported = tmp_path / "exports" / "hf"
    exported.parent.mkdir()
    capsys.readouterr()
    assert main(["export", "--checkpoint", str(checkpoint), "--out", str(exported)]) == 2
    assert _error_line(capsys).startswith(f"error: checkpoint {checkpoint} is damaged: actor/__1_0.distcp has 1000 "
                                          "bytes")
    assert list(exported.parent.iterdir()) == []


def test_export_that_fails_in_its_worker_names_the_file_and_leaves_nothing(saved_run, tmp_path):
    """An unlisted marker (an older checkpoint) lets a truncated shard through to the conversion: it fails naming
    the shard, and the half-written export is removed."""
    from megatron_zero.parallel.local_launch import WorkerFailed

    out = _copy(saved_run, tmp_path)
    checkpoint = out / "checkpoints" / "step_000003"
    (checkpoint / "COMPLETE").write_text(json.dumps({"complete": True}))
    _truncate(checkpoint / "actor" / "__0_0.distcp")
    exported = tmp_path / "exports" / "hf"
    exported.parent.mkdir()
    with pytest.raises(WorkerFailed, match=f"{checkpoint / 'actor' / '__0_0.distcp'} is damaged"):
        main(["export", "--checkpoint", str(checkpoint), "--out", str(exported)])
    assert list(exported.parent.iterdir()) == []


# ---- B: one history across restarts ------------------------------------------------------------------------------

def test_a_restart_after_a_crash_logs_every_step_once(saved_run, base_mcore, tmp_path, caplog):
    """Crashed while saving step 3: its records are written, its checkpoint is not (no COMPLETE), and the last
    metrics line was cut off mid-write. The restart resumes at step 2 and redoes step 3, logged once."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out = _copy(saved_run, tmp_path)
    (out / "checkpoints" / "step_000003" / "COMPLETE").unlink()
    with open(out / "metrics.jsonl", "a") as f:
        f.write('{"step": 4, "rew')
    assert _demo(out, base_mcore, 3, "run.save_every=2", "run.tensorboard=true") == 0
    assert _steps(out / "metrics.jsonl") == [1, 2, 3]
    assert _metrics(out) == _metrics(saved_run)
    assert _steps(out / "eval.jsonl") == [0, 3]
    assert sorted(p.name for p in (out / "samples").iterdir()) == [
        "eval_step_0.jsonl", "eval_step_3.jsonl", "step_1.jsonl", "step_2.jsonl", "step_3.jsonl"]
    events = EventAccumulator(str(out / "tensorboard"))
    events.Reload()
    assert [event.step for event in events.Scalars("accuracy")] == [1, 2, 3]
    (aside,) = (out / "superseded").iterdir()
    assert (f"resuming at step 2: moved the records of steps 3 (logged after that checkpoint; this run redoes them) "
            f"from metrics.jsonl, eval.jsonl, samples/ (2 files), checkpoints/ (1) to {aside}") in caplog.text
    # What was moved out is all there: step 3's first records, the cut-off line, the unfinished checkpoint.
    assert (aside / "metrics.jsonl").read_text().splitlines()[1] == '{"step": 4, "rew'
    assert _steps(aside / "eval.jsonl") == [3] and (aside / "checkpoints" / "step_000003" / "trainer.pt").is_file()


def test_a_start_at_step_0_moves_an_earlier_runs_records_aside(saved_run, base_mcore, tmp_path, caplog):
    """No complete checkpoint (crashed while saving each): the run starts at step 0 and moves the earlier files out
    first, keeping the base model's conversion and the logs."""
    out = _copy(saved_run, tmp_path)
    for marker in (out / "checkpoints").glob("*/COMPLETE"):
        marker.unlink()
    assert _demo(out, base_mcore, 1) == 0
    assert _steps(out / "metrics.jsonl") == [1]
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step_000001"]
    (aside,) = (out / "superseded").iterdir()
    assert _steps(aside / "metrics.jsonl") == [1, 2, 3]
    assert sorted(p.name for p in (aside / "checkpoints").iterdir()) == ["step_000002", "step_000003"]
    assert (f"starting at step 0 in {out}, which holds an earlier run's records: moved metrics.jsonl, eval.jsonl, "
            f"samples/ (5 files), checkpoints/ (2), summary.json, training.png, analysis, tensorboard to {aside}"
            ) in caplog.text
    assert (out / "logs").is_dir()


def test_records_keep_one_line_per_step_the_last_written(tmp_path):
    """Files logged twice by restarts before this cut-back existed ([1, 2, 1, 2]) come out with each step once."""
    from megatron_zero.trainer.run_records import keep_history_through

    lines = [{"step": 1, "v": "old"}, {"step": 2, "v": "old"}, {"step": 1, "v": "new"}, {"step": 2, "v": "new"},
             {"step": 3, "v": "new"}]
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines))
    aside = keep_history_through(tmp_path, 2)
    assert [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()] == lines[2:4]
    assert _steps(aside / "metrics.jsonl") == [1, 2, 3]
    assert keep_history_through(tmp_path, 2) is None  # nothing left to move


def test_export_names_a_missing_folder_apart_from_an_unfinished_checkpoint(tmp_path, capsys):
    missing = tmp_path / "checkpoints" / "step_000100"
    assert main(["export", "--checkpoint", str(missing), "--out", str(tmp_path / "hf")]) == 2
    assert _error_line(capsys) == f"error: --checkpoint {missing}: no such folder"
    missing.mkdir(parents=True)  # a save that died before its marker
    assert main(["export", "--checkpoint", str(missing), "--out", str(tmp_path / "hf")]) == 2
    assert _error_line(capsys) == f"error: {missing} is not a complete training checkpoint (no COMPLETE marker)"
    assert not (tmp_path / "hf").exists()
