"""Config validation: each kind of bad experiment config fails before any worker starts, naming the field."""

import re

import pytest

from megatron_zero.preflight.config import load_config
from megatron_zero.models.tiny import save_tiny_model
from megatron_zero.preflight.train import check_train_inputs

# The tiny test models have 256 positions: prompts up to 128 tokens + 64 new tokens fit.
BASE = ["cluster.cpu_workers_per_node=2", "actor.max_tokens_per_microbatch=4096", "rollout.max_new_tokens=64",
        "data.train.max_prompt_tokens=128"]


@pytest.mark.parametrize("overrides,message", [
    (["parallel.tensor_parallel_size=3"], r"3 x 1 x 1 = 3 does not divide .* 2 CPU workers"),
    (["run.num_steps=0"], r"run.num_steps=0 must be >= 1"),
    (["run.num_minibatches=3", "data.sampler.batch_size=4", "rollout.num_samples_per_prompt=2"],
     r"run.num_minibatches=3 must divide .* = 8"),
    (["actor.temperature=0.7"], r"actor.temperature=0.7 must equal rollout.temperature=1.0"),
    (["rollout.max_new_tokens=8192"], r"actor.max_tokens_per_microbatch=4096 is smaller than one sequence of "
                                      r"data.train.max_prompt_tokens=128 \+ rollout.max_new_tokens=8192 = 8320 tokens"),
    # The prompt counts too: 4000 new tokens fit the budget alone, not after a 128-token prompt.
    (["rollout.max_new_tokens=4000"], r"max_tokens_per_microbatch=4096 is smaller than one sequence .* = 4128 tokens"),
    (["loss.clip_low=1.5"], r"clip_low=1.5"),
    (["advantage.estimator=ppo_gae"], r"ppo_gae"),
    (["model.params_dtype=float8"], r"model.params_dtype='float8'"),
    (["run.nope=1"], r"Key 'nope' not in 'RunConfig'"),
    (["run.num_steps=many"], r"could not be converted to Integer"),
    (["health.max_logprob_gap_mean=0"], r"health.max_logprob_gap_mean=0.0 must be > 0"),
    (["eval.max_new_tokens=0"], r"eval.max_new_tokens=0 must be an integer >= 1"),
    (["eval.max_problems=0"], r"eval.max_problems=0 must be null \(all\) or an integer >= 1"),
    (["parallel.context_parallel_size=2"], r"parallel.context_parallel_size=2 is not supported yet"),
    (["rollout.num_samples_per_prompt=1"], r"advantage.estimator='grpo' compares each response with the other "
                                           r"samples of its prompt, but rollout.num_samples_per_prompt=1"),
    (["rollout.off_policy_steps=2"], r"rollout.off_policy_steps=2 must be 0 \(on-policy\) or 1"),
    (["rollout.off_policy_steps=1"], r"rollout.off_policy_steps=1 trains on responses of the policy one step back; "
                                     r"set loss.tis_cap"),
    (["rollout.off_policy_steps=1", "loss.tis_cap=2.0", "cluster.colocate=true"],
     r"rollout.off_policy_steps=1 generates the next batch while the actor trains, but cluster.colocate=True"),
    (["rollout.quantization=int4"], r"rollout.quantization='int4' is unknown; use null or one of \['fp8'\]"),
])
def test_bad_config_names_the_field(overrides, message):
    with pytest.raises(ValueError, match=message):
        load_config(None, ["model_path=/unused", *BASE, *overrides])


GPU_SGLANG = ["cluster.gpus_per_node=8", "cluster.cpu_workers_per_node=null", "cluster.colocate=true",
              "rollout.engine=sglang", "rollout.sglang.model_path=/m"]


DISAGGREGATED = ["cluster.colocate=false", "cluster.rollout_num_gpus=8", "rollout.sglang.colocated=false"]
CPU_WORKERS = ["cluster.gpus_per_node=0", "cluster.cpu_workers_per_node=2"]


def test_sglang_launches_on_cpu_workers_colocated_or_on_bundles_of_their_own():
    """Without GPUs the launched servers run on CPU (rollout/sglang_cpu.py): on the CPU workers' bundles or on
    cluster.rollout_num_gpus CPU bundles; float32 unless asked otherwise, so the fp32 gap bounds apply."""
    colocated = load_config(None, ["model_path=/unused", *BASE, *GPU_SGLANG, *CPU_WORKERS, "model.params_dtype=float32"])
    assert colocated.rollout.sglang.served_dtype(colocated.cluster.use_gpus) == "float32"
    assert colocated.logprob_precision == "fp32"
    separate = load_config(None, ["model_path=/unused", *BASE, *GPU_SGLANG, *CPU_WORKERS, "cluster.colocate=false",
                                  "cluster.rollout_num_gpus=1", "rollout.sglang.colocated=false"])
    assert separate.cluster.rollout_num_gpus == 1
    on_gpus = load_config(None, ["model_path=/unused", *BASE, *GPU_SGLANG, "model.params_dtype=float32"])
    assert on_gpus.rollout.sglang.served_dtype(on_gpus.cluster.use_gpus) == "bfloat16"
    assert on_gpus.logprob_precision == "16bit"
    with pytest.raises(ValueError, match=r"the SGLang servers have no GPUs: set cluster.colocate=True"):
        load_config(None, ["model_path=/unused", *BASE, *GPU_SGLANG, *CPU_WORKERS, "cluster.colocate=false"])


@pytest.mark.parametrize("overrides,message", [
    (["cluster.colocate=false"], r"the SGLang servers have no GPUs: set cluster.colocate=True .* or "
                                 r"cluster.rollout_num_gpus=N"),
    (["rollout.sglang.colocated=false"], r"sglang.colocated=False, but servers on the actor's GPUs must release"),
    (["rollout.sglang.tp_size=3"], r"sglang.tp_size=3 must divide cluster.gpus_per_node=8"),
    (["rollout.sglang.base_gpu_id=2"], r"sglang.base_gpu_id=2: launched servers see only"),
    # Disaggregated: engines on GPUs of their own.
    (["cluster.rollout_num_gpus=8"], r"cluster.colocate=True puts the rollout engines on the ranks' GPUs, but "
                                     r"cluster.rollout_num_gpus=8 gives them GPUs of their own"),
    ([*DISAGGREGATED, "rollout.sglang.colocated=true"], r"sglang.colocated=True, but the engines run on "
                                                        r"cluster.rollout_num_gpus=8 GPUs of their own"),
    ([*DISAGGREGATED, "cluster.rollout_num_gpus=6", "rollout.sglang.tp_size=4"],
     r"sglang.tp_size=4 must divide cluster.rollout_num_gpus=6"),
    ([*DISAGGREGATED, "cluster.rollout_num_gpus=-1"], r"cluster.rollout_num_gpus=-1 must be an integer >= 0"),
    ([*DISAGGREGATED, "rollout.engine=torch"], r"cluster.rollout_num_gpus=8 reserves GPUs for SGLang engines, but "
                                               r"rollout.engine='torch'"),
    # A server started by hand: weights by broadcast, no GPUs of the cluster.
    (["cluster.colocate=false", "rollout.sglang.launch=false"], r"launch=False with rollout.sglang.colocated=True: the "
                                                                r"server at http://127.0.0.1:30000 was started by hand"),
    ([*DISAGGREGATED, "rollout.off_policy_steps=1", "loss.tis_cap=2.0", "rollout.temperature=0.7",
      "actor.temperature=0.7"], r"re-scores each batch on the engine, but SGLang 0.5.23 scores given tokens at "
                                r"temperature 1 only, and rollout.temperature=0.7"),
    ([*DISAGGREGATED, "rollout.sglang.launch=false"], r"launch=False uses the server at .* cluster.rollout_num_gpus=8 "
                                                      r"place launched engines"),
])
def test_bad_sglang_launch_config_names_the_field(overrides, message):
    with pytest.raises(ValueError, match=message):
        load_config(None, ["model_path=/unused", *BASE[1:], *GPU_SGLANG, *overrides])


@pytest.mark.parametrize("overrides", [[], DISAGGREGATED, ["cluster.colocate=false", "rollout.sglang.launch=false",
                                                           "rollout.sglang.colocated=false"]])
def test_sglang_layouts_that_fit_validate(overrides):
    """Colocated, disaggregated, and a server started by hand."""
    config = load_config(None, ["model_path=/unused", *BASE[1:], *GPU_SGLANG, *overrides])
    assert config.rollout.engine == "sglang"


@pytest.mark.parametrize("override, message", [
    ("loss.clip_low=1.5", r"^loss.clip_low=1.5 must be in \(0, 1\)"),  # PolicyLossConfig calls it policy_loss
    ("data.train.template=nope", r"^data.train.template: "),             # a DatasetConfig, also used for eval
    ("rollout.top_p=2", r"^rollout.top_p=2.0 must be in \(0, 1\]"),     # already the user's key: unchanged
])
def test_errors_name_the_key_the_user_typed(override, message):
    with pytest.raises(ValueError, match=message):
        load_config(None, ["model_path=/unused", *BASE, override])


def _model_with_tokenizer(tmp_path):
    """A tiny Qwen2 with the demo model's (character) tokenizer files beside it."""
    import shutil

    from megatron_zero.demo import BASE_MODEL_PATH

    model = save_tiny_model("qwen2", tmp_path / "model")
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(BASE_MODEL_PATH / name, model / name)
    return model


def test_file_checks_run_before_workers(tmp_path):
    config = load_config(None, [f"model_path={tmp_path}/missing", *BASE])
    with pytest.raises(FileNotFoundError, match=re.escape(f"model_path='{tmp_path}/missing': no config.json")):
        check_train_inputs(config)
    model = _model_with_tokenizer(tmp_path)
    config = load_config(None, [f"model_path={model}", *BASE, "parallel.tensor_parallel_size=2",
                                "data.train.path=/nonexistent.jsonl"])
    with pytest.raises(FileNotFoundError, match="data.train.path='/nonexistent.jsonl' does not exist"):
        check_train_inputs(config)
    # TP must divide the model's heads (4) and query groups (2): TP=2 does, and the data error comes first.
    config = load_config(None, [f"model_path={model}", *BASE, "cluster.cpu_workers_per_node=4",
                                "parallel.tensor_parallel_size=4"])
    with pytest.raises(ValueError, match="tensor_parallel_size=4 must divide num_key_value_heads=2"):
        check_train_inputs(config)
    # Prompt + response beyond the model's context (the tiny qwen2 has 256 positions).
    config = load_config(None, [f"model_path={model}", *BASE, "data.train.max_prompt_tokens=200"])
    with pytest.raises(ValueError, match=r"data.train.max_prompt_tokens=200 \+ rollout.max_new_tokens=64 = 264 "
                                         r"tokens exceed the model's context, max_position_embeddings=256"):
        check_train_inputs(config)
    # The held-out set's greedy decoding is bounded by the same context.
    eval_file = tmp_path / "eval.jsonl"
    eval_file.write_text('{"question": "1+1?", "answer": "2"}\n')
    config = load_config(None, [f"model_path={model}", *BASE, f"eval.path={eval_file}", "eval.max_new_tokens=200",
                                f"data.train.path={eval_file}"])
    with pytest.raises(ValueError, match=r"data.train.max_prompt_tokens=128 \+ eval.max_new_tokens=200 = 328 tokens "
                                         r"exceed the model's context"):
        check_train_inputs(config)
    # Expert parallelism needs experts; every supported family is dense.
    config = load_config(None, [f"model_path={model}", *BASE, "parallel.expert_parallel_size=2"])
    with pytest.raises(ValueError, match=r"parallel.expert_parallel_size=2 needs a mixture-of-experts model, but "
                                         r"model_type='qwen2' .* is dense; set it to 1"):
        check_train_inputs(config)


def test_common_mistakes_get_one_line_before_any_worker(tmp_path):
    """Each mistake is a ValueError or FileNotFoundError (the CLI prints those as one line) naming the file or key,
    raised by load_config or check_train_inputs, which run before Ray starts."""
    import shutil

    from megatron_zero.data import load_problems
    from megatron_zero.demo import TRAIN_PROMPTS_PATH

    model = _model_with_tokenizer(tmp_path)
    base = [f"model_path={model}", f"data.train.path={TRAIN_PROMPTS_PATH}", *BASE]
    (tmp_path / "bad.yaml").write_text("run: [\n")
    with pytest.raises(ValueError, match=r"bad.yaml is not valid YAML at line 2, column 1"):
        load_config(str(tmp_path / "bad.yaml"), base)
    # A section given one value, in the file or an override, is named by its key (OmegaConf's merge error says only
    # "int is not a subclass of ActorConfig"); each file section and override is checked, so all come in one block.
    (tmp_path / "flat.yaml").write_text("actor: 3\nrun:\n  num_steps: abc\ndata:\n  train: [1]\n")
    with pytest.raises(ValueError) as error:
        load_config(str(tmp_path / "flat.yaml"), [*base, "rollout.sglang=5", "actor.lr", "actor.lr=[1"])
    assert str(error.value).splitlines()[1:] == [
        f"  actor is a section of keys (actor.lr, ...), not a value: 3 (in {tmp_path / 'flat.yaml'})",
        f"  run.num_steps: Value 'abc' of type 'str' could not be converted to Integer (in {tmp_path / 'flat.yaml'})",
        f"  data.train is a section of keys (data.train.path, ...), not a value: [1] (in {tmp_path / 'flat.yaml'})",
        "  rollout.sglang is a section of keys (rollout.sglang.model_path, ...), not a value: 5",
        "  'actor.lr' is not key=value (e.g. actor.lr=1e-6)",
        "  actor.lr: the value '[1' does not parse (did not find expected ',' or ']')",
    ]
    (tmp_path / "list.yaml").write_text("- 1\n- 2\n")
    with pytest.raises(ValueError, match=r"list.yaml holds a ListConfig, not a mapping of config keys"):
        load_config(str(tmp_path / "list.yaml"), base)
    (tmp_path / "a_file").write_text("")
    with pytest.raises(ValueError, match=r"run.output_dir='.*a_file' is a file; choose a directory"):
        check_train_inputs(load_config(None, [*base, f"run.output_dir={tmp_path / 'a_file'}"]))
    for missing, message in (("tokenizer.json", "has no tokenizer"), ("model.safetensors", "has no weights")):
        broken = tmp_path / f"without_{missing}"
        shutil.copytree(model, broken)
        (broken / missing).unlink()
        with pytest.raises(FileNotFoundError, match=rf"model_path='{broken}' {message}"):
            check_train_inputs(load_config(None, [*base, f"model_path={broken}"]))
    # Data files are read before Ray too (the trainer's first step after check_train_inputs): one line each.
    for name, text, message in (("empty.jsonl", "", "is an empty file"),
                                ("broken.jsonl", '{"question": 1\n', "is not valid JSON at line 1: ")):
        (tmp_path / name).write_text(text)
        config = load_config(None, [*base, f"data.train.path={tmp_path / name}"])
        with pytest.raises(ValueError, match=rf"data.train.path='.*{name}' {message}"):
            load_problems(config.data.train)


def test_yaml_file_and_overrides(tmp_path):
    path = tmp_path / "exp.yaml"
    path.write_text("model_path: /m\nrun:\n  num_steps: 7\nactor:\n  lr: 2.0e-6\n")
    config = load_config(str(path), [*BASE, "run.num_steps=9"])
    assert config.run.num_steps == 9 and config.actor.lr == 2e-6 and config.model_path == "/m"
    with pytest.raises(FileNotFoundError):
        load_config(str(tmp_path / "nope.yaml"), [])


def test_shipped_example_configs_validate():
    from pathlib import Path

    for path in sorted(Path(__file__).resolve().parents[1].glob("examples/configs/*.yaml")):
        config = load_config(str(path), [])
        assert config.run.num_steps >= 1, path


def test_logprob_gap_bounds_follow_the_precision_of_engine_and_actor():
    from pathlib import Path

    from megatron_zero.config.trainer import LOGPROB_GAP_BOUNDS
    from megatron_zero.trainer.demo import demo_config

    demo = demo_config("/tmp/unused", 1, [])
    assert demo.logprob_precision == "fp32" and demo.logprob_gap_bounds == LOGPROB_GAP_BOUNDS["fp32"] == (1e-3, 5e-2)
    example = load_config(str(Path(__file__).resolve().parents[1] / "examples/configs/qwen2.5-7b-zero-2node.yaml"), [])
    assert example.logprob_precision == "16bit" and example.logprob_gap_bounds == (0.1, 2.0)
    # Either side in 16 bits is enough: a float32 actor against a bf16 torch engine.
    assert load_config(None, ["model_path=/m", *BASE, "model.params_dtype=float32",
                              "rollout.torch.dtype=bfloat16"]).logprob_precision == "16bit"
    # A bound set by hand wins over the default, each on its own.
    tuned = load_config(None, ["model_path=/m", *BASE, "health.max_logprob_gap_max=0.5"])
    assert tuned.logprob_gap_bounds == (0.1, 0.5)
    # FP8 rollout weights make a float32 pair a reduced-precision one.
    assert load_config(None, ["model_path=/m", *BASE, "rollout.quantization=fp8"]).logprob_precision == "16bit"


def test_fp8_rollout_with_sglang_is_checked_before_workers(tmp_path):
    """rollout.quantization=fp8 with SGLang: launched servers need block-aligned fused projections (the tiny
    model's 64-row k/v are not), and a server started by hand must serve an FP8 checkpoint."""
    from megatron_zero.demo import TRAIN_PROMPTS_PATH
    from megatron_zero.rollout.fp8_weights import write_fp8_checkpoint

    model = _model_with_tokenizer(tmp_path)
    config = load_config(None, [f"model_path={model}", *BASE, *GPU_SGLANG, f"rollout.sglang.model_path={model}",
                                "rollout.quantization=fp8"])
    with pytest.raises(ValueError, match=r"rollout.quantization='fp8' \(.*\): rollout.sglang.tp_size=1: an SGLang "
                                         r"server of tp_size=1 cannot load 128x128 block-FP8 weights of this model"):
        check_train_inputs(config)
    aligned = save_tiny_model("qwen2", tmp_path / "aligned", hidden_size=128, intermediate_size=256,
                              num_attention_heads=2, num_key_value_heads=2)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (aligned / name).write_bytes((model / name).read_bytes())
    by_hand = [f"model_path={aligned}", *BASE, "rollout.engine=sglang", "rollout.sglang.launch=false",
               "rollout.sglang.colocated=false", "rollout.quantization=fp8", f"data.train.path={TRAIN_PROMPTS_PATH}"]
    config = load_config(None, [*by_hand, f"rollout.sglang.model_path={aligned}"])
    with pytest.raises(ValueError, match=r"rollout.sglang.model_path='.*aligned' \(the server started by hand\) is "
                                         r"not an FP8 checkpoint; start the server from `python tools/convert_"):
        check_train_inputs(config)
    fp8 = write_fp8_checkpoint(aligned, tmp_path / "fp8", tp_size=1)
    check_train_inputs(load_config(None, [*by_hand, f"rollout.sglang.model_path={fp8}"]))


def test_train_help_lists_every_field_with_its_default():
    import dataclasses

    from megatron_zero.cli import _config_help
    from megatron_zero.config.sglang import SGLangConfig
    from megatron_zero.config.trainer import TrainConfig

    text = _config_help()

    def leaves(cls):
        for f in dataclasses.fields(cls):
            default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
            if dataclasses.is_dataclass(default):
                yield from leaves(type(default))
            else:
                yield f.name

    for name in [*leaves(TrainConfig), *leaves(SGLangConfig)]:
        assert f"{name}:" in text, name
    assert "max_concurrent_requests: 512" in text and "pack_sequences: true" in text


def test_demo_on_sglang_runs_colocated_servers_of_its_own_model():
    """`megatron-zero demo rollout.engine=sglang`: one server beside each of the two ranks, serving the demo model;
    a user's layout overrides still win."""
    from megatron_zero.demo import BASE_MODEL_PATH
    from megatron_zero.trainer.demo import demo_config

    config = demo_config("/tmp/unused", 2, ["rollout.engine=sglang"])
    assert config.cluster.colocate and config.rollout.sglang.colocated
    assert config.rollout.sglang.model_path == str(BASE_MODEL_PATH)
    assert config.logprob_precision == "fp32"  # float32 on both sides: the tight gap bounds
    separate = demo_config("/tmp/unused", 2, ["rollout.engine=sglang", "cluster.colocate=false",
                                              "cluster.rollout_num_gpus=1", "rollout.sglang.colocated=false"])
    assert (separate.cluster.colocate, separate.cluster.rollout_num_gpus) == (False, 1)
    assert demo_config("/tmp/unused", 2).rollout.sglang is None  # the torch engine's demo is unchanged


def test_demo_defaults_draw_a_held_out_curve_and_fit_the_self_check():
    """The demo scores its held-out set often enough for a curve, reads boxed answers only, and its rollouts are
    long enough for the corpus's longest response (the self-check) within the base model's positions."""
    import json

    from megatron_zero.demo import BASE_MODEL_PATH, TEST_PROMPTS_PATH, TRAIN_PROMPTS_PATH
    from megatron_zero.demo.corpus import ANSWER_FORMATS, END_OF_TEXT, format_answer
    from megatron_zero.trainer.demo import demo_config

    demo = demo_config("/tmp/unused")
    assert 0 < demo.run.eval_every and demo.run.num_steps // demo.run.eval_every + 1 >= 4
    assert demo.reward.strict_boxed
    longest_response = max(len(format_answer(99, 99, name, slip)) for name in ANSWER_FORMATS for slip in (False, True))
    assert demo.rollout.max_new_tokens >= longest_response + len([END_OF_TEXT])
    assert demo.eval.max_new_tokens == demo.rollout.max_new_tokens
    longest_prompt = max(len(json.loads(line)["question"]) for path in (TRAIN_PROMPTS_PATH, TEST_PROMPTS_PATH)
                         for line in path.read_text().splitlines())
    assert longest_prompt <= demo.data.train.max_prompt_tokens
    positions = json.loads((BASE_MODEL_PATH / "config.json").read_text())["max_position_embeddings"]
    assert demo.data.train.max_prompt_tokens + demo.rollout.max_new_tokens <= positions
