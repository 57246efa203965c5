"""Tests of megatron_zero.analysis: text metrics on hand-written responses (expected values worked out
by hand below), the rule detector, the LLM judge against a local fake OpenAI-compatible server
(valid, wrapped, malformed, wrong-shape, slow, failing replies), step summaries, the report files
and the CLI.
"""

from __future__ import annotations

import base64
import html.parser
import json
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from megatron_zero.analysis import (
    BEHAVIORS,
    LLMJudge,
    RuleJudge,
    SampleRecord,
    analyze,
    has_box,
    keyword_counts,
    load_samples,
    make_judge,
    repetition_ratio,
    write_analysis,
    write_samples,
)
from megatron_zero.analysis.behaviors import JudgeParseError, parse_judge_reply, rule_verdict
from megatron_zero.analysis.records import LoadedRecord

REPO = Path(__file__).resolve().parents[1]


def loaded(records: list[SampleRecord]) -> list[LoadedRecord]:
    return [LoadedRecord(record, f"memory:{i + 1}") for i, record in enumerate(records)]


def record(step=0, response="", reward=0.0, num_tokens=10, finish_reason="stop", prompt="Q: 1+1?") -> SampleRecord:
    return SampleRecord(step=step, prompt=prompt, response=response, ground_truth="2", reward=reward,
                        num_tokens=num_tokens, finish_reason=finish_reason)


# ---------------------------------------------------------------- text metrics


def test_keyword_counts_are_word_bounded_and_case_insensitive():
    text = ("Wait, let me recheck. WAIT... it awaited a retrying loop; try  again.\n"
            "However, alternatively we could Rethink it. Retry! however, rechecked is not recheck-ed? recheck-ed")
    # wait: "Wait", "WAIT" ("awaited" is not a word match); recheck: "recheck", "recheck-ed" x2 ("-" is a
    # word boundary, "rechecked" is not); try again: across two spaces; however: 2; retry: "Retry"
    # ("retrying" is not); alternatively: 1; rethink: "Rethink".
    assert keyword_counts(text) == {
        "recheck": 3, "rethink": 1, "try again": 1, "wait": 2, "alternatively": 1, "retry": 1, "however": 2,
    }
    assert keyword_counts("try\nagain and TRY AGAIN")["try again"] == 2
    assert sum(keyword_counts("Compute 2 + 2 = 4.").values()) == 0


def test_has_box():
    assert has_box("so the answer is $\\boxed{4}$")
    assert has_box("\\boxed {x}")
    assert not has_box("the answer is 4")
    assert not has_box("\\boxed")


def test_repetition_ratio_repetitive_vs_not():
    sentence = "so we add the two numbers and get the same result".split()  # 10 words
    looping = " ".join(sentence * 30)  # 300 words = 6 identical windows of 50: 5 of 5 later windows repeat
    assert repetition_ratio(looping) == 1.0
    distinct = " ".join(f"w{i}" for i in range(300))  # 6 windows sharing no trigram
    assert repetition_ratio(distinct) == 0.0
    assert repetition_ratio("short text") == 0.0  # fewer than two windows


def test_repetition_ratio_small_windows_by_hand():
    # windows of 4 words, bigrams: W0={ab,bc,cd} W1={ef,fg,gh} W2=W0 W3={xy,yz,zw}
    text = "a b c d e f g h a b c d x y z w"
    # W1: J(W1,W0)=0; W2: J(W2,W0)=1 >= 0.85 -> repeat; W3: 0 -> ratio 1/3
    assert repetition_ratio(text, window_words=4, ngram=2) == pytest.approx(1 / 3)
    # looking back one window only, W2 is compared with W1 alone: no repeat
    assert repetition_ratio(text, window_words=4, ngram=2, lookback_windows=1) == 0.0
    # W1 = {ab,bc,cx} vs W0 = {ab,bc,cd}: J = 2/4 = 0.5, a repeat only below a 0.5 threshold
    near = "a b c d a b c x"
    assert repetition_ratio(near, window_words=4, ngram=2) == 0.0
    assert repetition_ratio(near, window_words=4, ngram=2, threshold=0.5) == 1.0


# ---------------------------------------------------------------- rule detector


RULE_CASES = {
    "verification": ("Let me verify: 3 * 4 = 12, which matches.", "We multiply 3 by 4 to get 12."),
    "backtracking": ("Wait, that's not right. Let me go back to the equation.", "Then we divide both sides by 2."),
    "subgoal_setting": ("First, we need to find the radius, then the area.", "The area is 12."),
    "enumeration": ("Case 1: n is even. Case 2: n is odd.", "n is even, so n^2 is even."),
}


@pytest.mark.parametrize("behavior", BEHAVIORS)
def test_rule_detector_per_behavior(behavior):
    positive, negative = RULE_CASES[behavior]
    verdict = rule_verdict(positive)
    assert verdict.behaviors[behavior], positive
    assert verdict.evidence[behavior] and verdict.evidence[behavior].lower() in positive.lower()
    assert not any(rule_verdict(negative).behaviors.values()), negative


def test_judge_registry():
    assert isinstance(make_judge("rules"), RuleJudge)
    with pytest.raises(ValueError, match="unknown judge 'gpt'; valid judges: rules, llm"):
        make_judge("gpt")
    with pytest.raises(ValueError, match="base_url"):
        make_judge("llm", base_url="localhost:30000", model="m")


# ---------------------------------------------------------------- LLM judge on a local fake server


def verdict_json(**present) -> str:
    return json.dumps({b: {"present": present.get(b, False), "evidence": "quote" if present.get(b) else ""}
                       for b in BEHAVIORS})


class FakeChatHandler(BaseHTTPRequestHandler):
    """Answers like an OpenAI chat endpoint; what it does depends on a marker in the judged text."""

    requests_seen: list[dict] = []
    flaky_failures = {"count": 0}

    def log_message(self, *args):  # keep pytest output clean
        pass

    def do_POST(self):
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        FakeChatHandler.requests_seen.append(body)
        user = body["messages"][-1]["content"]
        solution = user.split("<solution>")[1].split("</solution>")[0]
        if self.path != "/v1/chat/completions":
            return self._send(404, {"error": "not found"})
        if "SLOW" in solution:
            time.sleep(1.0)
            return self._send(200, self._chat(verdict_json(verification=True)))
        if "FLAKY" in solution and FakeChatHandler.flaky_failures["count"] == 0:
            FakeChatHandler.flaky_failures["count"] += 1
            return self._send(503, {"error": "overloaded"})
        if "MALFORMED" in solution:
            return self._send(200, self._chat('{"verification": {"present": tru'))
        if "BADSHAPE" in solution:
            return self._send(200, self._chat('{"verification": "yes"}'))
        if "NOTCHAT" in solution:
            return self._send(200, {"unexpected": True})
        if "WRAPPED" in solution:
            content = "<think>the JSON {} is below</think>Here is my verdict:\n```json\n" + verdict_json(enumeration=True) + "\n```"
            return self._send(200, self._chat(content))
        return self._send(200, self._chat(verdict_json(backtracking=True, subgoal_setting="subgoal" in solution)))

    @staticmethod
    def _chat(content: str) -> dict:
        return {"id": "x", "object": "chat.completion", "choices": [{"index": 0, "finish_reason": "stop",
                "message": {"role": "assistant", "content": content}}]}

    def _send(self, code: int, payload: dict) -> None:
        data = json.dumps(payload).encode()
        try:
            self.send_response(code)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)
        except (BrokenPipeError, ConnectionResetError):
            pass  # the client gave up (timeout test)


@pytest.fixture
def chat_server():
    FakeChatHandler.requests_seen = []
    FakeChatHandler.flaky_failures = {"count": 0}
    server = ThreadingHTTPServer(("127.0.0.1", 0), FakeChatHandler)
    server.daemon_threads = True
    server.block_on_close = False
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


def fast_judge(url: str) -> LLMJudge:
    return LLMJudge(url, "judge-model", timeout_s=0.3, max_retries=1, retry_backoff_s=0.01, num_workers=4)


def test_llm_judge_valid_wrapped_and_retried_replies(chat_server):
    items = [("Q", "plain subgoal answer"), ("Q", "WRAPPED answer"), ("Q", "FLAKY answer, wait")]
    verdicts = fast_judge(chat_server).judge(items)
    assert [v.source for v in verdicts] == ["llm", "llm", "llm"]
    assert all(v.error is None for v in verdicts)
    assert verdicts[0].behaviors == {"verification": False, "backtracking": True, "subgoal_setting": True, "enumeration": False}
    assert verdicts[1].behaviors == {"verification": False, "backtracking": False, "subgoal_setting": False, "enumeration": True}
    assert verdicts[1].evidence == {"enumeration": "quote"}
    assert FakeChatHandler.flaky_failures["count"] == 1  # the 503 was retried
    request = FakeChatHandler.requests_seen[0]
    assert request["model"] == "judge-model" and request["temperature"] == 0
    assert request["messages"][0]["role"] == "system"


def test_llm_judge_falls_back_to_rules_on_bad_replies(chat_server):
    responses = ["MALFORMED. Wait, let me verify.", "BADSHAPE. Case 1: x = 1.", "NOTCHAT. First, we need to find x.",
                 "SLOW. Let me double-check."]
    start = time.monotonic()
    verdicts = fast_judge(chat_server).judge([("Q", r) for r in responses])
    elapsed = time.monotonic() - start
    for response, verdict in zip(responses, verdicts):
        assert verdict.source == "rules-fallback", response
        assert verdict.behaviors == rule_verdict(response).behaviors
        assert verdict.error
    assert "JudgeParseError" in verdicts[0].error and "JudgeParseError" in verdicts[1].error
    assert "not an OpenAI chat completion" in verdicts[2].error
    assert "timed out" in verdicts[3].error.lower()
    # 2 attempts x 0.3 s timeout + backoff: bounded, no hanging
    assert elapsed < 3.0
    assert sum("SLOW" in r["messages"][-1]["content"] for r in FakeChatHandler.requests_seen) == 2


def test_llm_judge_unreachable_server_is_an_error_not_a_crash():
    import socket

    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    verdicts = fast_judge(f"http://127.0.0.1:{port}").judge([("Q", "Wait, wrong.")])
    assert verdicts[0].source == "rules-fallback" and "refused" in verdicts[0].error.lower()


def test_parse_judge_reply_accepts_bools_and_rejects_wrong_types():
    behaviors, _ = parse_judge_reply(json.dumps({b: b == "verification" for b in BEHAVIORS}))
    assert behaviors == {b: b == "verification" for b in BEHAVIORS}
    with pytest.raises(JudgeParseError, match="'enumeration'"):
        parse_judge_reply(json.dumps({b: True for b in BEHAVIORS[:3]}))
    with pytest.raises(JudgeParseError, match="true/false"):
        parse_judge_reply(json.dumps({b: {"present": "yes"} for b in BEHAVIORS}))
    with pytest.raises(JudgeParseError, match="no JSON"):
        parse_judge_reply("I think it verifies.")


def test_analyze_counts_llm_judge_errors_per_step(chat_server):
    records = [record(step=0, response="plain"), record(step=0, response="MALFORMED wait"),
               record(step=1, response="plain subgoal")]
    result = analyze(loaded(records), fast_judge(chat_server))
    assert [s.num_judge_errors for s in result.steps] == [1, 0]
    assert result.num_judge_errors == 1
    assert result.steps[0].behavior_rates["backtracking"] == 1.0  # llm says yes; rule fallback sees "wait"
    assert result.steps[1].behavior_rates["subgoal_setting"] == 1.0


# ---------------------------------------------------------------- step summaries


def test_step_summary_by_hand():
    records = [
        record(step=0, response="Let me verify. \\boxed{2}", reward=1.0, num_tokens=100),
        record(step=0, response="Wait, retry... " + "loop " * 150, reward=0.0, num_tokens=300, finish_reason="length"),
        record(step=0, response="Case 1: \\boxed{3}", reward=-0.5, num_tokens=200),
        record(step=5, response="\\boxed{2}", reward=1.0, num_tokens=50),
        record(step=5, response="First, we need to find x. \\boxed{2}", reward=1.0, num_tokens=70),
    ]
    result = analyze(loaded(records), RuleJudge())
    first, last = result.steps
    assert (first.step, first.num_responses, last.step, last.num_responses) == (0, 3, 5, 2)
    assert first.accuracy == pytest.approx(1 / 3)
    assert first.mean_reward == pytest.approx((1.0 + 0.0 - 0.5) / 3)
    assert first.mean_length == pytest.approx(200.0)
    assert first.mean_length_correct == pytest.approx(100.0)
    assert first.mean_length_wrong == pytest.approx(250.0)
    assert first.clip_ratio == pytest.approx(1 / 3) and first.stop_ratio == pytest.approx(2 / 3)
    assert first.box_ratio == pytest.approx(2 / 3)
    # 152 words -> 3 windows; G0 = {(Wait, retry..., loop), (retry..., loop, loop), (loop, loop, loop)},
    # G1 = G2 = {(loop, loop, loop)}: W1 vs W0 has J = 1/3, W2 repeats W1 -> ratio 1/2, repetitive
    assert repetition_ratio(records[1].response) == pytest.approx(0.5)
    assert first.repeat_ratio == pytest.approx(1 / 3)
    assert first.reflection_ratio == pytest.approx(1 / 3)
    assert first.keyword_means["wait"] == pytest.approx(1 / 3) and first.keyword_means["retry"] == pytest.approx(1 / 3)
    assert first.behavior_rates == {"verification": pytest.approx(1 / 3), "backtracking": pytest.approx(1 / 3),
                                    "subgoal_setting": 0.0, "enumeration": pytest.approx(1 / 3)}
    assert last.accuracy == 1.0 and last.mean_length_wrong is None and last.mean_length_correct == pytest.approx(60.0)
    assert last.behavior_rates["subgoal_setting"] == pytest.approx(0.5)
    assert (first.num_judged, last.num_judged) == (3, 2)


def test_max_judge_samples_is_per_step_and_deterministic():
    records = [record(step=s, response=f"Wait {i}") for s in (0, 1) for i in range(5)]
    first = analyze(loaded(records), RuleJudge(), max_judge_samples=2, seed=3)
    again = analyze(loaded(records), RuleJudge(), max_judge_samples=2, seed=3)
    assert [s.num_judged for s in first.steps] == [2, 2]
    judged = [r.source for r in first.responses if r.verdict]
    assert judged == [r.source for r in again.responses if r.verdict]
    assert sum(r.verdict is None for r in first.responses) == 6


# ---------------------------------------------------------------- records


def test_records_round_trip_and_errors_name_file_line_and_field(tmp_path):
    path = tmp_path / "samples.jsonl"
    write_samples([record(step=2, response="a"), record(step=3, response="b", finish_reason="length")], path)
    assert [r.record.step for r in load_samples([path])] == [2, 3]
    assert load_samples([path])[1].source == f"{path}:2"

    row = record().to_dict()
    del row["num_tokens"]
    path.write_text(json.dumps(record().to_dict()) + "\n" + json.dumps(row) + "\n")
    with pytest.raises(ValueError, match=r"samples.jsonl:2: missing field\(s\) \['num_tokens'\]"):
        load_samples([path])
    path.write_text(json.dumps({**record().to_dict(), "finish_reason": "abort"}) + "\n")
    with pytest.raises(ValueError, match=r":1: field 'finish_reason'='abort'"):
        load_samples([path])
    path.write_text(json.dumps({**record().to_dict(), "num_tokens": 3.5}) + "\n")
    with pytest.raises(ValueError, match="num_tokens"):
        load_samples([path])


# ---------------------------------------------------------------- report


class ReportParser(html.parser.HTMLParser):
    """Images, table cells, the text inside <pre> (marks included), the marked cues, every tag opened."""

    def __init__(self):
        super().__init__()
        self.images, self.cells, self.pre_text, self.marks, self.open_tags, self.headings = [], [], [], [], [], []
        self._stack = []

    def handle_starttag(self, tag, attrs):
        self.open_tags.append(tag)
        if tag == "img":
            self.images.append(dict(attrs)["src"])
        if tag not in ("img", "meta"):
            self._stack.append(tag)

    def handle_endtag(self, tag):
        if tag in self._stack:
            del self._stack[len(self._stack) - 1 - self._stack[::-1].index(tag):]

    def handle_data(self, data):
        inner = self._stack[-1] if self._stack else None
        if inner == "td":
            self.cells.append(data.strip())
        if inner in ("h2", "h3", "h4"):
            self.headings.append(data.strip())
        if "pre" in self._stack:
            self.pre_text.append(data)
        if inner == "mark":
            self.marks.append(data)


def parse_report(page: str) -> ReportParser:
    parser = ReportParser()
    parser.feed(page)
    parser.close()
    return parser


def report_records() -> list[SampleRecord]:
    records = []
    for step in (0, 10, 20):
        for i in range(4):
            correct = i < 1 + step // 10
            response = ["The answer is 5.", "Let me verify: 2+3=5. \\boxed{5}", "Wait, that's wrong. Case 1: ... \\boxed{5}",
                        "First, we need to find x. <script>alert('x')</script> & \\boxed{5}"][i]
            records.append(record(step=step, response=response, reward=1.0 if correct else 0.0,
                                  num_tokens=40 + 30 * i + step, finish_reason="length" if i == 0 and step == 0 else "stop"))
    return records


def test_report_files_render_and_embed_images(tmp_path):
    result = analyze(loaded(report_records()), RuleJudge())
    paths = write_analysis(result, tmp_path / "analysis")

    responses = [json.loads(line) for line in paths["responses"].read_text().splitlines()]
    steps = [json.loads(line) for line in paths["steps"].read_text().splitlines()]
    assert len(responses) == 12 and [s["step"] for s in steps] == [0, 10, 20]
    assert steps[0]["clip_ratio"] == 0.25 and steps[2]["accuracy"] == 0.75
    assert responses[1]["behaviors"]["verification"] is True and responses[1]["judge_source"] == "rules"

    page = paths["report"].read_text(encoding="utf-8")
    parser = parse_report(page)
    assert parser.open_tags[0] == "html"
    assert len(parser.images) == 4
    for src in parser.images:
        assert src.startswith("data:image/png;base64,")
        assert base64.b64decode(src.split(",", 1)[1]).startswith(b"\x89PNG\r\n\x1a\n")
    # the per-step table has a row per step; the step column holds 0, 10, 20
    for step in ("0", "10", "20"):
        assert step in parser.cells
    # model output is escaped: the script tag appears as text inside <pre>, never as a tag
    assert "script" not in parser.open_tags
    assert "<script>alert('x')</script>" in "".join(parser.pre_text)
    assert "&lt;script&gt;" in page
    for name in ("lengths", "behaviors", "ratios", "keywords"):
        assert paths[f"plot_{name}"].read_bytes().startswith(b"\x89PNG")


def test_report_shows_early_and_late_responses_with_the_cue_marked(tmp_path):
    # Six steps: early = steps 0 and 1, late = steps 4 and 5. Verification only from step 3 on; its cue carries HTML.
    records = []
    for step in range(6):
        records.append(record(step=step, response=f"plain answer {step} \\boxed{{2}}", reward=1.0, prompt="Q: 1+1?"))
        records.append(record(step=step, response=f"wrong {step}", reward=0.0, prompt="Q: 0+2?"))
        if step >= 3:
            records.append(record(step=step, response=f"Let me verify <b>{step}</b>: 1+1=2. \\boxed{{2}}", reward=1.0,
                                  prompt="Q: 2+0? <i>"))
        # A second sample of a prompt already shown: the stage's responses show each prompt once.
        records.append(record(step=step, response=f"again {step}", reward=0.0, prompt="Q: 0+2?"))
    result = analyze(loaded(records), RuleJudge())
    page = write_analysis(result, tmp_path / "analysis")["report"].read_text(encoding="utf-8")
    parser = parse_report(page)

    # The judge is named with how it decides.
    assert "rules</b> judge (rule judge: regular-expression cues" in page
    # Late verification examples come from the last steps first; the early steps have none.
    assert [ex.record.step for ex in result.examples("verification", "late")] == [5, 4]
    assert result.examples("verification", "early") == []
    assert "No judged response of the early steps shows this behaviour." in page
    # The cue is marked, the response around it is text (escaped), the HTML in it is no tag.
    # Twice among the late verification examples (steps 5, 4), once among the last step's responses.
    assert parser.marks.count("Let me verify") == 3
    assert "b" not in parser.open_tags[parser.open_tags.index("pre"):]
    assert "Let me verify <b>5</b>: 1+1=2. \\boxed{2}" in "".join(parser.pre_text)
    # Responses of the first and the last step, in order, one per prompt.
    assert [(ex.record.step, ex.record.correct) for ex in result.stage_samples("early")] == [(0, True), (0, False)]
    assert [ex.record.step for ex in result.stage_samples("late")] == [5, 5, 5]
    assert "plain answer 0 \\boxed{2}" in "".join(parser.pre_text) and "again" not in "".join(parser.pre_text)
    # Each response comes with its prompt (escaped too).
    assert "Q: 2+0? &lt;i&gt;" in page and "<i>" not in page
    # No reflection keyword in any response: no keyword table, a sentence instead.
    assert "No response uses any reflection keyword" in page
    assert "recheck" not in parser.cells


def test_report_keyword_table_keeps_only_the_keywords_used(tmp_path):
    records = [record(step=0, response="Wait, recheck it."), record(step=1, response="fine")]
    page = write_analysis(analyze(loaded(records), RuleJudge()), tmp_path / "a")["report"].read_text(encoding="utf-8")
    parser = parse_report(page)
    assert "No response uses any reflection keyword" not in page
    # Columns recheck and wait only: step 0 uses each once, step 1 neither.
    assert parser.headings.count("Reflection keywords (mean count per response)") == 1
    assert ["1.00", "1.00"] == [c for c in parser.cells if c == "1.00"]
    assert "Never used: rethink, try again, alternatively, retry, however." in page


def test_highlighted_parts_cover_the_text_and_mark_verbatim_evidence_only():
    from megatron_zero.analysis.report import highlighted_parts

    text = "First, we need to find x. Wait, let me verify: x=2."
    parts = highlighted_parts(text, {"verification": "let me verify", "subgoal_setting": "we need to find",
                                     "enumeration": "not in the text"})
    assert "".join(part["text"] for part in parts) == text
    assert [(part["text"], part["cue"]) for part in parts if part["cue"]] == [
        ("we need to find", "subgoal_setting"), ("let me verify", "verification")]
    # Overlapping cues: the earlier one wins, nothing is doubled.
    overlapping = highlighted_parts("abcdef", {"verification": "bcd", "backtracking": "cde"})
    assert [(p["text"], p["cue"]) for p in overlapping] == [("a", ""), ("bcd", "verification"), ("ef", "")]


def test_stage_steps_split_thirds():
    from megatron_zero.analysis.summary import stage_steps

    assert stage_steps(range(0, 61)) == {"early": list(range(20)), "late": list(range(41, 61))}
    assert stage_steps([3]) == {"early": [3], "late": [3]}
    with pytest.raises(ValueError, match="steps is empty"):
        stage_steps([])


def test_analysis_modules_import_no_circle_and_stay_small():
    """A module of analysis/ never imports (even for type checking) one that imports it back, and none grows past
    ~450 lines."""
    import ast

    package = REPO / "megatron_zero" / "analysis"
    graph = {}
    for path in package.glob("*.py"):
        tree = ast.parse(path.read_text())
        names = {node.module for node in ast.walk(tree) if isinstance(node, ast.ImportFrom) and node.module}
        names |= {alias.name for node in ast.walk(tree) if isinstance(node, ast.Import) for alias in node.names}
        graph[path.stem] = {n.rsplit(".", 1)[1] for n in names if n.startswith("megatron_zero.analysis.")}
        assert len(path.read_text().splitlines()) <= 450, path.name

    def reaches(start, target, seen=()):
        return any(n == target or (n not in seen and reaches(n, target, (*seen, n))) for n in graph.get(start, ()))

    circles = [name for name in graph if name != "__init__" and reaches(name, name)]
    assert not circles, f"import circle through {circles}"


def test_cli_writes_outputs_from_a_samples_dir(tmp_path):
    samples_dir = tmp_path / "evals"
    samples_dir.mkdir()
    records = report_records()
    for step in (0, 10, 20):
        write_samples([r for r in records if r.step == step], samples_dir / f"samples_step{step}.jsonl")
    out = tmp_path / "out"
    completed = subprocess.run(
        [sys.executable, str(REPO / "tools" / "analyze_behaviors.py"), "--samples-dir", str(samples_dir),
         "--out", str(out), "--max-judge-samples", "3"],
        capture_output=True, text=True, timeout=120, check=True,
    )
    assert "analysed 12 responses over 3 step(s)" in completed.stdout
    assert str(out / "report.html") in completed.stdout
    assert [json.loads(line)["num_judged"] for line in (out / "steps.jsonl").read_text().splitlines()] == [3, 3, 3]

    bad = subprocess.run([sys.executable, str(REPO / "tools" / "analyze_behaviors.py"), "--samples-dir",
                          str(samples_dir), "--out", str(out), "--judge", "llm"], capture_output=True, text=True)
    assert bad.returncode == 2 and "--judge-url" in bad.stderr
