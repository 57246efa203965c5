"""Convert HF checkpoints to Megatron distributed checkpoints and back, and prove the conversion by logits.

    python tools/convert_checkpoint.py hf-to-mcore --hf HF_DIR --out MCORE_DIR
    python tools/convert_checkpoint.py mcore-to-hf --mcore MCORE_DIR --out HF_DIR [--max-shard-size 5GB]
    python tools/convert_checkpoint.py verify --hf HF_DIR --mcore MCORE_DIR --tp 2 --pp 2
    python tools/convert_checkpoint.py hf-to-fp8 --hf HF_DIR --out FP8_DIR [--tp-size 2]

``hf-to-fp8`` writes the block-FP8 checkpoint an SGLang server started by hand serves under
``rollout.quantization=fp8`` (launched servers get the trainer's own copy); rollout/fp8_weights.py has the layout.
``--tp-size`` is the server's: each rank's slice of every linear must be whole 128x128 blocks, so a model is
refused at a tp size SGLang could not load it at (the error lists the sizes that fit).

Supported: Qwen2 / Qwen2.5 / Qwen2.5-Math, Llama-3 / 3.1 (and Llama-shaped DeepSeek-Math), Mistral.
The Megatron checkpoint (torch_dist) loads at any TP/PP whose sizes divide the heads, query groups,
layers and padded vocabulary. Conversion streams tensor by tensor; see docs/conversion.md for memory
and time on real models. ``verify`` prints the max |logit difference| as its last line and exits 1
when it is above the tolerance.
"""

from __future__ import annotations

import argparse
import os
import re
import sys

from megatron_zero.config.parallel import ParallelConfig
from megatron_zero.models.common.architecture import read_hf_config
from megatron_zero.models.hf_io import HFCheckpointReader
from megatron_zero.models.mcore_checkpoint import convert_hf_to_mcore
from megatron_zero.models.registry import get_bridge
from megatron_zero.models.verify import verify_conversion
from megatron_zero.parallel.local_launch import WorkerFailed, run_local_workers
from megatron_zero.rollout.fp8_weights import write_fp8_checkpoint
from megatron_zero.trainer.checkpoint import export_hf
from megatron_zero.utils.cpu_process import prepare_cpu_process
from megatron_zero.utils.files import staged_directory

_SIZE_RE = re.compile(r"^(\d+(?:\.\d+)?)\s*([KMG]?B)$", re.IGNORECASE)
_UNITS = {"B": 1, "KB": 1024, "MB": 1024**2, "GB": 1024**3}


def parse_size(text: str) -> int:
    match = _SIZE_RE.match(text.strip())
    if not match:
        raise argparse.ArgumentTypeError(f"size {text!r} is not like 5GB, 500MB or 1048576B")
    return int(float(match.group(1)) * _UNITS[match.group(2).upper()])


# Every command writes its output under a temporary name beside --out and renames it at the end (utils/files.py):
# a failed or interrupted conversion leaves no half-written checkpoint, and --out must be new or empty.

def hf_to_mcore(args: argparse.Namespace) -> None:
    # Validate in this process first: a bad config fails in a second, before any worker starts.
    hf_config = read_hf_config(args.hf)
    get_bridge(hf_config).parse(hf_config)
    HFCheckpointReader(args.hf)
    with staged_directory(args.out) as partial:
        run_local_workers(convert_hf_to_mcore, ParallelConfig(), args=(args.hf, str(partial), args.vocab_pad_multiple))
    print(f"wrote Megatron checkpoint {args.out}")


def mcore_to_hf(args: argparse.Namespace) -> None:
    # A training checkpoint (step_N or its actor/) is checked against its COMPLETE marker first.
    export_hf(args.mcore, args.out, args.max_shard_size)
    print(f"wrote HF checkpoint {args.out}")


def hf_to_fp8(args: argparse.Namespace) -> None:
    with staged_directory(args.out) as partial:
        write_fp8_checkpoint(args.hf, partial, tp_size=args.tp_size, tp_field="--tp-size")
    print(f"wrote FP8 checkpoint {args.out}")


def verify(args: argparse.Namespace) -> int:
    result = verify_conversion(args.hf, args.mcore, args.tp, args.pp, batch_size=args.batch_size,
                               seq_length=args.seq_length, seed=args.seed, tolerance=args.tolerance)
    verdict = "OK" if result.ok else "FAILED"
    print(f"{verdict}: TP={args.tp} PP={args.pp} tolerance={result.tolerance:g}")
    print(f"max |logit diff| = {result.max_abs_diff:.3e}")
    return 0 if result.ok else 1


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)

    p = commands.add_parser("hf-to-mcore", help="HF safetensors -> Megatron torch_dist checkpoint")
    p.add_argument("--hf", required=True, help="HF model directory (config.json + safetensors)")
    p.add_argument("--out", required=True, help="new directory for the Megatron checkpoint")
    p.add_argument("--vocab-pad-multiple", type=int, default=128,
                   help="pad the vocabulary to a multiple of this (every TP size used later must divide it)")
    p.set_defaults(run=hf_to_mcore)

    p = commands.add_parser("mcore-to-hf", help="Megatron torch_dist checkpoint -> HF safetensors")
    p.add_argument("--mcore", required=True,
                   help="Megatron checkpoint directory written by hf-to-mcore, or a training checkpoint (step_N)")
    p.add_argument("--out", required=True, help="new directory for the HF model")
    p.add_argument("--max-shard-size", type=parse_size, default=parse_size("5GB"), help="e.g. 5GB, 500MB")
    p.set_defaults(run=mcore_to_hf)

    p = commands.add_parser("verify", help="compare HF and Megatron logits at a TP/PP layout")
    p.add_argument("--hf", required=True)
    p.add_argument("--mcore", required=True)
    p.add_argument("--tp", type=int, default=1)
    p.add_argument("--pp", type=int, default=1)
    p.add_argument("--batch-size", type=int, default=2)
    p.add_argument("--seq-length", type=int, default=16)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--tolerance", type=float, default=None, help="max |logit diff| allowed (default: 1e-4 in float32)")
    p.set_defaults(run=verify)

    p = commands.add_parser("hf-to-fp8", help="HF safetensors -> block-FP8 HF checkpoint for SGLang rollout engines")
    p.add_argument("--hf", required=True, help="HF model directory (config.json + safetensors)")
    p.add_argument("--out", required=True, help="new directory for the FP8 checkpoint")
    p.add_argument("--tp-size", type=int, default=1,
                   help="tensor-parallel size of the SGLang server that will load it (its --tp-size)")
    p.set_defaults(run=hf_to_fp8)
    return parser


def main(argv: list[str] | None = None) -> int:
    prepare_cpu_process()
    # glibc otherwise raises its mmap threshold after the first large free and keeps freed tensor
    # memory in the heap: measured, that made the conversion workers' memory grow with model size.
    # glibc reads it when a process starts: set here, before the workers' fork server (or, with CUDA, the spawned
    # workers) starts.
    os.environ.setdefault("MALLOC_MMAP_THRESHOLD_", "65536")
    args = build_parser().parse_args(argv)
    try:
        return args.run(args) or 0
    except (FileNotFoundError, FileExistsError, ValueError, KeyError, WorkerFailed) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
