"""The ``megatron-zero`` command: train, demo, eval, difficulty, data, export.

    megatron-zero train --config examples/configs/qwen2.5-7b-zero-2node.yaml run.num_steps=200 actor.lr=1e-6
    megatron-zero train --config examples/configs/qwen2.5-7b-zero-2node.yaml --dry-run   # what a run would do
                                               # (plan and --dry-run need no download: docs/planning.md)
    megatron-zero train --help                 # every config field with its default
    megatron-zero demo --output-dir outputs/demo
    megatron-zero eval --model DIR --benchmarks gsm8k math500 --data-dir data/eval
    megatron-zero eval --model DIR --benchmarks math500 --engine sglang --num-gpus 8 --tp-size 2
    megatron-zero difficulty --model DIR --data data/hard.jsonl --uid-field uid --n 8 --out rates.jsonl
    megatron-zero data --split hard --math MATH/train --out data/hard.jsonl
    megatron-zero export --checkpoint outputs/run/checkpoints/step_000100 --out hf_model
    megatron-zero plan --config examples/configs/qwen2.5-7b-zero-2node.yaml --gpu-memory-gib 80
    megatron-zero launch prepare|wait ...      # used by examples/launch/ (docs/launching.md)
"""

from __future__ import annotations

import argparse
import logging
import re
import sys

from megatron_zero.cli_engine import (
    DIFFICULTY_FLAGS,
    add_engine_arguments,
    as_flags,
    difficulty_flag,
    engine_config,
)


def _train(args: argparse.Namespace) -> int:
    from megatron_zero.preflight.config import load_config
    from megatron_zero.trainer.loop import Trainer

    config = load_config(args.config, args.overrides)
    if args.dry_run:
        from megatron_zero.trainer.dry_run import dry_run

        report = dry_run(config, model_config=args.model_config)
        print(report.text)
        return 2 if report.missing else 0 if report.fits else 1
    trainer = Trainer(config)
    try:
        trainer.fit()
    finally:
        trainer.close()
    return 0


def _demo(args: argparse.Namespace) -> int:
    from megatron_zero.trainer.demo import run_demo

    run_demo(args.output_dir, num_steps=args.steps, overrides=args.overrides)
    return 0


def _eval(args: argparse.Namespace) -> int:
    from megatron_zero.config.evaluation import EvalConfig
    from megatron_zero.evaluation.model_eval import evaluate_model
    from megatron_zero.evaluation.runner import results_table

    try:
        config = EvalConfig(benchmarks=args.benchmarks, data_dir=args.data_dir, template=args.template,
                            n_samples=args.n, temperature=args.temperature, top_p=args.top_p,
                            max_new_tokens=args.max_new_tokens, max_problems=args.max_problems,
                            pass_k=args.pass_k or [], seed=args.seed)
    except ValueError as error:
        raise as_flags(error, ("eval",), {"n_samples": "--n"}) from None
    report = evaluate_model(args.model, config, engine_config(args), args.out)
    print(results_table(report))
    print(f"wrote {args.out}")
    return 0


def _difficulty(args: argparse.Namespace) -> int:
    from megatron_zero.config.data import DatasetConfig, PassRateEstimateConfig
    from megatron_zero.evaluation.difficulty import estimate_model_pass_rates

    try:
        dataset = DatasetConfig(path=args.data, question_field=args.question_field, answer_field=args.answer_field,
                                uid_field=args.uid_field, template=args.template,
                                max_prompt_tokens=args.max_prompt_tokens, filter_overlong=args.filter_overlong)
        sampling = PassRateEstimateConfig(num_samples=args.n, temperature=args.temperature, top_p=args.top_p,
                                          max_new_tokens=args.max_new_tokens, batch_size=args.batch_size,
                                          seed=args.seed)
    except ValueError as error:
        raise as_flags(error, ("difficulty", "data.train"), DIFFICULTY_FLAGS) from None
    rates = estimate_model_pass_rates(args.model, dataset, sampling, engine_config(args), args.out,
                                      keys=difficulty_flag)
    # The table is keyed by the problems' ids: training must read the data with the same settings to find them.
    same = {"path": args.data, "uid_field": args.uid_field, "question_field": args.question_field,
            "answer_field": args.answer_field, "template": args.template}
    defaults = DatasetConfig()
    dataset_keys = " ".join(override(f"data.train.{key}", value) for key, value in same.items()
                            if key == "path" or value != getattr(defaults, key))
    print(f"wrote {args.out}: pass rates of {len(rates)} problems; train on a band with {dataset_keys} "
          f"data.pass_rate_filter.pass_rate_file={args.out} data.pass_rate_filter.min_pass_rate=0.1 "
          "data.pass_rate_filter.max_pass_rate=0.9")
    return 0


def override(key: str, value: object) -> str:
    """``key=value`` as a user pastes it into a shell: values OmegaConf would parse as YAML (a template such as
    "{input}" is a mapping there) are double-quoted, and the whole is shell-quoted where needed."""
    import json
    import shlex

    text = str(value)
    if re.search(r"[{}\[\]:,'\"#&*!|>%@` ]", text):
        text = json.dumps(text)
    return shlex.quote(f"{key}={text}")


def _data(args: argparse.Namespace) -> int:
    from pathlib import Path

    from megatron_zero.data.splits import SPLIT_DATASET_FIELDS, build_difficulty_split, read_rows, write_jsonl
    from megatron_zero.utils.files import prepare_output

    prepare_output(args.out, "--out")
    missing = [f"--{flag} {path}" for flag in ("math", "gsm8k") for path in getattr(args, flag)
               if not Path(path).exists()]
    if missing:
        raise FileNotFoundError(f"no such file or folder: {', '.join(missing)}")
    rows = build_difficulty_split(args.split, [row for path in args.math for row in read_rows(path)],
                                  [row for path in args.gsm8k for row in read_rows(path)],
                                  max_problems=args.max_problems, seed=args.seed)
    write_jsonl(rows, args.out)
    fields = " ".join(f"data.train.{key}={value}" for key, value in SPLIT_DATASET_FIELDS.items())
    # The pass-rate table is keyed by problem id: difficulty must use the split's ids, as training will.
    rates = str(Path(args.out).with_name(Path(args.out).stem + "_rates.jsonl"))
    print(f"wrote {len(rows)} {args.split} problems to {args.out}; pass rates (optional): `megatron-zero difficulty "
          f"--model MODEL --data {args.out} --uid-field {SPLIT_DATASET_FIELDS['uid_field']} --out {rates}`, then "
          f"add data.pass_rate_filter.pass_rate_file={rates}; train with data.train.path={args.out} {fields}")
    return 0


def _export(args: argparse.Namespace) -> int:
    from pathlib import Path

    from megatron_zero.trainer.checkpoint import COMPLETE_MARKER, export_hf

    checkpoint = Path(args.checkpoint)
    if not checkpoint.is_dir():
        raise FileNotFoundError(f"--checkpoint {checkpoint}: no such folder")
    if not (checkpoint / COMPLETE_MARKER).is_file():
        raise FileNotFoundError(f"{checkpoint} is not a complete training checkpoint (no {COMPLETE_MARKER} marker)")
    export_hf(checkpoint, args.out)  # verified against its marker first; nothing left in --out's folder on failure
    print(f"wrote HF model {args.out}")
    return 0


def _plan(args: argparse.Namespace) -> int:
    import json

    from megatron_zero.preflight.config import load_config
    from megatron_zero.planning.actor_memory import GIB
    from megatron_zero.planning.layouts import recommend_layouts
    from megatron_zero.planning.memory import plan_inputs, plan_memory
    from megatron_zero.planning.report import format_plan
    from megatron_zero.preflight.generation import MissingFiles, check_generation_inputs
    from megatron_zero.preflight.train import generation_inputs, prompt_bound

    flag_problems = [f"--{flag.replace('_', '-')}={getattr(args, flag)} must be {bound}"
                     for flag, bound, ok in [("gpu_memory_gib", "> 0", args.gpu_memory_gib > 0),
                                             ("overhead_gib", ">= 0", args.overhead_gib >= 0),
                                             ("cuda_graph_reserve_gib", ">= 0", args.cuda_graph_reserve_gib >= 0),
                                             ("recommend", ">= 0", args.recommend >= 0)] if not ok]
    if flag_problems:
        raise ValueError("; ".join(flag_problems))
    config = load_config(args.config, args.overrides)
    # The architecture and the length check of the preflight, without its file checks: a plan is arithmetic.
    resolved = check_generation_inputs(generation_inputs(config), lambda: prompt_bound(config),
                                       MissingFiles(collect=True), args.model_config)
    if not resolved.from_checkpoint:
        logging.getLogger(__name__).info("architecture from %s (model_path %s is not on this machine or "
                                         "--model-config was given)", resolved.source, config.model_path)
    inputs = plan_inputs(config, resolved.arch, device_bytes=int(args.gpu_memory_gib * GIB),
                         overhead_bytes=int(args.overhead_gib * GIB),
                         cuda_graph_reserve_bytes=int(args.cuda_graph_reserve_gib * GIB), kernels=args.kernels)
    plan = plan_memory(inputs)
    cluster = config.cluster
    recommendations = recommend_layouts(inputs, world_size=cluster.num_workers, gpus_per_node=cluster.gpus_per_node,
                                        rollout_num_gpus=cluster.rollout_num_gpus, limit=args.recommend)
    if args.json:
        print(json.dumps({**plan.to_dict(), "recommendations": [rec.to_dict() for rec in recommendations]}, indent=2))
    else:
        print(format_plan(plan, recommendations))
    return 0 if plan.fits else 1


def _launch_prepare(args: argparse.Namespace) -> int:
    from megatron_zero.preflight.config import load_config
    from megatron_zero.trainer.launch import check_allocation, prepare

    config = load_config(args.config, args.overrides)
    if args.nodes is not None:
        check_allocation(config.cluster, args.nodes, args.gpus_per_node, args.cpus_per_node)
    print(prepare(config))  # the last line of stdout: the launch scripts read it
    return 0


def _launch_wait(args: argparse.Namespace) -> int:
    from megatron_zero.preflight.config import load_config
    from megatron_zero.trainer.launch import wait_for_hosts
    from megatron_zero.cluster.placement import ClusterNotReadyError

    config = load_config(args.config, args.overrides)
    try:
        wait_for_hosts(config.cluster, args.address, [host for host in args.hosts.split(",") if host])
    except ClusterNotReadyError as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    return 0


def _config_help() -> str:
    from omegaconf import OmegaConf

    from megatron_zero.config.sglang import SGLangConfig
    from megatron_zero.config.trainer import TrainConfig

    # rollout.sglang defaults to null (the torch engine needs none), so its fields are listed on their own.
    return ("every field, with its default (override any with key.sub=value):\n\n"
            + OmegaConf.to_yaml(OmegaConf.structured(TrainConfig))
            + "\nrollout.sglang, required with rollout.engine=sglang (rollout.sglang.model_path=... etc.):\n\n"
            + OmegaConf.to_yaml(OmegaConf.structured(SGLangConfig)))


def _add_model_config_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model-config", default=None,
                        help="the model's HF config.json (or its folder) to plan with; default: model_path's own, "
                             "else the shipped examples/model_configs/<basename of model_path> (docs/planning.md)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="megatron-zero", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)

    train = commands.add_parser("train", help="run zero-RL training from a YAML config",
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=_config_help())
    train.add_argument("--config", help="YAML experiment file")
    train.add_argument("--dry-run", action="store_true",
                       help="validate config and files, print the layout, memory plan, server command lines and "
                            "first requests a run would use, and exit (no Ray, no GPU); without the checkpoint or the "
                            "data it still prints the plan, then lists every missing file (exit 2)")
    _add_model_config_argument(train)
    train.add_argument("overrides", nargs="*", help="key.sub=value overrides")
    train.set_defaults(run=_train)

    demo = commands.add_parser(
        "demo", help="the whole zero-RL loop on this CPU box, no downloads (about 3 min on 2 cores)"
    )
    demo.add_argument("--output-dir", default="outputs/demo")
    demo.add_argument("--steps", type=int, default=None, help="RL steps (default: the demo's tuned number)")
    demo.add_argument("overrides", nargs="*", help="key.sub=value overrides of the demo's config; rollout.engine=sglang "
                                                   "runs it on the real SGLang server on CPU (the sglang-cpu extra)")
    demo.set_defaults(run=_demo)

    ev = commands.add_parser("eval", help="evaluate an HF model on math benchmarks (local files)")
    ev.add_argument("--model", required=True)
    ev.add_argument("--benchmarks", nargs="+", action="extend", required=True)
    ev.add_argument("--data-dir", default="data/eval")
    ev.add_argument("--template", default="qwen-boxed")
    ev.add_argument("--n", type=int, default=1)
    ev.add_argument("--temperature", type=float, default=0.0)
    ev.add_argument("--top-p", type=float, default=0.95)
    ev.add_argument("--max-new-tokens", type=int, default=4096)
    ev.add_argument("--max-problems", type=int, default=None)
    # action="extend": a repeated list flag adds to the list, where argparse's default would keep only the last.
    ev.add_argument("--pass-k", type=int, nargs="+", action="extend", default=None,
                    help="k of pass@k (default 1, 2, 4, ... n)")
    ev.add_argument("--seed", type=int, default=0)
    ev.add_argument("--out", default="outputs/eval")
    add_engine_arguments(ev)
    ev.set_defaults(run=_eval)

    difficulty = commands.add_parser("difficulty", help="pass rate of each training problem under a model "
                                                        "(the table data.pass_rate_filter reads)")
    difficulty.add_argument("--model", required=True)
    difficulty.add_argument("--data", required=True, help="training problems (.jsonl / .json / .parquet)")
    difficulty.add_argument("--out", required=True, help="the pass-rate table to write (.jsonl)")
    difficulty.add_argument("--n", type=int, default=8, help="samples per problem")
    difficulty.add_argument("--template", default="qwen-boxed")
    difficulty.add_argument("--question-field", default="question")
    difficulty.add_argument("--answer-field", default="answer")
    difficulty.add_argument("--uid-field", default=None,
                            help="stable problem ids (default: <file stem>-<row>); training must use the same "
                                 "(data.train.uid_field); `megatron-zero data` files: --uid-field uid")
    difficulty.add_argument("--max-prompt-tokens", type=int, default=1024)
    difficulty.add_argument("--filter-overlong", action="store_true",
                            help="drop prompts longer than --max-prompt-tokens (default: refuse them)")
    difficulty.add_argument("--temperature", type=float, default=1.0)
    difficulty.add_argument("--top-p", type=float, default=1.0)
    difficulty.add_argument("--max-new-tokens", type=int, default=3072)
    difficulty.add_argument("--batch-size", type=int, default=256, help="problems per generation call")
    difficulty.add_argument("--seed", type=int, default=0)
    add_engine_arguments(difficulty)
    difficulty.set_defaults(run=_difficulty)

    data = commands.add_parser("data", help="the paper's Easy / Medium / Hard training split from local MATH and "
                                            "GSM8K files")
    data.add_argument("--split", required=True, help="easy (GSM8K + MATH level 1), medium (MATH 1-4) or hard (3-5)")
    data.add_argument("--math", nargs="+", action="extend", required=True,
                      help="MATH files or folders (problem, level, type, solution; .jsonl / .json / .parquet)")
    data.add_argument("--gsm8k", nargs="+", action="extend", default=[],
                      help="GSM8K files (question, answer with '####'); easy only")
    data.add_argument("--max-problems", type=int, default=None, help="subsample to this many (the paper: ~8000)")
    data.add_argument("--seed", type=int, default=0)
    data.add_argument("--out", required=True)
    data.set_defaults(run=_data)

    export = commands.add_parser("export", help="a training checkpoint -> HF safetensors")
    export.add_argument("--checkpoint", required=True, help="OUTPUT_DIR/checkpoints/step_N")
    export.add_argument("--out", required=True)
    export.set_defaults(run=_export)

    plan = commands.add_parser("plan", help="per-GPU memory of a config's phases (docs/planning.md); exit 1 if it "
                                            "does not fit")
    plan.add_argument("--config", required=True, help="YAML experiment file")
    plan.add_argument("overrides", nargs="*", help="key.sub=value overrides")
    plan.add_argument("--gpu-memory-gib", type=float, default=80.0, help="memory of one GPU (default: H100 80GB)")
    plan.add_argument("--overhead-gib", type=float, default=2.0,
                      help="per process on a GPU: CUDA context, NCCL buffers, allocator slack (an assumption)")
    plan.add_argument("--cuda-graph-reserve-gib", type=float, default=3.0,
                      help="SGLang memory outside its static fraction: CUDA graphs, forward activations")
    plan.add_argument("--kernels", default="transformer_engine", choices=["transformer_engine", "local"],
                      help="layer implementation whose saved activations are counted (GPU: transformer_engine)")
    plan.add_argument("--recommend", type=int, default=5, help="list this many layouts that fit")
    plan.add_argument("--json", action="store_true", help="print the plan as JSON")
    _add_model_config_argument(plan)
    plan.set_defaults(run=_plan)

    launch = commands.add_parser("launch", help="checks the launch scripts run (examples/launch/, docs/launching.md)")
    steps = launch.add_subparsers(dest="launch_step", required=True)
    prep = steps.add_parser("prepare", help="before Ray: validate, check the allocation, convert model_path once; "
                                            "print the Megatron checkpoint's directory")
    prep.add_argument("--config", help="YAML experiment file")
    prep.add_argument("--nodes", type=int, default=None, help="nodes of the allocation (omit: no allocation check)")
    prep.add_argument("--gpus-per-node", type=int, default=0)
    prep.add_argument("--cpus-per-node", type=int, default=0)
    prep.add_argument("overrides", nargs="*", help="key.sub=value overrides")
    prep.set_defaults(run=_launch_prepare)
    wait = steps.add_parser("wait", help="wait until every host's Ray node joined (cluster.startup_timeout_s)")
    wait.add_argument("--config", help="YAML experiment file")
    wait.add_argument("--address", required=True, help="the Ray head, HOST:PORT")
    wait.add_argument("--hosts", default="", help="comma-separated host names (ray_node.sh's NODE_NAME); "
                                                  "empty: check only the number of nodes and their GPUs")
    wait.add_argument("overrides", nargs="*", help="key.sub=value overrides")
    wait.set_defaults(run=_launch_wait)
    return parser


def main(argv: list[str] | None = None) -> int:
    from megatron_zero.utils.cpu_process import prepare_cpu_process

    prepare_cpu_process()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    args = build_parser().parse_args(argv)
    from megatron_zero.cluster.placement import ClusterNotReadyError

    try:
        return args.run(args)
    except (FileNotFoundError, ValueError, ClusterNotReadyError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
