"""Tests of megatron_zero.data: templates (verbatim text), loading with configurable fields and clear errors,
over-long prompts, exact sampler resume across epoch boundaries, dynamic sampling, difficulty splits and the
pass-rate band.

Data are tiny hand-written files in tmp dirs; the tokenizer is a word-level `tokenizers` model built here (no
download), whose token count has an independent reference: the number of \\w+ / punctuation runs.
"""

from __future__ import annotations

import json
import logging
import random
import re

import datasets
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from omegaconf import OmegaConf
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from megatron_zero.config.data import DataConfig, DatasetConfig, PassRateFilterConfig, SamplerConfig
from megatron_zero.config.problems import raise_problems
from megatron_zero.preflight.names import template_problems
from megatron_zero.data import (
    PassRate,
    Problem,
    PromptSampler,
    SampleGroup,
    build_difficulty_split,
    dynamic_sampling,
    estimate_pass_rates,
    filter_by_pass_rate,
    load_pass_rates,
    load_problems,
    make_prompt_formatter,
    problems_from_rows,
    read_gsm8k_rows,
    read_math_rows,
    save_pass_rates,
    write_jsonl,
)


@pytest.fixture(scope="module")
def tokenizer():
    vocab = {"[UNK]": 0, "Question": 1, "Answer": 2}
    model = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    model.pre_tokenizer = pre_tokenizers.Whitespace()
    wrapped = PreTrainedTokenizerFast(tokenizer_object=model, unk_token="[UNK]")
    wrapped.chat_template = (
        "{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}</{{ m['role'] }}>{% endfor %}"
        "{% if add_generation_prompt %}<assistant>{% endif %}"
    )
    return wrapped


def reference_num_tokens(text: str) -> int:
    # The Whitespace pre-tokenizer splits on \w+|[^\w\s]+; every piece is one word-level token.
    return len(re.findall(r"\w+|[^\w\s]+", text))


def write_rows(path, rows):
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


# ---------------------------------------------------------------- templates


def test_templates_verbatim():
    question = "What is $\\{x\\}$ if {input} appears? \\boxed{}"
    simple = "Question:\n" + question + "\nAnswer:\nLet's think step by step.\n"
    assert make_prompt_formatter("simple")(question) == simple
    assert make_prompt_formatter("abel")(question) == simple
    qwen = (
        "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n"
        + question
        + "\nPlease reason step by step, and put your final answer within \\boxed{}.<|im_end|>\n"
        "<|im_start|>assistant\n"
    )
    assert make_prompt_formatter("qwen-boxed")(question) == qwen
    assert make_prompt_formatter("Problem: {input}\nSolution:")("1+1 {y}") == "Problem: 1+1 {y}\nSolution:"


def test_chat_template_and_template_errors(tokenizer):
    assert make_prompt_formatter("chat", tokenizer)("2+2?") == "<user>2+2?</user><assistant>"
    with pytest.raises(ValueError, match="no tokenizer was given"):
        make_prompt_formatter("chat")
    with pytest.raises(ValueError, match=r"'qwen' is unknown; use one of \['abel', 'chat', 'qwen-boxed', 'simple'\]"):
        make_prompt_formatter("qwen")
    with pytest.raises(ValueError, match="data.train.template"):
        raise_problems(template_problems(DatasetConfig(path="x.jsonl", template="qwen")))


# ---------------------------------------------------------------- loading


def test_load_jsonl_parquet_and_json_with_custom_fields(tmp_path):
    rows = [{"problem": f"q{i}", "sol": i * 1.0, "lvl": f"Level {i % 5 + 1}", "src": "math", "id": f"p{i}"}
            for i in range(5)]
    jsonl = write_rows(tmp_path / "train.jsonl", rows)
    parquet = tmp_path / "train.parquet"
    pq.write_table(pa.Table.from_pylist(rows), parquet)
    json_list = tmp_path / "train.json"
    json_list.write_text(json.dumps(rows))
    saved = tmp_path / "saved"
    datasets.Dataset.from_list(rows).save_to_disk(str(saved))
    for path in (jsonl, parquet, json_list, saved):
        config = DatasetConfig(
            path=str(path), question_field="problem", answer_field="sol", uid_field="id", level_field="lvl",
            source_field="src", template="simple", cache_dir=str(tmp_path / "cache"),
        )
        problems = load_problems(config)
        assert [p.uid for p in problems] == [row["id"] for row in rows]
        assert [p.ground_truth for p in problems] == [str(i) for i in range(5)]  # 3.0 -> "3"
        assert problems[2].metadata == {"level": "Level 3", "source": "math"}
        assert problems[2].prompt_text == make_prompt_formatter("simple")("q2")
    default_uids = load_problems(DatasetConfig(path=str(jsonl), question_field="problem", answer_field="sol",
                                               cache_dir=str(tmp_path / "cache")))
    assert [p.uid for p in default_uids] == [f"train-{i}" for i in range(5)]


def test_missing_field_error_names_field_file_row_and_keys(tmp_path):
    path = write_rows(tmp_path / "bad.jsonl", [{"question": "a", "answer": "1"}, {"question": "b", "solution": "2"}])
    with pytest.raises(ValueError) as error:
        load_problems(DatasetConfig(path=str(path), cache_dir=str(tmp_path / "cache")))
    message = str(error.value)
    for part in ("'answer'", str(path), "row 1", "['question', 'solution']"):
        assert part in message
    with pytest.raises(ValueError, match="share uid 'x'"):
        problems_from_rows([{"question": "a", "answer": "1", "id": "x"}] * 2, DatasetConfig(uid_field="id"))
    with pytest.raises(ValueError, match="neither a data file"):
        load_problems(DatasetConfig(path=str(tmp_path)))
    with pytest.raises(ValueError, match="missing.jsonl' does not exist"):
        load_problems(DatasetConfig(path="data/missing.jsonl"))
    with pytest.raises(ValueError, match="data.train.path='' is not set"):
        load_problems(DatasetConfig())


def test_overlong_prompts_error_or_filtered_with_report(tokenizer, caplog):
    rows = [{"question": " ".join(["w"] * n), "answer": "1", "id": f"q{n}"} for n in (1, 5, 40, 60)]
    template_tokens = reference_num_tokens(make_prompt_formatter("simple")(""))
    limit = template_tokens + 30
    simple = make_prompt_formatter("simple")
    expected_long = [row["id"] for row in rows if reference_num_tokens(simple(row["question"])) > limit]
    assert expected_long == ["q40", "q60"]
    config = DatasetConfig(uid_field="id", template="simple", max_prompt_tokens=limit)
    with pytest.raises(ValueError,
                       match=r"2 of 4 prompts are longer than data.train.max_prompt_tokens=\d+.*'q40', 'q60'"):
        problems_from_rows(rows, config, tokenizer)
    filtering = DatasetConfig(uid_field="id", template="simple", max_prompt_tokens=limit, filter_overlong=True)
    with caplog.at_level(logging.WARNING):
        kept = problems_from_rows(rows, filtering, tokenizer)
    assert [p.uid for p in kept] == ["q1", "q5"]
    assert "2 of 4 prompts are longer" in caplog.text and "dropped" in caplog.text
    # Without a tokenizer nothing is checked and nothing dropped.
    assert len(problems_from_rows(rows, config)) == 4


# ---------------------------------------------------------------- sampler


def make_problems(n: int) -> list[Problem]:
    return [Problem(f"p{i}", f"q{i}", f"q{i}", str(i)) for i in range(n)]


def test_sampler_epochs_are_permutations_and_resume_exactly():
    problems = make_problems(10)
    config = SamplerConfig(batch_size=4, seed=3)
    reference = PromptSampler(problems, config)
    stream = [[p.uid for p in reference.next_batch()] for _ in range(12)]  # 48 prompts: 4.8 epochs
    flat = [uid for batch in stream for uid in batch]
    for epoch in range(4):
        assert sorted(flat[epoch * 10 : epoch * 10 + 10]) == sorted(p.uid for p in problems)
    assert flat[:10] != flat[10:20]  # a new order every epoch
    # Resume after every step, including the steps whose batch crosses an epoch boundary (2, 5, 7, 10).
    for step in range(12):
        replay = PromptSampler(problems, config)
        for _ in range(step):
            replay.next_batch()
        state = json.loads(json.dumps(replay.state_dict()))
        resumed = PromptSampler(problems, config)
        resumed.load_state_dict(state)
        assert [[p.uid for p in resumed.next_batch()] for _ in range(12 - step)] == stream[step:]
    with pytest.raises(ValueError, match="same data and seed"):
        PromptSampler(problems, SamplerConfig(batch_size=4, seed=4)).load_state_dict(state)


def test_sampler_num_epochs_and_no_shuffle():
    problems = make_problems(5)
    batches = list(PromptSampler(problems, SamplerConfig(batch_size=2, shuffle=False, num_epochs=2)))
    order = [f"p{i}" for i in range(5)] * 2
    assert [[p.uid for p in b] for b in batches] == [order[i : i + 2] for i in range(0, 10, 2)]
    with pytest.raises(ValueError, match="batch_size=6 is larger than the 5 problems"):
        PromptSampler(problems, SamplerConfig(batch_size=6))


# ---------------------------------------------------------------- dynamic sampling


def test_dynamic_sampling_keeps_batch_size_and_drops_only_constant_groups():
    rng = random.Random(0)
    supplied: list[SampleGroup] = []

    def supply(num_missing: int) -> list[SampleGroup]:
        groups = []
        for _ in range(num_missing):
            rewards = tuple(float(rng.random() < rng.choice([0.0, 0.5, 1.0])) for _ in range(4))
            groups.append(SampleGroup(uid=f"g{len(supplied)}", rewards=rewards))
            supplied.append(groups[-1])
        return groups

    groups, report = dynamic_sampling(supply, num_groups=16, max_refill_rounds=20)
    varied = [g for g in supplied if len(set(g.rewards)) > 1]
    assert [g.uid for g in groups] == [g.uid for g in varied[:16]]
    assert report.filled and report.num_groups_kept == 16
    assert report.num_groups_seen == len(supplied)
    assert report.num_groups_dropped == len(supplied) - len(varied) > 0
    assert report.num_groups_surplus == 0


def test_dynamic_sampling_reports_an_underfilled_batch_and_surplus():
    def all_constant(num_missing):
        return [SampleGroup(uid="c", rewards=(1.0, 1.0))] * num_missing

    groups, report = dynamic_sampling(all_constant, num_groups=3, max_refill_rounds=2)
    assert groups == [] and not report.filled
    assert (report.num_rounds, report.num_groups_seen, report.num_groups_dropped) == (3, 9, 9)

    def generous(num_missing):  # returns more than asked for
        return [SampleGroup(uid=str(i), rewards=(0.0, 1.0)) for i in range(num_missing + 2)]

    groups, report = dynamic_sampling(generous, num_groups=3, max_refill_rounds=0)
    assert len(groups) == 3 and report.num_groups_surplus == 2 and report.filled


# ---------------------------------------------------------------- difficulty splits and pass rates


MATH_ROWS = [
    {
        "problem": f"m{i}",
        "solution": f"so \\boxed{{\\frac{{{i}}}{{2}}}} wait \\boxed{{{i}}}",
        "level": f"Level {i % 5 + 1}",
        "type": "Algebra",
    }
    for i in range(10)
] + [{"problem": "odd", "solution": "\\boxed{0}", "level": "Level ?", "type": "Algebra"}]
GSM8K_ROWS = [{"question": f"g{i}", "answer": f"Work.\n#### {i + 1},250"} for i in range(3)]


def test_public_format_readers():
    math = read_math_rows(MATH_ROWS)
    assert [row["answer"] for row in math[:3]] == ["0", "1", "2"]  # last box wins
    nested = read_math_rows([{"problem": "p", "solution": "\\boxed{\\frac{1}{2}}", "level": "Level 2"}])
    assert nested[0]["answer"] == "\\frac{1}{2}"
    assert [row["level"] for row in math] == [i % 5 + 1 for i in range(10)] + [None]
    assert [row["answer"] for row in read_gsm8k_rows(GSM8K_ROWS)] == ["1250", "2250", "3250"]
    with pytest.raises(ValueError, match=r"MATH row 0: field 'solution' is missing.*\['level', 'problem'\]"):
        read_math_rows([{"problem": "p", "level": "Level 1"}])
    with pytest.raises(ValueError, match="GSM8K row 0.*'####'"):
        read_gsm8k_rows([{"question": "q", "answer": "42"}])


def test_unreadable_split_inputs_are_named(tmp_path):
    from megatron_zero.data.splits import read_rows

    folder = tmp_path / "MATH" / "algebra"
    folder.mkdir(parents=True)
    (folder / "1.json").write_bytes(b"\xff\xfe{}")  # UTF-16 exported by an editor
    with pytest.raises(ValueError, match=rf"^{re.escape(str(folder / '1.json'))}: not UTF-8 text \(invalid start byte"):
        read_rows(tmp_path / "MATH")  # the file inside the folder, not the folder, is named
    (tmp_path / "t.jsonl").write_text('{"problem": "p"}\n{"problem": \n')
    with pytest.raises(ValueError, match=r"t.jsonl:2: not valid JSON"):
        read_rows(tmp_path / "t.jsonl")


def test_build_difficulty_splits():
    def uids(rows):
        return sorted(row["uid"] for row in rows)

    level = {f"math-{i}": i % 5 + 1 for i in range(10)}  # MATH_ROWS' levels; "Level ?" (math-10) is in no split
    easy = build_difficulty_split("easy", MATH_ROWS, GSM8K_ROWS)
    assert uids(easy) == sorted([f"gsm8k-{i}" for i in range(3)] + [uid for uid, lv in level.items() if lv == 1])
    assert uids(build_difficulty_split("medium", MATH_ROWS)) == sorted(uid for uid, lv in level.items() if lv <= 4)
    assert uids(build_difficulty_split("hard", MATH_ROWS)) == sorted(uid for uid, lv in level.items() if lv >= 3)
    assert len(build_difficulty_split("hard", MATH_ROWS, max_problems=4, seed=1)) == 4
    with pytest.raises(ValueError, match=r"'insane' is unknown; use one of \['easy', 'hard', 'medium'\]"):
        build_difficulty_split("insane", MATH_ROWS)
    with pytest.raises(ValueError, match="includes GSM8K"):
        build_difficulty_split("easy", MATH_ROWS)


def test_split_round_trips_through_jsonl_loader(tmp_path):
    path = tmp_path / "hard.jsonl"
    write_jsonl(build_difficulty_split("hard", MATH_ROWS), path)
    config = DatasetConfig(path=str(path), uid_field="uid", level_field="level", source_field="source",
                           cache_dir=str(tmp_path / "cache"))
    problems = load_problems(config)
    assert [(p.uid, p.ground_truth, p.metadata["level"]) for p in problems] == [
        (f"math-{i}", str(i), i % 5 + 1) for i in range(10) if i % 5 + 1 >= 3
    ]


def test_pass_rates_estimate_band_and_round_trip(tmp_path):
    problems = make_problems(7)
    true_rate = {p.uid: i / 6 for i, p in enumerate(problems)}  # 0, 1/6, ..., 1
    calls = []

    def generate_and_grade(batch, n):  # deterministic "engine": the first round(rate * n) samples are right
        calls.append(len(batch))
        return [[1.0 if k < round(true_rate[p.uid] * n) else 0.0 for k in range(n)] for p in batch]

    rates = estimate_pass_rates(problems, generate_and_grade, num_samples=6, batch_size=3)
    assert calls == [3, 3, 1]
    assert {uid: rate.pass_rate for uid, rate in rates.items()} == pytest.approx(true_rate)
    save_pass_rates(rates, tmp_path / "rates.jsonl")
    assert load_pass_rates(tmp_path / "rates.jsonl") == rates
    kept = filter_by_pass_rate(problems, rates, low=0.2, high=0.8)
    assert [p.uid for p in kept] == [p.uid for p in problems if 0.2 <= true_rate[p.uid] <= 0.8]
    with pytest.raises(ValueError, match="1 of 8 problems have no pass rate"):
        filter_by_pass_rate(problems + make_problems(8)[7:], rates, 0.0, 1.0)
    with pytest.raises(ValueError, match="must return 6 rewards"):
        estimate_pass_rates(problems, lambda batch, n: [[1.0]] * len(batch), num_samples=6)
    assert PassRate("x", 4, 1, "f").pass_rate == 0.25


def test_data_config_validation():
    config = OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(DataConfig), {"train": {"path": "a.jsonl"}}))
    assert config.train.path == "a.jsonl" and config.sampler.batch_size == 256
    with pytest.raises(ValueError, match="batch_size=0"):
        SamplerConfig(batch_size=0)
    with pytest.raises(ValueError, match=r"band \[0.9, 0.1\]"):
        PassRateFilterConfig(min_pass_rate=0.9, max_pass_rate=0.1)
    with pytest.raises(ValueError, match="max_prompt_tokens=0"):
        DatasetConfig(max_prompt_tokens=0)


def _rate_table(problems, correct_of, tmp_path):
    """A table written by the real writer: problem i solved correct_of(i) of 4 times."""
    from megatron_zero.data import problem_fingerprint

    rates = {p.uid: PassRate(p.uid, 4, correct_of(i), problem_fingerprint(p)) for i, p in enumerate(problems)}
    path = tmp_path / "rates.jsonl"
    save_pass_rates(rates, path)
    return path


def test_pass_rate_filter_keeps_the_band_and_reports_counts(tmp_path):
    from megatron_zero.data import apply_pass_rate_filter

    problems = make_problems(10)
    path = _rate_table(problems, lambda i: i % 5, tmp_path)  # rates 0, .25, .5, .75, 1, 0, ...
    kept, report = apply_pass_rate_filter(problems, PassRateFilterConfig(pass_rate_file=str(path),
                                                                         min_pass_rate=0.25, max_pass_rate=0.75))
    assert [p.uid for p in kept] == [f"p{i}" for i in range(10) if i % 5 in (1, 2, 3)]
    assert (report.num_kept, report.num_dropped_hard, report.num_dropped_easy, report.num_dropped) == (6, 2, 2, 4)
    unchanged, none = apply_pass_rate_filter(problems, PassRateFilterConfig())
    assert unchanged == problems and none is None
    with pytest.raises(ValueError, match=r"band \[0.3, 0.4\] keeps none of the 10 problems \(4 below it, 6 above"):
        apply_pass_rate_filter(problems, PassRateFilterConfig(pass_rate_file=str(path), min_pass_rate=0.3,
                                                              max_pass_rate=0.4))
    with pytest.raises(FileNotFoundError, match="pass_rate_file='nope.jsonl' does not exist"):
        apply_pass_rate_filter(problems, PassRateFilterConfig(pass_rate_file="nope.jsonl"))


def test_pass_rate_table_for_other_problems_is_refused(tmp_path):
    problems = make_problems(6)
    path = _rate_table(problems, lambda i: 2, tmp_path)
    rates = load_pass_rates(path)
    # Same uids, other problems (a file whose rows moved under "<stem>-<row>" uids).
    shifted = [Problem(p.uid, q.question, q.prompt_text, q.ground_truth) for p, q in zip(problems, problems[1:])]
    with pytest.raises(ValueError, match=r"5 of 5 problems differ from the ones their rows were estimated on .*"
                                         r"first: \['p0', 'p1', 'p2', 'p3', 'p4'\]"):
        filter_by_pass_rate(shifted, rates, 0.0, 1.0)
    # A changed answer is another problem too.
    edited = [*problems[:5], Problem("p5", "q5", "q5", "6")]
    with pytest.raises(ValueError, match=r"1 of 6 problems differ .*\['p5'\]"):
        filter_by_pass_rate(edited, rates, 0.0, 1.0)


def test_pass_rate_table_rows_are_checked_when_read(tmp_path):
    path = tmp_path / "t.jsonl"
    path.write_text('{"uid": "a", "num_samples": 4, "num_correct": 1}\n')
    with pytest.raises(ValueError, match=r"t.jsonl:1: not a pass-rate row .*fingerprint.*megatron-zero difficulty"):
        load_pass_rates(path)
    path.write_text('{"uid": "a", "num_samples": 4, "num_correct": 5, "fingerprint": "f"}\n')
    with pytest.raises(ValueError, match="num_correct=5 of num_samples=4 is not a pass rate"):
        load_pass_rates(path)
    row = '{"uid": "a", "num_samples": 4, "num_correct": 1, "fingerprint": "f"}\n'
    path.write_text(row + row)
    with pytest.raises(ValueError, match=r"t.jsonl:2: uid 'a' appears twice"):
        load_pass_rates(path)
    path.write_text("\n")
    with pytest.raises(ValueError, match="holds no pass-rate rows"):
        load_pass_rates(path)


def test_measure_pass_rates_samples_n_per_prompt_and_grades_each():
    from megatron_zero.config.data import PassRateEstimateConfig
    from megatron_zero.evaluation import GeneratedText
    from megatron_zero.evaluation.difficulty import measure_pass_rates

    problems = make_problems(5)
    calls = []

    def generate(prompts, *, n, temperature, top_p, max_new_tokens, seed):
        calls.append((len(prompts), n, temperature, top_p, max_new_tokens, seed))
        # Prompt "qi" answered "i" by its first i samples.
        return [[GeneratedText(str(int(p[1:])) if k < int(p[1:]) else "x", 1, "stop") for k in range(n)]
                for p in prompts]

    def grade(responses, truths):
        return [float(r == t) for r, t in zip(responses, truths)]

    config = PassRateEstimateConfig(num_samples=4, temperature=0.7, max_new_tokens=9, batch_size=2, seed=5)
    rates = measure_pass_rates(problems, generate, grade, config)
    assert calls == [(2, 4, 0.7, 1.0, 9, 5), (2, 4, 0.7, 1.0, 9, 6), (1, 4, 0.7, 1.0, 9, 7)]
    assert [rates[p.uid].num_correct for p in problems] == [0, 1, 2, 3, 4]
    with pytest.raises(ValueError, match="temperature=0 .* num_samples=4"):
        PassRateEstimateConfig(num_samples=4, temperature=0.0)
    with pytest.raises(ValueError, match="difficulty.batch_size=0 must be an integer >= 1"):
        PassRateEstimateConfig(batch_size=0)


def test_data_command_builds_splits_from_local_math_and_gsm8k_files(tmp_path, capsys):
    """MATH as its original release (a folder tree of one-problem .json files) and as .jsonl; GSM8K as .jsonl."""
    import json

    from megatron_zero.cli import main

    math_dir = tmp_path / "MATH" / "train"
    for i, row in enumerate(MATH_ROWS):
        (math_dir / row["type"].lower()).mkdir(parents=True, exist_ok=True)
        (math_dir / row["type"].lower() / f"{i:02d}.json").write_text(json.dumps(row))
    gsm8k = tmp_path / "gsm8k.jsonl"
    write_jsonl(GSM8K_ROWS, gsm8k)
    out = tmp_path / "easy.jsonl"
    assert main(["data", "--split", "easy", "--math", str(math_dir), "--gsm8k", str(gsm8k), "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "wrote 5 easy problems" in printed
    overrides = dict(item.split("=", 1) for item in printed.split("train with ")[1].split())
    config = DatasetConfig(path=overrides["data.train.path"], uid_field=overrides["data.train.uid_field"],
                           level_field=overrides["data.train.level_field"],
                           source_field=overrides["data.train.source_field"], cache_dir=str(tmp_path / "cache"))
    problems = load_problems(config)
    # Level 1 rows of MATH_ROWS are i = 0 and 5 (answers "0", "5"); GSM8K answers without thousands separators.
    assert sorted((p.metadata["source"], p.ground_truth) for p in problems) == [
        ("gsm8k", "1250"), ("gsm8k", "2250"), ("gsm8k", "3250"), ("math", "0"), ("math", "5")]
    hard = tmp_path / "hard.jsonl"
    write_jsonl(MATH_ROWS, tmp_path / "math.jsonl")
    assert main(["data", "--split", "hard", "--math", str(tmp_path / "math.jsonl"), "--max-problems", "3",
                 "--out", str(hard)]) == 0
    rows = [json.loads(line) for line in hard.read_text().splitlines()]
    assert len(rows) == 3 and all(row["level"] >= 3 for row in rows)
    assert main(["data", "--split", "hard", "--math", str(math_dir), "--gsm8k", str(gsm8k), "--out", str(hard)]) == 2
    assert "has no place for the 3 GSM8K rows" in capsys.readouterr().err
    # A repeated flag adds files (argparse alone would keep only the last --math).
    assert main(["data", "--split", "hard", "--math", str(math_dir), "--math", str(tmp_path / "math.jsonl"),
                 "--out", str(hard)]) == 0
    both = [json.loads(line) for line in hard.read_text().splitlines()]
    assert main(["data", "--split", "hard", "--math", str(math_dir), "--out", str(hard)]) == 0
    assert len(both) == 2 * len(hard.read_text().splitlines()) > 0
    # Every missing input is named with its flag, before anything is read or written.
    hard.unlink()
    assert main(["data", "--split", "easy", "--math", str(tmp_path / "none"), "--math", str(math_dir), "--gsm8k",
                 str(tmp_path / "g.jsonl"), "--out", str(hard)]) == 2
    assert f"no such file or folder: --math {tmp_path / 'none'}, --gsm8k {tmp_path / 'g.jsonl'}" in (
        capsys.readouterr().err)
    assert not hard.exists()
