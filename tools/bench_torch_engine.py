"""Measure sampling throughput of the embedded torch rollout engine on a tiny random model.

Writes a random tiny HF model (``megatron_zero.models.tiny``, vocabulary 251) to a temporary folder, then
samples --num-sequences responses of exactly --max-new-tokens tokens (no stop, temperature 1) from prompts
of --prompt-tokens random ids, after one warm-up call, and prints generated tokens per second for each
torch thread count. The default size (256 sequences x 40 tokens) is one GRPO step of the CPU demo.

    python tools/bench_torch_engine.py
    python tools/bench_torch_engine.py --threads 1 2 --hidden-size 128 --num-layers 4
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time

import torch
from transformers import AutoModelForCausalLM

from megatron_zero.config.rollout import TorchEngineConfig
from megatron_zero.models.tiny import save_tiny_model
from megatron_zero.rollout.engine import SamplingParams
from megatron_zero.rollout.torch_engine import TorchEngine


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--family", default="qwen2")
    parser.add_argument("--hidden-size", type=int, default=64)
    parser.add_argument("--num-layers", type=int, default=2)
    parser.add_argument("--num-sequences", type=int, default=256)
    parser.add_argument("--prompt-tokens", type=int, default=16)
    parser.add_argument("--max-new-tokens", type=int, default=40)
    parser.add_argument("--max-batch-size", type=int, default=256)
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as folder:
        save_tiny_model(args.family, folder, hidden_size=args.hidden_size, num_hidden_layers=args.num_layers)
        model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    num_parameters = sum(p.numel() for p in model.parameters())
    engine = TorchEngine(model, TorchEngineConfig(max_batch_size=args.max_batch_size))
    prompts = torch.randint(0, 251, (args.num_sequences, args.prompt_tokens), generator=torch.Generator().manual_seed(0))
    params = SamplingParams(temperature=1.0, max_new_tokens=args.max_new_tokens, seed=0)
    print(f"{args.family} d={args.hidden_size} layers={args.num_layers} ({num_parameters / 1e6:.2f}M parameters), "
          f"{args.num_sequences} sequences x {args.max_new_tokens} new tokens, prompt {args.prompt_tokens} tokens, "
          f"load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores")
    for threads in args.threads:
        torch.set_num_threads(threads)
        engine.generate(prompts[:8].tolist(), params)
        seconds = []
        for _ in range(args.repeats):
            start = time.perf_counter()
            generations = engine.generate(prompts.tolist(), params)
            seconds.append(time.perf_counter() - start)
        num_tokens = sum(len(g.token_ids) for g in generations)
        print(f"threads={threads}: {num_tokens / min(seconds):,.0f} tokens/s best, {num_tokens / max(seconds):,.0f} "
              f"worst of {args.repeats} ({min(seconds):.2f}-{max(seconds):.2f} s per call)")


if __name__ == "__main__":
    main()
