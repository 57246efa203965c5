"""The SGLang rollout engine: our ``RolloutEngine`` contract mapped onto one SGLang server's HTTP API.

Why: rollouts run on SGLang (sglang==0.5.23, the gpu extra), one server per engine, tensor-parallel
over its GPUs; colocated with the actor it is launched on the actor's GPUs, gives its memory back during
training and receives new weights as CUDA IPC handles. Every endpoint, request field and response shape
used here was read from the 0.5.23 source (docs/sglang.md lists them):

- ``generate``        POST /generate, ``input_ids`` batch, ``return_logprob``; ``meta_info.output_token_logprobs``
                      holds (logprob, token_id, text) tuples, ``meta_info.finish_reason`` {"type": ...}.
                      ``generate_stream`` sends one such request per prompt, concurrently, and yields each
                      response as its request returns.
- ``compute_logprobs`` POST /generate with ``max_new_tokens=0`` (prefill only) and ``logprob_start_len``;
                      ``meta_info.input_token_logprobs`` starts with (None, first id) at that position.
- weights             every sync is one session: POST /begin_weight_update, the buckets, POST /end_weight_update
                      (0.5.23 refuses updates outside a session). Colocated: POST /update_weights_from_tensor,
                      ``load_format="flattened_bucket"``, one base64 pickled CUDA IPC handle per TP rank;
                      disaggregated: POST /update_weights_from_distributed while this process broadcasts over NCCL.
- memory              POST /release_memory_occupation and /resume_memory_occupation with ``tags``. Released
                      weights are discarded (no --enable-weights-cpu-backup): they must be synced after resume.
- ``flush_cache``     POST /flush_cache;  ``health_check``  GET /health_generate.

Log-prob temperature (checked in sglang/srt/layers/sampler.py and logits_processor.py): sampled-token
log-probs are log(softmax(logits / T)) over the full vocabulary before top-p / top-k, i.e. our contract,
unless the server runs with SGLANG_RETURN_ORIGINAL_LOGPROB=1 (then T = 1; ``launch_server_env`` keeps it
off). Greedy requests (T = 0) return log_softmax(logits) (SGLang treats T = 0 as T = 1, top_k = 1).
Prompt (input) log-probs are always at T = 1 in 0.5.23 (log_softmax of the raw logits, logprob_processor.py), so
``compute_logprobs`` accepts only temperature 1.0 (or 0, greedy, scored at 1) and refuses others.

CUDA boundary: serialising weights needs the sglang package (its pickling patch maps device indices to GPU
UUIDs, so a trainer that sees one GPU can hand a tensor to a server that sees several) and, on a GPU machine, CUDA
tensors (``CUDABoundaryError`` otherwise, before any request). On a machine without CUDA the same payload holds a
CPU tensor in shared memory, which the real server on CPU loads (rollout/sglang_cpu.py); tests/
test_sglang_real_server.py runs every path against it, tests/test_sglang_engine.py against a fake on 127.0.0.1.

Parts: rollout/sglang_launch.py (the server's command line and environment), rollout/sglang_requests.py (request
bodies and the checks on answers, pure: a dry run prints what a run would send), rollout/sglang_weights.py (weight
update sessions and their payloads), rollout/sglang_http.py (the HTTP client), this module (the engine).

How: start a server with ``launch_server_command(cfg)`` and ``launch_server_env()``, then
``engine = SGLangEngine(cfg); engine.wait_until_ready(); engine.generate(prompts, SamplingParams())``.
"""

from __future__ import annotations

import concurrent.futures
import logging
import threading
import time
from typing import Iterator, Optional, Sequence

import torch

from megatron_zero.config.sglang import SGLangConfig
from megatron_zero.rollout.engine import Generation, RolloutEngine, SamplingParams, WeightUpdateStats
from megatron_zero.rollout.sglang_http import SGLangHTTPClient, SGLangHTTPError
from megatron_zero.rollout.sglang_requests import (
    check_batch,
    checked_finish_reason,
    generate_payload,
    logprob_values,
    single_requests,
)
from megatron_zero.rollout.sglang_weights import SGLangWeightUpdates

logger = logging.getLogger(__name__)

# Memory tags of sglang/srt/constants.py (GPU_MEMORY_TYPE_*). Release frees the KV cache first (it is the
# largest and the scheduler flushes it on release), resume restores weights first so a weight sync can run
# before the KV cache takes its share again.
RELEASE_ORDER = ("kv_cache", "weights", "cuda_graph")
RESUME_WEIGHTS = ("weights",)
RESUME_KV_CACHE = ("kv_cache", "cuda_graph")
class SGLangEngine(SGLangWeightUpdates, RolloutEngine):
    """One SGLang server behind the ``RolloutEngine`` contract; see the module docstring.

    ``expected_weight_names``: the HF tensor names a weight sync must cover exactly once; by default the
    names in ``config.model_path``'s safetensors checkpoint, read at the first sync.
    ``weight_group``: disaggregated mode only, the torch.distributed group (this process is rank 0) that
    ``init_weights_update_group`` connected to the server.
    """

    def __init__(self, config: SGLangConfig, *, expected_weight_names: Optional[Sequence[str]] = None,
                 weight_group: Optional[torch.distributed.ProcessGroup] = None):
        self.config = config
        self.url = config.url
        self.weight_group = weight_group
        self._client = SGLangHTTPClient(self.url, max_retries=config.max_retries,
                                        retry_backoff_s=config.retry_backoff_s)
        self._expected_names = frozenset(expected_weight_names) if expected_weight_names is not None else None
        self._stats: Optional[WeightUpdateStats] = None
        self._sync_start = 0.0
        self._released: set[str] = set()

    # -- serving ---------------------------------------------------------------------------------------

    @property
    def honours_seeds(self) -> bool:
        # SGLang reads sampling_seed only in deterministic mode (sglang.enable_deterministic_inference).
        return self.config.enable_deterministic_inference

    def wait_until_ready(self) -> None:
        """Poll /health_generate until the server serves, at most ``config.startup_timeout_s``."""
        deadline = time.monotonic() + self.config.startup_timeout_s
        while True:
            try:
                self.health_check()
                return
            except SGLangHTTPError as e:
                if time.monotonic() > deadline:
                    raise RuntimeError(f"SGLang server {self.url} not ready after "
                                       f"{self.config.startup_timeout_s} s: {e}") from e
                time.sleep(max(0.1, self.config.retry_backoff_s))

    def _check_serving(self, what: str) -> None:
        # SGLang does not refuse work while its memory is released; a forward pass would touch freed memory.
        if self._released:
            raise RuntimeError(f"{what} on SGLang server {self.url} while its memory {sorted(self._released)} is "
                               "released; call resume_memory first")

    def health_check(self) -> None:
        self._check_serving("health_check")
        # /health_generate runs a one-token generation (or sees one finish), so a stuck scheduler fails it.
        self._client.request("GET", "/health_generate", timeout_s=self.config.health_timeout_s, retry=False)

    def generate(self, prompts: Sequence[Sequence[int]], params: SamplingParams) -> list[Generation]:
        prompts, payload = self._generate_request(prompts, params)
        if not prompts:
            return []
        outputs = check_batch(self._client.post("/generate", payload, timeout_s=self.config.generate_timeout_s),
                               len(prompts), self.url)
        return [self._parse_generation(i, prompt, out, sampling)
                for i, (prompt, out, sampling) in enumerate(zip(prompts, outputs, payload["sampling_params"]))]

    def generate_stream(self, prompts: Sequence[Sequence[int]],
                        params: SamplingParams) -> Iterator[tuple[int, Generation]]:
        """One /generate request per prompt, up to ``sglang.max_concurrent_requests`` in flight; each response is
        yielded as its request returns. The server batches concurrent requests itself (continuous batching,
        prefix cache across requests), so the GPU sees the same batch as one batched request."""
        prompts, payload = self._generate_request(prompts, params)
        return self._stream_requests(prompts, payload)

    def _generate_request(self, prompts: Sequence[Sequence[int]],
                          params: SamplingParams) -> tuple[list[list[int]], dict]:
        """The checked prompts and the /generate payload for all of them (raises before any request)."""
        self._check_serving("generate")
        payload = generate_payload(prompts, params, deterministic=self.config.enable_deterministic_inference)
        return payload["input_ids"], payload

    def _stream_requests(self, prompts: list[list[int]], payload: dict) -> Iterator[tuple[int, Generation]]:
        if not prompts:
            return
        # One HTTP client per request thread: a requests.Session is not documented as thread-safe, and its
        # connection pool (10) is smaller than the number of threads.
        local = threading.local()
        requests_of_one = list(single_requests(payload))

        def request(index: int) -> tuple[int, Generation]:
            if not hasattr(local, "client"):
                local.client = SGLangHTTPClient(self.url, max_retries=self.config.max_retries,
                                                retry_backoff_s=self.config.retry_backoff_s)
            one = requests_of_one[index]
            sampling = one["sampling_params"][0]
            outputs = local.client.post("/generate", one, timeout_s=self.config.generate_timeout_s)
            return index, self._parse_generation(index, prompts[index], check_batch(outputs, 1, self.url)[0],
                                                 sampling)

        executor = concurrent.futures.ThreadPoolExecutor(min(len(prompts), self.config.max_concurrent_requests),
                                                         thread_name_prefix="sglang-generate")
        try:
            futures = [executor.submit(request, index) for index in range(len(prompts))]
            for future in concurrent.futures.as_completed(futures):
                yield future.result()
        finally:
            # On an error (or a caller that stops early) the queued requests are dropped; those in flight end
            # on their own (the server finishes them), their threads exit and drop their clients.
            executor.shutdown(wait=False, cancel_futures=True)

    def _parse_generation(self, index: int, prompt: list[int], out: dict, sampling: dict) -> Generation:
        meta_info = out["meta_info"]
        finish_reason = checked_finish_reason(meta_info, self.url, index)
        logprobs, logprob_ids = logprob_values(meta_info["output_token_logprobs"], self.url, "output")
        token_ids = [int(t) for t in out["output_ids"]]
        if logprob_ids != token_ids:
            raise RuntimeError(f"SGLang server {self.url} /generate request {index}: output_token_logprobs name "
                               f"tokens {logprob_ids[:8]}... but output_ids are {token_ids[:8]}...")
        text = out.get("text", "")
        # SGLang checks the length limit before stop tokens and strings (schedule_batch.py Req.check_finished), so a
        # response whose last allowed token stops it comes back as "length"; the contract calls it "stop" (it is
        # complete, not truncated). The matched stop string stays in the text (no_stop_trim).
        if finish_reason == "length" and token_ids and (token_ids[-1] in sampling["stop_token_ids"]
                                                        or any(text.endswith(stop) for stop in sampling["stop"])):
            finish_reason = "stop"
        return Generation(prompt_ids=prompt, token_ids=token_ids, logprobs=logprobs, finish_reason=finish_reason,
                          text=text)

    def compute_logprobs(self, prompt_ids: Sequence[Sequence[int]], response_ids: Sequence[Sequence[int]],
                         temperature: float) -> list[list[float]]:
        if len(prompt_ids) != len(response_ids):
            raise ValueError(f"compute_logprobs got {len(prompt_ids)} prompts but {len(response_ids)} responses")
        # 0 (greedy) is scored at temperature 1, like generate's greedy log-probs.
        if temperature not in (0.0, 1.0):
            raise ValueError(
                f"compute_logprobs(temperature={temperature}): SGLang 0.5.23 returns prompt log-probs at "
                "temperature 1 only (log_softmax of the raw logits); use temperature 1.0 or the actor"
            )
        self._check_serving("compute_logprobs")
        if not prompt_ids:
            return []
        if any(not prompt for prompt in prompt_ids):
            raise ValueError("compute_logprobs: every prompt needs at least one token")
        sequences = [list(p) + list(r) for p, r in zip(prompt_ids, response_ids)]
        # Entry k of input_token_logprobs is token logprob_start_len + k; entry 0 has no log-prob (None), so
        # starting at the last prompt token makes entries 1.. the response tokens.
        starts = [len(p) - 1 for p in prompt_ids]
        payload = {
            "input_ids": sequences,
            "sampling_params": {"max_new_tokens": 0, "temperature": 1.0},
            "return_logprob": True,
            "logprob_start_len": starts,
        }
        outputs = check_batch(self._client.post("/generate", payload, timeout_s=self.config.generate_timeout_s),
                               len(sequences), self.url)
        result = []
        for i, (out, response) in enumerate(zip(outputs, response_ids)):
            entries = out["meta_info"]["input_token_logprobs"]
            if len(entries) != len(response) + 1:
                raise RuntimeError(f"SGLang server {self.url} /generate request {i}: {len(entries)} input log-probs "
                                   f"for a {len(response)}-token response (expected {len(response) + 1})")
            values, ids = logprob_values(entries[1:], self.url, "input")
            if ids != [int(t) for t in response]:
                raise RuntimeError(f"SGLang server {self.url} /generate request {i}: input log-probs name tokens "
                                   f"{ids[:8]}... but the response is {list(response)[:8]}...")
            result.append(values)
        return result

    # -- memory ----------------------------------------------------------------------------------------

    def release_memory(self) -> None:
        if not self.config.colocated:
            raise RuntimeError(f"release_memory on {self.url}: only colocated servers (--enable-memory-saver) "
                               "release memory; set rollout.sglang.colocated=true")
        for tag in RELEASE_ORDER:
            if tag not in self._released:
                self._post_memory("/release_memory_occupation", [tag])
                self._released.add(tag)

    def resume_memory(self) -> None:
        self.resume_weights()
        self.resume_kv_cache()

    def resume_weights(self) -> None:
        self._resume(RESUME_WEIGHTS)

    def resume_kv_cache(self) -> None:
        if "weights" in self._released:
            raise RuntimeError(f"SGLang server {self.url}: resume the weights before the KV cache")
        self._resume(RESUME_KV_CACHE)

    def _resume(self, tags: tuple[str, ...]) -> None:
        # SGLang raises KeyError for a tag it has not released, so only released ones are resumed.
        released = [tag for tag in tags if tag in self._released]
        if released:
            self._post_memory("/resume_memory_occupation", released)
            self._released -= set(released)

    def _post_memory(self, endpoint: str, tags: list[str]) -> None:
        # Not retried: a second release/resume of a tag the server already handled fails inside SGLang.
        self._client.post(endpoint, {"tags": tags}, timeout_s=self.config.control_timeout_s, retry=False)

    def flush_cache(self) -> None:
        # SGLang refuses (HTTP 400) while requests are running; the client raises with its message.
        self._client.post("/flush_cache", {}, timeout_s=self.config.control_timeout_s)

    def shutdown(self) -> None:
        self._client.close()
