"""Detect the four cognitive behaviours of the paper in responses: verification, backtracking,
subgoal setting, enumeration.

Two judges, registered by name in `JUDGES`:
- "rules": regex cues per behaviour (`RULE_CUES`). Free and deterministic; the default, and the
  fallback for any item the LLM judge cannot answer. It over-counts formulaic phrases and misses
  paraphrases, so read its rates as trends, not truths.
- "llm": any OpenAI-compatible chat endpoint (e.g. an SGLang server started with
  ``python -m sglang.launch_server --model-path Qwen/Qwen2.5-72B-Instruct``), asked at temperature 0
  for a strict JSON verdict per behaviour (`JUDGE_SYSTEM_PROMPT`, `judge_user_prompt`). Requests use
  the stdlib (urllib), time out after `timeout_s`, and are retried at most `max_retries` times on
  network errors, timeouts, HTTP 429 and 5xx. A malformed answer, or a request that still fails, is
  recorded as an error on that item and the rule verdict is used instead; judging never raises.

Usage::

    judge = make_judge("llm", base_url="http://127.0.0.1:30000", model="Qwen/Qwen2.5-72B-Instruct")
    verdicts = judge.judge([(prompt, response), ...])
"""

from __future__ import annotations

import http.client
import json
import logging
import re
import time
import urllib.error
import urllib.request
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Optional, Protocol

logger = logging.getLogger(__name__)

BEHAVIORS = ("verification", "backtracking", "subgoal_setting", "enumeration")

_FLAGS = re.IGNORECASE
RULE_CUES: dict[str, tuple[re.Pattern, ...]] = {
    "verification": tuple(
        re.compile(p, _FLAGS)
        for p in (
            r"\b(?:let(?: me|'s| us)|we (?:can|should)|i (?:will|should|can))\s+(?:now\s+)?(?:verify|check|double[- ]check|confirm)\b",
            r"\bverif(?:y|ying|ied|ication)\b",
            r"\bdouble[- ]check",
            r"\b(?:substitut\w*|plug\w*)\b[^.\n]{0,40}\bback\b",
            r"\bcheck(?:ing)?\s+(?:the|our|my|this)\s+(?:answer|solution|result|work|calculation)s?\b",
        )
    ),
    "backtracking": tuple(
        re.compile(p, _FLAGS)
        for p in (
            r"\bwait\b",
            r"\b(?:that|this)(?:'s| is)\s+(?:not (?:right|correct)|incorrect|wrong)\b",
            r"\b(?:i|we)\s+made\s+(?:a|an)\s+(?:mistake|error)\b",
            r"\b(?:go back|start over|reconsider|re-?evaluate|re-?examine|rethink|recheck)\b",
            r"\b(?:this|that)\s+(?:does not|doesn't|did not|didn't)\s+(?:work|make sense|seem right)\b",
            r"\btry\s+(?:a\s+)?(?:different|another)\s+(?:approach|method|way)\b",
            r"\btry\s+again\b",
        )
    ),
    "subgoal_setting": tuple(
        re.compile(p, _FLAGS)
        for p in (
            r"\b(?:we|i)\s+(?:first\s+)?need\s+to\s+(?:first\s+)?(?:find|determine|compute|calculate|figure out|solve)\b",
            r"\bstep\s+\d+\b",
            r"\bfirst(?:ly)?,?\s+(?:we|i|let's|let us)\b",
            r"\bbreak\s+(?:this|it|the problem)\s+(?:down|into)\b",
            r"\bour\s+(?:goal|next step)\s+is\b",
        )
    ),
    "enumeration": tuple(
        re.compile(p, _FLAGS)
        for p in (
            r"\bcase\s+(?:\d+|[ivx]+|one|two|three)\b",
            r"\b(?:list|enumerate|consider|check|try)\s+(?:all|each|every)\s+(?:the\s+)?(?:possible\s+)?(?:cases?|values?|possibilities|options|combinations|pairs)\b",
            r"\b(?:all|the)\s+possible\s+(?:cases|values|possibilities|combinations|pairs|outcomes)\b",
            r"\bfor\s+each\s+(?:possible\s+)?(?:case|value|possibility|choice)\b",
        )
    ),
}


@dataclass(frozen=True)
class Verdict:
    """The behaviours found in one response, by which judge, with a short evidence quote each."""

    behaviors: dict[str, bool]
    evidence: dict[str, str] = field(default_factory=dict)
    source: str = "rules"  # "rules", "llm", or "rules-fallback" when the LLM answer was unusable
    error: Optional[str] = None


def rule_verdict(response: str) -> Verdict:
    behaviors, evidence = {}, {}
    for behavior, patterns in RULE_CUES.items():
        match = next((m for m in (p.search(response) for p in patterns) if m), None)
        behaviors[behavior] = match is not None
        if match:
            evidence[behavior] = match.group(0)
    return Verdict(behaviors=behaviors, evidence=evidence, source="rules")


class BehaviorJudge(Protocol):
    name: str
    # What decides the verdicts, in words a report prints next to the rates.
    description: str

    def judge(self, items: Sequence[tuple[str, str]]) -> list[Verdict]:
        """One verdict per (prompt, response) pair, in order."""
        ...


class RuleJudge:
    name = "rules"
    description = ("rule judge: regular-expression cues per behaviour (megatron_zero.analysis.behaviors.RULE_CUES); "
                   "it over-counts formulaic phrases and misses paraphrases, so read its rates as trends")

    def judge(self, items: Sequence[tuple[str, str]]) -> list[Verdict]:
        return [rule_verdict(response) for _, response in items]


JUDGE_SYSTEM_PROMPT = (
    "You are an expert annotator of mathematical reasoning. You read a model's solution and label which "
    "reasoning behaviours it shows. You answer with one JSON object and nothing else."
)

_BEHAVIOR_DEFINITIONS = """\
- verification: the solution checks an intermediate or final result, e.g. substitutes the answer back, \
recomputes a value another way, or explicitly confirms a step ("Let me verify: 3*4 = 12, correct").
- backtracking: the solution notices that a step or approach is wrong or not working and abandons or \
revises it ("Wait, that's wrong", "This doesn't work; let's try another way").
- subgoal_setting: the solution explicitly breaks the problem into intermediate goals before pursuing \
them ("First we need to find x, then use it to compute y").
- enumeration: the solution systematically goes through cases, values or possibilities one by one \
("Case 1: n is even ... Case 2: n is odd", "Try x = 1, 2, 3").
Plain step-by-step computation without these is none of them."""

_ANSWER_FORMAT = json.dumps({b: {"present": False, "evidence": ""} for b in BEHAVIORS})


def judge_user_prompt(prompt: str, response: str) -> str:
    return (
        "Decide for each of the four behaviours below whether the solution shows it at least once.\n\n"
        f"{_BEHAVIOR_DEFINITIONS}\n\n"
        f"<problem>\n{prompt}\n</problem>\n\n"
        f"<solution>\n{response}\n</solution>\n\n"
        "Reply with exactly one JSON object of this shape, `present` true or false, `evidence` a short quote "
        f"from the solution (empty if absent):\n{_ANSWER_FORMAT}"
    )


class JudgeParseError(ValueError):
    pass


_THINK_BLOCK = re.compile(r"<think>.*?</think>", re.DOTALL)


def parse_judge_reply(content: str) -> tuple[dict[str, bool], dict[str, str]]:
    """Behaviours and evidence from the judge's reply; raises JudgeParseError if it is not the asked JSON.

    Tolerates what chat models wrap around JSON (code fences, a sentence before it, a <think> block),
    but not a wrong shape: every behaviour must be present, as {"present": bool, ...} or a bare bool.
    """
    text = _THINK_BLOCK.sub("", content)
    decoder = json.JSONDecoder()
    verdict = None
    for start in (m.start() for m in re.finditer(r"\{", text)):
        try:
            candidate, _ = decoder.raw_decode(text, start)
        except json.JSONDecodeError:
            continue
        if isinstance(candidate, dict) and any(b in candidate for b in BEHAVIORS):
            verdict = candidate
            break
    if verdict is None:
        raise JudgeParseError(f"no JSON verdict in reply: {content[:120]!r}")
    behaviors, evidence = {}, {}
    for behavior in BEHAVIORS:
        if behavior not in verdict:
            raise JudgeParseError(f"verdict lacks {behavior!r}: {verdict!r}"[:200])
        value = verdict[behavior]
        present = value.get("present") if isinstance(value, dict) else value
        if not isinstance(present, bool):
            raise JudgeParseError(f"{behavior!r} must be true/false, got {value!r}"[:200])
        behaviors[behavior] = present
        if isinstance(value, dict) and present and isinstance(value.get("evidence"), str):
            evidence[behavior] = value["evidence"]
    return behaviors, evidence


def _truncate_middle(text: str, max_chars: int) -> str:
    if len(text) <= max_chars:
        return text
    head = max_chars // 2
    omitted = len(text) - 2 * head
    return f"{text[:head]}\n[... {omitted} characters omitted ...]\n{text[-head:]}"


_RETRYABLE_HTTP = (429, 500, 502, 503, 504)


class LLMJudge:
    """Judge through ``POST {base_url}/v1/chat/completions`` of an OpenAI-compatible server."""

    name = "llm"

    def __init__(
        self,
        base_url: str,
        model: str,
        *,
        timeout_s: float = 120.0,
        max_retries: int = 2,
        retry_backoff_s: float = 1.0,
        max_response_chars: int = 24000,
        max_tokens: int = 512,
        num_workers: int = 8,
    ) -> None:
        if not base_url.startswith(("http://", "https://")):
            raise ValueError(f"judge base_url={base_url!r} must start with http:// or https://")
        if not model:
            raise ValueError("judge model='' must name the served model, e.g. 'Qwen/Qwen2.5-72B-Instruct'")
        if timeout_s <= 0 or max_retries < 0 or retry_backoff_s < 0 or num_workers < 1:
            raise ValueError(
                f"judge timeout_s={timeout_s} must be > 0, max_retries={max_retries} and "
                f"retry_backoff_s={retry_backoff_s} >= 0, num_workers={num_workers} >= 1"
            )
        self.url = base_url.rstrip("/") + "/v1/chat/completions"
        self.model = model
        self.description = (f"LLM judge: {model} at {self.url}, temperature 0, rule verdict where its answer "
                            "was unusable")
        self.timeout_s = timeout_s
        self.max_retries = max_retries
        self.retry_backoff_s = retry_backoff_s
        self.max_response_chars = max_response_chars
        self.max_tokens = max_tokens
        self.num_workers = num_workers

    def judge(self, items: Sequence[tuple[str, str]]) -> list[Verdict]:
        with ThreadPoolExecutor(max_workers=self.num_workers) as pool:
            return list(pool.map(lambda item: self._judge_one(*item), items))

    def _judge_one(self, prompt: str, response: str) -> Verdict:
        try:
            content = self._complete(judge_user_prompt(prompt, _truncate_middle(response, self.max_response_chars)))
            behaviors, evidence = parse_judge_reply(content)
            return Verdict(behaviors=behaviors, evidence=evidence, source="llm")
        except (OSError, ValueError, http.client.HTTPException) as error:
            # OSError covers URLError, HTTPError, timeouts and refused connections; ValueError covers
            # JudgeParseError and a body that is not JSON; HTTPException a connection cut mid-reply.
            logger.warning("LLM judge failed on one item, using the rule verdict: %s", error)
            fallback = rule_verdict(response)
            return Verdict(
                behaviors=fallback.behaviors,
                evidence=fallback.evidence,
                source="rules-fallback",
                error=f"{type(error).__name__}: {error}"[:300],
            )

    def _complete(self, user_prompt: str) -> str:
        payload = json.dumps(
            {
                "model": self.model,
                "messages": [
                    {"role": "system", "content": JUDGE_SYSTEM_PROMPT},
                    {"role": "user", "content": user_prompt},
                ],
                "temperature": 0,
                "max_tokens": self.max_tokens,
            }
        ).encode("utf-8")
        for attempt in range(self.max_retries + 1):
            request = urllib.request.Request(
                self.url, data=payload, headers={"Content-Type": "application/json"}, method="POST"
            )
            try:
                with urllib.request.urlopen(request, timeout=self.timeout_s) as reply:
                    body = json.loads(reply.read().decode("utf-8"))
                break
            except urllib.error.HTTPError as error:
                if error.code not in _RETRYABLE_HTTP or attempt == self.max_retries:
                    raise
            except (urllib.error.URLError, TimeoutError, ConnectionError, http.client.HTTPException):
                if attempt == self.max_retries:
                    raise
            time.sleep(self.retry_backoff_s * 2**attempt)
        try:
            content = body["choices"][0]["message"]["content"]
        except (KeyError, IndexError, TypeError) as error:
            raise JudgeParseError(f"reply is not an OpenAI chat completion: {str(body)[:120]!r}") from error
        if not isinstance(content, str):
            raise JudgeParseError(f"reply content is not text: {content!r}"[:200])
        return content


JUDGES = {"rules": RuleJudge, "llm": LLMJudge}


def make_judge(name: str, **kwargs) -> BehaviorJudge:
    if name not in JUDGES:
        raise ValueError(f"unknown judge {name!r}; valid judges: {', '.join(JUDGES)}")
    return JUDGES[name](**kwargs)
