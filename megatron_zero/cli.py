"""The ``megatron-zero`` command: train, demo, eval, export.

    megatron-zero train --config examples/configs/qwen2.5-7b.yaml run.num_steps=200 actor.lr=1e-6
    megatron-zero train --help                 # every config field with its default
    megatron-zero demo --output-dir outputs/demo
    megatron-zero eval --model DIR --benchmarks gsm8k math500 --data-dir data/eval
    megatron-zero export --checkpoint outputs/run/checkpoints/step_000100 --out hf_model
"""

from __future__ import annotations

import argparse
import logging
import sys


def _train(args: argparse.Namespace) -> int:
    from megatron_zero.config.trainer import load_config
    from megatron_zero.trainer.loop import Trainer

    config = load_config(args.config, args.overrides)
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
    from transformers import AutoTokenizer

    from megatron_zero.config.evaluation import EvalConfig
    from megatron_zero.config.reward import RewardConfig
    from megatron_zero.config.rollout import TorchEngineConfig
    from megatron_zero.data.templates import make_prompt_formatter
    from megatron_zero.evaluation.generation import EngineGenerator
    from megatron_zero.evaluation.runner import evaluate, results_table, write_eval_outputs
    from megatron_zero.rewards import GraderPool
    from megatron_zero.rollout.torch_engine import TorchEngine

    config = EvalConfig(benchmarks=args.benchmarks, data_dir=args.data_dir, template=args.template,
                        n_samples=args.n, temperature=args.temperature, top_p=args.top_p,
                        max_new_tokens=args.max_new_tokens, max_problems=args.max_problems)
    tokenizer = AutoTokenizer.from_pretrained(args.model)
    engine = TorchEngine.from_pretrained(args.model, TorchEngineConfig(), tokenizer=tokenizer)
    with GraderPool(RewardConfig()) as pool:
        report = evaluate(config, EngineGenerator(engine, tokenizer), lambda r, g: pool.grade_batch(r, g).scores,
                          make_prompt_formatter(args.template, tokenizer))
    write_eval_outputs(report, args.out)
    print(results_table(report))
    print(f"wrote {args.out}")
    return 0


def _export(args: argparse.Namespace) -> int:
    from pathlib import Path

    from megatron_zero.config.parallel import ParallelConfig
    from megatron_zero.models.mcore_checkpoint import convert_mcore_to_hf
    from megatron_zero.parallel.local_launch import run_local_workers
    from megatron_zero.trainer.checkpoint import COMPLETE_MARKER

    checkpoint = Path(args.checkpoint)
    if not (checkpoint / COMPLETE_MARKER).is_file():
        raise FileNotFoundError(f"{checkpoint} is not a complete training checkpoint (no {COMPLETE_MARKER} marker)")
    run_local_workers(convert_mcore_to_hf, ParallelConfig(), args=(str(checkpoint / "actor"), args.out))
    print(f"wrote HF model {args.out}")
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


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="megatron-zero", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)

    train = commands.add_parser("train", help="run zero-RL training from a YAML config",
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=_config_help())
    train.add_argument("--config", help="YAML experiment file")
    train.add_argument("overrides", nargs="*", help="key.sub=value overrides")
    train.set_defaults(run=_train)

    demo = commands.add_parser("demo", help="the whole zero-RL loop on this CPU box, no downloads (~10 min)")
    demo.add_argument("--output-dir", default="outputs/demo")
    demo.add_argument("--steps", type=int, default=None, help="RL steps (default: the demo's tuned number)")
    demo.add_argument("overrides", nargs="*", help="key.sub=value overrides of the demo's config")
    demo.set_defaults(run=_demo)

    ev = commands.add_parser("eval", help="evaluate an HF model on math benchmarks (local files)")
    ev.add_argument("--model", required=True)
    ev.add_argument("--benchmarks", nargs="+", required=True)
    ev.add_argument("--data-dir", default="data/eval")
    ev.add_argument("--template", default="qwen-boxed")
    ev.add_argument("--n", type=int, default=1)
    ev.add_argument("--temperature", type=float, default=0.0)
    ev.add_argument("--top-p", type=float, default=0.95)
    ev.add_argument("--max-new-tokens", type=int, default=4096)
    ev.add_argument("--max-problems", type=int, default=None)
    ev.add_argument("--out", default="outputs/eval")
    ev.set_defaults(run=_eval)

    export = commands.add_parser("export", help="a training checkpoint -> HF safetensors")
    export.add_argument("--checkpoint", required=True, help="OUTPUT_DIR/checkpoints/step_N")
    export.add_argument("--out", required=True)
    export.set_defaults(run=_export)
    return parser


def main(argv: list[str] | None = None) -> int:
    from megatron_zero.utils.cpu_warnings import silence_cpu_fallback_warnings

    silence_cpu_fallback_warnings()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    args = build_parser().parse_args(argv)
    try:
        return args.run(args)
    except (FileNotFoundError, ValueError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
