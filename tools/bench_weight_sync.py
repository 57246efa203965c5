"""Measure the Megatron -> HF weight stream (resharding + bucketing) over a bucket-size sweep, on CPU.

    python tools/bench_weight_sync.py --tp 2 --pp 2 --bucket-mb 1 16 64 256
    python tools/bench_weight_sync.py --hidden 1024 --ffn 2816 --layers 8 --heads 16 --kv-heads 2 --vocab 32000

Writes a random Qwen2-shaped HF model of the given size (float32), converts it to a Megatron
checkpoint, loads it at TP x PP on local gloo processes and runs ``HFWeightStream`` once per bucket
size as warm-up, then ``--repeats`` times. The consumer on the sender copies every bucket tensor into
a preallocated HF-layout tensor, as a rollout engine's load would. Prints, per bucket size, the median
wall seconds of a whole sync (consumer included), the seconds spent resharding inside the stream, the
GB/s of the whole sync, and the bucket count. CPU/gloo figures only; GPU/NCCL figures need a GPU machine.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
from pathlib import Path

from megatron_zero.config.parallel import ParallelConfig
from megatron_zero.parallel.local_launch import run_local_workers


def _convert(hf_dir: str, mcore_dir: str) -> None:
    from megatron_zero.models.mcore_checkpoint import convert_hf_to_mcore

    convert_hf_to_mcore(hf_dir, mcore_dir)


def _bench_job(mcore_dir: str, bucket_sizes: list[int], repeats: int) -> list[dict]:
    import torch

    from megatron_zero.actor.actor import load_model
    from megatron_zero.config.model import ModelConfig
    from megatron_zero.parallel.reshard import HFWeightStream

    model, info = load_model(mcore_dir, ModelConfig(params_dtype="float32"))
    loaded: dict[str, torch.Tensor] = {}

    def consume(stream: HFWeightStream) -> None:
        for bucket in stream:
            for name, tensor in bucket:
                if name not in loaded:
                    loaded[name] = torch.empty_like(tensor)
                loaded[name].copy_(tensor)

    rows = []
    for bucket_bytes in bucket_sizes:
        stream = HFWeightStream(model, info.arch, info.bridge, bucket_bytes=bucket_bytes)
        runs = []
        for _ in range(repeats + 1):  # the first run is warm-up (allocations, metadata exchange)
            consume(stream) if stream.is_sender else stream.drain()
            runs.append(stream.stats)
        runs = runs[1:]
        seconds = statistics.median(r.seconds for r in runs)
        rows.append(dict(bucket_bytes=bucket_bytes, seconds=seconds,
                         reshard_seconds=statistics.median(r.reshard_seconds for r in runs),
                         num_bytes=runs[0].num_bytes, num_buckets=runs[0].num_buckets,
                         max_bucket_bytes=runs[0].max_bucket_bytes, gb_per_s=runs[0].num_bytes / 1e9 / seconds))
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tp", type=int, default=2)
    parser.add_argument("--pp", type=int, default=2)
    parser.add_argument("--bucket-mb", type=float, nargs="+", default=[0.25, 1, 16, 64, 256])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--hidden", type=int, default=64)
    parser.add_argument("--ffn", type=int, default=96)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--kv-heads", type=int, default=2)
    parser.add_argument("--vocab", type=int, default=251)
    parser.add_argument("--workdir", type=Path, default=None, help="where to write the models (default: a temp dir)")
    args = parser.parse_args()

    from megatron_zero.models.tiny import save_tiny_model

    with tempfile.TemporaryDirectory(dir=args.workdir) as tmp:
        hf_dir = save_tiny_model("qwen2", Path(tmp) / "hf", hidden_size=args.hidden, intermediate_size=args.ffn,
                                 num_hidden_layers=args.layers, num_attention_heads=args.heads,
                                 num_key_value_heads=args.kv_heads, vocab_size=args.vocab)
        mcore_dir = str(Path(tmp) / "mcore")
        run_local_workers(_convert, ParallelConfig(), args=(str(hf_dir), mcore_dir))
        parallel = ParallelConfig(tensor_parallel_size=args.tp, pipeline_parallel_size=args.pp)
        bucket_sizes = [int(mb * 2**20) for mb in args.bucket_mb]
        rows = run_local_workers(_bench_job, parallel, args=(mcore_dir, bucket_sizes, args.repeats))[0]

    print(f"qwen2-shaped hidden={args.hidden} ffn={args.ffn} layers={args.layers} vocab={args.vocab}, float32, "
          f"TP={args.tp} x PP={args.pp} on CPU/gloo, median of {args.repeats} syncs; "
          f"{rows[0]['num_bytes'] / 2**20:.1f} MiB per sync")
    print(f"{'bucket MiB':>10} {'buckets':>8} {'max MiB':>8} {'sync s':>9} {'reshard s':>10} {'GB/s':>7}")
    for row in rows:
        print(f"{row['bucket_bytes'] / 2**20:>10.2f} {row['num_buckets']:>8d} {row['max_bucket_bytes'] / 2**20:>8.2f} "
              f"{row['seconds']:>9.4f} {row['reshard_seconds']:>10.4f} {row['gb_per_s']:>7.3f}")


if __name__ == "__main__":
    main()
