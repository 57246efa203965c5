"""Pretrain the demo's tiny Qwen2 base model on the synthetic addition corpus: one CPU core, about five minutes.

Why: the CPU zero-RL demo needs a base model that our Megatron bridge converts (model_type qwen2: QKV bias, tied
embeddings, rope) and that leaves RL real headroom: greedy decoding mostly takes the inaccurate direct box while
sampling sometimes takes the accurate digit-by-digit chain (see corpus.py). Plain PyTorch on the HF model is
enough at this size; the result is a normal HF directory (config, safetensors, tokenizer).

How: ``python tools/pretrain_demo_model.py --out megatron_zero/demo/assets`` (the shipped assets), or
``build_demo_assets(out_dir, DemoPretrainSettings())`` from Python. Rows are right-padded (the causal mask keeps
padding out of real positions, so no attention mask and no fully masked rows) and batches are bucketed by
length; the loss covers every real token and the end token, not the padding.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import random
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from megatron_zero.data.splits import write_jsonl
from megatron_zero.demo import BASE_MODEL_DIR, TEST_PROMPTS_FILE, TRAIN_PROMPTS_FILE
from megatron_zero.demo.corpus import corpus_texts, prompt_rows, split_problems
from megatron_zero.demo.tokenizer import build_char_tokenizer

logger = logging.getLogger(__name__)

# Label value the HF loss ignores.
IGNORE_INDEX = -100
# Length buckets span this many batches: little padding, still well mixed.
_BUCKET_BATCHES = 16


@dataclasses.dataclass(kw_only=True, frozen=True)
class DemoPretrainSettings:
    """Everything that determines the shipped base model and prompt sets (same settings -> same files)."""

    seed: int = 0
    num_layers: int = 3
    hidden_size: int = 128
    num_heads: int = 4
    num_kv_heads: int = 4
    intermediate_size: int = 384
    # The longest prompt (66) plus the demo's 64 new tokens.
    max_positions: int = 144
    num_steps: int = 4000
    batch_size: int = 32
    lr: float = 2e-3
    warmup_steps: int = 50
    # Cosine decay ends at this fraction of lr.
    final_lr_fraction: float = 0.1
    weight_decay: float = 0.01
    num_threads: int = 1
    num_test: int = 200
    num_train_prompts: int = 2000

    def __post_init__(self) -> None:
        for name in ("num_layers", "hidden_size", "num_heads", "num_kv_heads", "intermediate_size", "max_positions",
                     "num_steps", "batch_size", "num_threads", "num_test", "num_train_prompts"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name}={getattr(self, name)} must be > 0")
        if self.hidden_size % self.num_heads or self.num_heads % self.num_kv_heads:
            raise ValueError(f"num_heads={self.num_heads} must divide hidden_size={self.hidden_size} and be a "
                             f"multiple of num_kv_heads={self.num_kv_heads}")
        if not self.lr > 0 or not 0 <= self.final_lr_fraction <= 1:
            raise ValueError(f"lr={self.lr} must be > 0 and final_lr_fraction={self.final_lr_fraction} in [0, 1]")
        if not 0 <= self.warmup_steps < self.num_steps:
            raise ValueError(f"warmup_steps={self.warmup_steps} must be in [0, num_steps={self.num_steps})")


def demo_model_config(settings: DemoPretrainSettings, vocab_size: int, eos_token_id: int):
    """HF Qwen2 config: QKV bias, tied embeddings, rope."""
    from transformers import Qwen2Config

    return Qwen2Config(
        vocab_size=vocab_size,
        hidden_size=settings.hidden_size,
        intermediate_size=settings.intermediate_size,
        num_hidden_layers=settings.num_layers,
        num_attention_heads=settings.num_heads,
        num_key_value_heads=settings.num_kv_heads,
        max_position_embeddings=settings.max_positions,
        tie_word_embeddings=True,
        rope_theta=10_000.0,
        rms_norm_eps=1e-6,
        bos_token_id=eos_token_id,
        eos_token_id=eos_token_id,
        pad_token_id=eos_token_id,
        use_sliding_window=False,
    )


def length_bucketed_batches(rows: Sequence[Sequence[int]], batch_size: int, pad_id: int,
                            rng: random.Random) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """(input_ids, labels) batches of `rows` right-padded to the batch's longest row; labels hide the padding."""
    order = list(range(len(rows)))
    rng.shuffle(order)
    bucket = batch_size * _BUCKET_BATCHES
    groups = []
    for start in range(0, len(order), bucket):
        chunk = sorted(order[start:start + bucket], key=lambda index: len(rows[index]))
        groups += [chunk[i:i + batch_size] for i in range(0, len(chunk), batch_size)]
    rng.shuffle(groups)
    batches = []
    for group in groups:
        width = max(len(rows[index]) for index in group)
        input_ids = torch.full((len(group), width), pad_id, dtype=torch.long)
        labels = torch.full((len(group), width), IGNORE_INDEX, dtype=torch.long)
        for row, index in enumerate(group):
            input_ids[row, :len(rows[index])] = torch.tensor(rows[index])
            labels[row, :len(rows[index])] = torch.tensor(rows[index])
        batches.append((input_ids, labels))
    return batches


def _lr_factor(step: int, settings: DemoPretrainSettings) -> float:
    if step < settings.warmup_steps:
        return (step + 1) / settings.warmup_steps
    progress = (step - settings.warmup_steps) / max(1, settings.num_steps - settings.warmup_steps)
    cosine = 0.5 * (1 + math.cos(math.pi * progress))
    return settings.final_lr_fraction + (1 - settings.final_lr_fraction) * cosine


def pretrain(model: torch.nn.Module, batches: Sequence[tuple[torch.Tensor, torch.Tensor]],
             settings: DemoPretrainSettings) -> list[float]:
    """AdamW with linear warmup and cosine decay, one step per batch; returns the loss of every step."""
    optimizer = torch.optim.AdamW(model.parameters(), lr=settings.lr, betas=(0.9, 0.95),
                                  weight_decay=settings.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: _lr_factor(step, settings))
    model.train()
    losses = []
    for step, (input_ids, labels) in enumerate(batches):
        loss = model(input_ids=input_ids, labels=labels).loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        scheduler.step()
        losses.append(loss.item())
        if step % 50 == 0 or step == len(batches) - 1:
            logger.info("step %d/%d loss %.4f lr %.2e", step, len(batches), losses[-1], scheduler.get_last_lr()[0])
    model.eval()
    return losses


def build_demo_assets(out_dir: str | Path, settings: DemoPretrainSettings) -> dict[str, Any]:
    """Pretrain the base model and write it (HF format, with tokenizer) and the RL / test prompt sets to `out_dir`.

    Returns a summary: parameter count, steps, tokens, seconds and the first / last losses.
    """
    from transformers import AutoModelForCausalLM

    out_dir = Path(out_dir)
    torch.set_num_threads(settings.num_threads)
    torch.manual_seed(settings.seed)
    split = split_problems(seed=settings.seed, num_test=settings.num_test)
    tokenizer = build_char_tokenizer()
    texts = corpus_texts(split.train, num_examples=settings.num_steps * settings.batch_size, seed=settings.seed)
    rows = tokenizer(texts)["input_ids"]
    longest = max(len(row) for row in rows)
    if longest > settings.max_positions:
        raise ValueError(f"max_positions={settings.max_positions} is shorter than the longest corpus row ({longest})")
    batches = length_bucketed_batches(rows, settings.batch_size, tokenizer.pad_token_id, random.Random(settings.seed))
    config = demo_model_config(settings, len(tokenizer), tokenizer.eos_token_id)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32, attn_implementation="sdpa")
    start = time.perf_counter()
    losses = pretrain(model, batches, settings)
    seconds = time.perf_counter() - start
    model.save_pretrained(out_dir / BASE_MODEL_DIR)
    tokenizer.save_pretrained(out_dir / BASE_MODEL_DIR)
    write_jsonl(prompt_rows(split.train, settings.num_train_prompts, seed=settings.seed + 1),
                out_dir / TRAIN_PROMPTS_FILE)
    write_jsonl(prompt_rows(split.test, settings.num_test, seed=settings.seed + 2), out_dir / TEST_PROMPTS_FILE)
    num_tokens = sum(len(row) for row in rows)
    return dict(num_parameters=sum(p.numel() for p in model.parameters()), num_steps=len(batches),
                num_tokens=num_tokens, seconds=seconds, tokens_per_s=num_tokens / seconds,
                first_loss=losses[0], last_loss=sum(losses[-20:]) / len(losses[-20:]))
