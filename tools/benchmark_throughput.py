"""Throughput of one RL step at a real model shape: rollout, grading, log-probs, training (TFLOP/s, MFU), weight sync.

A random checkpoint of the shape (a name below or any HF config.json; no downloads) runs one colocated step on one
device with the trainer's own components (megatron_zero/benchmark/throughput.py says what each figure is). Prints
a markdown table and writes the JSON (--out). The layer count is cut when the model would not fit the device
(stated in the output; --num-layers sets it).

    python tools/benchmark_throughput.py --shape tiny-qwen2 --out bench.json               # CPU, seconds
    python tools/benchmark_throughput.py --shape qwen2.5-0.5b --device cuda --out bench.json
    python tools/benchmark_throughput.py --shape path/to/config.json --device cuda --num-prompts 16 \\
        --response-tokens 1024

The reward phase grades tools/bench_rewards.py's synthetic responses (random weights write no mathematics).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import shlex
import sys
import tempfile
from pathlib import Path

from bench_rewards import make_batch

from megatron_zero.benchmark.shapes import MODEL_SHAPES, load_shape
from megatron_zero.benchmark.throughput import (
    DEVICES,
    DTYPES,
    BenchmarkSpec,
    markdown_table,
    resolve_device,
    run_benchmark,
)
from megatron_zero.cli_engine import as_flags
from megatron_zero.utils.files import atomic_write_text, prepare_output


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", required=True,
                        help=f"one of {sorted(MODEL_SHAPES)} or a path to an HF config.json (or its directory)")
    parser.add_argument("--num-layers", type=int, default=None, help="default: the config's, cut to fit")
    parser.add_argument("--device", choices=DEVICES, default="auto")
    parser.add_argument("--dtype", choices=DTYPES, default=None, help="default: bfloat16 on CUDA, float32 on CPU")
    parser.add_argument("--num-prompts", type=int, default=8)
    parser.add_argument("--samples-per-prompt", type=int, default=8)
    parser.add_argument("--prompt-tokens", type=int, default=64)
    parser.add_argument("--response-tokens", type=int, default=128)
    parser.add_argument("--max-tokens-per-microbatch", type=int, default=8192)
    parser.add_argument("--engine-batch-size", type=int, default=256)
    parser.add_argument("--bucket-mb", type=int, default=512)
    parser.add_argument("--grader-workers", type=int, default=0, help="0: one per CPU")
    parser.add_argument("--no-grading", action="store_true", help="skip the reward phase (math-verify not installed)")
    parser.add_argument("--repeats", type=int, default=1, help="timed steps after the warm-up step")
    parser.add_argument("--peak-tflops", type=float, default=None, help="device peak, for MFU off the peak table")
    parser.add_argument("--rollout-quantization", choices=["fp8"], default=None,
                        help="sync block-FP8 linear weights (bytes and the engine's policy; not FP8 decode speed)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--workdir", type=Path, default=None, help="where the random model goes (default: a temp dir)")
    parser.add_argument("--out", type=Path, default=None, help="write the JSON here")
    args = parser.parse_args()
    if args.out is not None:
        try:
            prepare_output(args.out, "--out")  # before the benchmark's minutes, not after
        except ValueError as error:
            parser.error(str(error))

    try:  # bad flags in one line, as argparse says its own, before the model is written
        spec = BenchmarkSpec(shape=args.shape, num_layers=args.num_layers, device=args.device, dtype=args.dtype,
                             num_prompts=args.num_prompts, samples_per_prompt=args.samples_per_prompt,
                             prompt_tokens=args.prompt_tokens, response_tokens=args.response_tokens,
                             max_tokens_per_microbatch=args.max_tokens_per_microbatch,
                             engine_batch_size=args.engine_batch_size, bucket_mb=args.bucket_mb,
                             grader_workers=args.grader_workers, repeats=args.repeats, peak_tflops=args.peak_tflops,
                             seed=args.seed, rollout_quantization=args.rollout_quantization)
        load_shape(spec.shape)
        resolve_device(spec.device)
    except ValueError as error:
        # BenchmarkSpec names its fields (num_prompts=0); the user typed --num-prompts.
        fields = tuple(field.name for field in dataclasses.fields(BenchmarkSpec))
        parser.error(str(as_flags(error, (), {}, bare=fields)))
    graded = None if args.no_grading else make_batch(spec.num_graded, spec.samples_per_prompt, spec.seed)
    with tempfile.TemporaryDirectory(dir=args.workdir) as workdir:
        result = run_benchmark(spec, workdir, graded=graded)
    result["command"] = shlex.join([Path(sys.executable).name, *sys.argv])
    print(markdown_table(result))
    if args.out is not None:
        atomic_write_text(args.out, json.dumps(result, indent=2))
        print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
