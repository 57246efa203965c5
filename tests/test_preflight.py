"""The checks before any engine or Ray starts, tried as a user would from the CLI (issue #21 items 4-6).

- README's / docs' / examples' `plan` and `train --dry-run` lines, verbatim, on a machine without /models or /data;
- `eval` and `difficulty` refuse a prompt + response beyond the model's context, as `train` does, before an engine;
- a malformed JSONL names its line;
- `data`'s printed advice, then `difficulty`'s, followed in order, ends in a run that reads the pass-rate table.
No Ray: every command here stops before it.
"""

from __future__ import annotations

import json
import re
import shlex
from pathlib import Path

import pytest

from megatron_zero.cli import main
from megatron_zero.demo import BASE_MODEL_PATH

ROOT = Path(__file__).resolve().parents[1]
DOCUMENTED = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md")), *sorted((ROOT / "examples").rglob("*.yaml")),
              ROOT / "megatron_zero" / "cli.py"]
EXAMPLE_CONFIGS = sorted((ROOT / "examples" / "configs").glob("*.yaml"))
# `megatron-zero plan|train --config examples/configs/X.yaml ...` up to the end of the command (a comment, a
# backtick, the line's end).
COMMAND = re.compile(r"megatron-zero ((?:plan|train) --config examples/configs/[^\s`]+[^`#\n]*)")


def documented_commands() -> list[str]:
    commands = {match.group(1).strip() for path in DOCUMENTED for match in COMMAND.finditer(path.read_text())}
    return sorted(command for command in commands if command.startswith("plan") or "--dry-run" in command)


def test_the_documents_hold_plan_and_dry_run_lines():
    commands = documented_commands()
    assert any(c.startswith("plan") for c in commands) and any("--dry-run" in c for c in commands), commands


@pytest.mark.parametrize("command", documented_commands())
def test_documented_plan_and_dry_run_work_without_the_downloads(command, monkeypatch, capsys):
    """Verbatim, from the repository root, with neither /models nor /data here: a plan prints whole; a dry run
    prints the whole plan, then every missing file in one block, and exits 2 for that alone."""
    monkeypatch.chdir(ROOT)
    argv = shlex.split(command)
    assert not Path("/models").exists()  # the point of the test: nothing downloaded
    code = main(argv)
    out, err = capsys.readouterr()
    assert "error:" not in err, err
    if argv[0] == "plan":
        assert code in (0, 1) and "peak" in out  # 1: the plan does not fit the GPU (a plan all the same)
        return
    assert code == 2, out
    assert "cluster:" in out and "GiB" in out  # placement and the memory plan
    block = out.split("input(s) missing; a run would stop before Ray starts:")[1]
    assert "model_path=" in block and "data.train.path=" in block
    if "rollout.engine" not in command:
        assert "sglang.launch_server" in out or "torch engine" in out or "SGLang server started by hand" in out


@pytest.mark.parametrize("config", EXAMPLE_CONFIGS, ids=lambda path: path.stem)
def test_every_example_dry_runs_without_the_downloads(config, monkeypatch, capsys):
    monkeypatch.chdir(ROOT)
    assert main(["train", "--config", str(config.relative_to(ROOT)), "--dry-run"]) == 2
    out, err = capsys.readouterr()
    assert "error:" not in err and "cluster:" in out and "input(s) missing" in out
    assert out.rstrip().splitlines()[-1].startswith("  - ")  # the block of missing files ends the output


def test_plan_refuses_a_sequence_beyond_the_engine_context(monkeypatch, capsys):
    monkeypatch.chdir(ROOT)
    assert main(["plan", "--config", "examples/configs/qwen2.5-7b-zero-2node.yaml",
                 "rollout.sglang.context_length=4096"]) == 2
    assert ("data.train.max_prompt_tokens=1024 + rollout.max_new_tokens=8192 = 9216 tokens exceed the SGLang "
            "server's context, rollout.sglang.context_length=4096") in _error(capsys)


def test_model_config_flag_and_an_unknown_model(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(ROOT)
    config = "examples/configs/qwen2.5-7b-zero-2node.yaml"
    assert main(["plan", "--config", config, "model_path=/models/Unknown-7B"]) == 2
    assert "no shipped architecture named 'Unknown-7B'" in capsys.readouterr().err
    assert main(["plan", "--config", config, "model_path=/models/Unknown-7B",
                 "--model-config", "examples/model_configs/Qwen2.5-7B/config.json"]) in (0, 1)
    assert main(["train", "--config", config, "--dry-run", "model_path=/models/Unknown-7B",
                 "--model-config", "examples/model_configs/Qwen2.5-7B"]) == 2
    assert "examples/model_configs/Qwen2.5-7B/config.json (model_path is not whole on this machine)" in \
        capsys.readouterr().out


def test_dry_run_with_the_model_lists_a_missing_table_and_eval_set_after_the_plan(tmp_path, capsys):
    data = tmp_path / "train.jsonl"
    data.write_text("".join(json.dumps({"question": f"{i}+1?", "answer": str(i + 1)}) + "\n" for i in range(8)))
    code = main(["train", "--dry-run", f"model_path={BASE_MODEL_PATH}", f"run.output_dir={tmp_path / 'run'}",
                 f"data.train.path={data}", 'data.train.template="{input}"',
                 f"data.pass_rate_filter.pass_rate_file={tmp_path / 'rates.jsonl'}",
                 f"eval.path={tmp_path / 'held_out.jsonl'}", "data.train.max_prompt_tokens=64",
                 "rollout.max_new_tokens=24", "eval.max_new_tokens=24", "data.sampler.batch_size=4",
                 "rollout.num_samples_per_prompt=2", "parallel.tensor_parallel_size=1",
                 "cluster.cpu_workers_per_node=1"])
    out, err = capsys.readouterr()
    assert code == 2 and "error:" not in err, err
    assert "8 problems (not in a pass-rate band: the table is missing" in out and "torch engine" in out
    block = out.split("2 input(s) missing; a run would stop before Ray starts:\n")[1].splitlines()
    assert len(block) == 2 and block[0].startswith("  - eval.path=")
    assert block[1].startswith("  - data.pass_rate_filter.pass_rate_file=") and "`megatron-zero difficulty" in block[1]


@pytest.fixture()
def no_engine(monkeypatch):
    """Fails the test if a command gets as far as starting an engine."""
    import megatron_zero.evaluation.engines as engines

    def refuse(*args, **kwargs):
        raise AssertionError("an engine was started")

    monkeypatch.setattr(engines, "standalone_engine", refuse)


def _error(capsys) -> str:
    return [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")][-1]


def test_eval_and_difficulty_refuse_sequences_beyond_the_context(tmp_path, no_engine, capsys):
    """The demo model has fewer than 164 positions: a 100-token prompt + 64 new tokens cannot fit."""
    positions = json.loads((BASE_MODEL_PATH / "config.json").read_text())["max_position_embeddings"]
    assert positions < 164
    (tmp_path / "gsm8k").mkdir()
    question = "What is " + "1+" * 50 + "1?"
    (tmp_path / "gsm8k" / "test.jsonl").write_text(json.dumps({"question": question, "answer": "x #### 51"}) + "\n")
    assert main(["eval", "--model", str(BASE_MODEL_PATH), "--benchmarks", "gsm8k", "--data-dir", str(tmp_path),
                 "--max-new-tokens", "64", "--out", str(tmp_path / "eval")]) == 2
    assert re.search(r"the longest prompt \(gsm8k row 0, \d+ tokens\) \+ --max-new-tokens=64 = \d+ tokens exceed "
                     r"the model's context, max_position_embeddings=\d+", _error(capsys))
    data = tmp_path / "train.jsonl"
    data.write_text(json.dumps({"question": "2+2?", "answer": "4"}) + "\n")
    assert main(["difficulty", "--model", str(BASE_MODEL_PATH), "--data", str(data), "--template", "{input}",
                 "--max-prompt-tokens", "100", "--max-new-tokens", "64", "--out", str(tmp_path / "r.jsonl")]) == 2
    assert ("--max-prompt-tokens=100 + --max-new-tokens=64 = 164 tokens exceed the model's context, "
            f"max_position_embeddings={positions}") in _error(capsys)
    # The SGLang server's own limit, where set (--context-length), counts too: both limits in one block.
    assert main(["difficulty", "--model", str(BASE_MODEL_PATH), "--data", str(data), "--template", "{input}",
                 "--max-prompt-tokens", "100", "--max-new-tokens", "64", "--engine", "sglang", "--context-length",
                 "120", "--device", "cpu", "--out", str(tmp_path / "r.jsonl")]) == 2
    err = capsys.readouterr().err
    assert "the SGLang server's context, --context-length=120" in err and f"max_position_embeddings={positions}" in err
    # And its KV pool: one sequence longer than the whole pool can never be scheduled.
    assert main(["difficulty", "--model", str(BASE_MODEL_PATH), "--data", str(data), "--template", "{input}",
                 "--max-prompt-tokens", "40", "--max-new-tokens", "40", "--engine", "sglang", "--max-total-tokens",
                 "64", "--device", "cpu", "--out", str(tmp_path / "r.jsonl")]) == 2
    assert ("--max-prompt-tokens=40 + --max-new-tokens=40 = 80 tokens exceed the SGLang server's KV pool, "
            "--max-total-tokens=64") in _error(capsys)


def test_command_errors_name_the_command_flags(tmp_path, capsys):
    data = tmp_path / "train.jsonl"
    data.write_text(json.dumps({"question": "2+2?", "answer": "4"}) + "\n")
    assert main(["difficulty", "--model", str(BASE_MODEL_PATH), "--data", str(data), "--n", "0",
                 "--out", str(tmp_path / "r.jsonl")]) == 2
    assert _error(capsys) == "error: --n=0 must be an integer >= 1"
    assert main(["difficulty", "--model", str(BASE_MODEL_PATH), "--data", str(data), "--max-prompt-tokens", "0",
                 "--out", str(tmp_path / "r.jsonl")]) == 2
    assert _error(capsys).startswith("error: --max-prompt-tokens=0 must be >= 1")
    assert main(["eval", "--model", str(BASE_MODEL_PATH), "--benchmarks", "gsm8k", "--n", "0"]) == 2
    assert _error(capsys).startswith("error: --n=0 must be")
    assert main(["eval", "--model", str(BASE_MODEL_PATH), "--benchmarks", "gsm8k", "--engine", "sglang",
                 "--tp-size", "2", "--num-gpus", "3", "--device", "cpu"]) == 2
    assert _error(capsys) == "error: --tp-size=2 must divide --num-gpus=3 (one engine per tp_size GPUs)"
    # Said once, as the flag: not also as the CPU layout built from it (cluster.cpu_workers_per_node).
    assert main(["eval", "--model", str(BASE_MODEL_PATH), "--benchmarks", "gsm8k", "--engine", "sglang",
                 "--num-gpus", "0", "--device", "cpu"]) == 2
    assert _error(capsys) == "error: --num-gpus=0 must be an integer >= 1"


def test_malformed_jsonl_names_its_line(tmp_path):
    from megatron_zero.config.data import DatasetConfig
    from megatron_zero.data.problems import eval_set_keys, load_problems

    path = tmp_path / "train.jsonl"
    path.write_text('{"question": "1+1?", "answer": "2"}\n\n{"question": "2+2?" "answer": "4"}\n')
    with pytest.raises(ValueError, match=r"^data.train.path='.*train.jsonl' is not valid JSON at line 3: Expecting "
                                         r"',' delimiter$"):
        load_problems(DatasetConfig(path=str(path), cache_dir=str(tmp_path / "cache")))
    # A .json data file (one document) too.
    document = tmp_path / "train.json"
    document.write_text('[\n  {"question": "1+1?", "answer": "2"},\n  {"question": "2+2?" "answer": "4"}\n]\n')
    with pytest.raises(ValueError, match=r"^data.train.path='.*train.json' is not valid JSON at line 3"):
        load_problems(DatasetConfig(path=str(document), cache_dir=str(tmp_path / "cache")))
    # The held-out set is read with data.train's settings but named as the user set it.
    with pytest.raises(ValueError, match=r"^eval.path='.*train.jsonl' is not valid JSON at line 3"):
        load_problems(DatasetConfig(path=str(path), cache_dir=str(tmp_path / "cache")), keys=eval_set_keys)


def test_every_json_lines_reader_names_the_line(tmp_path):
    """Pass-rate tables, benchmark files (eval sets) and sample records, each broken on line 2."""
    from megatron_zero.analysis.records import read_sample_file
    from megatron_zero.data.difficulty import load_pass_rates
    from megatron_zero.evaluation.benchmarks import load_benchmark

    broken = '\n{"a": 1 "b": 2}\n'  # line 1 blank (skipped), line 2 broken
    table = tmp_path / "rates.jsonl"
    table.write_text(broken)
    (tmp_path / "gsm8k").mkdir()
    (tmp_path / "gsm8k" / "test.jsonl").write_text(broken)
    samples = tmp_path / "samples.jsonl"
    samples.write_text(broken)
    for read, path in ((load_pass_rates, table), (lambda _: load_benchmark("gsm8k", tmp_path), None),
                       (lambda path: list(read_sample_file(path)), samples)):
        with pytest.raises(ValueError, match=r":2: |line 2"):
            read(path)


MATH_ROWS = [{"problem": f"Q: {a}+{a}=? A:", "solution": f"It is $\\boxed{{{2 * a}}}$.", "level": f"Level {3 + a % 3}",
              "type": "Algebra"} for a in range(1, 9)]


def test_data_then_difficulty_then_train_as_printed(tmp_path, capsys):
    """README's sequence: `data`, then the `difficulty` command it prints, then a run with the overrides
    `difficulty` prints. Before the fix `data` advised uid_field=uid while `difficulty` keyed rates by file stem and
    row, and the run ended in "8 of 8 problems have no pass rate"."""
    math_file = tmp_path / "math.jsonl"
    math_file.write_text("".join(json.dumps(row) + "\n" for row in MATH_ROWS))
    split = tmp_path / "data" / "hard.jsonl"
    assert main(["data", "--split", "hard", "--math", str(math_file), "--out", str(split)]) == 0
    printed = capsys.readouterr().out
    difficulty = shlex.split(re.search(r"`megatron-zero (difficulty [^`]+)`", printed).group(1))
    difficulty[difficulty.index("MODEL")] = str(BASE_MODEL_PATH)
    # At the demo model's size (144 positions): short prompts and responses, few samples.
    assert main([*difficulty, "--n", "2", "--template", "{input}", "--max-prompt-tokens", "64", "--max-new-tokens",
                 "8", "--batch-size", "8"]) == 0
    printed = capsys.readouterr().out
    overrides = shlex.split(printed.split("train on a band with ")[1])
    assert "data.train.uid_field=uid" in overrides
    code = main(["train", "--dry-run", f"model_path={BASE_MODEL_PATH}", f"run.output_dir={tmp_path / 'run'}",
                 *overrides, "data.pass_rate_filter.min_pass_rate=0", "data.pass_rate_filter.max_pass_rate=1",
                 "data.train.max_prompt_tokens=64", "rollout.max_new_tokens=24", "data.sampler.batch_size=4",
                 "rollout.num_samples_per_prompt=2", "parallel.tensor_parallel_size=1",
                 "cluster.cpu_workers_per_node=1"])
    out, err = capsys.readouterr()
    assert code == 0, err
    assert re.search(r"data: .*hard.jsonl: \d+ problems in the pass-rate band", out)


def test_a_table_keyed_by_another_uid_field_says_so(tmp_path):
    from megatron_zero.config.data import DatasetConfig
    from megatron_zero.data.difficulty import PassRate, check_pass_rate_table, problem_fingerprint
    from megatron_zero.data.problems import problems_from_rows

    rows = [{"uid": f"p{i}", "question": f"{i}+1?", "answer": str(i + 1)} for i in range(3)]
    by_row = problems_from_rows(rows, DatasetConfig(), origin="hard.jsonl")
    rates = {p.uid: PassRate(p.uid, 4, 1, problem_fingerprint(p)) for p in by_row}
    by_uid = problems_from_rows(rows, DatasetConfig(uid_field="uid"), origin="hard.jsonl")
    with pytest.raises(ValueError, match=r"3 of 3 problems have no pass rate .* the table holds 3 of them under other "
                                         r"ids \(e.g. 'hard-0' for 'p0'\): it was written with another uid field"):
        check_pass_rate_table(by_uid, rates)


def _sharded_copy(folder: Path) -> Path:
    """The demo model with its weights in two safetensors shards and an index, as a hub download has them."""
    import shutil

    from safetensors.torch import load_file, save_file

    shutil.copytree(BASE_MODEL_PATH, folder)
    tensors = load_file(folder / "model.safetensors")
    (folder / "model.safetensors").unlink()
    names = sorted(tensors)
    shards = {"model-00001-of-00002.safetensors": names[: len(names) // 2],
              "model-00002-of-00002.safetensors": names[len(names) // 2:]}
    for shard, shard_names in shards.items():
        save_file({name: tensors[name] for name in shard_names}, folder / shard)
    weight_map = {name: shard for shard, shard_names in shards.items() for name in shard_names}
    (folder / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return folder


def test_a_damaged_model_directory_is_named_before_any_engine(tmp_path, no_engine, capsys):
    """An interrupted download: a shard cut short in its tensors or its header, a shard the index lists but that is
    not there, a tokenizer.json half written. Each is one line naming the file, before an engine loads them."""
    data = tmp_path / "train.jsonl"
    data.write_text(json.dumps({"question": "2+2?", "answer": "4"}) + "\n")

    def difficulty(model: Path) -> str:
        assert main(["difficulty", "--model", str(model), "--data", str(data), "--template", "{input}",
                     "--max-prompt-tokens", "20", "--max-new-tokens", "20", "--out", str(tmp_path / "r.jsonl")]) == 2
        return _error(capsys)

    whole = _sharded_copy(tmp_path / "sharded")
    from megatron_zero.preflight.model_files import damaged_model_files

    assert damaged_model_files(whole, "--model") == [] == damaged_model_files(BASE_MODEL_PATH, "--model")
    shard = whole / "model-00002-of-00002.safetensors"
    size = shard.stat().st_size
    with shard.open("r+b") as f:
        f.truncate(size - 100)  # the header is whole; the last tensor's bytes are not
    assert difficulty(whole) == (f"error: --model='{whole}': {shard} is damaged ({size - 100} bytes, its header says "
                                 f"{size}); download or copy it again")
    with shard.open("r+b") as f:
        f.truncate(20)
    assert f"{shard} is damaged (20 bytes, its header alone needs" in difficulty(whole)
    shard.unlink()
    assert difficulty(whole) == (f"error: --model='{whole}': {whole} index names shard(s) that are missing: "
                                 "['model-00002-of-00002.safetensors']")
    (whole / "model.safetensors.index.json").write_text('{"weight_map": {"a": ')
    assert f"{whole / 'model.safetensors.index.json'} is not a safetensors index (JSONDecodeError" in difficulty(whole)
    cut = _sharded_copy(tmp_path / "cut_tokenizer")
    (cut / "tokenizer.json").write_text((cut / "tokenizer.json").read_text()[:100])
    assert difficulty(cut).startswith(f"error: --model='{cut}': tokenizer.json does not parse (line ")
