"""Tests of megatron_zero.rewards: answer extraction, math-verify equivalence, score schemes, the reward
registry, and the grader pool under hostile output (timeouts killed and counted, pool usable afterwards).

Expected grades are hand-labelled mathematical facts (1/2 == 0.5, {1,2} == {2,1}, ...). One pool is shared by
the module (its start-up is the main cost); tests that need another reward function start a one-worker pool.
"""

from __future__ import annotations

import collections
import importlib
import random
import textwrap
import threading
import time

import pytest
from omegaconf import OmegaConf

from megatron_zero.config.reward import RewardConfig
from megatron_zero.config.problems import raise_problems
from megatron_zero.preflight.names import reward_problems
from megatron_zero.rewards import (
    REWARD_FUNCTIONS,
    GraderPool,
    GradeStatus,
    cut_at_stop_tokens,
    extract_answer,
    get_reward_fn,
    grade_batch,
    grade_math,
    last_boxed,
    math_reward,
    math_reward_batch,
    register_reward,
)

# Short, so that hostile items cost little test time; real runs use 10 s.
TIMEOUT_S = 1.5


@pytest.fixture(scope="module")
def pool():
    with GraderPool(RewardConfig(timeout_s=TIMEOUT_S, num_workers=2)) as shared_pool:
        yield shared_pool


def boxed(answer: str) -> str:
    return f"Let me work through it step by step. First ... so the result is \\boxed{{{answer}}}."


# (ground truth, answer the model boxes, equal?)
EQUIVALENCE_CASES = [
    ("0.5", "1/2", True),
    ("0.5", "\\frac{1}{2}", True),
    ("\\frac{1}{2}", "\\dfrac12", True),
    ("\\frac{\\sqrt{2}}{2}", "\\sqrt2/2", True),
    ("\\frac{\\sqrt2}{2}", "\\frac{1}{\\sqrt{2}}", True),
    ("1000", "1,000", True),
    ("1,000,000", "1000000", True),
    ("50", "50\\%", True),
    ("50\\%", "50", True),
    ("[1,2)", "[1, 2)", True),
    ("(-\\infty, 2]", "(-\\infty,2]", True),
    ("\\{1,2\\}", "\\{2,1\\}", True),
    ("1,2", "2, 1", True),
    ("\\text{(B)}", "B", True),
    ("B", "\\textbf{(B)}", True),
    ("x^2+2x+1", "(x+1)^2", True),
    ("10", "10\\text{ cm}", True),
    ("2", "2.0", True),
    ("-3", "-3", True),
    # wrong answers
    ("0.5", "\\frac{1}{3}", False),
    ("[1,2)", "(1,2)", False),
    ("\\{1,2\\}", "\\{1,2,3\\}", False),
    ("\\text{(B)}", "C", False),
    ("1000", "100", False),
    ("\\sqrt{2}", "2", False),
    ("\\pi", "3.14", False),
]


@pytest.mark.parametrize("ground_truth,answer,equal", EQUIVALENCE_CASES)
def test_equivalent_forms_graded_in_process(ground_truth, answer, equal):
    result = grade_math(boxed(answer), ground_truth, RewardConfig())
    assert result.status == GradeStatus.OK
    assert result.correct is equal
    assert result.score == (1.0 if equal else 0.0)
    assert result.extracted == answer and result.source == "boxed"


def test_pool_grades_like_in_process(pool):
    responses = [boxed(answer) for _, answer, _ in EQUIVALENCE_CASES]
    truths = [truth for truth, _, _ in EQUIVALENCE_CASES]
    grades = pool.grade_batch(responses, truths)
    assert grades.scores == [1.0 if equal else 0.0 for _, _, equal in EQUIVALENCE_CASES]
    assert grades.counts == {"ok": len(EQUIVALENCE_CASES), "no_answer": 0, "unparsed": 0, "timeout": 0, "error": 0}
    assert grades.failure_rate == 0.0
    assert math_reward_batch(responses, truths, pool=pool) == grades.scores


def test_last_box_wins_and_nested_braces():
    response = "First guess \\boxed{3}. Wait, recheck: \\boxed{\\frac{\\sqrt{2}}{\\{4\\}}} no... \\fbox{4}"
    assert last_boxed(response) == "4"
    assert math_reward(response, "4") == 1.0
    assert math_reward(response, "3") == 0.0
    assert last_boxed("x \\boxed{\\frac{\\sqrt{2}}{2}} y") == "\\frac{\\sqrt{2}}{2}"
    assert last_boxed("\\boxed{\\{1,2\\}}") == "\\{1,2\\}"
    assert last_boxed("\\boxed 7$") == "7"
    # Cut inside the box (truncated response): no boxed answer.
    assert last_boxed("\\boxed{3} then \\boxed{\\frac{1}{") is None


@pytest.mark.parametrize("response, finished, truth", [
    # The number inside the unfinished box.
    ("2 + 2 = 4, so the answer is \\boxed{4", "2 + 2 = 4, so the answer is \\boxed{4}", "4"),
    # An earlier box, abandoned for a new final answer that was cut off.
    ("First \\boxed{3}. Wait, recheck: \\boxed{\\frac{1}{", "First \\boxed{3}. Wait, recheck: \\boxed{3}", "3"),
    # Cut right after the command.
    ("The sum is 12, hence \\boxed", "The sum is 12, hence \\boxed 12", "12"),
])
def test_response_cut_inside_its_last_box_gets_no_credit(response, finished, truth):
    # Truncation is not an answer: without this the last-number fallback would grade the unfinished box.
    assert extract_answer(response, RewardConfig().stop_tokens) is None
    assert math_reward(response, truth) == 0.0
    assert math_reward(finished, truth) == 1.0


@pytest.mark.parametrize("stop", ["<|endoftext|>", "<|im_end|>", "</s>"])
def test_answer_after_end_token_does_not_count(stop):
    response = f"I think \\boxed{{3}}{stop}\n<|im_start|>user\nthe answer is \\boxed{{4}}"
    assert cut_at_stop_tokens(response, RewardConfig().stop_tokens) == "I think \\boxed{3}"
    assert math_reward(response, "4") == 0.0
    assert math_reward(response, "3") == 1.0
    # Without stop tokens the later box is the answer.
    assert math_reward(response, "4", RewardConfig(stop_tokens=[])) == 1.0


def test_fallbacks_and_strict_mode():
    stops = RewardConfig().stop_tokens
    answer_is = "Adding them up, the answer is $\\frac{3}{4}$.\nDone, 7 steps."
    assert extract_answer(answer_is, stops).source == "answer_is"
    assert math_reward(answer_is, "0.75") == 1.0
    last_number = "We get 12 apples, then 1,250 more."
    assert extract_answer(last_number, stops).text == "1250"
    assert math_reward(last_number, "1250") == 1.0
    strict = RewardConfig(strict_boxed=True)
    for response in (answer_is, last_number):
        result = grade_math(response, "0.75", strict)
        assert (result.status, result.score, result.extracted) == (GradeStatus.NO_ANSWER, 0.0, None)
    assert grade_math("no digits here", "1", RewardConfig()).status == GradeStatus.NO_ANSWER
    # Bare LaTeX or a letter after "the answer is" (no $), the Minerva format, a sentence after the answer.
    for response, truth in (
        ("so the answer is \\sqrt{8}", "2\\sqrt2"),
        ("The answer is B.", "\\text{(B)}"),
        ("The final answer is $\\frac{1}{2}$. I hope it is correct.", "0.5"),
        ("Hence the answer is 42. Check: 3 > 2, fine.", "42"),
    ):
        result = grade_math(response, truth, RewardConfig())
        assert (result.status, result.score, result.source) == (GradeStatus.OK, 1.0, "answer_is")
    # Strict mode still reads boxes.
    assert math_reward(boxed("0.75"), "3/4", strict) == 1.0


def test_score_schemes():
    responses = {"correct": boxed("2"), "wrong": boxed("3"), "no_answer": "I cannot solve this."}
    expected = {
        "binary": {"correct": 1.0, "wrong": 0.0, "no_answer": 0.0},
        "format": {"correct": 1.0, "wrong": -0.5, "no_answer": -1.0},
    }
    for scheme, values in expected.items():
        config = RewardConfig(score_scheme=scheme, strict_boxed=True)
        assert {k: math_reward(r, "2", config) for k, r in responses.items()} == values
    custom = {"correct": 2.0, "wrong": -0.25, "no_answer": -3.0}
    config = RewardConfig(score_scheme="custom", score_values=custom, strict_boxed=True)
    assert {k: math_reward(r, "2", config) for k, r in responses.items()} == custom


def test_config_errors_name_the_field():
    with pytest.raises(ValueError, match=r"score_scheme='fmt'.*binary.*custom.*format"):
        RewardConfig(score_scheme="fmt")
    with pytest.raises(ValueError, match=r"score_values.*correct.*wrong.*no_answer"):
        RewardConfig(score_scheme="custom", score_values={"correct": 1.0})
    with pytest.raises(ValueError, match="score_scheme='custom' to use"):
        RewardConfig(score_values={"correct": 1.0, "wrong": 0.0, "no_answer": 0.0})
    with pytest.raises(ValueError, match=r"reward_fn='mth'.*\['math'"):
        raise_problems(reward_problems(RewardConfig(reward_fn="mth")))
    with pytest.raises(ValueError, match="timeout_s=0"):
        RewardConfig(timeout_s=0)
    config = OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(RewardConfig), {"strict_boxed": True}))
    assert config == RewardConfig(strict_boxed=True)


USER_REWARD_MODULE = '''
import os
from megatron_zero.rewards import GradeResult, GradeStatus

def length_reward(response, ground_truth, config):
    return float(len(response) == int(ground_truth))

def explode(response, ground_truth, config):
    if response == "crash":
        os._exit(3)
    if response == "raise":
        raise ZeroDivisionError("user bug")
    if response == "alloc":
        bytearray(8 * 2**30)  # over the worker's address-space cap
    if response == "alloc100":
        bytearray(100 * 2**20)  # well inside it
    return GradeResult(score=0.5, status=GradeStatus.OK, correct=False)
'''


@pytest.fixture
def user_module(tmp_path, monkeypatch):
    (tmp_path / "my_rewards.py").write_text(textwrap.dedent(USER_REWARD_MODULE))
    monkeypatch.syspath_prepend(str(tmp_path))
    return "my_rewards"


def test_registry_by_import_path_and_name(user_module):
    fn = get_reward_fn(f"{user_module}:length_reward")
    assert fn("abc", "3", RewardConfig()) == 1.0
    with pytest.raises(ValueError, match="has no 'nope'"):
        get_reward_fn(f"{user_module}:nope")
    with pytest.raises(ValueError, match="cannot import module 'no_such_module_xyz'"):
        get_reward_fn("no_such_module_xyz:f")
    with pytest.raises(ValueError, match=r"unknown; use one of \['math'"):
        get_reward_fn("nope")
    try:
        register_reward("length_test")(fn)
        assert get_reward_fn("length_test") is fn
        assert RewardConfig(reward_fn="length_test").reward_fn == "length_test"
        with pytest.raises(ValueError, match="already registered"):
            register_reward("length_test")(fn)
    finally:
        REWARD_FUNCTIONS.pop("length_test", None)


def test_user_reward_in_pool_with_errors_and_crash_counted(user_module):
    config = RewardConfig(reward_fn=f"{user_module}:explode", num_workers=1, timeout_s=5.0, max_worker_memory_mb=2048)
    with GraderPool(config) as user_pool:
        grades = user_pool.grade_batch(["fine", "raise", "crash", "alloc", "fine"], ["1"] * 5)
        # The same items through a session, submitted in reverse: the same grades, failures counted alike.
        with user_pool.session() as session:
            for index, response in reversed(list(enumerate(["fine", "raise", "crash", "alloc", "fine"]))):
                session.submit(index, response, "1")
            streamed = session.finish()
    assert [(r.status, r.score) for r in streamed.results] == [(r.status, r.score) for r in grades.results]
    assert streamed.counts == grades.counts
    ok, error = GradeStatus.OK, GradeStatus.ERROR
    assert [r.status for r in grades.results] == [ok, error, error, error, ok]
    assert grades.scores == [0.5, 0.0, 0.0, 0.0, 0.5]
    assert "ZeroDivisionError: user bug" in grades.results[1].detail
    assert "exit code 3" in grades.results[2].detail
    assert "MemoryError" in grades.results[3].detail
    assert grades.counts["error"] == 3 and grades.failure_rate == 0.6
    with pytest.raises(RuntimeError, match="failure rate 0.600 > reward.max_failure_rate=0.05"):
        grades.check_failure_rate(0.05)


def test_pool_rejects_functions_workers_cannot_import():
    try:
        register_reward("lambda_test")(lambda response, truth, config: 1.0)
        with pytest.raises(ValueError, match="not __main__, not a lambda"):
            GraderPool(RewardConfig(reward_fn="lambda_test", num_workers=1))
    finally:
        REWARD_FUNCTIONS.pop("lambda_test", None)


def test_hostile_output_is_killed_counted_and_pool_survives(pool):
    rng = random.Random(0)
    garbage = "".join(rng.choice("{}\\^_$()0123456789abcxyz ") for _ in range(100_000))
    hostile = [
        "\\boxed{9^{9^{9^{9}}}}",  # sympy tries to evaluate the tower
        "\\boxed{" + "{" * 3000 + "1" + "}" * 3000 + "}",  # the LaTeX parser crawls through the nesting
        garbage,
        "\\boxed{\\frac{1}{2}",  # cut inside the box: not read as 1/2 (the last-number fallback gives 2)
        boxed("\\frac{"),  # malformed LaTeX inside a complete box
        boxed("7"),
    ]
    started = time.monotonic()
    grades = pool.grade_batch(hostile, ["3", "1", "5", "0.5", "2", "7"])
    elapsed = time.monotonic() - started
    # Two workers, each item at most TIMEOUT_S (+ replacement start-up): bounded, nowhere near sympy's minutes.
    assert elapsed < 3 * TIMEOUT_S + 5, elapsed
    statuses = [result.status for result in grades.results]
    assert statuses[0] == GradeStatus.TIMEOUT and statuses[1] == GradeStatus.TIMEOUT
    assert grades.scores[:5] == [0.0] * 5 and grades.scores[5] == 1.0
    assert grades.counts["timeout"] == statuses.count(GradeStatus.TIMEOUT) >= 2
    assert sum(grades.counts.values()) == len(hostile)
    assert grades.num_failures == grades.counts["timeout"] + grades.counts["error"]
    # The killed workers were replaced: the same pool still grades, from another thread too.
    out = []
    thread = threading.Thread(target=lambda: out.append(pool.grade_batch([boxed("1/2")] * 8, ["0.5"] * 8)))
    thread.start()
    thread.join(timeout=30)
    assert out and out[0].scores == [1.0] * 8
    assert all(worker.process.is_alive() for worker in pool._workers)


def test_concurrent_batches_from_threads(pool):
    results = {}

    def grade(index):
        results[index] = pool.grade_batch([boxed(str(index)), boxed("0")], [str(index), str(index)]).scores

    threads = [threading.Thread(target=grade, args=(i,)) for i in range(1, 5)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=30)
    assert results == {i: [1.0, 0.0] for i in range(1, 5)}


def test_pool_close_and_batch_errors():
    config = RewardConfig(num_workers=1)
    grades = grade_batch([boxed("2")], ["2"], config)  # a pool for one call
    assert grades.scores == [1.0]
    closed = GraderPool(config)
    processes = [worker.process for worker in closed._workers]
    closed.close()
    closed.close()
    assert not any(process.is_alive() for process in processes)
    with pytest.raises(RuntimeError, match="closed"):
        closed.grade_batch([boxed("2")], ["2"])
    with pytest.raises(ValueError, match="2 responses but 1 ground truths"):
        grade_batch(["a", "b"], ["1"], pool=closed)


# --- incremental grading (GradingSession) -------------------------------------------------------------


def test_session_grades_like_grade_batch_in_any_submission_order(pool):
    responses = [boxed(answer) for _, answer, _ in EQUIVALENCE_CASES] + ["no answer here", "\\boxed{\\frac{"]
    truths = [truth for truth, _, _ in EQUIVALENCE_CASES] + ["1", "2"]
    expected = pool.grade_batch(responses, truths)
    order = list(range(len(responses)))
    random.Random(0).shuffle(order)
    with pool.session() as session:
        for index in order:
            session.submit(index, responses[index], truths[index])
        grades = session.finish()
    assert grades.results == expected.results  # every field of every GradeResult, in index order
    assert grades.counts == expected.counts and grades.counts["no_answer"] >= 1


def test_session_grades_in_the_background_and_submit_never_waits(pool):
    tower = "\\boxed{9^{9^{9^{9}}}}"  # runs into the timeout
    opened = time.monotonic()
    with pool.session() as session:
        session.submit(0, tower, "3")
        session.submit(1, tower, "3")  # both workers now busy for TIMEOUT_S
        started = time.monotonic()
        for index in range(2, 10):
            session.submit(index, boxed(str(index)), str(index))
        assert time.monotonic() - started < 0.2  # queued, not waiting for a free worker
        # The caller works on (the trainer: generates) while the pool kills the towers, starts replacements
        # (~1 s) and grades the rest.
        time.sleep(TIMEOUT_S + 3.0)
        finishing = time.monotonic()
        grades = session.finish()
        finished = time.monotonic()
    assert finished - finishing < 0.5  # everything was graded during the sleep
    assert [r.status for r in grades.results[:2]] == [GradeStatus.TIMEOUT] * 2
    assert grades.scores[2:] == [1.0] * 8 and grades.counts["timeout"] == 2 and grades.num_failures == 2
    # The span from the first item to the last grade: past the timeout, ended before finish() was called.
    assert TIMEOUT_S <= grades.seconds < finishing - opened


def test_session_misuse_and_abort_leave_the_pool_usable(pool):
    with pool.session() as session:
        session.submit(0, boxed("1"), "1")
        with pytest.raises(ValueError, match="index 0 .* already submitted"):
            session.submit(0, boxed("1"), "1")
        session.submit(2, boxed("1"), "1")
        with pytest.raises(ValueError, match=r"indices \[1\] were never submitted"):
            session.finish()
    with pytest.raises(RuntimeError, match="already finished"):
        session.finish()
    # An exception while items are in flight aborts the session: the busy worker is killed at once, not after
    # its timeout, and the next batch is graded normally.
    started = time.monotonic()
    with pytest.raises(KeyError):
        with pool.session() as session:
            session.submit(0, "\\boxed{9^{9^{9^{9}}}}", "3")
            time.sleep(0.2)
            raise KeyError("generation failed")
    assert time.monotonic() - started < TIMEOUT_S
    with pytest.raises(RuntimeError, match="finished"):
        session.submit(1, boxed("1"), "1")
    assert pool.grade_batch([boxed("0.5"), boxed("3")], ["1/2", "3"]).scores == [1.0, 1.0]
    assert all(worker.process.is_alive() and worker.task_id is None for worker in pool._workers)


SCRIPT_WITHOUT_GUARD = """
from megatron_zero.rewards import math_reward_batch
print("graded", math_reward_batch([r"so \\\\boxed{4}", r"\\\\boxed{5}"], ["4", "4"]))
"""


@pytest.mark.parametrize("how", ["script", "stdin"])
def test_grader_pool_works_from_a_script_without_main_guard_and_from_stdin(tmp_path, how):
    """Workers must not re-import the caller's main module: a script without the guard would run again in each
    worker (and start pools there), and ``python -`` has no file to import at all."""
    import subprocess
    import sys

    script = tmp_path / "grade.py"
    script.write_text(SCRIPT_WITHOUT_GUARD)
    command = [sys.executable, str(script)] if how == "script" else [sys.executable, "-"]
    done = subprocess.run(command, input=None if how == "script" else SCRIPT_WITHOUT_GUARD, capture_output=True,
                          text=True, timeout=120, cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-2000:]
    # Once: the script ran in this process only, not again in the workers.
    assert done.stdout.splitlines() == ["graded [1.0, 0.0]"]


# --- fast paths: the same grades as math-verify, without its parser or simplify -------------------------------

from megatron_zero.rewards.fast_parse import fast_parse  # noqa: E402
from megatron_zero.rewards.fast_verify import certainly_wrong  # noqa: E402
from megatron_zero.rewards.math_reward import grade_math_reference  # noqa: E402

# The module, not the package's `math_reward` function of the same name.
math_reward_module = importlib.import_module("megatron_zero.rewards.math_reward")


def _numerals(rng: random.Random, count: int) -> list[str]:
    """Integers as models write them: zero, signs, leading zeros, 1 to 30 digits."""
    special = ["0", "-0", "00", "007", "-007"]
    drawn = [str(rng.choice([rng.randint(1, 9), rng.randint(10, 999), rng.randint(1000, 10**7),
                             rng.randint(10**15, 10**30)]) * rng.choice([1, 1, -1])) for _ in range(count)]
    return special + drawn


def _fast_parse_corpus() -> list[str]:
    rng = random.Random(0)
    numerals = _numerals(rng, 16)
    corpus = list(numerals)
    for a, b in zip(numerals, reversed(numerals)):
        space = rng.choice(["", " "])
        left, right = rng.choice("[("), rng.choice("])")
        corpus += [
            f"{a}.{rng.randint(0, 999)}", f"{a}/{b}", f"\\frac{{{a}}}{{{b}}}", f"-\\dfrac{{{a}}}{{{b}}}",
            f"\\tfrac{{{a}}}{{{b}}}", f"{left}{a},{space}{b}{right}", f"{left}{b}, {a}{right}",
            f"\\{{{a},{space}{b}\\}}", f"{a},{space}{b}", f"{rng.randint(1, 999)},{rng.randint(0, 999):03d}",
            f"{a}\\sqrt{{{b}}}", f"\\sqrt{{{b}}}", f"-\\sqrt{{{a}}}",
        ]
    # Hand-picked: math-verify's normalisation special cases and look-alikes of the patterns.
    corpus += [
        "0.5", "-0.5", "00.5", ".5", "0.50", "2.50", "1,000", "-1,234", "1,000,000", "0,594", "-0,772", "12,345.5",
        "1,2", "1, 234", "1,2,3", "\\{1\\}", "\\{1,1\\}", "\\{3, 1\\}", "\\{1,000\\}", "[3, 3]", "(3, 3)", "[5, 3)",
        "(5, 3)", "[5, 3]", "(3, 3]", "(1,2)", "07/14", "-0/5", "4/2", "1/0", "1.5/2", "\\frac{4}{2}", "\\frac{1}{0}",
        "\\frac12", "\\frac{-0}{4}", "\\frac{3}{-4}", "50\\%", "50%", "x=3", "1e3", "+3", "1 000", "10^3", "3 ",
        "1,  2", "[1,  2)", "٣", "1" * 101, "(-\\infty, 2]",
        "\\sqrt3", "2\\sqrt3", "2 \\sqrt{3}", "\\sqrt{-3}", "0\\sqrt{3}", "\\sqrt{0}", "\\sqrt{1}", "1\\sqrt{4}",
        *"ABCDEFGHIJe", *(f"({letter})" for letter in "ABCDEFGHIJe"), "(B", "B)", "b", "AB",
    ]
    return list(dict.fromkeys(corpus))


def _parse_key(parsed: tuple) -> list:
    import sympy

    return [(type(item).__name__, item if isinstance(item, str) else sympy.srepr(item),
             getattr(item, "_unsorted_args", None)) for item in parsed]


def test_fast_parse_is_math_verify_parse_for_every_answer_it_takes():
    """Each fast parse is compared with math-verify's parse of the same answer: value (type and srepr), the
    normalised string, the written order of sets; both the boxed and the bare ("the answer is") form."""
    paths = collections.Counter()
    for text in _fast_parse_corpus():
        for wrap in (True, False):
            fast = fast_parse(text, wrap)
            if fast is None:
                continue
            paths[fast.path, wrap] += 1
            assert _parse_key(fast.parsed) == _parse_key(math_reward_module._reference_parse(text, wrap)), (text, wrap)
    # Every path is taken, so a pattern that stopped matching shows up here rather than as a silent slow-down.
    for path in ("integer", "thousands", "decimal", "fraction", "radical", "interval", "set", "choice"):
        assert paths[path, True] >= 10, (path, paths)
    assert paths["integer", False] >= 10 and paths["decimal", False] >= 10
    # Answers math-verify's normalisation treats specially, or whose parse is not a plain number: left to it.
    for text in ("0,594", "-0,772", "07/14", "-0/5", "1.5/2", "50\\%", "x=3", "1e3", "+3", "1 000", ".5",
                 "1,  2", "٣", "1" * 101, "(-\\infty, 2]", "12,345.5", "I", "e", "(B", "AB",
                 "\\sqrt3", "2 \\sqrt{3}", "\\sqrt{-3}"):
        assert fast_parse(text, True) is None, text
    assert fast_parse("007", False) is None and fast_parse("00.5", False) is None


def _grading_corpus() -> list[tuple[str, str]]:
    """(ground truth, response) pairs: right, wrong and unboxed answers in many forms against many answer types."""
    rng = random.Random(1)
    pairs = []
    for _ in range(4):
        a, b = rng.randint(2, 60), rng.randint(2, 9)
        value = a * b
        golds = {
            str(value): [str(value), f"{value:,}", f"{value}.0", str(value + 1), f"-{value}",
                         f"\\frac{{{value * 2}}}{{2}}"],
            f"\\frac{{{a}}}{{{b}}}": [f"{a}/{b}", f"\\dfrac{{{a}}}{{{b}}}", f"{a / b:.6f}", f"{a / b:.3f}", str(a)],
            f"{a}.{b}": [f"{a}.{b}0", f"\\frac{{{a * 10 + b}}}{{10}}", f"{a}.{b + 1}", str(a)],
            f"{a}\\sqrt{{{b}}}": [f"{a * b ** 0.5:.6f}", f"{a * b ** 0.5:.2f}", str(a * b), f"\\sqrt{{{a * a * b}}}",
                                  str(round(a * b ** 0.5)), f"{a}\\sqrt{{{b}}}", f"{a}\\sqrt{{{b + 1}}}",
                                  f"-{a}\\sqrt{{{b}}}"],
            f"\\frac{{\\pi}}{{{b}}}": [f"{3.141592653589793 / b:.6f}", str(b), f"{3.14159 / b:.5f}"],
            f"[{a}, {a + b})": [f"[{a},{a + b})", f"({a}, {a + b})", str(a), f"{a}.5", f"{a}, {a + b}"],
            f"({a}, {a + b})": [f"{a}, {a + b}", f"\\{{{a}, {a + b}\\}}", str(a)],
            f"\\{{{a}, {a + b}\\}}": [f"\\{{{a + b},{a}\\}}", f"{a}, {a + b}", str(a), f"\\{{{a}\\}}"],
            f"\\{{{a}\\}}": [str(a), str(a + 1)],
            f"{a}\\%": [str(a), f"{a / 100}", str(a + 1)],
            "\\text{(B)}": ["B", "(B)", "C", str(a)],
            f"x={a}": [str(a), f"x={a}", str(a + 1)],
        }
        for gold, answers in golds.items():
            for answer in answers:
                pairs.append((gold, boxed(answer)))
            pairs.append((gold, f"Adding up, the answer is {rng.choice(answers)}."))
            pairs.append((gold, f"We get {a} and then {rng.choice(answers)} more"))  # the last number
    return list(dict.fromkeys(pairs))


def test_fast_grades_equal_math_verify_grades():
    """Every response graded with the fast paths gets math-verify's GradeResult (score, status, correct,
    extracted, source); the fast paths carry most of the corpus."""
    config = RewardConfig()
    pairs = _grading_corpus()
    num_fast_parsed = 0
    decided = collections.Counter()
    for gold, response in pairs:
        assert grade_math(response, gold, config) == grade_math_reference(response, gold, config), (gold, response)
        answer = extract_answer(response, config.stop_tokens)
        wrap = answer.source != "answer_is"
        if fast_parse(answer.text, wrap) is not None:
            num_fast_parsed += 1
            gold_parse = math_reward_module._parse(gold, True)
            decided[certainly_wrong(gold_parse, math_reward_module._parse(answer.text, wrap))] += 1
    assert len(pairs) > 250 and num_fast_parsed > 0.6 * len(pairs), (num_fast_parsed, len(pairs))
    assert decided["interval"] >= 10 and decided["numeric_gap"] >= 40, decided


def _count_math_verify_calls(monkeypatch) -> collections.Counter:
    """Calls of math-verify's parse and verify from math_reward, counted by name."""
    calls = collections.Counter()

    def counting(name):
        real = getattr(math_reward_module, name)

        def wrapper(*args, **kwargs):
            calls[name] += 1
            return real(*args, **kwargs)

        monkeypatch.setattr(math_reward_module, name, wrapper)

    counting("parse")
    counting("verify")
    return calls


def test_fast_paths_are_taken_without_math_verify(monkeypatch):
    """Plain answers never reach math-verify's parser, and clearly wrong numbers never reach its verify."""
    calls = _count_math_verify_calls(monkeypatch)
    math_reward_module._parse.cache_clear()
    math_reward_module._reference_parse.cache_clear()
    config = RewardConfig()
    plain = [("1234", "1,234"), ("1234", "1235"), ("0.75", "\\dfrac{3}{4}"), ("-2.5", "-5/2"), ("[1, 4)", "[1,4)"),
             ("\\{3, 1\\}", "1, 3"), ("(2, 9)", "\\{2, 9\\}"), ("17", "the answer is 17")]
    for gold, answer in plain:
        grade_math(answer if "answer is" in answer else boxed(answer), gold, config)
    assert calls["parse"] == 0, calls
    num_verified = calls["verify"]
    # Wrong numbers and expressions decided without verify (the ground truth pi/2 parsed by math-verify).
    for gold, answer in (("2\\sqrt{3}", "6"), ("2\\sqrt{3}", "3.46"), ("[1, 4)", "2"), ("\\frac{\\pi}{2}", "1.5"),
                         ("2\\sqrt{3}", "2\\sqrt{5}"), ("0.25", "0.3")):
        assert grade_math(boxed(answer), gold, config).correct is False
    assert calls["verify"] == num_verified, calls
    # Close enough to need math-verify's rounding rule: verified, and right.
    assert grade_math(boxed("3.464102"), "2\\sqrt{3}", config).correct is True
    assert calls["verify"] == num_verified + 1


def test_fast_paths_off_with_another_math_verify_version(monkeypatch, caplog):
    """The fast paths mirror one math-verify version; with another installed, every answer goes to math-verify."""
    from megatron_zero.rewards import fast_parse as fast_parse_module

    monkeypatch.setattr(fast_parse_module, "VERIFIED_VERSIONS", {"math-verify": "0.0.1", "latex2sympy2_extended": "0"})
    fast_parse_module.fast_paths_apply.cache_clear()
    calls = _count_math_verify_calls(monkeypatch)
    math_reward_module._reference_parse.cache_clear()
    try:
        assert grade_math(boxed("1,234"), "1234", RewardConfig()).correct is True
        assert calls == {"parse": 2, "verify": 1} and "grading fast paths are off" in caplog.text
    finally:
        fast_parse_module.fast_paths_apply.cache_clear()


FORKSERVER_WITH_TORCH = '''
import multiprocessing
import sys

# Start this process's one forkserver the way parallel/local_launch.py does on CPU: torch imported in it.
context = multiprocessing.get_context("forkserver")
context.set_forkserver_preload(["torch"])
process = context.Process(target=sys.exit, args=(0,))
process.start()
process.join()

from megatron_zero.config.reward import RewardConfig
from megatron_zero.rewards import GraderPool

config = RewardConfig(reward_fn="my_rewards:explode", num_workers=1, max_worker_memory_mb=512)
with GraderPool(config) as pool:
    grades = pool.grade_batch(["fine", "alloc100", "alloc"], ["1"] * 3)
print([result.status.value for result in grades.results])
print(grades.results[2].detail)
'''


def test_worker_memory_cap_counts_from_the_workers_start(user_module, tmp_path):
    """Grader workers fork from the process's one forkserver, which local_launch may have started with torch in it
    (hundreds of MB of address space for the CPU build, ~3.9 GB for the CUDA one): the cap is what grading may add,
    so a 512 MB cap still lets grading allocate 100 MB, and still stops an 8 GiB allocation. (A cap counted from 0
    refused the 100 MB here; in CI's second stack, with the CUDA build, math-verify's own warm-up.)"""
    import os
    import subprocess
    import sys

    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(tmp_path), *sys.path])}
    done = subprocess.run([sys.executable, "-c", FORKSERVER_WITH_TORCH], env=env, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    statuses, detail = done.stdout.strip().splitlines()[-2:]
    assert statuses == "['ok', 'ok', 'error']"
    assert "MemoryError" in detail
