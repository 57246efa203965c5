"""Measure the engine-vs-actor log-prob gap that FP8 rollout weights introduce, on CPU with the torch engine.

For each model, two torch engines hold the same weights: the actor's (float32) and the FP8 rollout's (the
actor's buckets through ``rollout/fp8_weights.quantize_bucket`` then ``dequantize_bucket``, loaded with
``sync_weights``, i.e. exactly the weights an SGLang FP8 engine multiplies with). The FP8 engine samples
responses (temperature 1) and reports its log-probs; the actor engine scores the same tokens; the tool prints
mean / p99 / max of |logp_actor - logp_rollout| over all response tokens. The same gap with the unquantized
weights in both engines (batched decode vs one prefill) is printed as the floor. Also the bytes of one full sync
in FP8 against bf16.

Models: the demo model (megatron_zero/demo/assets/base_model) and a random model of Qwen2.5-0.5B's shape
(``benchmark/shapes.py``, HF's default init, so no outlier weights as trained models have) cut to --layers
layers. Prompts are random token ids.

    python tools/bench_fp8_rollout_gap.py
    python tools/bench_fp8_rollout_gap.py --layers 24 --num-sequences 64
"""

from __future__ import annotations

import argparse
import copy
import datetime
import os
import tempfile

import torch
from transformers import AutoModelForCausalLM

from megatron_zero.benchmark.shapes import load_shape, write_random_model
from megatron_zero.demo import BASE_MODEL_PATH
from megatron_zero.rollout.engine import SamplingParams
from megatron_zero.rollout.fp8_weights import (
    dequantize_bucket,
    is_quantized_weight,
    quantize_bucket,
)
from megatron_zero.rollout.torch_engine import TorchEngine


def num_bytes(bucket: list[tuple[str, torch.Tensor]]) -> int:
    return sum(tensor.numel() * tensor.element_size() for _, tensor in bucket)


def measure(label: str, model: torch.nn.Module, args: argparse.Namespace) -> None:
    actor = TorchEngine(model)
    rollout = TorchEngine(copy.deepcopy(model))
    # Tied weights appear once, as the actor's weight stream sends them.
    bucket = [(name, tensor.detach()) for name, tensor in model.state_dict().items()
              if not (model.config.tie_word_embeddings and name == "lm_head.weight")]
    fp8_bucket = quantize_bucket(bucket)
    # Bytes as the GPU sync would send them: bf16 weights against FP8 linears + float32 scales + bf16 rest.
    bf16_bucket = [(name, tensor.to(torch.bfloat16)) for name, tensor in bucket]
    bytes_ratio = num_bytes(quantize_bucket(bf16_bucket)) / num_bytes(bf16_bucket)
    linears = [(name, tensor) for name, tensor in bf16_bucket if is_quantized_weight(name, tensor)]
    linear_ratio = num_bytes(quantize_bucket(linears)) / num_bytes(linears)
    vocab = model.config.vocab_size
    prompts = torch.randint(0, vocab, (args.num_sequences, args.prompt_tokens),
                            generator=torch.Generator().manual_seed(0)).tolist()
    params = SamplingParams(temperature=1.0, max_new_tokens=args.max_new_tokens, seed=0)
    num_parameters = sum(p.numel() for p in model.parameters())
    print(f"{label}: {num_parameters / 1e6:.1f}M parameters, {args.num_sequences} responses x "
          f"{args.max_new_tokens} tokens, sync bytes FP8 / bf16 = {bytes_ratio:.3f} "
          f"({linear_ratio:.4f} for the linear weights alone)")
    for weights in ("float32", "fp8"):
        if weights == "fp8":
            rollout.sync_weights([dequantize_bucket(fp8_bucket, torch.float32)], version=1)
        generations = rollout.generate(prompts, params)
        scored = actor.compute_logprobs([g.prompt_ids for g in generations], [g.token_ids for g in generations], 1.0)
        gap = torch.tensor([abs(a - b) for g, s in zip(generations, scored) for a, b in zip(g.logprobs, s)])
        print(f"  rollout weights {weights:>7}: |logp gap| mean {gap.mean():.2e}, p99 {gap.quantile(0.99):.2e}, "
              f"max {gap.max():.2e} over {gap.numel()} tokens")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", type=int, default=4, help="layers of the Qwen2.5-0.5B-shaped model (24 in full)")
    parser.add_argument("--num-sequences", type=int, default=32)
    parser.add_argument("--prompt-tokens", type=int, default=16)
    parser.add_argument("--max-new-tokens", type=int, default=32)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print(f"{datetime.date.today()}, CPU, {args.threads} thread(s), load average {os.getloadavg()[0]:.1f} "
          f"on {os.cpu_count()} cores")
    measure("demo model", AutoModelForCausalLM.from_pretrained(str(BASE_MODEL_PATH), dtype=torch.float32), args)
    with tempfile.TemporaryDirectory() as folder:
        write_random_model(load_shape("qwen2.5-0.5b"), folder, num_layers=args.layers, dtype="float32")
        model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    measure(f"random Qwen2.5-0.5B shape, {args.layers} of 24 layers", model, args)


if __name__ == "__main__":
    main()
