"""Accuracy metrics over n samples per problem: unbiased pass@k and avg@k.

pass@k (Chen et al. 2021, "Evaluating Large Language Models Trained on Code"): with n samples of
which c are correct, the probability that a random k-subset holds at least one correct sample,
1 - C(n-c, k) / C(n, k). Computed as 1 - prod_{i=n-c+1..n} (1 - k/i), which avoids the huge
binomials and is exact up to float64 rounding.

avg@k: the mean correctness of the first k samples (samples are i.i.d., so the first k are a random
k-subset); AIME24 "avg@32" in the paper is avg@k with k = n = 32.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np


def pass_at_k(num_samples: int, num_correct: int, k: int) -> float:
    """Unbiased pass@k for one problem with `num_correct` of `num_samples` correct."""
    if not 0 <= num_correct <= num_samples:
        raise ValueError(f"num_correct={num_correct} must be in [0, num_samples={num_samples}]")
    if not 1 <= k <= num_samples:
        raise ValueError(f"k={k} must be in [1, num_samples={num_samples}]")
    if num_samples - num_correct < k:
        return 1.0  # every k-subset must contain a correct sample
    return float(1.0 - np.prod(1.0 - k / np.arange(num_samples - num_correct + 1, num_samples + 1, dtype=np.float64)))


def mean_pass_at_k(correct: Sequence[Sequence[bool]], k: int) -> float:
    """pass@k averaged over problems; `correct[p][s]` is whether sample s of problem p is correct."""
    _check_rectangular(correct, k)
    return float(np.mean([pass_at_k(len(row), int(sum(row)), k) for row in correct]))


def mean_avg_at_k(correct: Sequence[Sequence[bool]], k: int) -> float:
    """avg@k averaged over problems: the accuracy of the first k samples of each problem."""
    _check_rectangular(correct, k)
    return float(np.mean([np.mean(np.asarray(row[:k], dtype=np.float64)) for row in correct]))


def _check_rectangular(correct: Sequence[Sequence[bool]], k: int) -> None:
    if not correct:
        raise ValueError("no problems to score")
    lengths = {len(row) for row in correct}
    if len(lengths) != 1:
        raise ValueError(f"every problem needs the same number of samples, got {sorted(lengths)}")
    (num_samples,) = lengths
    if not 1 <= k <= num_samples:
        raise ValueError(f"k={k} must be in [1, num_samples={num_samples}]")
