"""Tests of the embedded torch rollout engine against plain HF forward passes of tiny random models.

Every expected value is recomputed independently: log-probs by one unpadded, uncached forward per sequence;
greedy tokens by repeated argmax; stop positions by scanning an unconstrained sample of the same seed.
"""

import inspect
import re

import pytest
import torch
import transformers
from omegaconf import OmegaConf

from megatron_zero.config.rollout import RolloutConfig, TorchEngineConfig
from megatron_zero.models.tiny import save_tiny_model
from megatron_zero.rollout.engine import SamplingParams
from megatron_zero.rollout.torch_engine import TorchEngine

VOCAB_SIZE = 251
# Prompts of different lengths, so batches are left-padded.
PROMPTS = [[3, 17, 42, 8, 99, 5, 61], [7], [200, 11, 250, 0], [12, 13, 14, 15, 16, 17, 18, 19, 20, 21], [9, 9]]


def load(model_dir):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny models gain nothing from intra-op threads, and on a busy 2-core machine OpenMP threads waiting
    for each other made these tests 6x slower (measured 58 s vs 9 s)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def model_dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("tiny")
    return {name: save_tiny_model(family, root / name, seed=seed) for name, family, seed in [
        ("qwen2", "qwen2", 0), ("qwen2-seed1", "qwen2", 1), ("mistral", "mistral", 0), ("llama", "llama", 0),
        ("untied", "qwen2-untied", 0)]}


@pytest.fixture(scope="module")
def tokenizer():
    """One printable character per id, decoded by concatenation: any token sequence's text is predictable."""
    from tokenizers import Tokenizer, decoders, models
    from transformers import PreTrainedTokenizerFast

    vocab = {chr(0x100 + index): index for index in range(VOCAB_SIZE)}
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token=chr(0x100)))
    backend.decoder = decoders.Fuse()
    return PreTrainedTokenizerFast(tokenizer_object=backend)


def decode(token_ids):
    return "".join(chr(0x100 + token) for token in token_ids)


def reference_logprobs(model, prompt, response, temperature):
    """log softmax(logits / T) at each response token from one unpadded forward of prompt + response."""
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([prompt + response])).logits[0].double()
    logp = torch.log_softmax(logits[len(prompt) - 1:-1] / temperature, dim=-1)
    return logp[torch.arange(len(response)), torch.tensor(response)]


def max_logprob_error(model, generations, temperature):
    return max((reference_logprobs(model, g.prompt_ids, g.token_ids, temperature)
                - torch.tensor(g.logprobs, dtype=torch.float64)).abs().max().item() for g in generations)


def test_same_seed_same_tokens_whatever_the_batch_size(model_dirs):
    model = load(model_dirs["qwen2"])
    params = SamplingParams(temperature=1.0, max_new_tokens=12, seed=7)
    whole = TorchEngine(model, TorchEngineConfig(max_batch_size=16)).generate(PROMPTS, params)
    chunked_engine = TorchEngine(model, TorchEngineConfig(max_batch_size=2))
    chunked = chunked_engine.generate(PROMPTS, params)
    assert [g.token_ids for g in chunked] == [g.token_ids for g in whole]
    assert [g.token_ids for g in chunked_engine.generate(PROMPTS, params)] == [g.token_ids for g in whole]
    other_seed = chunked_engine.generate(PROMPTS, SamplingParams(temperature=1.0, max_new_tokens=12, seed=8))
    assert all(a.token_ids != b.token_ids for a, b in zip(other_seed, whole))
    assert all(g.finish_reason == "length" and len(g.token_ids) == 12 for g in whole)


# Random tiny models are nearly uniform: top_p=0.6 keeps ~135 of 251 tokens, top_k=20 keeps 8%, so an
# ignored truncation shows in most of the 100 sampled tokens.
@pytest.mark.parametrize("top_p, top_k", [(0.6, -1), (1.0, 20)])
@pytest.mark.parametrize("family", ["qwen2", "mistral", "llama"])
def test_sampled_logprobs_match_plain_forward_and_truncation_is_honoured(model_dirs, family, top_p, top_k):
    model = load(model_dirs[family])
    engine = TorchEngine(model, TorchEngineConfig(max_batch_size=4))
    prompts = PROMPTS * 2  # two chunks, each left-padded; mistral's window (6) is shorter than the sequences
    params = SamplingParams(temperature=0.7, top_p=top_p, top_k=top_k, max_new_tokens=10, seed=3)
    generations = engine.generate(prompts, params)
    assert max_logprob_error(model, generations, params.temperature) < 1e-5
    for g in generations:
        with torch.no_grad():
            logits = model(input_ids=torch.tensor([g.prompt_ids + g.token_ids])).logits[0].double()
        probs = torch.softmax(logits[len(g.prompt_ids) - 1:-1] / params.temperature, dim=-1)
        for step, token in enumerate(g.token_ids):
            more_likely = probs[step] > probs[step, token]
            assert top_k == -1 or more_likely.sum() < top_k
            # Nucleus: the mass of strictly more likely tokens is still below top_p.
            assert probs[step][more_likely].sum() < params.top_p + 1e-6


@pytest.mark.parametrize("top_p, top_k", [(1.0, -1), (0.8, -1), (1.0, 3)])
def test_sampling_frequencies_follow_the_truncated_distribution(model_dirs, top_p, top_k):
    model = load(model_dirs["qwen2"])
    temperature, num_samples = 0.15, 4000  # a peaked first-token distribution: a few dominant tokens
    params = SamplingParams(temperature=temperature, top_p=top_p, top_k=top_k, max_new_tokens=1, seed=11)
    generations = TorchEngine(model).generate([PROMPTS[0]] * num_samples, params)
    counts = torch.bincount(torch.tensor([g.token_ids[0] for g in generations]), minlength=VOCAB_SIZE)
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([PROMPTS[0]])).logits[0, -1].double()
    probs = torch.softmax(logits / temperature, dim=-1)
    ranked = probs.sort(descending=True)
    kept = torch.zeros(VOCAB_SIZE, dtype=torch.bool)
    kept[ranked.indices[torch.cumsum(ranked.values, 0) - ranked.values < top_p]] = True
    if top_k > 0:
        kept[ranked.indices[top_k:]] = False
    expected = torch.where(kept, probs, 0.0) / probs[kept].sum()
    assert counts[~kept].sum() == 0
    frequencies = counts.double() / num_samples
    assert ((frequencies - expected).abs() <= 5 * (expected * (1 - expected) / num_samples).sqrt() + 1e-3).all()


def uncached_greedy(model, prompt, num_tokens):
    """Greedy tokens by an argmax over one full, uncached forward of the whole sequence per step."""
    sequence = list(prompt)
    with torch.no_grad():
        for _ in range(num_tokens):
            sequence.append(int(model(input_ids=torch.tensor([sequence])).logits[0, -1].argmax()))
    return sequence[len(prompt):]


def test_greedy_is_argmax_with_temperature_one_logprobs(model_dirs):
    model = load(model_dirs["qwen2"])
    generations = TorchEngine(model).generate(PROMPTS, SamplingParams(temperature=0, max_new_tokens=6))
    for g in generations:
        assert g.token_ids == uncached_greedy(model, g.prompt_ids, 6)
    assert max_logprob_error(model, generations, 1.0) < 1e-5


class CacheRenamed(torch.nn.Module):
    """A tiny HF model behind a forward that takes its KV cache under the name a subclass declares and, like
    transformers' own forwards, swallows unknown keywords in **kwargs: a wrong name silently decodes uncached.
    transformers 5.19 (the GPU container's) names it past_key_values, 5.25 (the CPU stack's) cache; the
    subclasses let either venv check the engine against both."""

    def __init__(self, model):
        super().__init__()
        self.model = model
        self.config = model.config
        self.installed_name = next(name for name in ("cache", "past_key_values")
                                   if name in inspect.signature(model.forward).parameters)

    def get_input_embeddings(self):
        return self.model.get_input_embeddings()

    def run(self, cache, **inputs):
        return self.model(**inputs, **{self.installed_name: cache})


class CacheAsPastKeyValues(CacheRenamed):
    def forward(self, input_ids, attention_mask=None, position_ids=None, past_key_values=None, use_cache=None,
                logits_to_keep=0, **kwargs):
        return self.run(past_key_values, input_ids=input_ids, attention_mask=attention_mask,
                        position_ids=position_ids, use_cache=use_cache, logits_to_keep=logits_to_keep)


class CacheAsCache(CacheRenamed):
    def forward(self, input_ids, attention_mask=None, position_ids=None, cache=None, use_cache=None,
                logits_to_keep=0, **kwargs):
        return self.run(cache, input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                        use_cache=use_cache, logits_to_keep=logits_to_keep)


class NoCache(CacheRenamed):
    def forward(self, input_ids, attention_mask=None, position_ids=None, use_cache=None, logits_to_keep=0,
                **kwargs):
        return self.run(None, input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                        use_cache=use_cache, logits_to_keep=logits_to_keep)


@pytest.mark.parametrize("renamed", [CacheAsPastKeyValues, CacheAsCache])
def test_decoding_uses_the_kv_cache_whatever_the_forward_calls_it(model_dirs, renamed):
    """Decoding without the cache sees one token per step: its log-probs are off by ~0.75 on this model (its
    greedy tokens happen to agree, so the log-probs are the check that catches it)."""
    model = load(model_dirs["qwen2"])
    generations = TorchEngine(renamed(model)).generate(PROMPTS, SamplingParams(temperature=0, max_new_tokens=6))
    for g in generations:
        assert g.token_ids == uncached_greedy(model, g.prompt_ids, 6)
    assert max_logprob_error(model, generations, 1.0) < 1e-5


def test_a_forward_taking_no_cache_is_refused_at_construction(model_dirs):
    message = f"NoCache.forward (transformers {transformers.__version__}) takes neither 'cache' nor 'past_key_values'"
    with pytest.raises(ValueError, match=re.escape(message)):
        TorchEngine(NoCache(load(model_dirs["qwen2"])))


def test_stop_strings_stop_tokens_and_length(model_dirs, tokenizer):
    engine = TorchEngine(load(model_dirs["qwen2"]), tokenizer=tokenizer)
    free = engine.generate(PROMPTS, SamplingParams(max_new_tokens=24, seed=5))
    assert all(g.finish_reason == "length" and g.text == decode(g.token_ids) for g in free)

    def first_match(tokens, hit):
        return next((k for k in range(len(tokens)) if hit(tokens[:k + 1])), None)

    stops = (decode(free[0].token_ids[8:10]), decode(free[2].token_ids[15:18]))
    stop_ids = (free[1].token_ids[5], free[3].token_ids[11])
    for kind, params in [
        ("strings", SamplingParams(max_new_tokens=24, seed=5, stop=stops)),
        ("ids", SamplingParams(max_new_tokens=24, seed=5, stop_token_ids=stop_ids)),
    ]:
        hit = ((lambda tokens: any(s in decode(tokens) for s in stops)) if kind == "strings"
               else (lambda tokens: tokens[-1] in stop_ids))
        for g, f in zip(engine.generate(PROMPTS, params), free):
            cut = first_match(f.token_ids, hit)
            expected = f.token_ids if cut is None else f.token_ids[:cut + 1]
            assert g.token_ids == expected
            assert g.logprobs == pytest.approx(f.logprobs[:len(expected)], abs=1e-6)
            assert g.finish_reason == ("length" if cut is None else "stop")
            assert g.text == decode(expected)
    # A stop at the last allowed token is reported as a stop, not as length.
    at_limit = engine.generate(PROMPTS[:1], SamplingParams(max_new_tokens=10, seed=5, stop=stops[:1]))[0]
    assert at_limit.token_ids == free[0].token_ids[:10] and at_limit.finish_reason == "stop"


def test_compute_logprobs_matches_plain_forward(model_dirs):
    model = load(model_dirs["mistral"])
    engine = TorchEngine(model, TorchEngineConfig(max_batch_size=3))
    responses = [[5, 6, 7, 8, 9, 10, 11], [1], [], [250, 0, 3], [4] * 12]
    for temperature in (0.6, 0.0):
        result = engine.compute_logprobs(PROMPTS, responses, temperature)
        assert result[2] == []
        for prompt, response, logprobs in zip(PROMPTS, responses, result):
            if response:
                expected = reference_logprobs(model, prompt, response, temperature or 1.0)
                assert torch.allclose(torch.tensor(logprobs, dtype=torch.float64), expected, atol=1e-5, rtol=0)


def hf_weights(model_dir, with_lm_head):
    weights = load(model_dir).state_dict()
    return [(name, tensor) for name, tensor in weights.items() if with_lm_head or name != "lm_head.weight"]


@pytest.mark.parametrize("with_lm_head", [False, True])
def test_weight_update_makes_the_engine_compute_the_new_model(model_dirs, with_lm_head):
    engine = TorchEngine(load(model_dirs["qwen2"]))
    target = load(model_dirs["qwen2-seed1"])
    responses = [[1, 2, 3, 4]] * len(PROMPTS)

    def error_vs_target():
        got = engine.compute_logprobs(PROMPTS, responses, 1.0)
        return max((reference_logprobs(target, p, r, 1.0) - torch.tensor(g, dtype=torch.float64)).abs().max().item()
                   for p, r, g in zip(PROMPTS, responses, got))

    assert error_vs_target() > 1e-2  # negative control: the engine still holds seed 0
    weights = hf_weights(model_dirs["qwen2-seed1"], with_lm_head)
    stats = engine.sync_weights([weights[i:i + 5] for i in range(0, len(weights), 5)], version=3)
    assert error_vs_target() < 1e-5
    assert (stats.version, stats.num_tensors, stats.num_buckets) == (3, len(weights), -(-len(weights) // 5))
    assert stats.num_bytes == sum(t.numel() * t.element_size() for _, t in weights)
    assert stats.names == {name for name, _ in weights} and stats.seconds > 0
    assert engine.weight_version == 3
    engine.health_check()


def test_weight_update_errors(model_dirs):
    engine = TorchEngine(load(model_dirs["qwen2"]))
    weights = dict(hf_weights(model_dirs["qwen2-seed1"], with_lm_head=False))
    embed = "model.embed_tokens.weight"
    before = engine.compute_logprobs(PROMPTS, PROMPTS, 1.0)
    engine.begin_weight_update(1)
    with pytest.raises(ValueError, match="unknown tensor 'model.nope'"):
        engine.update_weights([(embed, weights[embed]), ("model.nope", torch.zeros(1))])
    with pytest.raises(ValueError, match="float32 \\(251, 64\\)"):
        engine.update_weights([(embed, weights[embed].T.contiguous())])
    with pytest.raises(ValueError, match="float64"):
        engine.update_weights([(embed, weights[embed].double())])
    engine.update_weights([(embed, weights[embed])])
    with pytest.raises(ValueError, match="sent twice"):
        engine.update_weights([(embed, weights[embed])])
    with pytest.raises(ValueError, match="tied"):
        engine.update_weights([("lm_head.weight", weights[embed] + 1)])
    with pytest.raises(RuntimeError, match="in progress"):
        engine.generate(PROMPTS, SamplingParams(seed=0))
    with pytest.raises(RuntimeError, match="missed 25 tensors"):
        engine.finish_weight_update()
    with pytest.raises(RuntimeError, match="mixed"):
        engine.compute_logprobs(PROMPTS, PROMPTS, 1.0)
    # The rejected buckets changed nothing: only the embedding moved, so a full sync of the old model restores it.
    engine.sync_weights([hf_weights(model_dirs["qwen2"], with_lm_head=False)], version=2)
    assert engine.compute_logprobs(PROMPTS, PROMPTS, 1.0) == before

    untied = TorchEngine(load(model_dirs["untied"]))
    with pytest.raises(RuntimeError, match="lm_head.weight"):
        untied.sync_weights([hf_weights(model_dirs["untied"], with_lm_head=False)], version=1)


def test_released_engine_refuses_until_resumed_and_synced(model_dirs):
    model = load(model_dirs["qwen2"])
    engine = TorchEngine(model)
    expected = engine.compute_logprobs(PROMPTS, PROMPTS, 1.0)
    engine.release_memory()
    assert all(p.numel() == 0 for p in model.parameters())
    for call in (lambda: engine.generate(PROMPTS, SamplingParams(seed=0)), engine.health_check,
                 lambda: engine.begin_weight_update(1)):
        with pytest.raises(RuntimeError, match="released"):
            call()
    engine.resume_memory()
    with pytest.raises(RuntimeError, match="sync weights"):
        engine.generate(PROMPTS, SamplingParams(seed=0))
    engine.sync_weights([hf_weights(model_dirs["qwen2"], with_lm_head=False)], version=1)
    engine.health_check()
    assert model.lm_head.weight is model.model.embed_tokens.weight
    assert engine.compute_logprobs(PROMPTS, PROMPTS, 1.0) == expected


def test_bad_requests_fail_before_any_work(model_dirs):
    engine = TorchEngine(load(model_dirs["qwen2"]))
    with pytest.raises(ValueError, match="need a tokenizer"):
        engine.generate(PROMPTS, SamplingParams(stop=("x",)))
    with pytest.raises(ValueError, match="token id 251 outside"):
        engine.generate([[1, 251]], SamplingParams())
    with pytest.raises(ValueError, match="prompt 1 is empty"):
        engine.generate([[1], []], SamplingParams())
    with pytest.raises(ValueError, match="stop_token_ids \\[300\\]"):
        engine.generate([[1]], SamplingParams(stop_token_ids=(300,)))
    with pytest.raises(ValueError, match="2 prompts but 1 responses"):
        engine.compute_logprobs([[1], [2]], [[3]], 1.0)
    with pytest.raises(ValueError, match="rollout.torch.dtype"):
        TorchEngine(load(model_dirs["qwen2"]), TorchEngineConfig(dtype="bfloat16"))


def test_rollout_configs_validate_and_work_with_omegaconf():
    config = OmegaConf.to_object(OmegaConf.structured(RolloutConfig))
    assert config.engine == "torch" and config.torch.max_batch_size == 256
    with pytest.raises(ValueError, match="rollout.engine='vllm' is unknown; use one of \\['torch', 'sglang'\\]"):
        RolloutConfig(engine="vllm")
    with pytest.raises(ValueError, match="needs rollout.sglang"):
        RolloutConfig(engine="sglang")
    with pytest.raises(ValueError, match="rollout.torch.max_batch_size=0"):
        TorchEngineConfig(max_batch_size=0)
    with pytest.raises(ValueError, match="rollout.torch.device='tpu'"):
        TorchEngineConfig(device="tpu")


# --- streaming ----------------------------------------------------------------------------------------


def test_generate_stream_gives_generate_s_responses_each_index_once(model_dirs, tokenizer):
    engine = TorchEngine(load(model_dirs["qwen2"]), TorchEngineConfig(max_batch_size=3), tokenizer=tokenizer)
    free = engine.generate(PROMPTS, SamplingParams(max_new_tokens=16, seed=4))
    # Stop ids from two rows' samples, so rows finish at different steps and the stream comes out of order.
    params = SamplingParams(max_new_tokens=16, seed=4, stop_token_ids=(free[1].token_ids[2], free[3].token_ids[6]))
    batch = engine.generate(PROMPTS, params)
    streamed = list(engine.generate_stream(PROMPTS, params))
    assert sorted(index for index, _ in streamed) == list(range(len(PROMPTS)))
    assert [index for index, _ in streamed] != list(range(len(PROMPTS)))  # a later row finished first
    assert dict(streamed) == dict(enumerate(batch))  # tokens, log-probs, finish reasons and texts
    assert any(g.finish_reason == "stop" for g in batch) and any(g.finish_reason == "length" for g in batch)


def early_and_late_prompts(engine, max_new_tokens, seed):
    """Two prompts and a stop id with which the first stops at its first token and the second runs to the end
    (found from unconstrained samples of the same seed, whose draws a stop does not change)."""
    params = SamplingParams(max_new_tokens=max_new_tokens, seed=seed)
    for late in PROMPTS[1:]:
        free = engine.generate([PROMPTS[0], late], params)
        if free[0].token_ids[0] not in free[1].token_ids:
            return [PROMPTS[0], late], free[0].token_ids[0]
    raise AssertionError(f"every prompt's sample draws the first token of prompt 0's; try another seed than {seed}")


def test_stream_yields_a_stopped_row_before_the_others_finish(model_dirs):
    model = load(model_dirs["qwen2"])
    engine = TorchEngine(model)
    max_new_tokens = 20
    prompts, stop_id = early_and_late_prompts(engine, max_new_tokens, seed=9)
    forwards = []
    model.register_forward_hook(lambda *args: forwards.append(1))
    stream = engine.generate_stream(prompts, SamplingParams(max_new_tokens=max_new_tokens, seed=9,
                                                            stop_token_ids=(stop_id,)))
    index, first = next(stream)
    assert (index, first.token_ids, first.finish_reason) == (0, [stop_id], "stop")
    assert len(forwards) == 1  # only the prefill has run: the other row has 19 tokens to go
    (index, last), = list(stream)
    assert (index, last.finish_reason, len(last.token_ids)) == (1, "length", max_new_tokens)
    assert len(forwards) == max_new_tokens  # prefill + one forward per later token
    assert stop_id not in last.token_ids


def test_stream_checks_up_front_and_refuses_to_outlive_a_weight_sync(model_dirs):
    engine = TorchEngine(load(model_dirs["qwen2"]))
    with pytest.raises(ValueError, match="token id 251 outside"):
        engine.generate_stream([[1, 251]], SamplingParams())  # raised at the call, before any iteration
    prompts, stop_id = early_and_late_prompts(engine, max_new_tokens=8, seed=1)
    stream = engine.generate_stream(prompts, SamplingParams(max_new_tokens=8, seed=1, stop_token_ids=(stop_id,)))
    assert next(stream)[0] == 0
    engine.sync_weights([hf_weights(model_dirs["qwen2-seed1"], with_lm_head=False)], version=1)
    with pytest.raises(RuntimeError, match="weights changed"):
        next(stream)
