"""The CPU demo's shipped base model, tokenizer and prompt sets, and the corpus / pretraining code behind them."""

import json
import math
import random
import re

import pytest
import torch

from megatron_zero.demo import BASE_MODEL_PATH, TEST_PROMPTS_PATH, TRAIN_PROMPTS_PATH
from megatron_zero.demo.corpus import (
    ANSWER_FORMATS,
    END_OF_TEXT,
    WORD_FRACTION,
    corpus_texts,
    prompt_rows,
    split_problems,
)
from megatron_zero.demo.pretrain import DemoPretrainSettings, demo_model_config, length_bucketed_batches, pretrain
from megatron_zero.demo.tokenizer import build_char_tokenizer

# Written independently of corpus.py: what a row must look like.
_OPERANDS = r"([1-9]\d)"
_BARE = re.compile(rf"^Q: {_OPERANDS}\+{_OPERANDS}=\? A:$")
_WORD = re.compile(rf"^Q: [A-Za-z ]+ {_OPERANDS} [a-z ]+ {_OPERANDS}[a-z ]*\. How many [a-z ]+\? A:$")
_RESPONSES = {
    "direct_box": re.compile(r"^ \\boxed\{(\d+)\}$"),
    "bare": re.compile(r"^ (\d+)$"),
    "answer_is": re.compile(r"^ The answer is (\d+)\.$"),
    "chain_box": re.compile(r"^ Digits: (\d)\+(\d)=(\d\d), (\d)\+(\d)\+(\d)=(\d+)\. \\boxed\{(\d+)\}$"),
    "chain": re.compile(r"^ Digits: (\d)\+(\d)=(\d\d), (\d)\+(\d)\+(\d)=(\d+)\. Sum (\d+)\.$"),
    # A first box, a recomputation under a verification cue, the box it gives.
    "verify_box": re.compile(r"^ \\boxed\{(\d+)\}\? Verify: Digits: (\d)\+(\d)=(\d\d), (\d)\+(\d)\+(\d)=(\d+)\. \\boxed\{(\d+)\}$"),
}


def _operands(question: str) -> tuple[int, int]:
    match = _BARE.match(question) or _WORD.match(question)
    assert match, f"malformed question {question!r}"
    return int(match.group(1)), int(match.group(2))


def _read_jsonl(path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def _classify(text: str) -> tuple[str, bool]:
    """(answer format, whether the prompt is a word problem); checks every number against a + b."""
    assert text.endswith(END_OF_TEXT) and text.count(END_OF_TEXT) == 1
    prompt, response = text[: -len(END_OF_TEXT)].split(" A:")
    a, b = _operands(prompt + " A:")
    for name, pattern in _RESPONSES.items():
        match = pattern.match(response)
        if match:
            numbers = [int(group) for group in match.groups()]
            if name in ("direct_box", "verify_box"):
                guess, *rest = numbers
                # A direct guess is the sum or the sum with the carry from the ones forgotten (a slip).
                assert guess in (a + b, a + b - 10 * ((a % 10 + b % 10) // 10)), text
                numbers = rest or [a + b]
            if name in ("chain", "chain_box", "verify_box"):
                a1, b1, ones, a10, b10, carry, tens, total = numbers
                assert (a1, b1, a10, b10) == (a % 10, b % 10, a // 10, b // 10)
                assert ones == a1 + b1 and carry == ones // 10 and tens == a10 + b10 + carry
                numbers = [total]
            assert numbers == [a + b], text
            return name, not _BARE.match(prompt + " A:")
    raise AssertionError(f"unknown answer format in {text!r}")


def test_shipped_tokenizer_loads_offline_and_round_trips(monkeypatch):
    from transformers import AutoTokenizer

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    tokenizer = AutoTokenizer.from_pretrained(BASE_MODEL_PATH)
    text = "Q: Sam has 37 apples and gets 45 more. A: Digits: 7+5=12, 3+4+1=8. \\boxed{82}\n  x"
    ids = tokenizer(text)["input_ids"]
    assert len(ids) == len(text)  # one token per ASCII character
    assert tokenizer.decode(ids) == text
    with_end = text + END_OF_TEXT
    assert tokenizer.decode(tokenizer(with_end)["input_ids"]) == with_end
    assert tokenizer.eos_token == tokenizer.pad_token == END_OF_TEXT
    assert tokenizer(END_OF_TEXT)["input_ids"] == [tokenizer.eos_token_id]
    # The shipped tokenizer is the one the code builds.
    assert tokenizer.get_vocab() == build_char_tokenizer().get_vocab()


def test_shipped_model_is_a_small_qwen2_that_learned_the_corpus():
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(BASE_MODEL_PATH).eval()
    tokenizer = AutoTokenizer.from_pretrained(BASE_MODEL_PATH)
    config = model.config
    assert config.model_type == "qwen2" and config.tie_word_embeddings
    assert config.vocab_size == len(tokenizer) and config.eos_token_id == tokenizer.eos_token_id
    assert sum(p.stat().st_size for p in BASE_MODEL_PATH.iterdir()) < 10 * 2**20
    # Per-token loss on fresh corpus rows far below a uniform guess over the vocabulary.
    texts = corpus_texts(split_problems(seed=0, num_test=200).train, num_examples=16, seed=123)
    batch = length_bucketed_batches(tokenizer(texts)["input_ids"], 16, tokenizer.pad_token_id, random.Random(0))
    input_ids, labels = batch[0]
    with torch.no_grad():
        loss = model(input_ids=input_ids, labels=labels).loss.item()
    assert loss < 0.5 * math.log(config.vocab_size)


def test_shipped_prompt_sets_are_well_formed_and_disjoint():
    train, test = _read_jsonl(TRAIN_PROMPTS_PATH), _read_jsonl(TEST_PROMPTS_PATH)
    assert len(train) == 2000 and len(test) == 200
    for rows in (train, test):
        assert len({row["question"] for row in rows}) == len(rows)
        for row in rows:
            assert set(row) == {"question", "answer"}
            assert row["answer"] == str(sum(_operands(row["question"])))
        num_word = sum(not _BARE.match(row["question"]) for row in rows)
        assert num_word == round(WORD_FRACTION * len(rows))
    # Held out by unordered operand pair: a test problem is not seen in either order.
    train_pairs = {frozenset(_operands(row["question"])) for row in train}
    test_pairs = {frozenset(_operands(row["question"])) for row in test}
    assert not train_pairs & test_pairs
    # ... nor in the pretraining corpus, which draws from the same split (seed 0, see assets/README.md).
    corpus_pairs = {frozenset(_operands(text.split(" A:")[0] + " A:"))
                    for text in corpus_texts(split_problems(seed=0, num_test=200).train, 5000, seed=0)}
    assert not corpus_pairs & test_pairs


def test_corpus_is_seeded_and_mixes_formats_as_documented():
    pairs = split_problems(seed=0, num_test=200).train
    texts = corpus_texts(pairs, num_examples=20_000, seed=3)
    assert texts == corpus_texts(pairs, num_examples=20_000, seed=3)
    assert texts != corpus_texts(pairs, num_examples=20_000, seed=4)
    kinds = [_classify(text) for text in texts]
    for name, share in ANSWER_FORMATS.items():
        observed = sum(kind == name for kind, _ in kinds) / len(texts)
        # 5 binomial standard deviations.
        assert abs(observed - share) < 5 * math.sqrt(share * (1 - share) / len(texts)), (name, observed)
    word = sum(is_word for _, is_word in kinds) / len(texts)
    assert abs(word - WORD_FRACTION) < 5 * math.sqrt(WORD_FRACTION * (1 - WORD_FRACTION) / len(texts))
    # The direct box must dominate, so that greedy decoding prefers it over the chain.
    assert ANSWER_FORMATS["direct_box"] > ANSWER_FORMATS["chain_box"] + ANSWER_FORMATS["chain"]
    # The self-check is rare: after a first box the base model mostly stops, so greedy decoding does not check.
    assert ANSWER_FORMATS["verify_box"] < ANSWER_FORMATS["direct_box"] / 3
    # Direct guesses slip (forget the carry) in about half the cases with a carry (45 of 100 ones-digit pairs),
    # the self-check's first box too, which its last box corrects: the last box follows the recomputation.
    for kind in ("direct_box", "verify_box"):
        guesses = [text for text, (name, _) in zip(texts, kinds) if name == kind]
        wrong = [text for text in guesses
                 if re.findall(r"boxed\{(\d+)\}", text)[0] != str(sum(_operands(text.split(" A:")[0] + " A:")))]
        assert 0.17 < len(wrong) / len(guesses) < 0.28, kind


def test_prompt_rows_and_split_reject_impossible_requests():
    split = split_problems(seed=0, num_test=10)
    assert not {frozenset(pair) for pair in split.train} & {frozenset(pair) for pair in split.test}
    with pytest.raises(ValueError, match="num_rows=1000"):
        prompt_rows(split.test, num_rows=1000, seed=0)
    with pytest.raises(ValueError, match="num_test=0"):
        split_problems(seed=0, num_test=0)


def test_length_buckets_keep_every_row_and_mask_padding():
    rows = [[5] * length for length in range(1, 40)]
    batches = length_bucketed_batches(rows, batch_size=4, pad_id=0, rng=random.Random(0))
    seen = sorted(int((labels != -100).sum(dim=1)[i]) for _, labels in batches for i in range(len(labels)))
    assert seen == list(range(1, 40))
    for input_ids, labels in batches:
        assert torch.equal(input_ids[labels != -100], torch.full_like(input_ids[labels != -100], 5))
        assert torch.all(input_ids[labels == -100] == 0)


def test_a_few_pretraining_steps_lower_the_loss():
    from transformers import AutoModelForCausalLM

    settings = DemoPretrainSettings(num_layers=1, hidden_size=32, num_heads=2, num_kv_heads=1, intermediate_size=64,
                                    num_steps=20, batch_size=16, lr=3e-3, warmup_steps=3)
    tokenizer = build_char_tokenizer()
    texts = corpus_texts(split_problems(seed=0, num_test=200).train, num_examples=20 * 16, seed=0)
    batches = length_bucketed_batches(tokenizer(texts)["input_ids"], 16, tokenizer.pad_token_id, random.Random(0))
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(demo_model_config(settings, len(tokenizer), tokenizer.eos_token_id))
    input_ids, labels = batches[0]
    with torch.no_grad():
        before = model(input_ids=input_ids, labels=labels).loss.item()
    pretrain(model, batches, settings)
    with torch.no_grad():
        after = model(input_ids=input_ids, labels=labels).loss.item()
    # A uniform guess scores log(vocab) = 5.55 nats; 20 steps reach ~4.3.
    assert after < before - 0.5


def test_settings_name_the_bad_field():
    with pytest.raises(ValueError, match="warmup_steps=50"):
        DemoPretrainSettings(num_steps=40, warmup_steps=50)
    with pytest.raises(ValueError, match="num_heads=3"):
        DemoPretrainSettings(num_heads=3)


def test_response_patterns_name_each_corpus_format_and_nothing_else():
    from megatron_zero.demo.corpus import format_answer
    from megatron_zero.demo.measure import is_correct, last_number_correct
    from megatron_zero.demo.patterns import OTHER, pattern_rates, response_pattern

    for name in ANSWER_FORMATS:
        assert response_pattern(format_answer(37, 45, name) + END_OF_TEXT + " junk") == name
    assert response_pattern(" \\boxed{72}? Verify: Digits: 7+5=12, 3+4") == OTHER  # cut off inside the check
    assert response_pattern(" Digits: 7+5=12. \\boxed{82}") == OTHER
    rates = pattern_rates([" \\boxed{82}", " 82", " 82", "zz"])
    assert rates["direct_box"] == 0.25 and rates["bare"] == 0.5 and rates[OTHER] == 0.25
    # The demo's reward reads the last box only.
    assert is_correct(" \\boxed{72}? Verify: Digits: 7+5=12, 3+4+1=8. \\boxed{82}", "82")
    assert not is_correct(" \\boxed{82}? Verify: Digits: 7+5=12, 3+4+1=8. \\boxed{72}", "82")
    assert not is_correct(" Digits: 7+5=12, 3+4+1=8. Sum 82.", "82")
    # The forced chain's arithmetic is judged by its last number, boxed or not.
    assert last_number_correct(" Digits: 7+5=12, 3+4+1=8. Sum 82.", "82")
    assert not last_number_correct(" Digits: 7+5=12, 3+4+1=8. Sum 81.<|endoftext|>82", "82")


def test_demo_story_averages_the_first_and_last_steps(tmp_path):
    from megatron_zero.demo.story import demo_story

    (tmp_path / "analysis").mkdir()
    (tmp_path / "samples").mkdir()
    rates = {"verification": 0.0, "backtracking": 0.0, "subgoal_setting": 0.0, "enumeration": None}
    steps = []
    for step in range(1, 5):
        verify = step >= 3
        steps.append({"step": step, "accuracy": 0.25 * step, "mean_length_correct": 10.0 * step,
                      "mean_length_wrong": None if step == 4 else 5.0, "box_ratio": 0.5,
                      "behavior_rates": {**rates, "verification": 0.5 if verify else 0.0}})
        responses = [" \\boxed{72}? Verify: Digits: 7+5=12, 3+4+1=8. \\boxed{82}" if verify else " \\boxed{82}", " 82"]
        (tmp_path / "samples" / f"step_{step}.jsonl").write_text(
            "".join(json.dumps({"response": r}) + "\n" for r in responses))
    (tmp_path / "analysis" / "steps.jsonl").write_text("".join(json.dumps(s) + "\n" for s in steps))
    (tmp_path / "summary.json").write_text(json.dumps({"eval_history": [{"step": 0, "accuracy": 0.5}]}))

    story = demo_story(tmp_path, window=2)
    assert story["first_steps"] == [1, 2] and story["last_steps"] == [3, 4]
    first, last = story["first"], story["last"]
    assert (first["accuracy"], last["accuracy"]) == (0.375, 0.875)
    assert (first["length_wrong"], last["length_wrong"]) == (5.0, 5.0)  # step 4 has none: not a zero
    assert (first["verification"], last["verification"]) == (0.0, 0.5) and last["enumeration"] is None
    assert (first["pattern_direct_box"], last["pattern_verify_box"], last["pattern_bare"]) == (0.5, 0.5, 0.5)
    with pytest.raises(ValueError, match="window=3 needs at least 6 steps"):
        demo_story(tmp_path, window=3)
