"""SGLang 0.5.23's /generate request bodies and answers, as our ``RolloutEngine`` contract needs them: our
``SamplingParams`` as its ``sampling_params``, one seed per request, and the checks on what comes back (log-prob
tuples, finish reasons, batch sizes). Pure: the HTTP client is rollout/sglang_engine.py.
"""

from __future__ import annotations

from typing import Iterator, Sequence

import numpy as np

from megatron_zero.rollout.engine import FINISH_REASONS, SamplingParams


def sglang_sampling_params(params: SamplingParams, *, deterministic: bool) -> dict:
    """Our ``SamplingParams`` as SGLang's ``sampling_params`` dict (sglang/srt/sampling/sampling_params.py)."""
    if params.seed is not None and not deterministic:
        raise ValueError(
            f"sampling.seed={params.seed} is set but SGLang ignores per-request seeds unless the server runs "
            "with --enable-deterministic-inference; set rollout.sglang.enable_deterministic_inference=true (eval, "
            "difficulty: --deterministic) or seed=None"
        )
    sampling = {
        "temperature": params.temperature,
        "top_p": params.top_p,
        "top_k": params.top_k,
        "max_new_tokens": params.max_new_tokens,
        "stop": list(params.stop),
        "stop_token_ids": list(params.stop_token_ids),
        # The contract keeps a matched stop string in the text; SGLang trims it by default.
        "no_stop_trim": True,
    }
    if params.seed is not None:
        sampling["sampling_seed"] = params.seed
    return sampling


def request_seeds(seed: int, count: int) -> list[int]:
    """One sampling seed per request, all derived from ``seed``. SGLang's seeded sampler draws from (seed, token
    position) alone, so the n samples of a prompt sent with one shared seed would be n copies of one response."""
    return [int(child.generate_state(1)[0]) for child in np.random.SeedSequence(seed).spawn(count)]


def generate_payload(prompts: Sequence[Sequence[int]], params: SamplingParams, *, deterministic: bool) -> dict:
    """The JSON body of one POST /generate for ``prompts`` (``GenerateReqInput``), exactly as the engine sends it.

    ``sampling_params`` is a list, one entry per prompt; when seeded each gets a seed of its own (``request_seeds``).
    Raises before any request for an empty prompt or a seed the server would not honour."""
    prompts = [list(prompt) for prompt in prompts]
    empty = [i for i, prompt in enumerate(prompts) if not prompt]
    if empty:
        raise ValueError(f"prompts {empty[:5]} are empty; every prompt needs at least one token")
    sampling = sglang_sampling_params(params, deterministic=deterministic)
    return {
        "input_ids": prompts,
        "sampling_params": [sampling] * len(prompts) if params.seed is None else [
            {**sampling, "sampling_seed": seed} for seed in request_seeds(params.seed, len(prompts))],
        "return_logprob": True,
        # -1: log-probs of the generated tokens only.
        "logprob_start_len": -1,
    }


def single_requests(payload: dict) -> Iterator[dict]:
    """``payload`` (``generate_payload``) as the one-prompt /generate requests ``generate_stream`` sends, in prompt
    order: each a batch of one, so its answer has the same shape as a batched request's."""
    for prompt, sampling in zip(payload["input_ids"], payload["sampling_params"], strict=True):
        yield {**payload, "input_ids": [prompt], "sampling_params": [sampling]}


def logprob_values(entries: list, url: str, what: str) -> tuple[list[float], list[int]]:
    """Split SGLang's (logprob, token_id, text) tuples; orjson writes -inf and NaN as null, so null is refused."""
    values, ids = [], []
    for position, entry in enumerate(entries):
        logprob, token_id = entry[0], entry[1]
        if logprob is None:
            raise RuntimeError(f"SGLang server {url} /generate returned a non-finite {what} log-prob (JSON null) "
                               f"at position {position} for token {token_id}; the weights may hold NaN or the "
                               "token has zero probability")
        values.append(float(logprob))
        ids.append(int(token_id))
    return values, ids


def checked_finish_reason(meta_info: dict, url: str, index: int) -> str:
    reason = meta_info.get("finish_reason")
    kind = reason.get("type") if isinstance(reason, dict) else None
    if kind == "abort":
        raise RuntimeError(f"SGLang server {url} /generate aborted request {index}: {reason.get('message')} "
                           f"(status {reason.get('status_code')})")
    if kind not in FINISH_REASONS:
        raise RuntimeError(f"SGLang server {url} /generate request {index} has finish_reason={reason!r}; "
                           f"expected a dict with type in {FINISH_REASONS}")
    return kind


def check_batch(outputs: object, expected: int, url: str) -> list[dict]:
    if not isinstance(outputs, list) or len(outputs) != expected:
        got = f"{len(outputs)} outputs" if isinstance(outputs, list) else type(outputs).__name__
        raise RuntimeError(f"SGLang server {url} /generate answered a batch of {expected} with {got}")
    return outputs
