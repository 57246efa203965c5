r"""Measure a demo base model before RL: accuracy and answer-pattern rates, greedy and sampled, on the test set.

Why: RL can only select what the base model already samples (DEMO-NOTES). Before shipping a base model we check
that greedy decoding takes the inaccurate direct box, that the accurate paths (the digit chain, the self-check)
are sampled sometimes and are right far more often than the direct guess, so the correctness reward has
something to select. assets/README.md's table is this function's output.

How: ``python tools/measure_demo_base.py --model megatron_zero/demo/assets/base_model``. Correct means the last
``\boxed{}`` holds the sum (the demo's reward reads boxed answers only: reward.strict_boxed).
"""

from __future__ import annotations

import re
from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from megatron_zero.demo.corpus import CHAIN_PREFIX, END_OF_TEXT
from megatron_zero.demo.patterns import OTHER, RESPONSE_PATTERNS, response_pattern
from megatron_zero.rewards.extraction import last_boxed

# The demo's rollout limit (trainer/demo.py: rollout.max_new_tokens).
MAX_NEW_TOKENS = 64


def is_correct(response: str, answer: str) -> bool:
    """The demo reward's verdict on an integer sum: the last box, nothing else."""
    boxed = last_boxed(response.split(END_OF_TEXT, 1)[0])
    return boxed is not None and boxed.strip() == answer


def last_number_correct(response: str, answer: str) -> bool:
    """Whether the response's last number is the sum: the chain's arithmetic, however the chain ends."""
    numbers = re.findall(r"\d+", response.split(END_OF_TEXT, 1)[0])
    return bool(numbers) and numbers[-1] == answer


def generate(model, tokenizer, prompts: Sequence[str], *, num_samples: int, do_sample: bool,
             seed: int) -> list[list[str]]:
    """`num_samples` responses per prompt (temperature 1, no top-k / top-p when sampling). Prompts of one length
    are batched together, so no row is padded."""
    by_length: dict[int, list[int]] = defaultdict(list)
    encoded = [tokenizer(prompt)["input_ids"] for prompt in prompts]
    for index, ids in enumerate(encoded):
        by_length[len(ids)].append(index)
    responses: list[list[str]] = [[] for _ in prompts]
    torch.manual_seed(seed)
    for length, indices in sorted(by_length.items()):
        input_ids = torch.tensor([encoded[i] for i in indices]).repeat_interleave(num_samples, dim=0)
        with torch.no_grad():
            output = model.generate(input_ids, attention_mask=torch.ones_like(input_ids), max_new_tokens=MAX_NEW_TOKENS,
                                    do_sample=do_sample, temperature=1.0 if do_sample else None, top_k=0 if do_sample
                                    else None, top_p=1.0 if do_sample else None, pad_token_id=tokenizer.eos_token_id)
        texts = tokenizer.batch_decode(output[:, length:], skip_special_tokens=False)
        for row, text in enumerate(texts):
            responses[indices[row // num_samples]].append(text.split(END_OF_TEXT, 1)[0])
    return responses


def _census(responses: Sequence[str], answers: Sequence[str]) -> dict[str, Any]:
    """Accuracy, and per pattern its share and its accuracy (None where the pattern never occurs)."""
    names = [response_pattern(response) for response in responses]
    correct = [is_correct(response, answer) for response, answer in zip(responses, answers)]
    patterns = {}
    for name in (*RESPONSE_PATTERNS, OTHER):
        hits = [ok for pattern, ok in zip(names, correct) if pattern == name]
        patterns[name] = {"share": len(hits) / len(names), "accuracy": sum(hits) / len(hits) if hits else None}
    return {"accuracy": sum(correct) / len(correct), "patterns": patterns}


def measure_base_model(model_dir: str | Path, rows: Sequence[dict[str, str]], *, num_samples: int = 8,
                       seed: int = 0) -> dict[str, Any]:
    """Greedy, greedy with the chain's first word forced, and sampled (`num_samples` per prompt) census of `rows`
    ({"question", "answer"}), plus pass@num_samples."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    prompts = [row["question"] for row in rows]
    answers = [row["answer"] for row in rows]
    greedy = [r[0] for r in generate(model, tokenizer, prompts, num_samples=1, do_sample=False, seed=seed)]
    forced = [CHAIN_PREFIX + r[0] for r in generate(model, tokenizer, [p + CHAIN_PREFIX for p in prompts],
                                                     num_samples=1, do_sample=False, seed=seed)]
    sampled = generate(model, tokenizer, prompts, num_samples=num_samples, do_sample=True, seed=seed)
    flat = [response for group in sampled for response in group]
    flat_answers = [answer for answer, group in zip(answers, sampled) for _ in group]
    return {
        "greedy": _census(greedy, answers),
        # Forced, the greedy chain may end " Sum 82." (unboxed): its arithmetic is judged by its last number.
        "greedy_chain_forced": {"accuracy": _census(forced, answers)["accuracy"],
                                "last_number_accuracy": sum(map(last_number_correct, forced, answers)) / len(answers)},
        "sampled": _census(flat, flat_answers),
        f"pass@{num_samples}": sum(any(is_correct(r, a) for r in group) for group, a in zip(sampled, answers))
        / len(answers),
    }
