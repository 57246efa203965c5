"""End-to-end tests of ``SGLangEngine`` against the CPU stand-in for an SGLang 0.5.23 server
(tests/sglang_cpu_server.py) serving a tiny Qwen2 model. The stand-in judges requests by the pinned wheel's contract
(tests/sglang_contract.py), so these tests skip without it (and fail under MEGATRON_ZERO_REQUIRE_SGLANG_WHEEL=1).

The stand-in runs as a subprocess; the real client talks to it over HTTP. Generations are compared with a
``TorchEngine`` built in this process, log-probs with a float64 computation with the HF model, and the
disaggregated weight sync (gloo broadcast from this process as rank 0, ``parallel/weight_broadcast.py``) with a
model loaded from a checkpoint of the perturbed weights; a server started with --ignore-weight-updates must keep
its weights (the check can fail). Released weights are discarded unless the server keeps a CPU backup: a resume
without a re-sync serves log-probs far outside the trainer's engine-vs-actor bound.

Run: python -m pytest tests/test_sglang_cpu_server.py -q
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import requests
import sglang_contract
import torch
from safetensors.torch import load_file, save_file

from megatron_zero.config.rollout import TorchEngineConfig
from megatron_zero.config.sglang import SGLangConfig
from megatron_zero.config.trainer import LOGPROB_GAP_BOUNDS
from megatron_zero.demo.tokenizer import build_char_tokenizer
from megatron_zero.models.tiny import save_tiny_model
from megatron_zero.parallel.weight_broadcast import destroy_weight_broadcast_group, init_weight_broadcast_group
from megatron_zero.rollout.engine import SamplingParams
from megatron_zero.rollout.sglang_engine import SGLangEngine
from megatron_zero.rollout.sglang_requests import request_seeds
from megatron_zero.rollout.sglang_weights import WEIGHT_GROUP_NAME
from megatron_zero.rollout.sglang_http import SGLangHTTPClient, SGLangHTTPError
from megatron_zero.rollout.torch_engine import TorchEngine

SERVER = Path(__file__).resolve().parent / "sglang_cpu_server.py"
STARTUP_TIMEOUT_S = 60.0
MAX_NEW_TOKENS = 10


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def start_server(model_dir: Path, log_path: Path, *flags: str) -> tuple[subprocess.Popen, int]:
    sglang_contract.require_wheel()
    port = free_port()
    command = [sys.executable, str(SERVER), "--model-path", str(model_dir), "--host", "127.0.0.1", "--port", str(port),
               "--dtype", "float32", "--enable-deterministic-inference", *flags]
    with open(log_path, "w") as log:
        process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT)
    return process, port


def wait_healthy(process: subprocess.Popen, port: int, log_path: Path) -> list[int]:
    """Poll GET /health until 200; the status codes seen on the way (503 while the model loads)."""
    seen: list[int] = []
    deadline = time.monotonic() + STARTUP_TIMEOUT_S
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"stand-in exited with {process.returncode}:\n{log_path.read_text()[-3000:]}")
        try:
            seen.append(requests.get(f"http://127.0.0.1:{port}/health", timeout=5).status_code)
            if seen[-1] == 200:
                return seen
        except requests.ConnectionError:
            pass
        time.sleep(0.05)
    raise RuntimeError(f"stand-in not healthy after {STARTUP_TIMEOUT_S} s:\n{log_path.read_text()[-3000:]}")


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("tiny_qwen2")
    save_tiny_model("qwen2", path)
    build_char_tokenizer().save_pretrained(str(path))  # eos id 0, inside the model's vocabulary of 251
    return path


@pytest.fixture(scope="module")
def servers(model_dir, tmp_path_factory):
    """Ports of two stand-ins started together: "plain" and "ignore" (--ignore-weight-updates, and it keeps released
    weights: --enable-weights-cpu-backup), and the /health codes each answered while starting ("<name> startup")."""
    logs = tmp_path_factory.mktemp("logs")
    started = {"plain": start_server(model_dir, logs / "plain.log", "--warmup-s", "1"),
               "ignore": start_server(model_dir, logs / "ignore.log", "--ignore-weight-updates",
                                      "--enable-weights-cpu-backup")}
    try:
        seen = {f"{name} startup": wait_healthy(process, port, logs / f"{name}.log")
                for name, (process, port) in started.items()}
        yield {**{name: port for name, (_, port) in started.items()}, **seen}
    finally:
        for process, _ in started.values():
            process.kill()
            process.wait()


def client_engine(model_dir: Path, port: int,
                  weight_group: torch.distributed.ProcessGroup | None = None) -> SGLangEngine:
    config = SGLangConfig(model_path=str(model_dir), port=port, colocated=False, enable_deterministic_inference=True,
                          dtype="float32", retry_backoff_s=0.1)
    return SGLangEngine(config, weight_group=weight_group)


def reference_engine(model_dir: Path) -> TorchEngine:
    from transformers import AutoTokenizer

    return TorchEngine.from_pretrained(str(model_dir), TorchEngineConfig(dtype="float32"),
                                       tokenizer=AutoTokenizer.from_pretrained(str(model_dir)))


def prompts(count: int = 4, seed: int = 0) -> list[list[int]]:
    generator = torch.Generator().manual_seed(seed)
    return [torch.randint(1, 251, (3 + i,), generator=generator).tolist() for i in range(count)]


def expected_finish(tokens: list[int], params: SamplingParams) -> str:
    """The contract's finish reason as the client reports it: a response ending in one of the request's stop tokens
    is complete ("stop"), also at the length limit, where SGLang itself says "length" (it checks the length first,
    schedule_batch.py Req.check_finished) and the client corrects it; an eos the server adds by itself is not in
    the request, so at the limit it stays "length"."""
    if tokens and tokens[-1] in params.stop_token_ids:
        return "stop"
    return "length" if len(tokens) == params.max_new_tokens else "stop"


def assert_same_as_reference(generations, reference: TorchEngine, batch, params, eos_id: int) -> None:
    # The server stops at the tokenizer's eos as well (SGLang does unless ignore_eos); the reference is told so.
    with_eos = dataclasses.replace(params, stop_token_ids=(*params.stop_token_ids, eos_id))
    # The client sends each prompt with a seed of its own, derived from params.seed.
    seeds = request_seeds(params.seed, len(batch)) if params.seed is not None else [None] * len(batch)
    for prompt, generation, seed in zip(batch, generations, seeds):
        expected = reference.generate([prompt], dataclasses.replace(with_eos, seed=seed))[0]
        assert generation.prompt_ids == prompt
        assert generation.token_ids == expected.token_ids
        assert generation.logprobs == pytest.approx(expected.logprobs, abs=1e-6)
        assert generation.finish_reason == expected_finish(expected.token_ids, params)
        assert generation.text == expected.text


def float64_logprobs(model_dir: Path, prompt: list[int], response: list[int]) -> list[float]:
    """log softmax(logits)[token] of each response token, the HF model in float64."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float64)
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([prompt + response])).logits[0]
    logp = torch.log_softmax(logits, dim=-1)
    return [logp[len(prompt) - 1 + k, token].item() for k, token in enumerate(response)]


# --- generation and log-probs ------------------------------------------------------------------------------


def test_greedy_and_seeded_generation_match_torch_engine(model_dir, servers):
    engine, reference = client_engine(model_dir, servers["plain"]), reference_engine(model_dir)
    engine.wait_until_ready()
    eos_id = reference._tokenizer.eos_token_id
    batch = prompts()
    greedy = SamplingParams(temperature=0.0, max_new_tokens=MAX_NEW_TOKENS)
    first = engine.generate(batch, greedy)
    assert_same_as_reference(first, reference, batch, greedy, eos_id)
    # A stop token that occurs early in prompt 0's greedy response: its first occurrence ends the response.
    stop_id = first[0].token_ids[2]
    greedy = SamplingParams(temperature=0.0, max_new_tokens=MAX_NEW_TOKENS, stop_token_ids=(stop_id,))
    stopped = engine.generate(batch, greedy)
    assert_same_as_reference(stopped, reference, batch, greedy, eos_id)
    assert stopped[0].finish_reason == "stop" and stopped[0].token_ids[-1] == stop_id
    assert len(stopped[0].token_ids) <= 3
    # The stop token at the length limit: SGLang answers "length" (it checks the length first), the client reports
    # the complete response as "stop", as the contract says.
    at_limit = dataclasses.replace(greedy, max_new_tokens=len(stopped[0].token_ids))
    (last,) = engine.generate(batch[:1], at_limit)
    assert last.token_ids == stopped[0].token_ids and last.finish_reason == "stop"
    client = SGLangHTTPClient(engine.url, max_retries=0, retry_backoff_s=0.0)
    (raw,) = client.post("/generate", {"input_ids": batch[:1], "sampling_params": {
        "temperature": 0.0, "max_new_tokens": at_limit.max_new_tokens, "stop_token_ids": [stop_id]}}, timeout_s=30)
    assert raw["meta_info"]["finish_reason"] == {"type": "length", "length": at_limit.max_new_tokens}
    (raw,) = client.post("/generate", {"input_ids": batch[:1], "sampling_params": {
        "temperature": 0.0, "max_new_tokens": MAX_NEW_TOKENS, "stop_token_ids": [stop_id]}}, timeout_s=30)
    assert raw["output_ids"] == stopped[0].token_ids
    assert raw["meta_info"]["finish_reason"] == {"type": "stop", "matched": stop_id}
    # no_stop_trim is off by default: the matched token is left out of the text.
    assert raw["text"] == reference._tokenizer.decode(stopped[0].token_ids[:-1], skip_special_tokens=True)

    seeded = SamplingParams(temperature=1.0, top_p=0.9, top_k=50, max_new_tokens=MAX_NEW_TOKENS, seed=7,
                            stop_token_ids=(stop_id,))
    sampled = engine.generate(batch, seeded)
    assert_same_as_reference(sampled, reference, batch, seeded, eos_id)
    # The same seed gives the same tokens, whether prompts come in one request or one request each.
    assert [g.token_ids for g in engine.generate(batch, seeded)] == [g.token_ids for g in sampled]
    streamed = dict(engine.generate_stream(batch, seeded))
    assert [streamed[i].token_ids for i in range(len(batch))] == [g.token_ids for g in sampled]
    other_seed = engine.generate(batch, dataclasses.replace(seeded, seed=8))
    assert [g.token_ids for g in other_seed] != [g.token_ids for g in sampled]


def test_compute_logprobs_matches_generation_and_float64(model_dir, servers):
    engine = client_engine(model_dir, servers["plain"])
    batch = prompts(3, seed=1)
    generations = engine.generate(batch, SamplingParams(temperature=1.0, max_new_tokens=MAX_NEW_TOKENS, seed=3))
    responses = [g.token_ids for g in generations]
    scored = engine.compute_logprobs(batch, responses, temperature=1.0)
    for prompt, generation, values in zip(batch, generations, scored):
        assert values == pytest.approx(generation.logprobs, abs=1e-5)
        assert values == pytest.approx(float64_logprobs(model_dir, prompt, generation.token_ids), abs=1e-5)
    greedy = engine.generate(batch, SamplingParams(temperature=0.0, max_new_tokens=MAX_NEW_TOKENS))
    for generation, values in zip(greedy, engine.compute_logprobs(batch, [g.token_ids for g in greedy], 0.0)):
        assert values == pytest.approx(generation.logprobs, abs=1e-5)


# --- weight sync over gloo ---------------------------------------------------------------------------------


def perturbed_checkpoint(model_dir: Path, out_dir: Path) -> dict[str, torch.Tensor]:
    """Every tensor of the checkpoint plus noise, written as a copy of the model directory."""
    shutil.copytree(model_dir, out_dir)
    generator = torch.Generator().manual_seed(5)
    tensors = {name: tensor + 0.05 * torch.randn(tensor.shape, generator=generator)
               for name, tensor in load_file(model_dir / "model.safetensors").items()}
    save_file(tensors, out_dir / "model.safetensors", metadata={"format": "pt"})
    return tensors


def sync(engine: SGLangEngine, tensors: dict[str, torch.Tensor], version: int) -> None:
    names = sorted(tensors)
    engine.begin_weight_update(version)
    for bucket in (names[:10], names[10:]):
        engine.update_weights([(name, tensors[name]) for name in bucket])
    engine.finish_weight_update()


def greedy_outputs(engine, batch) -> list[tuple[list[int], list[float]]]:
    # The server stops at the tokenizer's eos (id 0) by itself; the reference TorchEngine must be told.
    params = SamplingParams(temperature=0.0, max_new_tokens=MAX_NEW_TOKENS, stop_token_ids=(0,))
    return [(g.token_ids, g.logprobs) for g in (engine.generate([p], params)[0] for p in batch)]


def assert_outputs_close(actual, expected) -> None:
    for (tokens, logprobs), (expected_tokens, expected_logprobs) in zip(actual, expected):
        assert tokens == expected_tokens
        assert logprobs == pytest.approx(expected_logprobs, abs=1e-6)


def connect(model_dir: Path, port: int) -> tuple[SGLangEngine, torch.distributed.ProcessGroup]:
    """The trainer side of /init_weights_update_group: the server joins as rank 1, this process as rank 0."""
    group_port = free_port()
    client_engine(model_dir, port).destroy_weights_update_group()  # one an earlier test left, as the trainer does
    future = client_engine(model_dir, port).init_weights_update_group("127.0.0.1", group_port, rank_offset=1,
                                                                      world_size=2, backend="gloo")
    group = init_weight_broadcast_group("127.0.0.1", group_port, rank=0, world_size=2, backend="gloo",
                                        timeout_s=60.0, group_name=WEIGHT_GROUP_NAME)
    assert future.result(timeout=60) == {"success": True, "message": "Succeeded to initialize custom process group."}
    return client_engine(model_dir, port, weight_group=group), group


def test_weight_update_over_gloo_reaches_the_model(model_dir, servers, tmp_path):
    batch = prompts(3, seed=2)
    original = greedy_outputs(reference_engine(model_dir), batch)
    tensors = perturbed_checkpoint(model_dir, tmp_path / "perturbed")
    perturbed = greedy_outputs(reference_engine(tmp_path / "perturbed"), batch)
    assert [tokens for tokens, _ in perturbed] != [tokens for tokens, _ in original]  # the test can fail

    engine, group = connect(model_dir, servers["plain"])
    try:
        assert_outputs_close(greedy_outputs(engine, batch), original)
        sync(engine, tensors, version=1)
        assert_outputs_close(greedy_outputs(engine, batch), perturbed)
        # A second sync over the same group puts the original weights back.
        sync(engine, load_file(model_dir / "model.safetensors"), version=2)
        assert_outputs_close(greedy_outputs(engine, batch), original)
        # A tensor the model lacks is refused after its broadcast was received, so the sender does not hang.
        client = SGLangHTTPClient(engine.url, max_retries=0, retry_backoff_s=0.0)
        body = {"names": ["extra.weight"], "dtypes": ["float32"], "shapes": [[2]], "group_name": WEIGHT_GROUP_NAME}
        client.post("/begin_weight_update", {}, timeout_s=10)
        with concurrent.futures.ThreadPoolExecutor(1) as executor:
            answer = executor.submit(client.post, "/update_weights_from_distributed", body, timeout_s=60, retry=False)
            torch.distributed.broadcast(torch.zeros(2), src=0, group=group)
            with pytest.raises(SGLangHTTPError, match=r"/update_weights_from_distributed failed \(HTTP 400\): Failed "
                                                      r"to update parameter online: the model has no tensor 'extra"):
                answer.result(timeout=60)
        client.post("/end_weight_update", {}, timeout_s=10)
        assert_outputs_close(greedy_outputs(engine, batch), original)
    finally:
        destroy_weight_broadcast_group(group)

    engine, group = connect(model_dir, servers["ignore"])
    try:
        sync(engine, tensors, version=1)
        assert_outputs_close(greedy_outputs(engine, batch), original)  # received, not loaded
    finally:
        destroy_weight_broadcast_group(group)
    assert not torch.distributed.is_initialized()  # no default group left behind for other tests


# --- errors and memory -------------------------------------------------------------------------------------


def test_bad_requests_answer_400_and_unknown_fields_are_ignored(model_dir, servers):
    port = servers["plain"]
    engine = client_engine(model_dir, port)
    with pytest.raises(SGLangHTTPError, match=r"/generate failed \(HTTP 400\): The input_ids \[1, 300\] contains "
                                              r"values greater than the vocab size \(251\)"):
        engine.generate([[1, 300]], SamplingParams(max_new_tokens=2))
    client = SGLangHTTPClient(engine.url, max_retries=0, retry_backoff_s=0.0)
    # SGLang's own schema: an unknown sampling field is refused with its text, an unknown top-level one ignored.
    with pytest.raises(SGLangHTTPError, match=r"/generate failed \(HTTP 400\): unknown field `temprature`, expected "
                                              r"one of `max_new_tokens`"):
        client.post("/generate", {"input_ids": [[1, 2]], "sampling_params": {"temprature": 1.0}}, timeout_s=10)
    body = {"input_ids": [[1, 2]], "sampling_params": {"max_new_tokens": 1}}
    assert client.post("/generate", {**body, "seed": 3}, timeout_s=10)[0]["meta_info"]["completion_tokens"] == 1
    with pytest.raises(SGLangHTTPError, match=r"/generate failed \(HTTP 400\): invalid type: string \"x\", "
                                              r"expected i64"):
        client.post("/generate", {**body, "sampling_params": {"max_new_tokens": "x"}}, timeout_s=10)
    # The other requests: unknown fields dropped, a missing required one refused.
    assert client.post("/release_memory_occupation", {"tags": ["kv_cache"], "colour": "red"}, timeout_s=10) is None
    client.post("/resume_memory_occupation", {"tags": ["kv_cache"]}, timeout_s=10)
    with pytest.raises(SGLangHTTPError, match=r"/init_weights_update_group failed \(HTTP 400\): .*\['master_port'"):
        client.post("/init_weights_update_group", {"master_address": "127.0.0.1", "rank_offset": 1,
                                                   "world_size": 2}, timeout_s=10)
    # Weights only inside a session (0.5.23), base64 payloads only.
    with pytest.raises(SGLangHTTPError, match=r"/update_weights_from_distributed failed \(HTTP 400\): "
                                              r"update_weights_from_distributed must run between begin_weight_update"):
        client.post("/update_weights_from_distributed", {"names": [], "dtypes": [], "shapes": []}, timeout_s=10)
    with pytest.raises(SGLangHTTPError, match=r"/end_weight_update failed \(HTTP 400\): no weight-update session"):
        client.post("/end_weight_update", {}, timeout_s=10)
    with pytest.raises(SGLangHTTPError, match=r"/update_weights_from_tensor failed \(HTTP 400\): .*Expected base64"):
        client.post("/update_weights_from_tensor", {"serialized_named_tensors": ["not base64!"]}, timeout_s=10)
    client.post("/begin_weight_update", {}, timeout_s=10)
    try:
        with pytest.raises(SGLangHTTPError, match=r"/begin_weight_update failed \(HTTP 400\): a weight-update session "
                                                  r"is already open"):
            client.post("/begin_weight_update", {}, timeout_s=10)
        with pytest.raises(SGLangHTTPError, match=r"/update_weights_from_tensor failed \(HTTP 400\): CUDA IPC"):
            client.post("/update_weights_from_tensor", {"serialized_named_tensors": ["AAAA"]}, timeout_s=10)
        with pytest.raises(SGLangHTTPError, match=r"/update_weights_from_distributed failed \(HTTP 400\): Group "
                                                  r"weight_update_group not in"):
            client.post("/update_weights_from_distributed", {"names": [], "dtypes": [], "shapes": []}, timeout_s=10)
    finally:
        client.post("/end_weight_update", {}, timeout_s=10)
    with pytest.raises(SGLangHTTPError, match=r"/no_such_endpoint failed \(HTTP 404\)"):
        client.post("/no_such_endpoint", {}, timeout_s=10)


def test_health_answers_503_while_starting_and_ready_after(servers):
    codes = servers["plain startup"]  # the stand-in waited a second of "warm-up" after loading
    assert codes[0] == 503 and codes[-1] == 200, codes
    assert requests.get(f"http://127.0.0.1:{servers['plain']}/ready", timeout=5).status_code == 200


def test_flush_cache_refuses_while_requests_run(model_dir, servers):
    client = SGLangHTTPClient(f"http://127.0.0.1:{servers['plain']}", max_retries=0, retry_backoff_s=0.0)
    long = {"input_ids": [[1, 2, 3]], "sampling_params": {"max_new_tokens": 200, "ignore_eos": True}}
    with concurrent.futures.ThreadPoolExecutor(3) as executor:
        running = [executor.submit(client.post, "/generate", long, timeout_s=120) for _ in range(3)]
        time.sleep(0.3)
        with pytest.raises(SGLangHTTPError, match=r"/flush_cache failed \(HTTP 400\): Flush cache failed"):
            client.post("/flush_cache", {}, timeout_s=10)
        # ?timeout= waits for the server to go idle (flush_wrapper.py), then flushes.
        assert client.post("/flush_cache?timeout=120", {}, timeout_s=150) is None
        assert all(future.done() for future in running)
    assert client.post("/flush_cache", {}, timeout_s=10) is None


def test_released_memory_refuses_generation_until_resumed(model_dir, servers):
    port = servers["ignore"]  # its weights never change, so the other tests do not depend on this one's order
    client = SGLangHTTPClient(f"http://127.0.0.1:{port}", max_retries=0, retry_backoff_s=0.0)
    body = {"input_ids": [[1, 2]], "sampling_params": {"max_new_tokens": 1}}
    with pytest.raises(SGLangHTTPError, match=r"/resume_memory_occupation failed \(HTTP 400\): KeyError: 'weights'"):
        client.post("/resume_memory_occupation", {"tags": ["weights"]}, timeout_s=10)
    assert client.post("/release_memory_occupation", {"tags": ["kv_cache", "weights"]}, timeout_s=10) is None
    with pytest.raises(SGLangHTTPError, match=r"/generate failed \(HTTP 400\): .*\['kv_cache', 'weights'\] is "
                                              r"released"):
        client.post("/generate", body, timeout_s=10)
    with pytest.raises(SGLangHTTPError, match=r"/health_generate failed \(HTTP 503\)"):
        client.request("GET", "/health_generate", timeout_s=10, retry=False)
    client.post("/resume_memory_occupation", {"tags": ["weights", "kv_cache"]}, timeout_s=10)
    assert client.post("/generate", body, timeout_s=10)[0]["meta_info"]["completion_tokens"] == 1


def max_gap(engine: SGLangEngine, model_dir: Path, batch: list[list[int]]) -> float:
    """The largest |engine - float64 reference| log-prob over greedy responses: what the trainer's health check
    bounds (LOGPROB_GAP_BOUNDS) for engine vs actor."""
    responses = [[5, 9, 2, 7] for _ in batch]
    scored = engine.compute_logprobs(batch, responses, temperature=1.0)
    return max(abs(value - reference) for prompt, response, values in zip(batch, responses, scored)
               for value, reference in zip(values, float64_logprobs(model_dir, prompt, response)))


def test_released_weights_are_gone_until_re_sent(model_dir, servers):
    """SGLang 0.5.23 discards released weights unless it keeps a CPU backup: a colocated step that resumes without
    a re-sync would sample from garbage. Here the gap to the model is far past the trainer's bound until the weights
    are sent again; the server with --enable-weights-cpu-backup keeps them."""
    batch = prompts(2, seed=3)
    _, bound = LOGPROB_GAP_BOUNDS["fp32"]
    for name, kept in (("plain", False), ("ignore", True)):
        # release/resume take the colocated engine's path; weights come by broadcast (CPU: no CUDA IPC).
        memory = SGLangEngine(dataclasses.replace(client_engine(model_dir, servers[name]).config, colocated=True))
        assert max_gap(memory, model_dir, batch) < 1e-5
        memory.release_memory()
        memory.resume_memory()
        gap = max_gap(memory, model_dir, batch)
        assert (gap < 1e-5) if kept else (gap > bound), (name, gap)
    engine, group = connect(model_dir, servers["plain"])
    try:
        sync(engine, load_file(model_dir / "model.safetensors"), version=1)
        assert max_gap(engine, model_dir, batch) < 1e-5
    finally:
        destroy_weight_broadcast_group(group)
