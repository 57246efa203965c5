r"""Synthetic 2-digit addition data for the CPU zero-RL demo: the pretraining corpus and the RL prompt sets.

Why: the demo needs a base model that is right only sometimes and rarely boxes its answer under greedy decoding,
yet sometimes samples an accurate, boxed reasoning chain that RL can reinforce (the paper's story in miniature).
So the corpus mixes answer formats (shared/reference/DEMO-NOTES.md): a dominant, inaccurate direct answer
(" \boxed{82}"), a bare number, "The answer is", a digit-by-digit chain with and without a box, and a rare
self-check: the direct box, then "? Verify:" and the sum recomputed as the digit chain, then the box the chain
gives. The chain
is accurate because each step is one lookup in the single-digit addition table. The direct guess is sloppy on
purpose: where the ones overflow it forgets the carry half the time (SLIP_RATE), as a quick mental sum does, in
the direct box and in the self-check's first box alike; the self-check's last box always follows the
recomputation, so it corrects the slip. The self-check grows out of the dominant direct path (same first tokens),
so RL with the correctness reward alone can select it over stopping after the guess: the paper's verification
behaviour, in words the rule judge (analysis/behaviors.py RULE_CUES) recognises.

Every operand has exactly two digits and every word-problem template has a fixed length, so all prompts of one
template have the same length (batches of prompts need no padding) and one example fills one row from
position 0. Held-out problems are kept out of both the corpus and the RL prompts by unordered operand pair, so
a test problem is never seen in either order.

How::

    split = split_problems(seed=0, num_test=200)
    texts = corpus_texts(split.train, num_examples=50_000, seed=0)   # prompt + answer + <|endoftext|>
    rows = prompt_rows(split.train, num_rows=2000, seed=1)           # [{"question": "Q: 37+45=? A:", "answer": "82"}]
"""

from __future__ import annotations

import dataclasses
import random
from collections.abc import Sequence

END_OF_TEXT = "<|endoftext|>"
# Operands are exactly two digits (fixed width).
MIN_OPERAND, MAX_OPERAND = 10, 99

BARE_TEMPLATE = "Q: {a}+{b}=? A:"
# Word problems: one fixed length per template (operands are fixed width).
WORD_TEMPLATES = (
    "Q: Sam has {a} apples and gets {b} more. How many apples now? A:",
    "Q: A shelf holds {a} books and another holds {b}. How many books? A:",
    "Q: Mia ran {a} laps then ran {b} laps. How many laps in all? A:",
)
WORD_FRACTION = 0.3

# The chain's first word: forcing it after the prompt measures the chain's own accuracy.
CHAIN_PREFIX = " Digits:"
# The self-check's first word after the first box; "Verify" is a rule-judge verification cue.
VERIFY_PREFIX = "? Verify:"
# Answer formats and their corpus shares. The direct box dominates so that greedy decoding takes it.
# The self-check is rare (12%): after a first box the base model mostly stops, so greedy decoding stays direct.
ANSWER_FORMATS: dict[str, float] = {
    "direct_box": 0.40,
    "bare": 0.10,
    "answer_is": 0.08,
    "chain_box": 0.18,
    "chain": 0.12,
    "verify_box": 0.12,
}
# Where the ones overflow, the share of direct guesses (direct box, the self-check's first box) that forget the
# carry. Without slips the 0.67M model's direct box was ~82% right under sampling, more often than a self-check
# then (~70%), so RL had no reason to check (assets/README.md).
SLIP_RATE = 0.5
# Formats that open with the direct guess.
GUESSING_FORMATS = ("direct_box", "verify_box")


@dataclasses.dataclass(frozen=True)
class AdditionProblem:
    a: int
    b: int
    # -1 for the bare "Q: a+b=? A:" prompt, else an index into WORD_TEMPLATES.
    template: int

    @property
    def prompt(self) -> str:
        template = BARE_TEMPLATE if self.template < 0 else WORD_TEMPLATES[self.template]
        return template.replace("{a}", str(self.a)).replace("{b}", str(self.b))

    @property
    def answer(self) -> int:
        return self.a + self.b


@dataclasses.dataclass(frozen=True)
class ProblemSplit:
    """Unordered operand pairs: `test` pairs never appear (in either order) in `train`."""

    train: tuple[tuple[int, int], ...]
    test: tuple[tuple[int, int], ...]


def digit_steps(a: int, b: int) -> str:
    r"""The digit-by-digit sum, e.g. 37+45 -> "7+5=12, 3+4+1=8." (ones sum always two digits: carry first)."""
    ones = a % 10 + b % 10
    tens = a // 10 + b // 10 + ones // 10
    return f"{a % 10}+{b % 10}={ones:02d}, {a // 10}+{b // 10}+{ones // 10}={tens}."


def chain(a: int, b: int) -> str:
    r"""The chain as written in a response, e.g. 37+45 -> " Digits: 7+5=12, 3+4+1=8."."""
    return f"{CHAIN_PREFIX} {digit_steps(a, b)}"


def carry_dropped_sum(a: int, b: int) -> int:
    """The sum with the carry from the ones forgotten (37+45 -> 72): the direct guess's slip."""
    return (a // 10 + b // 10) * 10 + (a % 10 + b % 10) % 10


def format_answer(a: int, b: int, answer_format: str, slip: bool = False) -> str:
    """The response text (no end token) in one of ANSWER_FORMATS; `slip`: the direct guess forgets the carry
    (the direct box is then wrong where the ones overflow; the self-check corrects it)."""
    total = a + b
    box = f"\\boxed{{{total}}}"
    guess = f"\\boxed{{{carry_dropped_sum(a, b) if slip else total}}}"
    responses = {
        "direct_box": f" {guess}",
        "bare": f" {total}",
        "answer_is": f" The answer is {total}.",
        "chain_box": f"{chain(a, b)} {box}",
        "chain": f"{chain(a, b)} Sum {total}.",
        # 37+45 -> " \boxed{72}? Verify: Digits: 7+5=12, 3+4+1=8. \boxed{82}" (the reward reads the last box).
        # The recomputation is the chain itself, first word included: the model reuses the skill it learned there.
        "verify_box": f" {guess}{VERIFY_PREFIX}{chain(a, b)} {box}",
    }
    if answer_format not in responses:
        raise ValueError(f"answer_format={answer_format!r} is unknown; use one of {sorted(responses)}")
    return responses[answer_format]


def split_problems(seed: int, num_test: int) -> ProblemSplit:
    """Shuffle all unordered operand pairs with `seed` and hold out `num_test` of them."""
    pairs = [(a, b) for a in range(MIN_OPERAND, MAX_OPERAND + 1) for b in range(a, MAX_OPERAND + 1)]
    if not 0 < num_test < len(pairs):
        raise ValueError(f"num_test={num_test} must be in [1, {len(pairs) - 1}] (there are {len(pairs)} pairs)")
    random.Random(seed).shuffle(pairs)
    return ProblemSplit(train=tuple(pairs[num_test:]), test=tuple(pairs[:num_test]))


def _sample_problem(pairs: Sequence[tuple[int, int]], rng: random.Random) -> AdditionProblem:
    a, b = rng.choice(pairs)
    if rng.random() < 0.5:
        a, b = b, a
    template = rng.randrange(len(WORD_TEMPLATES)) if rng.random() < WORD_FRACTION else -1
    return AdditionProblem(a=a, b=b, template=template)


def corpus_examples(
    pairs: Sequence[tuple[int, int]], num_examples: int, seed: int
) -> list[tuple[AdditionProblem, str, bool]]:
    """`num_examples` (problem, answer format, slip) drawn with `seed` from `pairs` (either order); slip: the
    direct guess forgets the carry (SLIP_RATE of the guessing formats' examples)."""
    if not pairs:
        raise ValueError("pairs is empty; pass ProblemSplit.train")
    rng = random.Random(seed)
    formats, weights = list(ANSWER_FORMATS), list(ANSWER_FORMATS.values())
    examples = []
    for _ in range(num_examples):
        problem = _sample_problem(pairs, rng)
        answer_format = rng.choices(formats, weights)[0]
        examples.append((problem, answer_format, answer_format in GUESSING_FORMATS and rng.random() < SLIP_RATE))
    return examples


def corpus_texts(pairs: Sequence[tuple[int, int]], num_examples: int, seed: int) -> list[str]:
    """Pretraining rows: prompt + response + END_OF_TEXT, one example per row."""
    return [
        problem.prompt + format_answer(problem.a, problem.b, answer_format, slip) + END_OF_TEXT
        for problem, answer_format, slip in corpus_examples(pairs, num_examples, seed)
    ]


def prompt_rows(pairs: Sequence[tuple[int, int]], num_rows: int, seed: int) -> list[dict[str, str]]:
    """RL / evaluation rows {"question": prompt text, "answer": sum}; distinct problems, drawn with `seed`."""
    # Every pair in both orders and every template: draw without replacement.
    candidates = [AdditionProblem(a=x, b=y, template=t) for a, b in pairs for x, y in {(a, b), (b, a)}
                  for t in range(-1, len(WORD_TEMPLATES))]
    rng = random.Random(seed)
    bare = [problem for problem in candidates if problem.template < 0]
    word = [problem for problem in candidates if problem.template >= 0]
    num_word = round(num_rows * WORD_FRACTION)
    if num_rows - num_word > len(bare) or num_word > len(word):
        raise ValueError(f"num_rows={num_rows} is more than the {len(bare) + len(word)} distinct problems of "
                         f"{len(pairs)} pairs allow at a word fraction of {WORD_FRACTION}")
    chosen = rng.sample(bare, num_rows - num_word) + rng.sample(word, num_word)
    rng.shuffle(chosen)
    return [{"question": problem.prompt, "answer": str(problem.answer)} for problem in chosen]

