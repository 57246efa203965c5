"""Measure one rollout's generate + grade wall time: sequential (``generate`` then ``grade_batch``) against
overlapped (``generate_stream`` feeding a ``GradingSession``, as the trainer does), on the demo model.

Both modes sample the same prompts with the same seed, so they produce the same responses and grades (checked);
the only difference is whether the grader pool works while the engine samples. Repeats alternate the order of
the two modes; the table reports the median of each column and the fastest total. Generation time swings with
other load on the machine (the load average is printed), so compare the grade wait, and totals over many repeats.

    python tools/bench_rollout_overlap.py                          # the demo's rollout: 32 prompts x 8, 40 tokens
    python tools/bench_rollout_overlap.py --num-prompts 64 --workers 2 --repeats 5
    python tools/bench_rollout_overlap.py --paper-like-grading     # grading as costly as long math responses

The demo's answers are short integers that grade in ~0.1 ms; --paper-like-grading pads each grade with busy CPU
time up to the per-response cost that tools/bench_rewards.py measures for paper-like responses on this box.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from pathlib import Path

import torch
from transformers import AutoTokenizer

from megatron_zero.config.data import DatasetConfig
from megatron_zero.config.reward import RewardConfig
from megatron_zero.config.rollout import TorchEngineConfig
from megatron_zero.data import load_problems
from megatron_zero.demo import BASE_MODEL_PATH, TRAIN_PROMPTS_PATH
from megatron_zero.rewards import GradeResult, GraderPool, grade_math
from megatron_zero.rollout.engine import SamplingParams
from megatron_zero.rollout.torch_engine import TorchEngine
from megatron_zero.trainer.rollout_source import generate_graded


# tools/bench_rewards.py's paper-like mix (300-2000 characters of LaTeX reasoning per response) graded at ~400
# responses/s per worker on this 2-core box: 2.5 ms each.
PAPER_LIKE_GRADE_MS = 2.5


def math_reward_paper_like_cost(response: str, ground_truth: str, config: RewardConfig) -> GradeResult:
    """The math reward, busy (not sleeping: real grading competes for the CPU) until PAPER_LIKE_GRADE_MS."""
    deadline = time.perf_counter() + PAPER_LIKE_GRADE_MS / 1000
    result = grade_math(response, ground_truth, config)
    while time.perf_counter() < deadline:
        pass
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--num-prompts", type=int, default=32)
    parser.add_argument("--samples-per-prompt", type=int, default=8)
    parser.add_argument("--max-new-tokens", type=int, default=40)
    parser.add_argument("--max-batch-size", type=int, default=256, help="rollout.torch.max_batch_size")
    parser.add_argument("--workers", type=int, default=1, help="grader processes (the demo uses 1)")
    parser.add_argument("--torch-threads", type=int, default=0, help="0: torch's default")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--paper-like-grading", action="store_true",
                        help=f"make each grade cost {PAPER_LIKE_GRADE_MS} ms of CPU, like long math responses")
    args = parser.parse_args()
    if args.torch_threads:
        torch.set_num_threads(args.torch_threads)

    tokenizer = AutoTokenizer.from_pretrained(str(BASE_MODEL_PATH))
    engine = TorchEngine.from_pretrained(str(BASE_MODEL_PATH), TorchEngineConfig(max_batch_size=args.max_batch_size),
                                         tokenizer=tokenizer)
    dataset = DatasetConfig(path=str(TRAIN_PROMPTS_PATH), template="{input}", max_prompt_tokens=80)
    problems = load_problems(dataset, tokenizer=tokenizer)[:args.num_prompts]
    n = args.samples_per_prompt
    prompts = [tokenizer(p.prompt_text, add_special_tokens=False)["input_ids"] for p in problems for _ in range(n)]
    truths = [p.ground_truth for p in problems for _ in range(n)]
    params = SamplingParams(temperature=1.0, max_new_tokens=args.max_new_tokens, seed=args.seed,
                            stop_token_ids=(tokenizer.eos_token_id,))

    def sequential() -> tuple[float, float, list[float]]:
        started = time.perf_counter()
        generations = engine.generate(prompts, params)
        generated = time.perf_counter()
        grades = pool.grade_batch([g.text for g in generations], truths)
        return generated - started, time.perf_counter() - generated, grades.scores

    def overlapped() -> tuple[float, float, list[float]]:
        started = time.perf_counter()
        with pool.session() as session:
            generate_graded(engine, prompts, params, truths, session)
            generated = time.perf_counter()
            grades = session.finish()
        return generated - started, time.perf_counter() - generated, grades.scores

    modes = {"sequential": sequential, "overlapped": overlapped}
    times: dict[str, list[tuple[float, float]]] = {mode: [] for mode in modes}
    # Grader processes import the reward by module name: this file's, found on sys.path[0] (the tools folder).
    reward_fn = f"{Path(__file__).stem}:math_reward_paper_like_cost" if args.paper_like_grading else "math"
    with GraderPool(RewardConfig(num_workers=args.workers, timeout_s=5.0, reward_fn=reward_fn)) as pool:
        reference = sequential()[2]  # warm-up of the engine and the workers; also the expected scores
        for repeat in range(args.repeats):
            for mode in (list(modes) if repeat % 2 == 0 else list(modes)[::-1]):
                generate_s, wait_s, scores = modes[mode]()
                if scores != reference:
                    raise RuntimeError(f"{mode} gave other grades than the sequential warm-up; same seed, same tokens")
                times[mode].append((generate_s, wait_s))

    num_tokens = sum(len(g.token_ids) for g in engine.generate(prompts, params))
    print(f"{len(prompts)} responses ({args.num_prompts} prompts x {n}), {num_tokens} tokens, "
          f"{pool.num_workers} grader worker(s) ({reward_fn}), torch threads {torch.get_num_threads()}, "
          f"{os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f}; median of {args.repeats} repeats")
    print(f"{'mode':>10} {'generate s':>10} {'grade wait s':>12} {'total s':>8} {'min total s':>11}")
    for mode, runs in times.items():
        generate_s = statistics.median(run[0] for run in runs)
        wait_s = statistics.median(run[1] for run in runs)
        totals = [run[0] + run[1] for run in runs]
        print(f"{mode:>10} {generate_s:>10.3f} {wait_s:>12.3f} {statistics.median(totals):>8.3f} {min(totals):>11.3f}")


if __name__ == "__main__":
    main()
