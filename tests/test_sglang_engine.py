"""Tests of the SGLang engine adapter against a fake SGLang 0.5.23 HTTP server on 127.0.0.1.

The fake server checks every request body against the field names of sglang 0.5.23 (copied below from its
source, file named at each set, and checked against the installed wheel by a test that skips without it) and
answers with the response shapes of that version (weight updates only inside a begin/end session), using a
tiny deterministic "model" whose log-probs the tests recompute independently in float64. What needs a
GPU (CUDA IPC serialisation, a real server) is covered only up to the CUDA boundary error.

Run: python -m pytest tests/test_sglang_engine.py -q
"""

from __future__ import annotations

import json
import math
import random
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
import torch
from omegaconf import OmegaConf
from safetensors.torch import save_file

from megatron_zero.config.sglang import SGLangConfig
from megatron_zero.rollout.engine import SamplingParams
from megatron_zero.rollout.sglang_engine import SGLangEngine
from megatron_zero.rollout.sglang_launch import launch_server_command, launch_server_env
from megatron_zero.rollout.sglang_weights import CUDABoundaryError
from megatron_zero.rollout.sglang_http import SGLangHTTPError

# --- field names of sglang 0.5.23 ----------------------------------------------------------------------
# Copied so the fake runs without the wheel; test_copied_contract_matches_the_wheel checks them against it.

# sglang/api/v1/api_types.py: GenerateRequest, the JSON contract every /generate body must pass (unknown keys are
# ignored by SGLang; this fake refuses them, so a misspelt field of ours fails here instead of doing nothing).
GENERATE_FIELDS = {
    "rid", "text", "input_ids", "stream", "sampling_params", "return_logprob", "logprob_start_len",
    "top_logprobs_num", "token_ids_logprob", "return_hidden_states", "return_text_in_logprobs", "bootstrap_host",
    "bootstrap_port", "bootstrap_room", "bootstrap_pair_key", "decode_tp_size", "routed_dp_rank",
    "disagg_prefill_dp_rank", "image_data", "mm_hashes", "video_data", "audio_data", "extra_key", "priority",
    "cache_salt", "require_reasoning", "lora_path", "session_params", "kv_hints", "routing_key", "max_thinking_tokens",
    "session_id", "custom_logit_processor", "custom_labels", "images_config", "return_prompt_token_ids",
    "routed_experts_start_len", "return_sampling_mask", "modalities",
}
# sglang/api/v1/api_types.py: SamplingParams (unknown keys rejected: HTTP 400 "unknown field `x`, expected ...").
SAMPLING_FIELDS = {
    "max_new_tokens", "stop", "stop_token_ids", "stop_regex", "temperature", "top_p", "top_k", "min_p",
    "frequency_penalty", "presence_penalty", "repetition_penalty", "min_new_tokens", "n", "json_schema",
    "regex", "ebnf", "structural_tag", "ignore_eos", "skip_special_tokens", "spaces_between_special_tokens",
    "no_stop_trim", "stream_interval", "logit_bias", "sampling_seed", "custom_params", "beam_width", "watermark",
    "choice",
}
# sglang/srt/managers/io_struct.py: (required fields, all fields, class) of the weight and memory requests.
_BASE = {"rid", "http_worker_ipc"}  # BaseReq
REQUEST_FIELDS = {
    "/update_weights_from_tensor": ({"serialized_named_tensors"}, _BASE | {
        "serialized_named_tensors", "load_format", "flush_cache", "abort_all_requests", "weight_version",
        "selector", "torch_empty_cache"}, "UpdateWeightsFromTensorReqInput"),
    "/update_weights_from_distributed": ({"names", "dtypes", "shapes"}, _BASE | {
        "names", "dtypes", "shapes", "group_name", "flush_cache", "abort_all_requests", "weight_version",
        "load_format", "selector", "torch_empty_cache"}, "UpdateWeightsFromDistributedReqInput"),
    "/init_weights_update_group": ({"master_address", "master_port", "rank_offset", "world_size"}, _BASE | {
        "master_address", "master_port", "rank_offset", "world_size", "group_name", "backend"},
        "InitWeightsUpdateGroupReqInput"),
    "/destroy_weights_update_group": (set(), _BASE | {"group_name"}, "DestroyWeightsUpdateGroupReqInput"),
    "/begin_weight_update": (set(), _BASE | {"selector"}, "BeginWeightUpdateReqInput"),
    "/end_weight_update": (set(), _BASE, "EndWeightUpdateReqInput"),
    "/release_memory_occupation": (set(), _BASE | {"tags"}, "ReleaseMemoryOccupationReqInput"),
    "/resume_memory_occupation": (set(), _BASE | {"tags"}, "ResumeMemoryOccupationReqInput"),
}
# sglang/srt/managers/scheduler_components/weight_updater.py: the answers outside a weight-update session.
NO_SESSION = "{} must run between begin_weight_update() and end_weight_update()"
SESSION_OPEN = "a weight-update session is already open; call end_weight_update() first"
NO_SESSION_TO_END = "no weight-update session is open; call begin_weight_update() first"
# sglang/srt/constants.py: GPU_MEMORY_ALL_TYPES.
MEMORY_TAGS = {"kv_cache", "weights", "cuda_graph"}

VOCAB = 11


def fake_logits(context: list[int]) -> list[float]:
    """The fake server's model: logits of the next token given the whole context."""
    h = sum((i + 1) * t for i, t in enumerate(context))
    return [((h * 31 + v * 17) % 13) / 3.0 for v in range(VOCAB)]


def reference_logprob(context: list[int], token: int, temperature: float) -> float:
    """log softmax(logits / T)[token] in float64, written independently of the server's code."""
    scaled = [x / temperature for x in fake_logits(context)]
    top = max(scaled)
    return scaled[token] - top - math.log(sum(math.exp(x - top) for x in scaled))


class FakeSGLang:
    """What the handler reads and records; tests change `mode` to get errors."""

    def __init__(self):
        self.requests: list[tuple[str, object]] = []
        self.mode = "ok"
        self.health_delay_s = 0.0
        self.health_failures = 0
        self.released: set[str] = set()
        self.session_open = False
        # Seconds a /generate request holding one of these prompts takes (a long response), keyed by the prompt.
        self.generate_delay_s: dict[tuple[int, ...], float] = {}


def _generate(state: FakeSGLang, body: dict) -> list[dict]:
    assert set(body) <= GENERATE_FIELDS, set(body) - GENERATE_FIELDS
    batch = body["input_ids"]
    assert isinstance(batch, list) and all(isinstance(ids, list) for ids in batch)
    # One dict for the whole batch, or one per prompt (io_struct.py: _normalize_sampling_params).
    samplings = body["sampling_params"]
    samplings = samplings if isinstance(samplings, list) else [samplings] * len(batch)
    assert len(samplings) == len(batch) and all(set(s) <= SAMPLING_FIELDS for s in samplings)
    sampling = samplings[0]
    assert all(s == sampling or {**s, "sampling_seed": None} == {**sampling, "sampling_seed": None}
               for s in samplings), "the fake model takes one sampling setting per batch (seeds may differ)"
    starts = body.get("logprob_start_len")
    starts = starts if isinstance(starts, list) else [starts] * len(batch)
    temperature = sampling.get("temperature", 1.0)
    # sglang/srt/sampling/sampling_params.py: temperature 0 becomes temperature 1 with top_k 1.
    greedy = temperature < 1e-6
    temperature = 1.0 if greedy else temperature
    outputs = []
    for index, (ids, start) in enumerate(zip(batch, starts)):
        if state.mode == "abort" and index == 1:
            # sglang/srt/managers/schedule_batch.py: FINISH_ABORT.to_json()
            finish = {"type": "abort", "message": "Abort before prefill", "status_code": None, "err_type": None}
            outputs.append({"text": "", "output_ids": [], "meta_info": {"id": f"r{index}", "finish_reason": finish,
                            "prompt_tokens": len(ids), "completion_tokens": 0, "cached_tokens": 0,
                            "input_token_logprobs": [], "output_token_logprobs": []}})
            continue
        context, out_ids, out_lp = list(ids), [], []
        rng = random.Random(sum(ids))
        finish = None
        for _ in range(sampling["max_new_tokens"]):
            logits = fake_logits(context)
            token = logits.index(max(logits)) if greedy else rng.randrange(VOCAB)
            out_ids.append(token)
            out_lp.append(reference_logprob(context, token, temperature))
            context.append(token)
            if token in sampling.get("stop_token_ids", []):
                finish = {"type": "stop", "matched": token}  # FINISH_MATCHED_TOKEN.to_json()
                break
        if finish is None:
            finish = {"type": "length", "length": sampling["max_new_tokens"]}  # FINISH_LENGTH.to_json()
        # Input log-probs are at temperature 1 in 0.5.23; entry 0 is (None, ids[start], None)
        # (scheduler_output_processor_mixin.py: [None] + input_token_logprobs[:-1]).
        if start is not None and start >= 0:
            input_lp = [(None, ids[start], None)] + [
                (reference_logprob(ids[:k], ids[k], 1.0), ids[k], None) for k in range(start + 1, len(ids))]
        else:
            input_lp = []
        outputs.append({
            "text": "".join(chr(97 + t) for t in out_ids),
            "output_ids": out_ids,
            # tokenizer_manager.py: meta_info keys; logprob tuples are (logprob, token_id, text or None).
            "meta_info": {
                "id": f"r{index}", "finish_reason": finish, "prompt_tokens": len(ids), "weight_version": "default",
                "total_retractions": 0, "input_token_logprobs": input_lp,
                "output_token_logprobs": [(lp, t, None) for lp, t in zip(out_lp, out_ids)],
                "output_token_logprobs_length": len(out_ids), "reasoning_tokens": 0,
                "completion_tokens": len(out_ids), "cached_tokens": 0, "e2e_latency": 0.01,
            },
        })
    return outputs


def send_answer(handler: BaseHTTPRequestHandler, status: int, body=None, text: str | None = None) -> bool:
    """Write one HTTP answer, a JSON ``body`` or plain ``text``; False if the client had closed the connection."""
    data = text.encode() if text is not None else json.dumps(body).encode()
    try:
        handler.send_response(status)
        handler.send_header("Content-Type", "text/plain" if text is not None else "application/json")
        handler.send_header("Content-Length", str(len(data)))
        handler.end_headers()
        handler.wfile.write(data)
        return True
    except (BrokenPipeError, ConnectionResetError):
        return False


def make_handler(state: FakeSGLang):
    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *args):
            pass

        def _send(self, status: int, body=None, text: str | None = None):
            send_answer(self, status, body, text)  # a closed connection: the client gave up (health-timeout test)

        def do_GET(self):
            state.requests.append((self.path, None))
            if self.path == "/health_generate":
                time.sleep(state.health_delay_s)
                if state.health_failures > 0:
                    state.health_failures -= 1
                    return self._send(503, text="")  # http_server.py: Response(status_code=503)
                return self._send(200, text="")
            self._send(404, {"detail": "Not Found"})

        def do_POST(self):
            body = json.loads(self.rfile.read(int(self.headers["Content-Length"])) or b"null")
            state.requests.append((self.path, body))
            if self.path == "/generate":
                if state.mode == "bad_request":
                    # http_server.py: _create_error_response
                    return self._send(400, {"error": {"message": "The input (40000 tokens) is longer than the "
                                                                 "model's context length (32768 tokens)."}})
                time.sleep(max((state.generate_delay_s.get(tuple(ids), 0.0) for ids in body["input_ids"]), default=0.0))
                return self._send(200, _generate(state, body))
            if self.path == "/flush_cache":
                if state.mode == "busy":
                    return self._send(400, text="Flush cache failed.\n")
                return self._send(200, text="Cache flushed.\nPlease check backend logs for more details.\n")
            if self.path in REQUEST_FIELDS:
                required, allowed, _ = REQUEST_FIELDS[self.path]
                assert required <= set(body) <= allowed, (self.path, body)
                if self.path in ("/begin_weight_update", "/end_weight_update"):
                    begin = self.path == "/begin_weight_update"
                    if state.session_open == begin:
                        return self._send(400, {"success": False, "message": SESSION_OPEN if begin else
                                                NO_SESSION_TO_END})
                    state.session_open = begin
                    return self._send(200, {"success": True, "message": "Success"})
                if self.path.startswith("/update_weights_from") and not state.session_open:
                    return self._send(400, {"success": False, "message": NO_SESSION.format(self.path.lstrip("/"))})
                if "memory_occupation" in self.path:
                    assert set(body["tags"]) <= MEMORY_TAGS
                    if self.path.startswith("/release"):
                        state.released |= set(body["tags"])
                    else:
                        assert set(body["tags"]) <= state.released, "resumed a tag that was not released"
                        state.released -= set(body["tags"])
                    return self._send(200, None)  # the handlers return None: JSON null
                if self.path == "/destroy_weights_update_group":  # the fake never holds a group
                    return self._send(400, {"success": False, "message": "The group to be destroyed does not exist."})
                if state.mode == "weights_fail":
                    return self._send(400, {"success": False, "message": "Failed to update weights: shape mismatch"})
                return self._send(200, {"success": True, "message": "Succeeded to update model weights."})
            self._send(404, {"detail": "Not Found"})

    return Handler


@pytest.fixture
def fake():
    state = FakeSGLang()
    server = ThreadingHTTPServer(("127.0.0.1", 0), make_handler(state))
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    state.port = server.server_address[1]
    yield state
    server.shutdown()
    server.server_close()


def make_engine(fake: FakeSGLang, names: list[str] | None = None, **overrides) -> SGLangEngine:
    fields = dict(model_path="/ckpt/tiny", port=fake.port, retry_backoff_s=0.0, health_timeout_s=5.0)
    return SGLangEngine(SGLangConfig(**{**fields, **overrides}), expected_weight_names=names)


# --- generation and log-probs ------------------------------------------------------------------------


@pytest.mark.parametrize("temperature", [1.0, 0.7, 0.0])
def test_generate_parses_tokens_logprobs_and_finish(fake, temperature):
    engine = make_engine(fake)
    prompts = [[1, 2, 3], [4, 5], [6]]
    params = SamplingParams(temperature=temperature, max_new_tokens=6, stop_token_ids=(7,), stop=("\n",))
    generations = engine.generate(prompts, params)
    sent = fake.requests[-1][1]
    assert sent["input_ids"] == prompts and sent["return_logprob"] is True
    assert all(sampling["no_stop_trim"] is True and sampling["stop"] == ["\n"] for sampling in sent["sampling_params"])
    t_ref = temperature if temperature > 0 else 1.0  # SGLang's greedy log-probs are at T = 1
    for prompt, gen in zip(prompts, generations):
        assert gen.prompt_ids == prompt
        context = list(prompt)
        for token, logprob in zip(gen.token_ids, gen.logprobs):
            assert logprob == pytest.approx(reference_logprob(context, token, t_ref), abs=1e-12)
            context.append(token)
        stopped = 7 in gen.token_ids
        assert gen.finish_reason == ("stop" if stopped else "length")
        assert (gen.token_ids[-1] == 7) if stopped else len(gen.token_ids) == 6


def test_generate_stream_yields_each_response_as_its_request_returns(fake):
    engine = make_engine(fake)
    prompts = [[1, 2, 3], [4, 5], [6], [8, 9, 10]]
    params = SamplingParams(temperature=0.7, max_new_tokens=6, stop_token_ids=(7,))
    batch = engine.generate(prompts, params)
    fake.requests.clear()
    fake.generate_delay_s = {(1, 2, 3): 1.0}  # prompt 0's response is slow
    started = time.monotonic()
    arrivals = [(index, generation, time.monotonic() - started)
                for index, generation in engine.generate_stream(prompts, params)]
    assert sorted(index for index, _, _ in arrivals) == [0, 1, 2, 3]
    # The fast ones came while prompt 0's request was still running (concurrent requests, not one batch).
    assert arrivals[-1][0] == 0 and arrivals[-1][2] >= 1.0
    assert all(seconds < 0.8 for _, _, seconds in arrivals[:-1])
    assert {index: generation for index, generation, _ in arrivals} == dict(enumerate(batch))
    bodies = [body for path, body in fake.requests if path == "/generate"]
    assert sorted(body["input_ids"] for body in bodies) == sorted([prompt] for prompt in prompts)
    assert all(body["sampling_params"] == bodies[0]["sampling_params"] for body in bodies)


def test_generate_stream_errors(fake):
    engine = make_engine(fake)
    with pytest.raises(ValueError, match=r"prompts \[1\] are empty"):
        engine.generate_stream([[1], []], SamplingParams())  # at the call, before any request
    assert fake.requests == []
    fake.mode = "bad_request"
    with pytest.raises(SGLangHTTPError, match="/generate failed \\(HTTP 400\\)"):
        list(engine.generate_stream([[1], [2]], SamplingParams(max_new_tokens=2)))
    assert list(engine.generate_stream([], SamplingParams())) == []


def test_compute_logprobs_matches_generation_logprobs(fake):
    engine = make_engine(fake)
    prompts = [[3, 1, 4, 1], [5, 9]]
    generations = engine.generate(prompts, SamplingParams(max_new_tokens=5))
    responses = [g.token_ids for g in generations]
    logprobs = engine.compute_logprobs(prompts, responses, temperature=1.0)
    sent = fake.requests[-1][1]
    assert sent["sampling_params"]["max_new_tokens"] == 0 and sent["logprob_start_len"] == [3, 1]
    for gen, values in zip(generations, logprobs):
        assert values == pytest.approx(gen.logprobs, abs=1e-12)
    assert engine.compute_logprobs([[2]], [[]], temperature=1.0) == [[]]
    # temperature 0 (greedy) is scored at temperature 1, like the greedy log-probs of generate
    assert engine.compute_logprobs(prompts, responses, temperature=0.0) == logprobs


def test_compute_logprobs_refuses_temperature_other_than_one(fake):
    with pytest.raises(ValueError, match="temperature 1 only"):
        make_engine(fake).compute_logprobs([[1]], [[2]], temperature=0.6)
    assert fake.requests == []


def test_abort_and_error_responses_raise_with_url_and_endpoint(fake):
    engine = make_engine(fake)
    fake.mode = "abort"
    with pytest.raises(RuntimeError, match=r"/generate aborted request 1: Abort before prefill"):
        engine.generate([[1], [2]], SamplingParams(max_new_tokens=2))
    fake.mode = "bad_request"
    with pytest.raises(SGLangHTTPError, match=rf"127.0.0.1:{fake.port} /generate failed \(HTTP 400\): .*context len"):
        engine.generate([[1]], SamplingParams(max_new_tokens=2))


def test_seed_needs_deterministic_server(fake):
    with pytest.raises(ValueError, match="enable_deterministic_inference"):
        make_engine(fake).generate([[1]], SamplingParams(seed=3))
    assert fake.requests == []
    engine = make_engine(fake, enable_deterministic_inference=True)

    def seeds_sent(seed: int, prompts: list[list[int]], stream: bool) -> list[int]:
        fake.requests.clear()
        params = SamplingParams(seed=seed, max_new_tokens=1)
        list(engine.generate_stream(prompts, params)) if stream else engine.generate(prompts, params)
        bodies = sorted((body for path, body in fake.requests if path == "/generate"), key=lambda b: b["input_ids"])
        return [sampling["sampling_seed"] for body in bodies for sampling in body["sampling_params"]]

    # SGLang samples from (seed, position): the 4 samples of one prompt need 4 seeds, or they are 4 copies.
    seeds = seeds_sent(3, [[1]] * 4, stream=False)
    assert len(set(seeds)) == 4
    assert seeds_sent(3, [[1]] * 4, stream=False) == seeds  # reproducible from the step's seed
    assert sorted(seeds_sent(3, [[1]] * 4, stream=True)) == sorted(seeds)  # streamed: the same seeds, one each
    assert not set(seeds_sent(4, [[1]] * 4, stream=False)) & set(seeds)  # the next step's are new


def test_seeds_are_sent_only_to_engines_that_honour_them(fake):
    """Training and evaluation ask for seeds through request_seed: a server without deterministic inference (the
    examples' default, and SGLang's fast sampler) gets requests without one instead of a refused first rollout."""
    from transformers import AutoTokenizer

    from megatron_zero.demo import BASE_MODEL_PATH
    from megatron_zero.evaluation.generation import EngineGenerator
    from megatron_zero.rollout.engine import request_seed
    from megatron_zero.rollout.engine_router import EngineRouter

    fast, deterministic = make_engine(fake), make_engine(fake, enable_deterministic_inference=True)
    assert [request_seed(e, 7) for e in (fast, deterministic, EngineRouter([deterministic]))] == [None, 7, 7]
    assert request_seed(EngineRouter([deterministic, fast]), 7) is None  # every engine of a router must honour it
    generate = EngineGenerator(EngineRouter([fast]), AutoTokenizer.from_pretrained(str(BASE_MODEL_PATH)))
    assert len(generate(["Q: 1+1=? A:"], n=2, temperature=1.0, top_p=1.0, max_new_tokens=2, seed=5)[0]) == 2
    sent = [sampling for path, body in fake.requests if path == "/generate" for sampling in body["sampling_params"]]
    assert len(sent) == 2 and not any("sampling_seed" in sampling for sampling in sent)


# --- memory, cache, health ---------------------------------------------------------------------------


def test_release_then_resume_weights_before_kv_cache(fake):
    engine = make_engine(fake)
    engine.release_memory()
    engine.release_memory()  # already released: nothing sent twice
    engine.resume_memory()
    calls = [(path, body["tags"]) for path, body in fake.requests]
    assert calls == [
        ("/release_memory_occupation", ["kv_cache"]),
        ("/release_memory_occupation", ["weights"]),
        ("/release_memory_occupation", ["cuda_graph"]),
        ("/resume_memory_occupation", ["weights"]),
        ("/resume_memory_occupation", ["kv_cache", "cuda_graph"]),
    ]
    assert fake.released == set()


def test_released_engine_refuses_work_and_kv_cache_before_weights(fake):
    engine = make_engine(fake)
    engine.release_memory()
    released = r"while its memory \['cuda_graph', 'kv_cache', 'weights'\] is released"
    with pytest.raises(RuntimeError, match=r"generate on SGLang server .* " + released):
        engine.generate([[1]], SamplingParams(max_new_tokens=1))
    with pytest.raises(RuntimeError, match="health_check on SGLang server"):
        engine.health_check()
    with pytest.raises(RuntimeError, match="resume the weights before the KV cache"):
        engine.resume_kv_cache()


def test_flush_cache_and_its_refusal(fake):
    engine = make_engine(fake)
    engine.flush_cache()
    fake.mode = "busy"
    with pytest.raises(SGLangHTTPError, match=r"/flush_cache failed \(HTTP 400\): Flush cache failed"):
        engine.flush_cache()


def test_health_check_timeout_and_startup_wait(fake):
    engine = make_engine(fake, health_timeout_s=0.2)
    fake.health_delay_s = 1.0
    start = time.monotonic()
    with pytest.raises(SGLangHTTPError, match=r"/health_generate failed: no answer within 0.2 s"):
        engine.health_check()
    assert time.monotonic() - start < 1.0
    fake.health_delay_s, fake.health_failures = 0.0, 2
    make_engine(fake, startup_timeout_s=30.0).wait_until_ready()
    assert fake.health_failures == 0


def test_unreachable_server_fails_after_bounded_retries():
    engine = SGLangEngine(SGLangConfig(model_path="/ckpt/tiny", port=1, max_retries=2, retry_backoff_s=0.0))
    with pytest.raises(SGLangHTTPError, match=r"127.0.0.1:1 /generate failed: cannot connect after 3 attempt"):
        engine.generate([[1]], SamplingParams(max_new_tokens=1))


# --- weights -----------------------------------------------------------------------------------------


def test_colocated_update_stops_at_the_cuda_boundary(fake, tmp_path, monkeypatch):
    """With CUDA present, CPU tensors are refused: a GPU server could not open their shared memory cheaply. (Without
    CUDA they travel in shared memory to a CPU server: tests/test_sglang_real_server.py.)"""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    save_file({"embed.weight": torch.zeros(4, 2), "head.weight": torch.zeros(2, 4)}, tmp_path / "model.safetensors")
    engine = make_engine(fake, model_path=str(tmp_path))
    engine.begin_weight_update(version=1)
    with pytest.raises(ValueError, match=r"does not have: \['lm.weight'\]"):
        engine.update_weights([("lm.weight", torch.zeros(1))])
    with pytest.raises(CUDABoundaryError, match=r"not on a CUDA device \(first: 'embed.weight'"):
        engine.update_weights([("embed.weight", torch.zeros(4, 2))])
    assert fake.requests == [("/begin_weight_update", {})]  # the session opened; no weights were sent



def test_colocated_update_serializes_the_bucket_once_per_server_rank(fake, monkeypatch):
    """SGLang 0.5.23 opens entry i of serialized_named_tensors on TP rank i only (managers/tp_worker.py
    deserialize_own_rank), and each CUDA IPC serialization carries its own reference count: a tp_size=2 server gets
    two serializations of the bucket, whose buffers live until the request returns. No CUDA here, so the serializer
    is replaced by one that numbers its calls."""
    import weakref

    from megatron_zero.rollout import sglang_weights

    bucket = [("embed.weight", torch.ones(4, 2)), ("head.weight", torch.ones(2, 4))]
    buffers = []

    def serialize(named_tensors):
        assert [name for name, _ in named_tensors] == ["embed.weight", "head.weight"]
        buffer = torch.zeros(8)
        buffers.append(weakref.ref(buffer))
        return f"payload-{len(buffers)}", buffer

    monkeypatch.setattr(sglang_weights, "serialize_flattened_bucket", serialize)
    engine = make_engine(fake, names=[name for name, _ in bucket], tp_size=2)
    alive_while_sent, post = [], engine._client.post

    def watched_post(endpoint, payload, **kwargs):
        if endpoint == "/update_weights_from_tensor":
            alive_while_sent.append([ref() is not None for ref in buffers])
        return post(endpoint, payload, **kwargs)

    monkeypatch.setattr(engine._client, "post", watched_post)
    engine.begin_weight_update(version=1)
    engine.update_weights(bucket)
    sent = [body["serialized_named_tensors"] for path, body in fake.requests if path == "/update_weights_from_tensor"]
    assert sent == [["payload-1", "payload-2"]]
    assert alive_while_sent == [[True, True]]
    assert all(ref() is None for ref in buffers)  # released once the server answered


def test_disaggregated_update_requests_and_broadcast(fake, gloo_group_of_one):
    names = ["a.weight", "b.bias"]
    engine = SGLangEngine(SGLangConfig(model_path="/ckpt/tiny", port=fake.port, colocated=False),
                          expected_weight_names=names, weight_group=gloo_group_of_one)
    future = engine.init_weights_update_group("10.0.0.1", 29600, rank_offset=1, world_size=2)
    assert future.result(timeout=10)["success"] is True
    engine.begin_weight_update(version=3)
    engine.update_weights([("a.weight", torch.ones(2, 3, dtype=torch.bfloat16))])
    with pytest.raises(ValueError, match="more than once"):
        engine.update_weights([("a.weight", torch.ones(2, 3))])
    with pytest.raises(RuntimeError, match=r"left 1 tensor\(s\) of the model stale: \['b.bias'\]"):
        engine.finish_weight_update()
    engine.begin_weight_update(version=4)
    engine.update_weights([("a.weight", torch.ones(2, 3, dtype=torch.bfloat16)), ("b.bias", torch.ones(3))])
    stats = engine.finish_weight_update()
    assert stats.version == 4 and stats.num_tensors == 2 and stats.num_bytes == 12 + 12 and stats.names == set(names)
    updates = [body for path, body in fake.requests if path == "/update_weights_from_distributed"]
    assert updates[-1]["names"] == names and updates[-1]["dtypes"] == ["bfloat16", "float32"]
    assert updates[-1]["shapes"] == [[2, 3], [3]] and updates[-1]["flush_cache"] is False
    # One session per sync (0.5.23 refuses updates outside one), closed before the single flush of stale prefixes;
    # the sync that left a tensor stale closed its session too, or the next begin would be refused.
    paths = [path for path, _ in fake.requests]
    assert paths.count("/begin_weight_update") == paths.count("/end_weight_update") == 2
    assert paths[-2:] == ["/end_weight_update", "/flush_cache"] and not fake.session_open
    with pytest.raises(RuntimeError, match="only colocated servers"):
        engine.release_memory()


def test_weights_failure_names_the_server(fake):
    fake.mode = "weights_fail"
    engine = make_engine(fake, colocated=False, names=["w"])
    with pytest.raises(SGLangHTTPError, match=r"/init_weights_update_group failed \(HTTP 400\): Failed to update"):
        engine.init_weights_update_group("10.0.0.1", 29600, rank_offset=1, world_size=2).result(timeout=10)


# --- launching and config ----------------------------------------------------------------------------


def test_copied_contract_matches_the_wheel():
    """The field names this fake (and so every test built on it) holds the client to are SGLang 0.5.23's own."""
    import sglang_contract

    sglang_contract.require_wheel()
    api = sglang_contract.api_types()
    assert GENERATE_FIELDS == set(sglang_contract.struct_defaults(api.GenerateRequest))
    assert SAMPLING_FIELDS == set(sglang_contract.struct_defaults(api.SamplingParams))
    for path, (required, allowed, class_name) in REQUEST_FIELDS.items():
        assert (required, allowed) == tuple(map(set, sglang_contract.request_fields(class_name))), path
    assert MEMORY_TAGS == sglang_contract.memory_tags()


def test_generate_payload_passes_the_wheels_contract():
    """generate_payload (what a dry run prints) is what generate sends, and SGLang's own /generate schema admits it;
    a misspelt sampling field is refused by that schema, as the server answers it (HTTP 400)."""
    import sglang_contract

    from megatron_zero.rollout.sglang_requests import generate_payload

    params = SamplingParams(temperature=0.7, max_new_tokens=4, stop=("\n",), stop_token_ids=(7,), seed=3)
    payload = generate_payload([[1, 2], [1, 2]], params, deterministic=True)
    assert payload["input_ids"] == [[1, 2], [1, 2]]
    assert len({sampling["sampling_seed"] for sampling in payload["sampling_params"]}) == 2
    with pytest.raises(ValueError, match="enable_deterministic_inference"):
        generate_payload([[1]], params, deterministic=False)
    sglang_contract.require_wheel()
    api = sglang_contract.api_types()
    parsed = api.GenerateRequest.from_json_value(json.loads(json.dumps(payload)))
    assert [s.sampling_seed for s in parsed.sampling_params] == [s["sampling_seed"] for s in payload["sampling_params"]]
    assert parsed.sampling_params[0].no_stop_trim is True and parsed.logprob_start_len == -1
    with pytest.raises(api.JsonContractError, match="unknown field `seed`"):
        api.GenerateRequest.from_json_value({**payload, "sampling_params": [{"seed": 3}]})


def test_launch_command_uses_real_flags():
    import sglang_contract

    sglang_contract.require_wheel()
    config = SGLangConfig(model_path="/ckpt/qwen", port=31000, tp_size=2, base_gpu_id=4, mem_fraction_static=0.6,
                          disable_radix_cache=True, random_seed=7, extra_server_args=["--chunked-prefill-size", "8192"])
    command = launch_server_command(config)
    assert command[1:3] == ["-m", "sglang.launch_server"]
    flags = [arg for arg in command[3:-2] if arg.startswith("--")]
    assert set(flags) <= sglang_contract.server_flags(), set(flags) - sglang_contract.server_flags()
    pairs = dict(zip(command[3::1], command[4::1]))
    assert pairs["--model-path"] == "/ckpt/qwen" and pairs["--tp-size"] == "2" and pairs["--base-gpu-id"] == "4"
    assert pairs["--port"] == "31000" and pairs["--mem-fraction-static"] == "0.6" and pairs["--dtype"] == "bfloat16"
    assert "--enable-memory-saver" in flags and "--disable-radix-cache" in flags
    assert command[-2:] == ["--chunked-prefill-size", "8192"]
    assert "--enable-memory-saver" not in launch_server_command(SGLangConfig(model_path="/m", colocated=False))
    assert launch_server_env({"SGLANG_RETURN_ORIGINAL_LOGPROB": "1", "PATH": "/bin"}) == {"PATH": "/bin"}


def test_config_validation_and_omegaconf():
    with pytest.raises(ValueError, match="sglang.model_path is empty"):
        SGLangConfig()
    with pytest.raises(ValueError, match=r"sglang.dtype='bf16' is not an SGLang dtype"):
        SGLangConfig(model_path="/m", dtype="bf16")
    with pytest.raises(ValueError, match=r"sglang.mem_fraction_static=1.2 must be in \(0, 1\)"):
        SGLangConfig(model_path="/m", mem_fraction_static=1.2)
    with pytest.raises(ValueError, match=r"extra_server_args sets \['--tp-size'\]"):
        SGLangConfig(model_path="/m", extra_server_args=["--tp-size", "4"])
    config = OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(SGLangConfig(model_path="/m")), {"tp_size": 4}))
    assert config.tp_size == 4 and config.url == "http://127.0.0.1:30000"
