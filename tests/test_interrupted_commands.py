"""Interrupted `difficulty` and `eval` keep what they finished and resume where they stopped (utils/progress.py).

Tried as a user would: the command killed with SIGKILL once part of its work is on disk, then the same command
again. The resumed run does not redo the kept parts and writes the same table / samples as an uninterrupted run
(the torch engine is seeded, so reruns are exact). A rerun with other settings is refused in one line.
No Ray: the torch engine runs in the command's own process.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from megatron_zero.cli import main
from megatron_zero.demo import BASE_MODEL_PATH, TRAIN_PROMPTS_PATH
from megatron_zero.utils.progress import Progress

ROOT = Path(__file__).resolve().parents[1]


def _first_rows(path: Path, count: int) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()[:count]]


def _kill_when(command: list[str], progress: Path, parts: int, cwd: Path) -> None:
    """Run ``megatron-zero <command>`` and SIGKILL it once ``progress`` holds ``parts`` finished parts."""
    process = subprocess.Popen([sys.executable, "-m", "megatron_zero.cli", *command], cwd=cwd,
                               stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and process.poll() is None:
        if progress.is_file() and progress.read_text().count("\n") >= 1 + parts:
            os.kill(process.pid, signal.SIGKILL)
            break
        time.sleep(0.02)
    _, err = process.communicate(timeout=60)
    assert process.returncode == -signal.SIGKILL, f"the command ended on its own before it was killed:\n{err}"


def _resume_line(caplog) -> str:
    return next(record.getMessage() for record in caplog.records if "resuming from" in record.getMessage())


def test_difficulty_killed_mid_run_resumes_to_the_uninterrupted_table(tmp_path, capsys, caplog):
    data = tmp_path / "train.jsonl"
    data.write_text("".join(json.dumps(row) + "\n" for row in _first_rows(TRAIN_PROMPTS_PATH, 40)))
    flags = ["difficulty", "--model", str(BASE_MODEL_PATH), "--data", str(data), "--template", "{input}",
             "--max-prompt-tokens", "70", "--max-new-tokens", "48", "--n", "8", "--batch-size", "4"]
    assert main([*flags, "--out", str(tmp_path / "whole.jsonl")]) == 0

    table = tmp_path / "rates.jsonl"
    progress = tmp_path / "rates.jsonl.progress"
    _kill_when([*flags, "--out", str(table)], progress, parts=2, cwd=ROOT)
    assert not table.exists()
    kept = progress.read_text().count("\n") - 1
    assert 2 <= kept < 10  # 40 problems in batches of 4: killed part-way

    # Other settings are not the same run: refused, the kept batches left as they are.
    before = progress.read_bytes()
    assert main([*flags[:-2], "--batch-size", "8", "--out", str(table)]) == 2
    err = capsys.readouterr().err
    assert f"error: {progress} holds {kept} finished batches of a difficulty run with other settings (batch_size 4 " \
           "then, 8 now); run that command again to resume it, or delete the file to start over" in err
    assert progress.read_bytes() == before

    caplog.set_level("INFO")
    assert main([*flags, "--out", str(table)]) == 0
    assert f"{kept} batches that an earlier difficulty run finished are kept" in _resume_line(caplog)
    assert table.read_text() == (tmp_path / "whole.jsonl").read_text()
    assert not progress.exists()


def test_eval_killed_after_a_benchmark_resumes_to_the_uninterrupted_results(tmp_path, caplog):
    rows = _first_rows(TRAIN_PROMPTS_PATH, 24)
    for name, part in (("gsm8k", rows[:12]), ("math500", rows[12:])):
        (tmp_path / "data" / name).mkdir(parents=True)
        question = "question" if name == "gsm8k" else "problem"
        answers = [f"x #### {row['answer']}" if name == "gsm8k" else row["answer"] for row in part]
        lines = [json.dumps({question: row["question"], "answer": answer}) + "\n" for row, answer in zip(part, answers)]
        (tmp_path / "data" / name / "test.jsonl").write_text("".join(lines))
    flags = ["eval", "--model", str(BASE_MODEL_PATH), "--benchmarks", "gsm8k", "math500", "--data-dir",
             str(tmp_path / "data"), "--template", "{input}", "--max-new-tokens", "48", "--n", "48", "--temperature",
             "1.0"]
    assert main([*flags, "--out", str(tmp_path / "whole")]) == 0

    out = tmp_path / "eval"
    _kill_when([*flags, "--out", str(out)], out / "eval.progress", parts=1, cwd=ROOT)
    assert sorted(path.name for path in out.iterdir() if path.is_file()) == ["eval.progress"]

    caplog.set_level("INFO")
    assert main([*flags, "--out", str(out)]) == 0
    assert "1 benchmarks that an earlier eval run finished are kept" in _resume_line(caplog)
    for name in ("samples_step0.jsonl", "results_step0.md"):
        assert (out / name).read_text() == (tmp_path / "whole" / name).read_text()
    assert not (out / "eval.progress").exists()


def test_progress_file_survives_a_cut_line_and_refuses_what_is_not_its_own(tmp_path):
    path = tmp_path / "work.progress"
    progress = Progress.open(path, {"n": 8, "pair": (1, 2)}, "difficulty", "batches")
    progress.add({"batch": 0})
    progress.add({"batch": 1})
    with path.open("a") as f:
        f.write('{"batch": 2, "ra')  # a kill during the third write
    resumed = Progress.open(path, {"n": 8, "pair": [1, 2]}, "difficulty", "batches")  # a tuple reads back as a list
    assert resumed.done == [{"batch": 0}, {"batch": 1}]  # the cut part is done again
    resumed.add({"batch": 2})
    assert Progress.open(path, {"n": 8, "pair": [1, 2]}, "difficulty").done == [{"batch": i} for i in range(3)]
    with pytest.raises(ValueError, match=r"work.progress is not the progress file of a eval run; move it away"):
        Progress.open(path, {"n": 8, "pair": [1, 2]}, "eval")
    lines = path.read_text().splitlines()
    path.write_text("\n".join([lines[0], "{oops", lines[2]]) + "\n")
    with pytest.raises(ValueError, match=r"work.progress:2: damaged \(.*\); delete the file to start over"):
        Progress.open(path, {"n": 8, "pair": [1, 2]}, "difficulty")
    path.write_text("")  # created, then killed before its header was written: a new file
    assert Progress.open(path, {"n": 8}, "difficulty").done == []
    resumed = Progress.open(path, {"n": 8}, "difficulty")
    resumed.finish()
    assert not path.exists()
