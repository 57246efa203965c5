"""Cheap per-response text metrics tracked in the paper next to accuracy.

- has_box: the response contains ``\\boxed{`` (the answer format the reward extracts).
- repetition_ratio / is_repetitive: degenerate looping, see `repetition_ratio`.
- keyword_counts: reflection keywords (recheck, rethink, try again, wait, alternatively, retry,
  however), counted as whole words/phrases, case-insensitive.

Lengths, clip/stop ratios and correctness come from the sample record itself (`num_tokens`,
`finish_reason`, `reward`); step-level aggregation lives in `megatron_zero.analysis.pipeline`.
"""

from __future__ import annotations

import re

REFLECTION_KEYWORDS = ("recheck", "rethink", "try again", "wait", "alternatively", "retry", "however")
_KEYWORD_PATTERNS = {
    # \b on both sides: "wait" must not match "awaited", "retry" not "retrying"; a phrase may
    # span any run of whitespace ("try\nagain").
    keyword: re.compile(r"\b" + r"\s+".join(map(re.escape, keyword.split())) + r"\b", re.IGNORECASE)
    for keyword in REFLECTION_KEYWORDS
}
_BOX_PATTERN = re.compile(r"\\boxed\s*\{")

REPETITION_WINDOW_WORDS = 50
REPETITION_NGRAM = 3
REPETITION_THRESHOLD = 0.85
REPETITION_LOOKBACK_WINDOWS = 8


def has_box(text: str) -> bool:
    return _BOX_PATTERN.search(text) is not None


def keyword_counts(text: str) -> dict[str, int]:
    """Occurrences of each reflection keyword (word-boundary, case-insensitive)."""
    return {keyword: len(pattern.findall(text)) for keyword, pattern in _KEYWORD_PATTERNS.items()}


def _ngrams(words: list[str], n: int) -> set[tuple[str, ...]]:
    return {tuple(words[i : i + n]) for i in range(len(words) - n + 1)}


def repetition_ratio(
    text: str,
    *,
    window_words: int = REPETITION_WINDOW_WORDS,
    ngram: int = REPETITION_NGRAM,
    threshold: float = REPETITION_THRESHOLD,
    lookback_windows: int = REPETITION_LOOKBACK_WINDOWS,
) -> float:
    """Share of a response's windows that repeat an earlier window (windowed n-gram Jaccard).

    Definition, exactly:
      1. words = the whitespace-separated tokens of `text` (no tokenizer needed, case kept);
      2. the text is cut into consecutive, non-overlapping windows of `window_words` words; a shorter
         tail is dropped, so the windows are W_0 .. W_{m-1} with m = len(words) // window_words;
      3. G_i = the set of word n-grams (n = `ngram`) inside W_i;
      4. W_i (i >= 1) is a repeat if Jaccard(G_i, G_j) = |G_i & G_j| / |G_i | G_j| >= `threshold`
         for some earlier window j with i - `lookback_windows` <= j < i (loops of up to
         lookback x window words are caught, at O(m x lookback) cost);
      5. ratio = (number of repeat windows) / (m - 1); 0.0 when m < 2.
    A response counts as repetitive when the ratio is > 0 (see `is_repetitive`).
    """
    if window_words < ngram or ngram < 1:
        raise ValueError(f"window_words={window_words} must be >= ngram={ngram} >= 1")
    words = text.split()
    num_windows = len(words) // window_words
    if num_windows < 2:
        return 0.0
    grams = [_ngrams(words[i * window_words : (i + 1) * window_words], ngram) for i in range(num_windows)]
    repeats = 0
    for i in range(1, num_windows):
        for j in range(max(0, i - lookback_windows), i):
            if len(grams[i] & grams[j]) >= threshold * len(grams[i] | grams[j]):
                repeats += 1
                break
    return repeats / (num_windows - 1)


def is_repetitive(ratio: float) -> bool:
    return ratio > 0.0
