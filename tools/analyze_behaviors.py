"""Analyse how response length, format and reasoning behaviours evolve across training steps.

Reads sample-record JSONL files (format: megatron_zero/analysis/records.py), writes per-response and
per-step JSONL, PNG plots and one self-contained report.html into --out.

    # cheap rule-based behaviour detector over a folder of checkpoint evaluations
    python tools/analyze_behaviors.py --samples-dir eval_out --out analysis_out

    # LLM judge on an OpenAI-compatible server (e.g. SGLang), 64 responses per step
    python tools/analyze_behaviors.py --samples rollouts/*.jsonl --out analysis_out --judge llm \\
        --judge-url http://127.0.0.1:30000 --judge-model Qwen/Qwen2.5-72B-Instruct --max-judge-samples 64
"""

from __future__ import annotations

import argparse
import logging

from megatron_zero.analysis import JUDGES, analyze, load_samples, make_judge, sample_files_in, write_analysis


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--samples", nargs="+", metavar="PATH", help="sample-record JSONL files")
    source.add_argument("--samples-dir", metavar="DIR", help="folder of *.jsonl files, e.g. one per checkpoint")
    parser.add_argument("--out", required=True, metavar="DIR", help="output folder")
    parser.add_argument("--judge", choices=sorted(JUDGES), default="rules", help="behaviour judge (default: rules)")
    parser.add_argument("--judge-url", help="base URL of the OpenAI-compatible server, for --judge llm")
    parser.add_argument("--judge-model", help="served model name, for --judge llm")
    parser.add_argument("--judge-timeout", type=float, default=120.0, help="seconds per judge request")
    parser.add_argument("--judge-workers", type=int, default=8, help="concurrent judge requests")
    parser.add_argument("--max-judge-samples", type=int, help="judge at most this many responses per step")
    parser.add_argument("--seed", type=int, default=0, help="seed of the per-step judge subsample")
    args = parser.parse_args()
    if args.judge == "llm" and not (args.judge_url and args.judge_model):
        parser.error("--judge llm needs --judge-url and --judge-model")
    if args.judge != "llm" and (args.judge_url or args.judge_model):
        parser.error("--judge-url / --judge-model only apply to --judge llm")
    return args


def main() -> None:
    args = parse_args()
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    paths = sample_files_in(args.samples_dir) if args.samples_dir else args.samples
    samples = load_samples(paths)
    judge_kwargs = (
        dict(base_url=args.judge_url, model=args.judge_model, timeout_s=args.judge_timeout, num_workers=args.judge_workers)
        if args.judge == "llm"
        else {}
    )
    result = analyze(samples, make_judge(args.judge, **judge_kwargs), max_judge_samples=args.max_judge_samples, seed=args.seed)
    outputs = write_analysis(result, args.out)
    print(f"analysed {len(result.responses)} responses over {len(result.steps)} step(s); judge errors: {result.num_judge_errors}")
    for name, path in outputs.items():
        print(f"{name:>16}: {path}")


if __name__ == "__main__":
    main()
