"""Measure a demo base model on the held-out set: accuracy and answer-pattern rates, greedy and sampled.

    python tools/measure_demo_base.py --model megatron_zero/demo/assets/base_model
    python tools/measure_demo_base.py --model /tmp/demo/base_model --prompts /tmp/demo/test_prompts.jsonl

Prints a JSON census (megatron_zero/demo/measure.py): greedy accuracy and pattern shares, greedy accuracy with
the digit chain's first word forced, sampled (T=1) shares and per-pattern accuracy, pass@k.
"""

from __future__ import annotations

import argparse
import json

import torch

from megatron_zero.data.splits import read_rows
from megatron_zero.demo import BASE_MODEL_PATH, TEST_PROMPTS_PATH
from megatron_zero.demo.measure import measure_base_model


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=str(BASE_MODEL_PATH), help="HF model directory")
    parser.add_argument("--prompts", default=str(TEST_PROMPTS_PATH), help="JSONL of {question, answer}")
    parser.add_argument("--num-samples", type=int, default=8, help="samples per prompt at temperature 1")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    result = measure_base_model(args.model, read_rows(args.prompts), num_samples=args.num_samples, seed=args.seed)
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
