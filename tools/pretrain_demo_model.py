"""Pretrain the CPU demo's base model and write it with the RL prompts and the held-out test set.

    python tools/pretrain_demo_model.py --out megatron_zero/demo/assets            # the shipped assets
    python tools/pretrain_demo_model.py --out /tmp/demo --seed 1 --num-steps 300   # a variant

Every field of `DemoPretrainSettings` is a flag (--num-layers, --lr, ...); defaults reproduce the shipped model.
Writes OUT/base_model (HF Qwen2 + tokenizer), OUT/train_prompts.jsonl, OUT/test_prompts.jsonl and prints a JSON
summary (parameters, steps, tokens, seconds, losses). Takes about five minutes on one free CPU core.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging

from megatron_zero.demo.pretrain import DemoPretrainSettings, build_demo_assets


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True, help="output directory")
    for field in dataclasses.fields(DemoPretrainSettings):
        parser.add_argument(f"--{field.name.replace('_', '-')}", type=type(field.default), default=field.default)
    args = vars(parser.parse_args())
    out = args.pop("out")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    summary = build_demo_assets(out, DemoPretrainSettings(**args))
    print(json.dumps(summary, indent=2))


if __name__ == "__main__":
    main()
