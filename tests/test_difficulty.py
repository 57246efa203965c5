"""Difficulty control end to end, at smoke size on the demo model: ``megatron-zero difficulty`` writes the pass-rate
table (torch engine, real math-verify grader), a trainer run with ``data.pass_rate_filter`` trains only on the
problems in the band, with the counts and the held-out accuracies before / after in summary.json; a missing or
mismatched table is one line before Ray starts.
"""

import json
import re

import pytest

from megatron_zero.cli import main
from megatron_zero.demo import BASE_MODEL_PATH, TEST_PROMPTS_PATH, TRAIN_PROMPTS_PATH

# One rank (TP=1) and tiny batches: the point is the data path, not the parallel layout.
SMOKE = ["parallel.tensor_parallel_size=1", "cluster.cpu_workers_per_node=1", "data.sampler.batch_size=4",
         "rollout.num_samples_per_prompt=4", "rollout.max_new_tokens=24", "eval.max_new_tokens=24",
         "eval.max_problems=4", "run.save_every=0", "run.num_minibatches=1", "reward.num_workers=1"]


@pytest.fixture(scope="module")
def train_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("data") / "train.jsonl"
    path.write_text("".join(TRAIN_PROMPTS_PATH.read_text().splitlines(keepends=True)[:12]))
    return path


@pytest.fixture(scope="module")
def rates_file(train_file):
    out = train_file.parent / "rates.jsonl"
    assert main(["difficulty", "--model", str(BASE_MODEL_PATH), "--data", str(train_file), "--n", "4",
                 "--template", "{input}", "--max-new-tokens", "24", "--max-prompt-tokens", "80", "--batch-size", "5",
                 "--out", str(out)]) == 0
    return out


def _rows(path):
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _error_line(capsys) -> str:
    """The one error line `main` printed (stderr also carries the datasets progress bar)."""
    lines = capsys.readouterr().err.strip().splitlines()
    errors = [line for line in lines if line.startswith("error:")]
    assert len(errors) == 1 and lines[-1] == errors[0], lines
    return errors[0]


def _train_args(output_dir, base_mcore, train_file, *extra):
    return ["train", f"model_path={BASE_MODEL_PATH}", f"run.output_dir={output_dir}", f"mcore_path={base_mcore}",
            f"data.train.path={train_file}", "data.train.template='{input}'", "data.train.max_prompt_tokens=80", *extra]


def test_table_has_a_row_per_problem_with_its_counts(rates_file, train_file):
    from megatron_zero.config.data import DatasetConfig
    from megatron_zero.data import load_problems
    from megatron_zero.data.difficulty import problem_fingerprint

    rows = _rows(rates_file)
    problems = load_problems(DatasetConfig(path=str(train_file), template="{input}"))
    assert [row["uid"] for row in rows] == [problem.uid for problem in problems]
    assert [row["fingerprint"] for row in rows] == [problem_fingerprint(problem) for problem in problems]
    assert all(row["num_samples"] == 4 and 0 <= row["num_correct"] <= 4 for row in rows)
    assert all(row["pass_rate"] == row["num_correct"] / 4 for row in rows)


def test_missing_or_mismatched_table_is_one_line_before_ray(tmp_path, rates_file, train_file, base_mcore, capsys):
    import ray

    if ray.is_initialized():
        ray.shutdown()
    # A table for other rows: the same file stem (uids train-0..), but the rows moved.
    moved = tmp_path / "train.jsonl"
    lines = train_file.read_text().splitlines(keepends=True)
    moved.write_text("".join(lines[1:] + lines[:1]))
    # A table for a subset: rows beyond it have no rate.
    longer = tmp_path / "longer" / "train.jsonl"
    longer.parent.mkdir()
    longer.write_text("".join(TRAIN_PROMPTS_PATH.read_text().splitlines(keepends=True)[:14]))
    cases = [
        (train_file, tmp_path / "none.jsonl", "pass_rate_file=.* does not exist; write it with `megatron-zero "
                                              "difficulty"),
        (moved, rates_file, "12 of 12 problems differ from the ones their rows were estimated on"),
        (longer, rates_file, r"2 of 14 problems have no pass rate \(first: \['train-12', 'train-13'\]\)"),
    ]
    for data, table, message in cases:
        code = main(_train_args(tmp_path / "run", base_mcore, data, *SMOKE,
                                f"data.pass_rate_filter.pass_rate_file={table}"))
        err = _error_line(capsys)
        assert code == 2 and re.search(message, err), err
        assert not ray.is_initialized()
    code = main(_train_args(tmp_path / "run", base_mcore, train_file, *SMOKE,
                            f"data.pass_rate_filter.pass_rate_file={rates_file}",
                            "data.pass_rate_filter.min_pass_rate=0.3", "data.pass_rate_filter.max_pass_rate=0.4"))
    err = _error_line(capsys)  # with 4 samples a rate is 0, 0.25, 0.5, 0.75 or 1: none in [0.3, 0.4]
    assert code == 2 and "band [0.3, 0.4] keeps none of the 12 problems" in err, err
    assert not ray.is_initialized()


def test_estimate_filter_train_samples_only_the_band_and_evaluates_before_and_after(tmp_path, rates_file, train_file,
                                                                                   base_mcore):
    from megatron_zero.trainer.demo import demo_config
    from megatron_zero.trainer.loop import Trainer

    rows = _rows(rates_file)
    # The band drops the problems the model never solved; the test needs some of both.
    kept = {row["uid"] for row in rows if row["pass_rate"] >= 0.25}
    assert len(kept) >= 4 and len(kept) < len(rows), rows
    eval_file = tmp_path / "eval.jsonl"
    eval_file.write_text("".join(TEST_PROMPTS_PATH.read_text().splitlines(keepends=True)[:4]))
    out = tmp_path / "run"
    config = demo_config(str(out), 2, [*SMOKE, f"mcore_path={base_mcore}", f"data.train.path={train_file}",
                                       f"data.pass_rate_filter.pass_rate_file={rates_file}",
                                       "data.pass_rate_filter.min_pass_rate=0.25", f"eval.path={eval_file}",
                                       "run.eval_every=1"])
    trainer = Trainer(config)
    try:
        trainer.fit()
    finally:
        trainer.close()

    summary = json.loads((out / "summary.json").read_text())
    report = summary["pass_rate_filter"]
    assert report["num_kept"] == len(kept) == summary["num_train_problems"]
    assert report["num_dropped"] == len(rows) - len(kept) == report["num_dropped_hard"]
    assert report["num_dropped_easy"] == 0 and report["min_pass_rate"] == 0.25
    # Sampled prompts are the kept problems' questions (template "{input}"), never a dropped one's.
    lines = train_file.read_text().splitlines()
    questions = {f"train-{i}": json.loads(line)["question"] for i, line in enumerate(lines)}
    sampled = {json.loads(line)["prompt"] for step in (1, 2)
               for line in (out / "samples" / f"step_{step}.jsonl").read_text().splitlines()}
    assert sampled <= {questions[uid] for uid in kept} and len(sampled) == min(8, len(kept))  # 2 steps x 4 prompts
    # Held-out evaluation before step 1, after every step (eval_every=1), and not twice at the end.
    evals = _rows(out / "eval.jsonl")
    assert [record["step"] for record in evals] == [0, 1, 2]
    assert summary["accuracy_before"] == evals[0]["accuracy"] and summary["accuracy_after"] == evals[2]["accuracy"]
    assert summary["eval_history"] == evals and summary["eval_problems"] == 4
    # Each accuracy is the mean of its samples' rewards, regraded here by math-verify directly.
    from megatron_zero.rewards.math_reward import math_reward

    for record in evals:
        samples = _rows(out / "samples" / f"eval_step_{record['step']}.jsonl")
        assert len(samples) == 4
        regraded = [math_reward(s["response"], s["ground_truth"]) for s in samples]
        assert regraded == [s["reward"] for s in samples]
        assert record["accuracy"] == pytest.approx(sum(r >= 1.0 for r in regraded) / 4)
