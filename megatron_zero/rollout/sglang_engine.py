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

How: ``cmd = launch_server_command(cfg)`` (start it with ``launch_server_env()``), then
``engine = SGLangEngine(cfg); engine.wait_until_ready(); engine.generate(prompts, SamplingParams())``.
``launch_server_command`` and ``generate_payload`` are pure (no network): a dry run prints what a run would send.
"""

from __future__ import annotations

import collections
import concurrent.futures
import logging
import sys
import threading
import time
from typing import Iterator, Mapping, Optional, Sequence

import numpy as np
import torch

from megatron_zero.config.sglang import SGLangConfig
from megatron_zero.rollout.engine import FINISH_REASONS, Generation, RolloutEngine, SamplingParams, WeightUpdateStats
from megatron_zero.rollout.fp8_weights import SCALE_SUFFIX, as_bytes
from megatron_zero.rollout.sglang_cpu import CPU_SERVER_ARGS, cpu_server_env
from megatron_zero.rollout.sglang_http import SGLangHTTPClient, SGLangHTTPError

logger = logging.getLogger(__name__)

# Memory tags of sglang/srt/constants.py (GPU_MEMORY_TYPE_*). Release frees the KV cache first (it is the
# largest and the scheduler flushes it on release), resume restores weights first so a weight sync can run
# before the KV cache takes its share again.
RELEASE_ORDER = ("kv_cache", "weights", "cuda_graph")
RESUME_WEIGHTS = ("weights",)
RESUME_KV_CACHE = ("kv_cache", "cuda_graph")
# Name of the NCCL group that /init_weights_update_group creates inside the server.
WEIGHT_GROUP_NAME = "megatron_zero_weights"


class CUDABoundaryError(RuntimeError):
    """Weights were offered for a colocated (CUDA IPC) update from a machine or tensor without CUDA."""


def launch_server_command(config: SGLangConfig, *, on_cpu: bool = False) -> list[str]:
    """The ``python -m sglang.launch_server`` command line for one engine (flags of sglang 0.5.23,
    sglang/srt/arg_groups/fields/). ``on_cpu``: a server on a machine without a GPU (``rollout/sglang_cpu.py``)."""
    command = [
        sys.executable, "-m", "sglang.launch_server",
        "--model-path", config.model_path,
        "--host", config.host,
        "--port", str(config.port),
        "--tp-size", str(config.tp_size),
        "--base-gpu-id", str(config.base_gpu_id),
        "--mem-fraction-static", str(config.mem_fraction_static),
        "--dtype", config.served_dtype(on_gpus=not on_cpu),
    ]
    max_total_tokens = config.served_max_total_tokens(on_gpus=not on_cpu)
    if max_total_tokens is not None:
        command += ["--max-total-tokens", str(max_total_tokens)]
    if on_cpu:
        command += CPU_SERVER_ARGS
    elif config.colocated:
        # /release_memory_occupation and /resume_memory_occupation need torch_memory_saver's allocator (CUDA only:
        # on CPU they flush the cache and keep the weights). No --enable-weights-cpu-backup: released weights are
        # discarded, and every resume is followed by a sync.
        command.append("--enable-memory-saver")
    if config.disable_radix_cache:
        command.append("--disable-radix-cache")
    if config.enable_deterministic_inference:
        command.append("--enable-deterministic-inference")
    if config.random_seed is not None:
        command += ["--random-seed", str(config.random_seed)]
    if config.context_length is not None:
        command += ["--context-length", str(config.context_length)]
    if config.trust_remote_code:
        command.append("--trust-remote-code")
    return command + list(config.extra_server_args)


def launch_server_env(base: Mapping[str, str], *, on_cpu: bool = False) -> dict[str, str]:
    """The environment for the server: ``base`` without SGLANG_RETURN_ORIGINAL_LOGPROB, which would make the
    returned log-probs ignore the temperature and break the contract; on CPU with what ``rollout/sglang_cpu.py``
    adds."""
    env = {key: value for key, value in base.items() if key != "SGLANG_RETURN_ORIGINAL_LOGPROB"}
    return cpu_server_env(env) if on_cpu else env


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


def _logprob_values(entries: list, url: str, what: str) -> tuple[list[float], list[int]]:
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


def _finish_reason(meta_info: dict, url: str, index: int) -> str:
    reason = meta_info.get("finish_reason")
    kind = reason.get("type") if isinstance(reason, dict) else None
    if kind == "abort":
        raise RuntimeError(f"SGLang server {url} /generate aborted request {index}: {reason.get('message')} "
                           f"(status {reason.get('status_code')})")
    if kind not in FINISH_REASONS:
        raise RuntimeError(f"SGLang server {url} /generate request {index} has finish_reason={reason!r}; "
                           f"expected a dict with type in {FINISH_REASONS}")
    return kind


def _check_batch(outputs: object, expected: int, url: str) -> list[dict]:
    if not isinstance(outputs, list) or len(outputs) != expected:
        got = f"{len(outputs)} outputs" if isinstance(outputs, list) else type(outputs).__name__
        raise RuntimeError(f"SGLang server {url} /generate answered a batch of {expected} with {got}")
    return outputs


def serialize_flattened_bucket(named_tensors: Sequence[tuple[str, torch.Tensor]]) -> tuple[str, torch.Tensor]:
    """One bucket as SGLang's "flattened_bucket" payload: a base64 pickled dict holding one uint8 CUDA buffer
    (shared by IPC handle, not copied over HTTP) and each tensor's name, dtype, shape and byte range. On a machine
    without CUDA (the CPU server beside CPU ranks, rollout/sglang_cpu.py) the buffer is a CPU tensor in shared
    memory, which the server opens by name.

    Returns the payload and the buffer: the producer must keep the buffer alive until the server has loaded it,
    so hold it until the request returns.
    """
    off_gpu = [name for name, tensor in named_tensors if not tensor.is_cuda]
    if not torch.cuda.is_available():
        # The default sharing strategy passes a file descriptor over a multiprocessing connection the server never
        # opens (it unpickles an HTTP body): its scheduler then dies ("digest sent was rejected", measured). A
        # file_system handle names a /dev/shm file instead. Process-wide, and only ever set on CPU machines.
        torch.multiprocessing.set_sharing_strategy("file_system")
    elif off_gpu:
        raise CUDABoundaryError(
            f"colocated SGLang weight updates pass CUDA IPC handles, but {len(off_gpu)} tensor(s) are not on a "
            f"CUDA device (first: {off_gpu[0]!r}, CUDA available: {torch.cuda.is_available()}); move the bucket "
            "to the GPU or use sglang.colocated=False (NCCL broadcast)"
        )
    # Imported here: sglang is GPU-only (the gpu extra). These are the classes the server unpickles with.
    from sglang.srt.utils import MultiprocessingSerializer
    from sglang.srt.utils.patch_torch import monkey_patch_torch_reductions
    from sglang.srt.weight_sync.tensor_bucket import FlattenedTensorBucket

    if torch.cuda.is_available():
        # Pickle device UUIDs instead of indices: this process and the server see different CUDA_VISIBLE_DEVICES.
        # (The patch rewrites the device field of CUDA tensors' pickles; a CPU tensor's has none.)
        monkey_patch_torch_reductions()
    # Widest elements first: the server views each tensor's slice of the flat uint8 buffer as its dtype, which
    # needs the slice's offset to be a multiple of the element size; an FP8 bucket mixes 4-byte scales, 2-byte
    # norms and 1-byte weights, and in this order every offset is aligned.
    widest_first = sorted(named_tensors, key=lambda named: -named[1].element_size())
    bucket = FlattenedTensorBucket(named_tensors=widest_first)
    payload = {"flattened_tensor": bucket.get_flattened_tensor(), "metadata": bucket.get_metadata()}
    return MultiprocessingSerializer.serialize(payload, output_str=True), payload["flattened_tensor"]


def wait_first_failure(pending: Mapping[concurrent.futures.Future, str], timeout_s: float, what: str) -> None:
    """Wait for every future of ``pending`` (future -> who answers it); raise the first failure as soon as it comes,
    noting who failed and ``what`` was going on, or a TimeoutError naming who has not answered by ``timeout_s``.

    For requests whose counterpart is a collective: a server that fails its side never joins, and waiting for the
    others would only end at the collective's timeout."""
    pending = dict(pending)
    deadline = time.monotonic() + timeout_s
    while pending:
        done, _ = concurrent.futures.wait(pending, timeout=max(0.0, deadline - time.monotonic()),
                                          return_when=concurrent.futures.FIRST_COMPLETED)
        if not done:
            raise TimeoutError(f"{sorted(pending.values())} did not answer within {timeout_s} s while {what}")
        for future in done:
            who = pending.pop(future)
            try:
                future.result()
            except Exception as error:
                error.add_note(f"from {who} while {what}")
                raise


def broadcast_bucket(bucket: Sequence[tuple[str, torch.Tensor]], group: torch.distributed.ProcessGroup,
                     answers: Sequence[tuple[str, concurrent.futures.Future]], timeout_s: float) -> None:
    """Broadcast ``bucket``'s tensors from rank 0 of ``group``, in order, to the servers whose announcements
    (``post_weights_from_distributed``) are ``answers`` (url, future), and wait for every answer.

    A server that refuses the bucket (HTTP 400) stops receiving, so the answers are watched while the broadcasts
    run and the first refusal is raised at once, naming the server (the group is then unusable: the run stops).
    """
    works = [torch.distributed.broadcast(as_bytes(tensor), src=0, group=group, async_op=True)
             for _, tensor in bucket]
    wait_first_failure({future: url for url, future in answers}, timeout_s,
                       f"broadcasting {[name for name, _ in bucket][:3]}... (sglang.control_timeout_s)")
    for work in works:
        work.wait()


class SGLangEngine(RolloutEngine):
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
        outputs = _check_batch(self._client.post("/generate", payload, timeout_s=self.config.generate_timeout_s),
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
            return index, self._parse_generation(index, prompts[index], _check_batch(outputs, 1, self.url)[0],
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
        finish_reason = _finish_reason(meta_info, self.url, index)
        logprobs, logprob_ids = _logprob_values(meta_info["output_token_logprobs"], self.url, "output")
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
        outputs = _check_batch(self._client.post("/generate", payload, timeout_s=self.config.generate_timeout_s),
                               len(sequences), self.url)
        result = []
        for i, (out, response) in enumerate(zip(outputs, response_ids)):
            entries = out["meta_info"]["input_token_logprobs"]
            if len(entries) != len(response) + 1:
                raise RuntimeError(f"SGLang server {self.url} /generate request {i}: {len(entries)} input log-probs "
                                   f"for a {len(response)}-token response (expected {len(response) + 1})")
            values, ids = _logprob_values(entries[1:], self.url, "input")
            if ids != [int(t) for t in response]:
                raise RuntimeError(f"SGLang server {self.url} /generate request {i}: input log-probs name tokens "
                                   f"{ids[:8]}... but the response is {list(response)[:8]}...")
            result.append(values)
        return result

    # -- weights ---------------------------------------------------------------------------------------

    def begin_weight_update(self, version: int) -> None:
        if self._stats is not None:
            raise RuntimeError(f"weight update {self._stats.version} on {self.url} is still open; "
                               "call finish_weight_update first")
        if "weights" in self._released:
            raise RuntimeError(f"SGLang server {self.url} has released its weights; resume them "
                               "(resume_weights) before a weight update")
        if self._expected_names is None:
            # Imported here: only needed once, and it pulls safetensors readers the serving path never uses.
            from megatron_zero.models.hf_io import HFCheckpointReader

            self._expected_names = frozenset(HFCheckpointReader(self.config.model_path).names())
        self._sync_start = time.perf_counter()
        # SGLang 0.5.23 takes weights only inside a session (scheduler_components/weight_updater.py); it waits for
        # running requests (the model-update writer lock). Not retried: a second begin is refused while one is open.
        self._client.post("/begin_weight_update", {}, timeout_s=self.config.control_timeout_s, retry=False)
        self._stats = WeightUpdateStats(version=version)

    def update_weights(self, bucket: Sequence[tuple[str, torch.Tensor]]) -> None:
        if not self.config.colocated:
            if self.weight_group is None:
                raise RuntimeError(f"rollout.sglang.colocated=False needs a weight_group: call "
                                   f"init_weights_update_group on {self.url}, create this side's group "
                                   "(parallel/weight_broadcast.py), and pass it as SGLangEngine(weight_group=...)")
            broadcast_bucket(bucket, self.weight_group, [(self.url, self.post_weights_from_distributed(bucket))],
                             self.config.control_timeout_s)
            return
        stats = self._check_bucket(bucket)
        # Buckets arrive sized by run.weight_sync_bucket_mb (the ranks' push, or the driver's resharding).
        self._update_from_tensor(bucket)
        stats.num_buckets += 1
        self._record(stats, bucket)

    def post_weights_from_distributed(self, bucket: Sequence[tuple[str, torch.Tensor]]
                                      ) -> concurrent.futures.Future:
        """Announce ``bucket`` to the server (POST /update_weights_from_distributed) and return at once with the
        answer's future; the caller then broadcasts the tensors (``broadcast_bucket``) on the group the server
        joined. Several servers on one group get the same announcement and receive one broadcast."""
        stats = self._check_bucket(bucket)
        payload = {
            "names": [name for name, _ in bucket],
            "dtypes": [str(tensor.dtype).removeprefix("torch.") for _, tensor in bucket],
            "shapes": [list(tensor.shape) for _, tensor in bucket],
            "group_name": WEIGHT_GROUP_NAME,
            "flush_cache": False,
        }
        # The server answers only after it has received every broadcast, which the caller sends meanwhile.
        answer = self._post_in_background("/update_weights_from_distributed", payload)
        stats.num_buckets += 1
        self._record(stats, bucket)
        return answer

    def update_weights_from_ranks(self, bucket: Sequence[tuple[str, torch.Tensor]], per_rank: Sequence[str]) -> None:
        """Colocated update in which server TP rank i opens the buffer of the actor rank on its own GPU:
        ``per_rank[i]`` is that rank's ``serialize_flattened_bucket(bucket)`` (``trainer/weight_push.py``).
        ``bucket`` is this process's copy, for the same name bookkeeping as ``update_weights``."""
        stats = self._check_bucket(bucket)
        self.update_weights_from_serialized(per_rank)
        stats.num_buckets += 1
        self._record(stats, bucket)

    @staticmethod
    def _record(stats: WeightUpdateStats, bucket: Sequence[tuple[str, torch.Tensor]]) -> None:
        for name, tensor in bucket:
            stats.names.add(name)
            stats.num_tensors += 1
            stats.num_bytes += tensor.numel() * tensor.element_size()

    def _check_bucket(self, bucket: Sequence[tuple[str, torch.Tensor]]) -> WeightUpdateStats:
        if self._stats is None:
            raise RuntimeError("update_weights called outside a weight update; call begin_weight_update first")
        names = [name for name, _ in bucket]
        unknown = sorted(set(names) - self._expected_names)
        if unknown:
            raise ValueError(f"weight update for {self.url} names {len(unknown)} tensor(s) the model does not have: "
                             f"{unknown[:5]}")
        repeated = sorted({n for n, count in collections.Counter(names).items() if count > 1}
                          | (set(names) & self._stats.names))
        if repeated:
            raise ValueError(f"weight update version {self._stats.version} sends {repeated[:5]} more than once")
        return self._stats

    def _update_from_tensor(self, chunk: list[tuple[str, torch.Tensor]]) -> None:
        # One serialization per server TP rank, as SGLang 0.5.23's own Engine sends (entrypoints/engine.py
        # _serialize_tensors_per_rank): rank i deserializes only entry i (managers/tp_worker.py
        # deserialize_own_rank), and each serialization registers its own CUDA IPC reference count here, which
        # that one rank's release drops; one payload opened by every rank would drop a single count tp_size times.
        # The flattened_bucket load does not move the buffer (weight_updater._update_weights_from_flattened_bucket):
        # each rank opens it on this process's GPU and its weight loaders copy it onto their own. Each call flattens
        # its own copy of the bucket (tp_size x run.weight_sync_bucket_mb while the request runs).
        per_rank = [serialize_flattened_bucket(chunk) for _ in range(self.config.tp_size)]
        self.update_weights_from_serialized([serialized for serialized, _ in per_rank])
        del per_rank  # the buffers lived until every rank had copied them into its parameters

    def update_weights_from_serialized(self, per_rank: Sequence[str]) -> None:
        """Send one flattened bucket already serialised per TP rank of the server (entry i is opened by rank i).

        ``update_weights`` serializes a buffer of this process for every rank, so with tp_size > 1 ranks read
        across GPUs; a caller whose actor rank i shares GPU i with server rank i can instead gather each
        rank's own ``serialize_flattened_bucket`` and send them here.
        """
        if len(per_rank) != self.config.tp_size:
            raise ValueError(f"got {len(per_rank)} serialized buckets for a tp_size={self.config.tp_size} server")
        payload = {
            "serialized_named_tensors": list(per_rank),
            "load_format": "flattened_bucket",
            # One flush at the end of the sync (finish_weight_update), not one per bucket.
            "flush_cache": False,
        }
        self._client.post("/update_weights_from_tensor", payload, timeout_s=self.config.control_timeout_s)

    def destroy_weights_update_group(self) -> bool:
        """Drop the server's weight-broadcast group, if it still holds one from an earlier trainer (a server started
        by hand outlives a restarted run, and SGLang refuses a new group under a name it holds). True if it had one."""
        try:
            self._client.post("/destroy_weights_update_group", {"group_name": WEIGHT_GROUP_NAME},
                              timeout_s=self.config.control_timeout_s, retry=False)
            return True
        except SGLangHTTPError as error:
            # model_runner.py: (False, "The group to be destroyed does not exist.") -> HTTP 400.
            if error.status == 400 and "does not exist" in str(error):
                return False
            raise

    def init_weights_update_group(self, master_address: str, master_port: int, rank_offset: int,
                                  world_size: int, backend: str = "nccl") -> concurrent.futures.Future:
        """Ask the server to join a weight-broadcast group (its TP rank i becomes rank rank_offset + i).

        Returns at once with a future: the server blocks in the rendezvous until this side joins too, so the
        caller creates its own group (rank 0, same address) and then waits on the future.
        """
        payload = {"master_address": master_address, "master_port": master_port, "rank_offset": rank_offset,
                   "world_size": world_size, "group_name": WEIGHT_GROUP_NAME, "backend": backend}
        return self._post_in_background("/init_weights_update_group", payload)

    def _post_in_background(self, endpoint: str, payload: dict) -> concurrent.futures.Future:
        """POST once (no retry: a repeat fails inside SGLang) from a thread of its own; the answer's future. For
        requests SGLang answers only after this side has done its part of a collective."""
        executor = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="sglang-collective")
        future = executor.submit(self._client.post, endpoint, payload, timeout_s=self.config.control_timeout_s,
                                 retry=False)
        executor.shutdown(wait=False)
        return future

    def finish_weight_update(self) -> WeightUpdateStats:
        if self._stats is None:
            raise RuntimeError("finish_weight_update called without begin_weight_update")
        stats, self._stats = self._stats, None
        # The session closes even when tensors are missing: an open one would refuse the next begin.
        self._client.post("/end_weight_update", {}, timeout_s=self.config.control_timeout_s, retry=False)
        missing = sorted(self._expected_names - stats.names)
        if missing:
            fp8_hint = ("; the server's checkpoint is block-FP8 and its scales were not sent: set "
                        "rollout.quantization=fp8" if all(name.endswith(SCALE_SUFFIX) for name in missing) else "")
            raise RuntimeError(f"weight update version {stats.version} for {self.url} left {len(missing)} tensor(s) "
                               f"of the model stale: {missing[:5]}{fp8_hint}")
        # Cached prefixes hold KV computed with the old weights.
        self.flush_cache()
        stats.seconds = time.perf_counter() - self._sync_start
        logger.info("SGLang %s: weights version %d, %d tensors, %.2f GB in %.2f s (%.2f GB/s)", self.url,
                    stats.version, stats.num_tensors, stats.num_bytes / 1e9, stats.seconds, stats.gb_per_s)
        return stats

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
