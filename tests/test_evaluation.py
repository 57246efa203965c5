"""Tests of megatron_zero.evaluation: pass@k / avg@k against brute force, the benchmark readers on
small files in the public formats, the config, and an end-to-end run with a fake generator.

The generator and the grader are small fakes written here (the real engine and reward are tested in
their own suites): the grader is an exact match on the last \\boxed{...}.
"""

from __future__ import annotations

import itertools
import json
import math
import re
from fractions import Fraction

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from omegaconf import OmegaConf

from megatron_zero.analysis.records import load_samples
from megatron_zero.config.evaluation import EvalConfig
from megatron_zero.evaluation import (
    BENCHMARKS,
    GeneratedText,
    evaluate,
    load_benchmark,
    mean_avg_at_k,
    mean_pass_at_k,
    pass_at_k,
    results_json,
    results_table,
    write_eval_outputs,
)
from megatron_zero.rewards.extraction import last_boxed as last_boxed_content


# ---------------------------------------------------------------- pass@k / avg@k


def brute_force_pass_at_k(n: int, c: int, k: int) -> float:
    """Share of all k-subsets of n samples (the first c correct) holding a correct sample."""
    subsets = list(itertools.combinations(range(n), k))
    return sum(any(i < c for i in subset) for subset in subsets) / len(subsets)


def test_pass_at_k_matches_brute_force_enumeration():
    for n in range(1, 8):
        for c in range(n + 1):
            for k in range(1, n + 1):
                assert pass_at_k(n, c, k) == pytest.approx(brute_force_pass_at_k(n, c, k), abs=1e-12), (n, c, k)


def test_pass_at_k_is_stable_for_large_n():
    # C(1000, 500) overflows float64; the product form must still match the exact rational value.
    n = 1000
    for c in (0, 1, 3, 500, 999, 1000):
        for k in (1, 16, 500, 1000):
            exact = 1 - Fraction(math.comb(n - c, k), math.comb(n, k))
            assert pass_at_k(n, c, k) == pytest.approx(float(exact), rel=1e-12, abs=1e-15), (c, k)


def test_pass_at_k_rejects_bad_arguments():
    with pytest.raises(ValueError, match="num_correct"):
        pass_at_k(4, 5, 1)
    with pytest.raises(ValueError, match="k=5"):
        pass_at_k(4, 1, 5)


def test_mean_pass_and_avg_at_k_against_plain_computation():
    rng = np.random.default_rng(0)
    correct = rng.random((9, 6)) < 0.3
    rows = correct.tolist()
    for k in range(1, 7):
        expected_pass = np.mean([brute_force_pass_at_k(6, int(row.sum()), k) for row in correct])
        # pass@k only depends on the count of correct samples, not their order
        assert mean_pass_at_k(rows, k) == pytest.approx(expected_pass, abs=1e-12)
        expected_avg = sum(sum(row[:k]) / k for row in rows) / len(rows)
        assert mean_avg_at_k(rows, k) == pytest.approx(expected_avg, abs=1e-12)
    assert mean_pass_at_k(rows, 1) == pytest.approx(correct.mean())


def test_mean_metrics_reject_ragged_samples():
    with pytest.raises(ValueError, match="same number of samples"):
        mean_pass_at_k([[True, False], [True]], 1)


# ---------------------------------------------------------------- config


def test_eval_config_k_values_and_validation():
    assert EvalConfig(n_samples=32).k_values == [1, 2, 4, 8, 16, 32]
    assert EvalConfig(n_samples=10).k_values == [1, 2, 4, 8, 10]
    assert EvalConfig(n_samples=1).k_values == [1]
    assert EvalConfig(n_samples=8, pass_k=[8, 1]).k_values == [1, 8]
    with pytest.raises(ValueError, match="greedy"):
        EvalConfig(temperature=0.0, n_samples=4)
    with pytest.raises(ValueError, match=r"pass_k=\[16\]"):
        EvalConfig(n_samples=8, pass_k=[16])
    with pytest.raises(ValueError, match="more than once"):
        EvalConfig(benchmarks=["gsm8k", "gsm8k"])
    with pytest.raises(ValueError, match="top_p"):
        EvalConfig(top_p=0.0)
    structured = OmegaConf.structured(EvalConfig(benchmarks=["aime24"], n_samples=32))
    assert OmegaConf.to_object(structured) == EvalConfig(benchmarks=["aime24"], n_samples=32)


# ---------------------------------------------------------------- benchmark readers


def write_jsonl(path, rows):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")


@pytest.fixture
def data_dir(tmp_path):
    """Two rows per benchmark in each public format (field names as in the public files)."""
    root = tmp_path / "data"
    write_jsonl(root / "gsm8k" / "test.jsonl", [
        {"question": "Janet has 3 ducks and buys 4. How many?", "answer": "She has 3+4=<<3+4=7>>7 ducks.\n#### 7"},
        {"question": "A house costs $1,000 more than 250. Price?", "answer": "1000+250=1250\n#### 1,250"},
    ])
    write_jsonl(root / "math500" / "test.jsonl", [
        {"problem": "Compute $1+1$.", "solution": "$\\boxed{2}$", "answer": "2", "subject": "Algebra", "level": 1,
         "unique_id": "test/algebra/1.json"},
        {"problem": "Simplify $\\frac{2}{4}$.", "solution": "$\\boxed{\\frac12}$", "answer": "\\frac{1}{2}",
         "subject": "Prealgebra", "level": 2, "unique_id": "test/prealgebra/2.json"},
    ])
    write_jsonl(root / "minerva_math" / "test.jsonl", [
        {"problem": "Find the speed.", "solution": "First $\\boxed{1}$ is wrong; so $v=\\boxed{\\frac{3}{2}} \\mathrm{~m/s}$",
         "type": "Physics", "idx": 0},
        {"problem": "Find the mass.", "solution": "m = \\boxed{4.5e33}", "type": "Astronomy", "idx": 1},
    ])
    (root / "olympiadbench").mkdir(parents=True)
    pq.write_table(pa.Table.from_pylist([
        {"id": 1606, "question": "How many moves?", "solution": ["..."], "final_answer": ["2"],
         "is_multiple_answer": False, "answer_type": "Numerical"},
        {"id": 1610, "question": "Largest mu?", "solution": ["..."], "final_answer": ["$\\frac{1}{2 n+2}$"],
         "is_multiple_answer": False, "answer_type": "Expression"},
    ]), root / "olympiadbench" / "test.parquet")
    (root / "aime24").mkdir()
    (root / "aime24" / "test.json").write_text(json.dumps([
        {"id": 60, "problem": "Aya walks 9 km. Minutes?", "solution": "...", "answer": "204", "url": "u", "year": "2024"},
        {"id": 61, "problem": "Find m+n.", "solution": "...", "answer": "113", "url": "u", "year": "2024"},
    ]), encoding="utf-8")
    write_jsonl(root / "amc23" / "test.jsonl", [
        {"id": 0, "question": "Cities 45 miles apart. Where do they meet?", "answer": 27.0, "url": "u"},
        {"id": 1, "question": "What is x+y?", "answer": 36.5, "url": "u"},
    ])
    return root


EXPECTED_ANSWERS = {
    "gsm8k": ["7", "1250"],
    "math500": ["2", "\\frac{1}{2}"],
    "minerva_math": ["\\frac{3}{2}", "4.5e33"],
    "olympiadbench": ["2", "\\frac{1}{2 n+2}"],
    "aime24": ["204", "113"],
    "amc23": ["27", "36.5"],
}


def test_readers_parse_every_public_format(data_dir):
    assert set(BENCHMARKS) == set(EXPECTED_ANSWERS)
    for name, answers in EXPECTED_ANSWERS.items():
        problems = load_benchmark(name, data_dir)
        assert [p.answer for p in problems] == answers, name
        assert all(p.question and p.benchmark == name for p in problems)
        assert [p.index for p in problems] == [0, 1]
    assert load_benchmark("gsm8k", data_dir)[0].question == "Janet has 3 ducks and buys 4. How many?"
    assert len(load_benchmark("math500", data_dir, max_problems=1)) == 1


def test_reader_errors_name_the_problem(data_dir):
    with pytest.raises(ValueError, match="unknown benchmark 'math5000'.*gsm8k, math500, minerva_math"):
        load_benchmark("math5000", data_dir)
    with pytest.raises(FileNotFoundError, match=re.escape(str(data_dir / "nowhere" / "gsm8k" / "test.jsonl"))):
        load_benchmark("gsm8k", data_dir / "nowhere")
    write_jsonl(data_dir / "math500" / "test.jsonl", [{"problem": "Compute.", "solution": "..."}])
    with pytest.raises(ValueError, match="row 0: missing answer field 'answer'"):
        load_benchmark("math500", data_dir)
    write_jsonl(data_dir / "gsm8k" / "test.jsonl", [{"question": "Q", "answer": "no marker"}])
    with pytest.raises(ValueError, match="####"):
        load_benchmark("gsm8k", data_dir)


def test_last_boxed_content_matches_braces():
    assert last_boxed_content("a \\boxed{1} b \\boxed{\\frac{1}{\\sqrt{2}}} c") == "\\frac{1}{\\sqrt{2}}"
    assert last_boxed_content("\\boxed {x+1}") == "x+1"
    assert last_boxed_content("no box") is None
    # a last box cut mid-way is no answer, even if an earlier box is complete
    assert last_boxed_content("\\boxed{1} then cut \\boxed{\\frac{1}{2") is None


# ---------------------------------------------------------------- end to end with fakes


def exact_match_grade(responses: list[str], ground_truths: list[str]) -> list[float]:
    return [1.0 if last_boxed_content(r) == gt else 0.0 for r, gt in zip(responses, ground_truths)]


class FakeGenerator:
    """Sample j of problem i is correct iff j < num_correct[prompt]; records how it was called."""

    def __init__(self, answers_by_prompt: dict[str, str], num_correct_by_prompt: dict[str, int]):
        self.answers = answers_by_prompt
        self.num_correct = num_correct_by_prompt
        self.calls = []

    def __call__(self, prompts, *, n, temperature, top_p, max_new_tokens, seed):
        self.calls.append(dict(num_prompts=len(prompts), n=n, temperature=temperature, top_p=top_p,
                               max_new_tokens=max_new_tokens, seed=seed))
        outputs = []
        for prompt in prompts:
            samples = []
            for j in range(n):
                answer = self.answers[prompt] if j < self.num_correct[prompt] else "wrong"
                cut = j % 3 == 2
                text = f"Some reasoning. \\boxed{{{answer}}}" if not cut else f"Some reasoning that never ends {answer}"
                samples.append(GeneratedText(text=text, num_tokens=10 + j, finish_reason="length" if cut else "stop"))
            outputs.append(samples)
        return outputs


def format_prompt(question: str) -> str:
    return f"Question:\n{question}\nAnswer:\nLet's think step by step.\n"


def test_evaluate_sampled_matches_independent_pass_at_k(data_dir, tmp_path):
    names = ["gsm8k", "minerva_math", "amc23"]
    problems = {name: load_benchmark(name, data_dir) for name in names}
    answers = {format_prompt(p.question): p.answer for ps in problems.values() for p in ps}
    # cut samples (j % 3 == 2) are unboxed and wrong, so count the boxed correct ones per prompt
    num_correct = {prompt: (i * 3) % 7 for i, prompt in enumerate(answers)}
    generate = FakeGenerator(answers, num_correct)
    config = EvalConfig(benchmarks=names, data_dir=str(data_dir), n_samples=6, temperature=1.0, top_p=0.95,
                        max_new_tokens=64, seed=7)
    report = evaluate(config, generate, exact_match_grade, format_prompt, step=40)

    assert [call["n"] for call in generate.calls] == [6, 6, 6]
    assert {(c["temperature"], c["top_p"], c["max_new_tokens"], c["seed"]) for c in generate.calls} == {(1.0, 0.95, 64, 7)}
    for result in report.results:
        correct = [
            [j < num_correct[format_prompt(p.question)] and j % 3 != 2 for j in range(6)]
            for p in problems[result.benchmark]
        ]
        for k in config.k_values:
            expected = np.mean([brute_force_pass_at_k(6, sum(row), k) for row in correct])
            assert result.pass_at_k[k] == pytest.approx(expected, abs=1e-12)
            assert result.avg_at_k[k] == pytest.approx(np.mean([sum(row[:k]) / k for row in correct]), abs=1e-12)
    average = report.average()
    assert average["pass@1"] == pytest.approx(np.mean([r.pass_at_k[1] for r in report.results]))

    table = results_table(report)
    header, rule, *rows = table.strip().splitlines()
    assert header == "| Metric | GSM8K | Minerva Math | AMC23 | Avg |"
    assert [row.split("|")[1].strip() for row in rows] == ["pass@1", "pass@2", "pass@4", "pass@6",
                                                           "avg@1", "avg@2", "avg@4", "avg@6"]
    assert rows[0].split("|")[-2].strip() == f"{100 * average['pass@1']:.1f}"

    paths = write_eval_outputs(report, tmp_path / "out")
    saved = json.loads(paths["json"].read_text())
    assert saved == json.loads(json.dumps(results_json(report)))
    assert saved["benchmarks"]["amc23"]["pass@2"] == pytest.approx(report.results[2].pass_at_k[2])
    records = load_samples([paths["samples"]])
    assert len(records) == 6 * 6
    assert {r.record.step for r in records} == {40}
    assert sum(r.record.finish_reason == "length" for r in records) == 6 * 2
    assert [r.record.benchmark for r in records[:6]] == ["gsm8k"] * 6


def test_evaluate_greedy_uses_temperature_zero(data_dir):
    problems = load_benchmark("aime24", data_dir)
    answers = {format_prompt(p.question): p.answer for p in problems}
    generate = FakeGenerator(answers, {prompt: 1 for prompt in answers})
    config = EvalConfig(benchmarks=["aime24"], data_dir=str(data_dir), temperature=0.0, top_p=0.95, n_samples=1)
    report = evaluate(config, generate, exact_match_grade, format_prompt)
    assert generate.calls[0]["temperature"] == 0.0 and generate.calls[0]["top_p"] == 1.0
    assert report.results[0].pass_at_k == {1: 1.0}


def test_evaluate_checks_files_before_generating_and_checks_outputs(data_dir):
    def must_not_run(*args, **kwargs):
        raise AssertionError("generation started before all benchmark files were found")

    config = EvalConfig(benchmarks=["gsm8k", "math500"], data_dir=str(data_dir))
    (data_dir / "math500" / "test.jsonl").unlink()
    with pytest.raises(FileNotFoundError, match="math500"):
        evaluate(config, must_not_run, exact_match_grade, format_prompt)

    def one_sample_short(prompts, **kwargs):
        return [[GeneratedText("x", 1, "stop")] for _ in prompts[:-1]]

    with pytest.raises(ValueError, match="1 outputs for 2 prompts"):
        evaluate(EvalConfig(benchmarks=["gsm8k"], data_dir=str(data_dir)), one_sample_short, exact_match_grade, format_prompt)
    with pytest.raises(ValueError, match="finish_reason='abort'"):
        GeneratedText("x", 1, "abort")


# ---------------------------------------------------------------- `megatron-zero eval` end to end (demo model)


def _demo_benchmarks(root):
    """The demo's held-out additions in two public formats: GSM8K ("#### n") and AMC23 (float answers)."""
    from megatron_zero.demo import TEST_PROMPTS_PATH

    rows = [json.loads(line) for line in TEST_PROMPTS_PATH.read_text().splitlines()[:8]]
    write_jsonl(root / "gsm8k" / "test.jsonl",
                [{"question": row["question"], "answer": f"Add them.\n#### {row['answer']}"} for row in rows[:4]])
    write_jsonl(root / "amc23" / "test.jsonl", [{"id": i, "question": row["question"], "answer": float(row["answer"])}
                                                for i, row in enumerate(rows[4:])])
    return root


def _eval_argv(data_dir, out, *extra):
    from megatron_zero.demo import BASE_MODEL_PATH

    return ["eval", "--model", str(BASE_MODEL_PATH), "--benchmarks", "gsm8k", "amc23", "--data-dir", str(data_dir),
            "--template", "{input}", "--max-new-tokens", "24", "--out", str(out), *extra]


def _samples(out):
    return [json.loads(line) for line in (out / "samples_step0.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def greedy_torch_eval(tmp_path_factory):
    """`megatron-zero eval` greedy on the torch engine: the reference the SGLang paths must repeat."""
    from megatron_zero.cli import main

    root = tmp_path_factory.mktemp("greedy")
    data_dir = _demo_benchmarks(root / "data")
    assert main(_eval_argv(data_dir, root / "out", "--temperature", "0")) == 0
    return data_dir, root / "out"


def test_eval_command_on_cpu_with_math_verify_and_pass_at_k(tmp_path):
    from megatron_zero.cli import main
    from megatron_zero.rewards.math_reward import math_reward

    data_dir = _demo_benchmarks(tmp_path / "data")
    out = tmp_path / "out"
    assert main(_eval_argv(data_dir, out, "--n", "4", "--temperature", "1.0", "--top-p", "1.0", "--seed", "3")) == 0
    samples = _samples(out)
    assert len(samples) == 8 * 4 and {s["benchmark"] for s in samples} == {"gsm8k", "amc23"}
    # The pool's grades are math-verify's: each response regraded here, in this process.
    assert [math_reward(s["response"], s["ground_truth"]) for s in samples] == [s["reward"] for s in samples]
    correct = [s["reward"] >= 1.0 for s in samples]
    assert 0 < sum(correct) < len(correct), "the demo model should solve some samples, not all"
    results = json.loads((out / "results_step0.json").read_text())
    for name in ("gsm8k", "amc23"):
        rows = [correct[i:i + 4] for i in range(0, len(samples), 4) if samples[i]["benchmark"] == name]
        assert len(rows) == 4
        for k in (1, 2, 4):
            expected = np.mean([brute_force_pass_at_k(4, sum(row), k) for row in rows])  # from the per-sample grades
            assert results["benchmarks"][name][f"pass@{k}"] == pytest.approx(expected, abs=1e-12)
            assert results["benchmarks"][name][f"avg@{k}"] == pytest.approx(np.mean([sum(r[:k]) / k for r in rows]))
    assert results["average"]["pass@1"] == pytest.approx(np.mean([results["benchmarks"][n]["pass@1"]
                                                                  for n in ("gsm8k", "amc23")]))
    assert (out / "results_step0.md").read_text().startswith("| Metric | GSM8K | AMC23 | Avg |")


def _same_greedy_results(reference_out, out):
    # Texts may differ in the trimmed stop token; what is graded and counted must not.
    def graded(path):
        return [(s["prompt"], s["reward"], s["num_tokens"], s["finish_reason"]) for s in _samples(path)]

    assert graded(out) == graded(reference_out)
    assert (json.loads((out / "results_step0.json").read_text())["benchmarks"]
            == json.loads((reference_out / "results_step0.json").read_text())["benchmarks"])


def test_engine_config_refuses_what_cannot_work():
    from megatron_zero.config.evaluation import EngineConfig
    from megatron_zero.config.sglang import SGLangConfig

    with pytest.raises(ValueError, match=r"engine='vllm' is unknown; use one of \['torch', 'sglang'\]"):
        EngineConfig(engine="vllm")
    with pytest.raises(ValueError, match="engine='sglang' needs an SGLangConfig"):
        EngineConfig(engine="sglang")
    with pytest.raises(ValueError, match="sglang.colocated=True .* set sglang.colocated=False"):
        EngineConfig(engine="sglang", sglang=SGLangConfig(model_path="m"))
    with pytest.raises(ValueError, match="sglang.tp_size=2 must divide cluster.rollout_num_gpus=1"):
        EngineConfig(engine="sglang", sglang=SGLangConfig(model_path="m", colocated=False, tp_size=2))
    with pytest.raises(ValueError, match=r"sglang_device='tpu' is unknown; use one of \['cuda', 'cpu'\]"):
        EngineConfig(engine="sglang", sglang=SGLangConfig(model_path="m", colocated=False), sglang_device="tpu")
    # --device cpu: the servers' bundles are CPU bundles, one per server rank.
    on_cpu = EngineConfig(engine="sglang", sglang=SGLangConfig(model_path="m", colocated=False, tp_size=2),
                          num_gpus=4, sglang_device="cpu").cluster
    assert (on_cpu.use_gpus, on_cpu.rollout_num_gpus) == (False, 4)


def test_sglang_eval_without_gpus_is_refused_at_once_unless_asked_for_cpu(tmp_path, capsys):
    """A local Ray cluster on a machine without GPUs never gets one: the launch says so at once (not after
    cluster.startup_timeout_s, 300 s) and names the CPU mode."""
    import time

    import ray

    from megatron_zero.cli import main

    if ray.is_initialized():
        ray.shutdown()
    start = time.monotonic()
    assert main(_eval_argv(_demo_benchmarks(tmp_path / "data"), tmp_path / "out", "--engine", "sglang",
                           "--ray-address", "local")) == 2
    assert time.monotonic() - start < 60
    error = capsys.readouterr().err.strip().splitlines()[-1]
    assert error.startswith("error: the local Ray cluster started here has 0 GPUs, but the run places bundles of "
                            "cluster.gpus_per_node=1 GPUs; on a machine without GPUs set cluster.gpus_per_node=0 "
                            "for `train` (CPU ranks; SGLang servers then run on CPU) or pass --device cpu")
    assert not ray.is_initialized()
