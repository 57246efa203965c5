"""Every command that writes checks where it writes, and its flags, before it works: `megatron-zero difficulty`,
`eval`, `data`, `tools/convert_checkpoint.py` and `tools/benchmark_throughput.py --out` create their output's
folders, or refuse in one line naming the path (a file in the way, no permission) before a model, engine or input
file is touched; their results are written under a temporary name and renamed, so a failed write leaves the previous
file whole.
"""

import json
import os
import sys

import pytest

from megatron_zero.cli import main
from megatron_zero.demo import BASE_MODEL_PATH, TRAIN_PROMPTS_PATH


@pytest.fixture
def no_work(monkeypatch):
    """Fail the test if a command gets as far as starting an engine or reading its inputs."""
    import megatron_zero.data.splits as splits
    import megatron_zero.evaluation.engines as engines
    import megatron_zero.evaluation.runner as runner

    def started(*args, **kwargs):
        raise AssertionError("work started before the output path was checked")

    for module, name in ((engines, "standalone_engine"), (runner, "load_benchmarks"), (splits, "read_rows")):
        monkeypatch.setattr(module, name, started)


def _error_line(capsys) -> str:
    err = capsys.readouterr().err
    assert "Traceback" not in err, err
    (line,) = [line for line in err.splitlines() if line.startswith("error: ")]
    return line


@pytest.fixture
def blocker(tmp_path):
    """A file where a command's output folder would have to be."""
    path = tmp_path / "results"
    path.write_text("not a folder\n")
    return path


@pytest.mark.parametrize("command", [
    ["difficulty", "--model", str(BASE_MODEL_PATH), "--data", str(TRAIN_PROMPTS_PATH), "--out", "{out}"],
    ["eval", "--model", str(BASE_MODEL_PATH), "--benchmarks", "gsm8k", "--out", "{out}"],
    ["data", "--split", "hard", "--math", "/nonexistent/MATH", "--out", "{out}"],
])
def test_a_file_in_the_way_is_refused_before_any_work(command, blocker, no_work, capsys):
    out = blocker / "run1" / "out.jsonl"
    assert main([arg.format(out=out) for arg in command]) == 2
    assert _error_line(capsys) == f"error: --out {out}: {blocker} is a file, where a folder must be"


def test_eval_refuses_a_file_as_its_output_folder(blocker, no_work, capsys):
    assert main(["eval", "--model", str(BASE_MODEL_PATH), "--benchmarks", "gsm8k", "--out", str(blocker)]) == 2
    assert _error_line(capsys) == f"error: --out {blocker} is a file; name a folder"


def test_benchmark_refuses_before_it_runs(blocker, monkeypatch, capsys):
    import benchmark_throughput

    monkeypatch.setattr(benchmark_throughput, "run_benchmark", lambda *args, **kwargs: pytest.fail("it ran"))
    monkeypatch.setattr(sys, "argv", ["benchmark_throughput.py", "--shape", "tiny-qwen2", "--out",
                                      str(blocker / "bench.json")])
    with pytest.raises(SystemExit) as exit_info:
        benchmark_throughput.main()
    assert exit_info.value.code == 2
    assert capsys.readouterr().err.splitlines()[-1] == (f"benchmark_throughput.py: error: --out {blocker / 'bench.json'}:"
                                                         f" {blocker} is a file, where a folder must be")


@pytest.mark.parametrize("flags, says", [
    (["--shape", "nope"], "--shape 'nope' is neither a known shape"),
    (["--shape", "tiny-qwen2", "--num-prompts", "0"], "--num-prompts=0 must be >= 1"),
    (["--shape", "tiny-qwen2", "--prompt-tokens", "9000"],
     "--max-tokens-per-microbatch=8192 is below one row of --prompt-tokens + --response-tokens = 9128; raise it"),
])
def test_benchmark_names_a_bad_flag_in_one_line(flags, says, tmp_path, monkeypatch, capsys):
    import benchmark_throughput

    monkeypatch.setattr(benchmark_throughput, "run_benchmark", lambda *args, **kwargs: pytest.fail("it ran"))
    monkeypatch.setattr(sys, "argv", ["benchmark_throughput.py", *flags, "--out", str(tmp_path / "bench.json")])
    with pytest.raises(SystemExit) as exit_info:
        benchmark_throughput.main()
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and err.splitlines()[-1].startswith(f"benchmark_throughput.py: error: {says}")


@pytest.mark.parametrize("command", ["hf-to-mcore", "hf-to-fp8"])
def test_conversion_refuses_a_file_in_the_way_before_any_work(command, blocker, monkeypatch, capsys):
    import convert_checkpoint

    monkeypatch.setattr(convert_checkpoint, "run_local_workers", lambda *args, **kwargs: pytest.fail("it ran"))
    monkeypatch.setattr(convert_checkpoint, "write_fp8_checkpoint", lambda *args, **kwargs: pytest.fail("it ran"))
    out = blocker / "mcore"
    assert convert_checkpoint.main([command, "--hf", str(BASE_MODEL_PATH), "--out", str(out)]) == 2
    assert _error_line(capsys) == f"error: --out {out}: {blocker} is a file, where a folder must be"
    assert convert_checkpoint.main([command, "--hf", str(BASE_MODEL_PATH), "--out", str(blocker)]) == 2
    assert _error_line(capsys) == f"error: --out {blocker} is a file; name a new folder"
    assert sorted(path.name for path in blocker.parent.iterdir()) == ["results"]  # no .partial left


@pytest.mark.parametrize("command", ["hf-to-mcore", "hf-to-fp8"])
def test_conversion_names_a_cut_short_shard_and_leaves_nothing(command, tmp_path, monkeypatch, capsys):
    import shutil

    import convert_checkpoint

    monkeypatch.setattr(convert_checkpoint, "run_local_workers", lambda *args, **kwargs: pytest.fail("it ran"))
    model = tmp_path / "download"
    shutil.copytree(BASE_MODEL_PATH, model)
    weights = model / "model.safetensors"
    os.truncate(weights, weights.stat().st_size // 2)  # an interrupted download
    assert convert_checkpoint.main([command, "--hf", str(model), "--out", str(tmp_path / "out")]) == 2
    assert _error_line(capsys).startswith(f"error: {weights} is damaged (")
    assert sorted(path.name for path in tmp_path.iterdir()) == ["download"]  # no .partial, no out


def test_data_creates_its_output_folders(tmp_path):
    math = tmp_path / "math.jsonl"
    math.write_text("".join(json.dumps({"problem": f"{i} + 1?", "level": "Level 4", "type": "Algebra",
                                        "solution": f"$\\boxed{{{i + 1}}}$"}) + "\n" for i in range(3)))
    out = tmp_path / "new" / "deeper" / "hard.jsonl"
    assert main(["data", "--split", "hard", "--math", str(math), "--out", str(out)]) == 0
    assert len(out.read_text().splitlines()) == 3
    assert sorted(p.name for p in out.parent.iterdir()) == ["hard.jsonl"]  # no temporary file left


@pytest.mark.skipif(os.geteuid() == 0, reason="root may write anywhere")
def test_a_folder_without_write_permission_is_refused(tmp_path):
    from megatron_zero.utils.files import prepare_output

    locked = tmp_path / "locked"
    locked.mkdir(mode=0o500)
    with pytest.raises(ValueError, match=f"--out {locked / 'rates.jsonl'}: no permission to write in {locked}"):
        prepare_output(locked / "rates.jsonl", "--out")
    with pytest.raises(ValueError, match=f"no permission to create the folder {locked / 'sub'}"):
        prepare_output(locked / "sub" / "rates.jsonl", "--out")


def test_a_failed_write_leaves_the_previous_pass_rate_table_whole(tmp_path, monkeypatch):
    import megatron_zero.data.difficulty as difficulty
    from megatron_zero.data.difficulty import PassRate, save_pass_rates

    path = tmp_path / "rates.jsonl"
    rates = {uid: PassRate(uid, 4, 1, "f") for uid in ("a", "b", "c")}
    save_pass_rates(rates, path)
    before = path.read_text()
    dumps = difficulty.json.dumps
    calls = iter(range(10))
    monkeypatch.setattr(difficulty.json, "dumps", lambda *a, **k: dumps(*a, **k) if next(calls) < 1 else 1 / 0)
    with pytest.raises(ZeroDivisionError):
        save_pass_rates({**rates, "d": PassRate("d", 4, 4, "f")}, path)
    assert path.read_text() == before
    assert [p.name for p in tmp_path.iterdir()] == ["rates.jsonl"]


def test_a_failed_write_leaves_the_previous_eval_samples_whole(tmp_path):
    from megatron_zero.analysis.records import SampleRecord, write_samples

    path = tmp_path / "samples_step0.jsonl"
    record = SampleRecord(step=0, prompt="1+1?", response="\\boxed{2}", ground_truth="2", reward=1.0, num_tokens=3,
                          finish_reason="stop")
    write_samples([record, record], path)
    before = path.read_text()

    def broken():
        yield record
        raise RuntimeError("the grader died")

    with pytest.raises(RuntimeError):
        write_samples(broken(), path)
    assert path.read_text() == before
    assert [p.name for p in tmp_path.iterdir()] == ["samples_step0.jsonl"]
