"""Measure grading throughput of the math reward's `GraderPool` on a synthetic, paper-like mix of responses.

Each prompt gets --samples-per-prompt responses of 300-2000 characters of step-by-step LaTeX reasoning ending in:
a correct boxed answer in an equivalent form (~45%), a wrong boxed answer (~30%), "the answer is ..." without a
box (~10%), no final answer (~10%), or a truncated box (~5%). Ground truths mix integers, fractions, radicals,
decimals, intervals, sets and multiple-choice letters, with random values so caches do not make it trivial.
--hostile-fraction replaces that share of endings with a power tower that runs into the timeout.
First grades the batch with math-verify's parse and verify for every answer (the reference) and with the fast
paths (megatron_zero/rewards/fast_parse.py, fast_verify.py), one worker each, taking turns chunk by chunk so
that other work on the machine slows both alike; prints both rates per core, their ratio and how many grades
differ (must be 0). Each pool first grades --warm-up other responses untimed, as a training run's long-lived
pool is warm. Then one table row per worker count, with the projected time for the 8k responses of a 32B
step.

    python tools/bench_rewards.py --num-responses 4000 --workers 1 2
    python tools/bench_rewards.py --num-responses 1000 --hostile-fraction 0.01 --timeout-s 10
"""

from __future__ import annotations

import argparse
import collections
import os
import random
import time

from megatron_zero.config.reward import RewardConfig
from megatron_zero.rewards import BatchGrades, GradeResult, GraderPool, extract_answer
from megatron_zero.rewards.fast_parse import fast_parse

_FILLER = [
    "Let's think step by step.",
    "First, we rewrite the expression as $\\frac{{{a}}}{{{b}}} + {c}x = {d}$.",
    "Multiplying both sides by ${b}$ gives ${a} + {e}x = {f}$.",
    "Wait, let me recheck this step: $({a}+{c})^2 = {g}$.",
    "We know that $\\sqrt{{{h}}} \\approx {i}.{c}$, so the bound holds.",
    "Substituting $x = {c}$ into $x^2 - {a}x + {b} = 0$ we get a contradiction, so try again.",
    "Therefore the sum of the roots is $\\dfrac{{{d}}}{{{b}}}$ by Vieta's formulas.",
    "Alternatively, consider the interval $[{a}, {d})$ and count the integers in it.",
]


def _ground_truth_and_variants(rng: random.Random) -> tuple[str, list[str], list[str]]:
    """A ground truth, equivalent forms of it, and wrong answers."""
    a, b = rng.randint(2, 99), rng.randint(2, 9)
    kind = rng.choice(["int", "int", "fraction", "radical", "decimal", "interval", "set", "choice"])
    if kind == "int":
        n = rng.randint(10, 99999)
        return str(n), [str(n), f"{n:,}", f"{n}.0"], [str(n + 1), str(-n)]
    if kind == "fraction":
        denominator = a * b + 1
        right = [f"{a}/{denominator}", f"\\dfrac{{{a}}}{{{denominator}}}"]
        return f"\\frac{{{a}}}{{{denominator}}}", right, [f"\\frac{{{a + 1}}}{{{denominator}}}"]
    if kind == "radical":
        return f"{a}\\sqrt{{{b}}}", [f"{a}\\sqrt{b}", f"\\sqrt{{{a * a * b}}}"], [f"{a}\\sqrt{{{b + 1}}}", f"{a * b}"]
    if kind == "decimal":
        return f"{a}.{b}", [f"{a}.{b}0", f"\\frac{{{a * 10 + b}}}{{10}}"], [f"{a}.{b + 1}"]
    if kind == "interval":
        return f"[{a}, {a + b})", [f"[{a},{a + b})"], [f"({a}, {a + b})", f"[{a}, {a + b}]"]
    if kind == "set":
        return f"\\{{{a}, {a + b}\\}}", [f"\\{{{a + b},{a}\\}}"], [f"\\{{{a}\\}}"]
    letter = rng.choice("ABCDE")
    return f"\\text{{({letter})}}", [letter, f"({letter})"], [rng.choice([x for x in "ABCDE" if x != letter])]


def _reasoning(rng: random.Random) -> str:
    target = rng.randint(300, 2000)
    parts = []
    while sum(len(part) for part in parts) < target:
        values = {k: rng.randint(1, 999) for k in "abcdefghi"}
        parts.append(rng.choice(_FILLER).format(**values))
    return "\n".join(parts)[:target]


def make_batch(
    num_responses: int, samples_per_prompt: int, seed: int, hostile_fraction: float = 0.0
) -> tuple[list[str], list[str]]:
    rng = random.Random(seed)
    responses, truths = [], []
    while len(responses) < num_responses:
        truth, right, wrong = _ground_truth_and_variants(rng)
        for _ in range(samples_per_prompt):
            body = _reasoning(rng)
            roll = rng.random()
            if roll < 0.45:
                ending = f"\n\nThus the final answer is $\\boxed{{{rng.choice(right)}}}$."
            elif roll < 0.75:
                ending = f"\n\nSo the answer is $\\boxed{{{rng.choice(wrong)}}}$."
            elif roll < 0.85:
                ending = f"\n\nThe answer is {rng.choice(right + wrong)}."
            elif roll < 0.95:
                ending = ""
            else:
                ending = "\n\nHence \\boxed{\\frac{" + str(rng.randint(1, 9))
            if rng.random() < hostile_fraction:  # sympy would work on this for minutes: costs one full timeout
                ending = "\n\nSo the answer is $\\boxed{9^{9^{9^{9}}}}$."
            responses.append(body + ending + rng.choice(["<|endoftext|>", "", "<|im_end|>junk \\boxed{0}"]))
            truths.append(truth)
    return responses[:num_responses], truths[:num_responses]


# Math-verify's parse and verify for every answer: what the fast paths must agree with.
_REFERENCE = "megatron_zero.rewards.math_reward:grade_math_reference"


def _compare(responses: list[str], truths: list[str], timeout_s: float, chunk: int,
             warm_up: tuple[list[str], list[str]]) -> tuple[BatchGrades, BatchGrades]:
    """The batch graded by math-verify alone and with the fast paths, one worker each, chunk by chunk in turn, so
    that load from other work on the machine falls on both alike."""
    graded: dict[str, list[BatchGrades]] = {"reference": [], "fast": []}
    configs = {"reference": RewardConfig(reward_fn=_REFERENCE, num_workers=1, timeout_s=timeout_s),
               "fast": RewardConfig(num_workers=1, timeout_s=timeout_s)}
    with GraderPool(configs["reference"]) as reference_pool, GraderPool(configs["fast"]) as fast_pool:
        reference_pool.grade_batch(*warm_up)
        fast_pool.grade_batch(*warm_up)
        for start in range(0, len(responses), chunk):
            for name, pool in (("reference", reference_pool), ("fast", fast_pool)):
                graded[name].append(pool.grade_batch(responses[start : start + chunk], truths[start : start + chunk]))
    return tuple(BatchGrades(results=[result for grades in graded[name] for result in grades.results],
                             seconds=sum(grades.seconds for grades in graded[name])) for name in ("reference", "fast"))


def _verdict(result: GradeResult) -> tuple:
    return result.score, result.status, result.correct, result.extracted, result.source


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--num-responses", type=int, default=4000)
    parser.add_argument("--samples-per-prompt", type=int, default=8)
    parser.add_argument("--workers", type=int, nargs="+", default=[0], help="worker counts to compare; 0 = CPUs")
    parser.add_argument("--timeout-s", type=float, default=10.0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--chunk", type=int, default=200, help="responses per turn in the math-verify comparison")
    parser.add_argument("--warm-up", type=int, default=400,
                        help="responses (another seed) each pool grades untimed first: a training run's pool is warm "
                        "(math-verify's LaTeX parser builds its tables on first use of each construct)")
    parser.add_argument("--hostile-fraction", type=float, default=0.0, help="share of power-tower answers")
    args = parser.parse_args()

    responses, truths = make_batch(args.num_responses, args.samples_per_prompt, args.seed, args.hostile_fraction)
    mean_chars = sum(map(len, responses)) / len(responses)
    print(
        f"{len(responses)} responses, mean {mean_chars:.0f} chars, {args.samples_per_prompt} per prompt; "
        f"{os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f} (other work on the machine slows this down)"
    )
    config = RewardConfig()
    answers = [extract_answer(response, config.stop_tokens) for response in responses]
    paths = collections.Counter(
        "no answer" if answer is None else getattr(fast_parse(answer.text, answer.source != "answer_is"), "path",
                                                   "math-verify")
        for answer in answers
    )
    shares = ", ".join(f"{path} {count / len(responses):.0%}" for path, count in paths.most_common())
    print(f"answers by parser: {shares}")
    warm_up = make_batch(args.warm_up, args.samples_per_prompt, args.seed + 1)
    reference, fast = _compare(responses, truths, args.timeout_s, args.chunk, warm_up)
    reference_rate, fast_rate = len(responses) / reference.seconds, len(responses) / fast.seconds
    differ = sum(_verdict(a) != _verdict(b) for a, b in zip(reference.results, fast.results))
    print(f"one worker each: math-verify {reference_rate:.1f} resp/s, fast paths {fast_rate:.1f} resp/s, "
          f"ratio {fast_rate / reference_rate:.2f}; grades that differ: {differ}")
    print(f"{'workers':>7} {'start s':>8} {'grade s':>8} {'resp/s':>8} {'8k est s':>9} {'accuracy':>8}  counts")
    for num_workers in args.workers:
        started = time.perf_counter()
        with GraderPool(RewardConfig(num_workers=num_workers, timeout_s=args.timeout_s)) as pool:
            startup_s = time.perf_counter() - started
            pool.grade_batch(*warm_up)
            grades = pool.grade_batch(responses, truths)
        rate = len(responses) / grades.seconds
        accuracy = sum(score == 1.0 for score in grades.scores) / len(responses)
        print(
            f"{pool.num_workers:>7} {startup_s:>8.2f} {grades.seconds:>8.2f} {rate:>8.1f} {8192 / rate:>9.1f} "
            f"{accuracy:>8.3f}  {grades.counts}"
        )


if __name__ == "__main__":
    main()
