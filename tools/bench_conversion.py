"""Measure conversion memory against checkpoint size: does HF <-> Megatron really stream?

    python tools/bench_conversion.py --layers 16 --hidden 1024 --ffn 4096 --vocab 32000 --workdir /tmp/bench

Writes a random bf16 Llama-shaped HF checkpoint of the given size (itself streamed, layer by
layer), then runs hf-to-mcore and mcore-to-hf, each in a fresh process, sampling that process's
anonymous resident memory (RssAnon, what cannot be paged out) every 10 ms. The memory-mapped
staging files count as file-backed pages, which the kernel reclaims under pressure, so RssAnon is
the number that must stay below the machine's memory; VmHWM (all resident pages) is shown too.
Prints a table; record the figures in docs/conversion.md.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import threading
import time
from pathlib import Path

import torch

from megatron_zero.config.parallel import ParallelConfig
from megatron_zero.parallel.local_launch import run_local_workers


def _status_kib(field: str) -> int:
    with open("/proc/self/status", encoding="ascii") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    return 0


def write_random_checkpoint(out: Path, layers: int, hidden: int, ffn: int, vocab: int, heads: int, kv_heads: int) -> int:
    from megatron_zero.models.hf_io import HFCheckpointWriter

    head_dim = hidden // heads
    out.mkdir(parents=True)
    config = dict(model_type="llama", architectures=["LlamaForCausalLM"], hidden_size=hidden, intermediate_size=ffn,
                  num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=kv_heads, vocab_size=vocab,
                  rms_norm_eps=1e-5, rope_theta=500000.0, max_position_embeddings=8192, tie_word_embeddings=False,
                  torch_dtype="bfloat16", hidden_act="silu")
    (out / "config.json").write_text(json.dumps(config, indent=2))
    writer = HFCheckpointWriter(out, max_shard_bytes=512 * 1024**2)

    def rand(*shape):
        return (torch.randn(*shape) * 0.02).to(torch.bfloat16)

    writer.add("model.embed_tokens.weight", rand(vocab, hidden))
    for i in range(layers):
        p = f"model.layers.{i}."
        writer.add(p + "input_layernorm.weight", torch.ones(hidden, dtype=torch.bfloat16))
        writer.add(p + "post_attention_layernorm.weight", torch.ones(hidden, dtype=torch.bfloat16))
        writer.add(p + "self_attn.q_proj.weight", rand(heads * head_dim, hidden))
        writer.add(p + "self_attn.k_proj.weight", rand(kv_heads * head_dim, hidden))
        writer.add(p + "self_attn.v_proj.weight", rand(kv_heads * head_dim, hidden))
        writer.add(p + "self_attn.o_proj.weight", rand(hidden, heads * head_dim))
        writer.add(p + "mlp.gate_proj.weight", rand(ffn, hidden))
        writer.add(p + "mlp.up_proj.weight", rand(ffn, hidden))
        writer.add(p + "mlp.down_proj.weight", rand(hidden, ffn))
    writer.add("model.norm.weight", torch.ones(hidden, dtype=torch.bfloat16))
    writer.add("lm_head.weight", rand(vocab, hidden))
    writer.finish()
    return sum(f.stat().st_size for f in out.glob("*.safetensors"))


def measured_conversion(fn_name: str, args: tuple) -> dict:
    """Worker body (a fresh 1-process job): run one conversion while sampling this process's memory."""
    from megatron_zero.models import mcore_checkpoint

    baseline = _status_kib("RssAnon")
    peak = [baseline]
    done = threading.Event()

    def sample():
        while not done.is_set():
            peak[0] = max(peak[0], _status_kib("RssAnon"))
            time.sleep(0.01)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    start = time.perf_counter()
    getattr(mcore_checkpoint, fn_name)(*args)
    seconds = time.perf_counter() - start
    done.set()
    sampler.join()
    return dict(seconds=seconds, rss_anon_peak_mib=peak[0] / 1024, rss_anon_baseline_mib=baseline / 1024,
                vm_hwm_mib=_status_kib("VmHWM") / 1024)


def run_measured(fn_name: str, *args) -> dict:
    return run_local_workers(measured_conversion, ParallelConfig(), args=(fn_name, args), timeout_s=3600)[0]


def main() -> None:
    os.environ.setdefault("MALLOC_MMAP_THRESHOLD_", "65536")  # as tools/convert_checkpoint.py sets it
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", type=int, default=16)
    parser.add_argument("--hidden", type=int, default=1024)
    parser.add_argument("--ffn", type=int, default=4096)
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--heads", type=int, default=16)
    parser.add_argument("--kv-heads", type=int, default=4)
    parser.add_argument("--shard-size-mib", type=int, default=256, help="HF shard size of mcore-to-hf (its write buffer)")
    parser.add_argument("--workdir", default="/tmp/megatron-zero-bench-conversion")
    args = parser.parse_args()

    work = Path(args.workdir)
    shutil.rmtree(work, ignore_errors=True)
    size = write_random_checkpoint(work / "hf", args.layers, args.hidden, args.ffn, args.vocab, args.heads, args.kv_heads)
    to_mcore = run_measured("convert_hf_to_mcore", str(work / "hf"), str(work / "mcore"))
    to_hf = run_measured("convert_mcore_to_hf", str(work / "mcore"), str(work / "hf_back"), args.shard_size_mib * 1024**2)
    from megatron_zero.models.hf_io import HFCheckpointReader

    original, restored = HFCheckpointReader(work / "hf"), HFCheckpointReader(work / "hf_back")
    exact = sorted(original.names()) == sorted(restored.names()) and all(
        torch.equal(original.get(n), restored.get(n)) for n in original.names())
    largest_tensor = 2 * max(args.vocab * args.hidden, 2 * args.ffn * args.hidden)
    print(f"checkpoint: {size / 1024**2:.0f} MiB bf16 ({args.layers} layers, hidden {args.hidden}, ffn {args.ffn}, "
          f"vocab {args.vocab}); largest Megatron tensor {largest_tensor / 1024**2:.0f} MiB; "
          f"round trip bit-exact: {exact}")
    print("| direction | seconds | peak RssAnon above baseline (MiB) | peak / checkpoint | VmHWM (MiB) |")
    print("|---|---|---|---|---|")
    for name, r in (("hf-to-mcore", to_mcore), ("mcore-to-hf", to_hf)):
        above = r["rss_anon_peak_mib"] - r["rss_anon_baseline_mib"]
        print(f"| {name} | {r['seconds']:.1f} | {above:.0f} | {above / (size / 1024**2):.2f} | {r['vm_hwm_mib']:.0f} |")


if __name__ == "__main__":
    main()
