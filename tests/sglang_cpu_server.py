"""A CPU stand-in for an SGLang 0.5.23 server: a real HF model served through ``TorchEngine`` over SGLang's
HTTP API, for end-to-end tests of ``megatron_zero/rollout/sglang_engine.py`` without a GPU.

Why: the fake in tests/test_sglang_engine.py checks request shapes against a toy "model"; this one serves a real
checkpoint, so generations, log-probs and the disaggregated weight sync (``/init_weights_update_group`` +
``/update_weights_from_distributed``, over gloo here instead of NCCL) can be compared with an independent
computation. Requests are judged by the pinned wheel's own contract (tests/sglang_contract.py; the wheel is installed
without its CUDA dependencies and this script exits naming the install line without it): /generate bodies by
``sglang/api/v1/api_types.py`` (unknown top-level fields ignored, unknown sampling fields HTTP 400), the other
requests by the fields of their io_struct classes (unknown ignored, a missing required one HTTP 400, as FastAPI's
validation error is answered in 0.5.23). Status codes and response shapes follow sglang/srt/entrypoints/http_server.py.

How::

    python tests/sglang_cpu_server.py --model-path DIR --host 127.0.0.1 --port 30000 --dtype float32 \
        --enable-deterministic-inference [--ignore-weight-updates]

``--ignore-weight-updates`` receives broadcast weights but does not load them: a negative control, a server
whose weight sync silently does nothing. The other flags ``launch_server_command`` emits are accepted and
ignored (they concern GPU memory and caching, which have no meaning here).

Behaviour that follows SGLang 0.5.23 (checked in its source), including what a trainer gets wrong today:
- Starting: the HTTP port answers at once, GET /health, /health_generate and /ready with 503 until the model is
  loaded (ServerStatus.Starting), every other request 503 too; then /health runs a one-token generation like
  /health_generate (SGLANG_ENABLE_HEALTH_ENDPOINT_GENERATION defaults on) and /ready answers 200.
- Weights arrive only inside a session: /update_weights_from_distributed (and _from_tensor) outside
  /begin_weight_update .. /end_weight_update is refused (HTTP 400, SGLang's message), as is a second begin.
- Released weights are gone: /release_memory_occupation with "weights" (without --enable-weights-cpu-backup)
  discards them; after the resume the parameters hold noise until a weight update re-sends them, so a trainer that
  skips the re-sync serves garbage, which the engine-vs-actor health check catches.
- /flush_cache refuses (HTTP 400) while a /generate request is running or waiting, unless ``?timeout=`` lets it
  wait for idle (flush_wrapper.py).
- temperature < 1e-6 is greedy (SGLang: temperature 1, top_k 1), so greedy log-probs are at temperature 1;
  input (prompt) log-probs are always at temperature 1.
- A request stops at its stop_token_ids and, unless ``ignore_eos``, at the eos ids of config.json,
  generation_config.json and the tokenizer; ``ignore_eos`` disables stop tokens altogether (as SGLang's
  ``_check_token_based_finish`` does). Length is checked first: a response that reaches max_new_tokens finishes
  with "length" even if its last token is a stop token or completes a stop string (our ``TorchEngine`` and the
  contract of rollout/engine.py call that "stop").
- ``sampling_seed`` is honoured only with --enable-deterministic-inference, where a request without one uses
  seed 42 (sampling_batch_info.py); without the flag every request samples with a fresh random seed.
- ``no_stop_trim`` false trims the matched stop string (or the matched stop token) from ``text`` only.
- ``sampling_params`` is one dict for the batch or a list with one per prompt (our client sends a list, each
  prompt with a seed of its own); ``logprob_start_len`` likewise an int or a list.
- ``logprob_start_len`` -1 means output log-probs only; k >= 0 returns input log-probs from position k, the first
  entry ``[None, ids[k], None]``.

Differences from real SGLang the lead should know:
- Sampling uses TorchEngine's sampler (inverse CDF with its own seeded uniforms), not SGLang's; for one seed the
  tokens differ from a real server's, but the same prompt and seed give the same tokens.
- Requests run one at a time under one lock (no continuous batching, no radix cache: ``cached_tokens`` is 0).
- Errors SGLang does not answer as HTTP 400 are answered 400 here with a message: a known SGLang field this
  stand-in does not implement, a negative token id,
  logprob_start_len beyond the prompt (SGLang: an aborted request), /generate while "weights" or "kv_cache" is
  released (SGLang: undefined, the memory is gone), resuming a tag that is not released (SGLang: KeyError in the
  scheduler), /update_weights_from_distributed on a group never created (SGLang: assertion in the scheduler).
- An unexpected failure inside a request is answered 500 with {"error": {"message": ...}} (not retried by
  our client), where SGLang would log it and usually abort the request.
- /health and /health_generate answer 503 while the weights are released (SGLang would touch freed memory).
- A weight update is checked as a whole (names, shapes) after all broadcasts are received and loads nothing if any
  tensor is bad; SGLang loads tensor by tensor and may leave the weights partly updated.
- ``--tp-size N``: as in SGLang, TP rank i joins a weight group as rank ``rank_offset + i`` and receives every
  broadcast in full (a real rank then loads its shard); here the N ranks are threads of one process, each with a
  gloo backend of its own on the group's store keys (torch registers one group name once per process), and the
  served model is one unsharded copy, loaded after the ranks' copies were checked equal. Groups of a tp > 1
  stand-in are gloo only.
- ``--dtype`` float16/half is refused (TorchEngine supports float32 and bfloat16 only).
- /update_weights_from_tensor checks its entries are base64 (as the server's Base64Bytes does) and then refuses
  with 400: CUDA IPC handles need a GPU.
- No default torch.distributed group: SGLang's model runner asserts one exists, but torch 2.13's
  ``_new_process_group_helper`` builds a group from a TCP rendezvous without it (checked), so none is created.
"""

from __future__ import annotations

import argparse
import base64
import binascii
import concurrent.futures
import dataclasses
import datetime
import json
import logging
import sys
import threading
import time
import uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Callable, Optional
from urllib.parse import parse_qs, urlsplit

import sglang_contract
import torch
from test_sglang_engine import NO_SESSION, NO_SESSION_TO_END, SESSION_OPEN, send_answer
from torch.distributed import distributed_c10d as c10d

from megatron_zero.config.rollout import TorchEngineConfig
from megatron_zero.rollout import fp8_weights as fp8_weights_module
from megatron_zero.rollout.engine import SamplingParams
from megatron_zero.rollout.torch_engine import TorchEngine

logger = logging.getLogger(__name__)

# --dtype of sglang/srt/server_args.py -> the TorchEngine dtype ("auto" keeps the float32 of a CPU run).
DTYPES = {"auto": "float32", "float": "float32", "float32": "float32", "bfloat16": "bfloat16"}
# sglang/srt/sampling/sampling_params.py: temperatures below this are greedy.
SAMPLING_EPS = 1e-6
# sglang/srt/sampling/sampling_batch_info.py: the seed of a deterministic request without sampling_seed.
DEFAULT_DETERMINISTIC_SEED = 42
# sglang/srt/managers/io_struct.py defaults.
DEFAULT_GROUP_NAME = "weight_update_group"
DEFAULT_MAX_NEW_TOKENS = 128
# Finite rendezvous and collective timeout of the weight group (SGLang uses torch's default, 30 min for gloo).
GROUP_TIMEOUT = datetime.timedelta(seconds=300)
# The io_struct request class behind each endpoint (http_server.py), whose fields judge its body.
REQUEST_CLASSES = {
    "/update_weights_from_tensor": "UpdateWeightsFromTensorReqInput",
    "/update_weights_from_distributed": "UpdateWeightsFromDistributedReqInput",
    "/init_weights_update_group": "InitWeightsUpdateGroupReqInput",
    "/destroy_weights_update_group": "DestroyWeightsUpdateGroupReqInput",
    "/begin_weight_update": "BeginWeightUpdateReqInput",
    "/end_weight_update": "EndWeightUpdateReqInput",
    "/release_memory_occupation": "ReleaseMemoryOccupationReqInput",
    "/resume_memory_occupation": "ResumeMemoryOccupationReqInput",
}
# Sampling fields of the contract this stand-in implements; the others are refused unless at their default.
SUPPORTED_SAMPLING = {"max_new_tokens", "stop", "stop_token_ids", "temperature", "top_p", "top_k", "no_stop_trim",
                      "ignore_eos", "skip_special_tokens", "sampling_seed"}
# Top-level /generate fields this stand-in reads (rid names the answer); the contract's others must be at their
# defaults (stream, text, top_logprobs_num, return_hidden_states, ...).
SUPPORTED_GENERATE = {"input_ids", "sampling_params", "return_logprob", "logprob_start_len", "rid"}
# Seed of the noise a released-and-resumed parameter holds until it is re-sent.
DISCARDED_WEIGHTS_SEED = 1234


class BadRequest(Exception):
    """Answered HTTP 400 with SGLang's error body (http_server.py: _create_error_response)."""


class Unavailable(Exception):
    """Answered HTTP 503 (SGLang while ServerStatus is Starting)."""


def parse_request(path: str, body: Any) -> dict:
    """``body`` as FastAPI hands it to the handler of ``path``: its io_struct class's fields (unknown ones dropped,
    msgspec_utils.py extra_behavior="ignore"), a missing required one refused like 0.5.23's validation handler."""
    if not isinstance(body, dict):
        raise BadRequest(f"{path}: the request body must be a JSON object, got {type(body).__name__}")
    required, allowed = sglang_contract.request_fields(REQUEST_CLASSES[path])
    missing = sorted(required - set(body))
    if missing:
        raise BadRequest(f"{path}: field(s) {missing} required by {REQUEST_CLASSES[path]} are missing")
    return {name: value for name, value in body.items() if name in allowed}


def check_implemented(body: dict, defaults: dict, supported: set[str], where: str) -> None:
    """Fields of the contract this stand-in does not implement must be absent or at their default."""
    unsupported = sorted(name for name, default in defaults.items()
                         if name not in supported and body.get(name) not in (None, default))
    if unsupported:
        raise BadRequest(f"{where}: {unsupported} are SGLang fields this CPU stand-in does not implement; "
                         "leave them at their defaults")


class CPUServer:
    """The state behind the HTTP handler: the model, its engine and the server's bookkeeping."""

    def __init__(self, model: torch.nn.Module, tokenizer: Any, dtype: str, *, deterministic: bool,
                 ignore_weight_updates: bool, weights_cpu_backup: bool, tp_size: int = 1,
                 fp8_weights: Optional[dict[str, list[torch.Tensor]]] = None):
        self.model = model
        # Started from an FP8 checkpoint: each quantized linear's [FP8 weight, weight_scale_inv], what SGLang's
        # Fp8LinearMethod holds; the model computes with their dequantization. None: an unquantized server.
        self.fp8_weights = fp8_weights
        self.tokenizer = tokenizer
        self.engine = TorchEngine(model, TorchEngineConfig(dtype=dtype, device="cpu"), tokenizer=tokenizer)
        self.vocab_size = model.get_input_embeddings().num_embeddings
        self.deterministic = deterministic
        self.ignore_weight_updates = ignore_weight_updates
        self.weights_cpu_backup = weights_cpu_backup
        # An eos id beyond the model's vocabulary (a tokenizer larger than the model) can never be sampled.
        self.eos_ids = {i for i in eos_token_ids(model, tokenizer) if i < self.vocab_size}
        self.weight_version = "default"  # server_args.weight_version
        self.released: set[str] = set()
        self.tp_size = tp_size
        self.groups: dict[str, list[ServerRank]] = {}
        self.session_open = False
        # /generate requests received and not yet answered (running or waiting for the lock): /flush_cache refuses.
        self.active_requests = 0
        self.idle = threading.Condition()
        # TorchEngine is not thread-safe; requests, weight loads and memory calls run one at a time.
        self.lock = threading.Lock()

    # -- /generate -------------------------------------------------------------------------------------

    def generate(self, body: Any) -> Any:
        with self.idle:
            self.active_requests += 1
        try:
            return self._generate(body)
        finally:
            with self.idle:
                self.active_requests -= 1
                self.idle.notify_all()

    def _generate(self, body: Any) -> Any:
        api = sglang_contract.api_types()
        # entrypoints/api_contract.py: the schema's own error text, HTTP 400 {"error": text}.
        try:
            api.GenerateRequest.from_json_value(body)
        except api.JsonContractError as e:
            raise BadRequest(str(e)) from e
        check_implemented(body, sglang_contract.struct_defaults(api.GenerateRequest), SUPPORTED_GENERATE, "/generate")
        batch = body.get("input_ids")
        if not isinstance(batch, list) or not batch:
            raise BadRequest("/generate: input_ids must be a non-empty list of token ids or of token-id lists "
                             "(this stand-in takes no text)")
        single = not isinstance(batch[0], list)
        prompts = [batch] if single else batch
        for index, ids in enumerate(prompts):
            if not isinstance(ids, list) or not ids or not all(isinstance(t, int) for t in ids):
                raise BadRequest(f"/generate: input_ids[{index}] must be a non-empty list of integers")
            if max(ids) >= self.vocab_size:
                # tokenizer_manager.py: _validate_input_ids_in_vocab
                raise BadRequest(f"The input_ids {ids} contains values greater than the vocab size "
                                 f"({self.vocab_size}).")
            if min(ids) < 0:
                raise BadRequest(f"The input_ids {ids} contains negative values.")
        # One dict for the whole batch or a list with one per prompt (io_struct.py GenerateReqInput).
        sampling = body.get("sampling_params") or {}
        if isinstance(sampling, list):
            if len(sampling) != len(prompts):
                raise BadRequest(f"/generate: {len(sampling)} sampling_params for {len(prompts)} prompts")
            samplings = [self._sampling(entry) for entry in sampling]
        else:
            samplings = [self._sampling(sampling)] * len(prompts)
        starts = body.get("logprob_start_len", -1)
        starts = starts if isinstance(starts, list) else [starts] * len(prompts)
        if len(starts) != len(prompts) or not all(isinstance(s, int) and s >= -1 for s in starts):
            raise BadRequest(f"/generate: logprob_start_len={body.get('logprob_start_len')!r} must be an integer "
                             f">= -1 or a list of {len(prompts)} of them")
        for ids, start in zip(prompts, starts):
            if start > len(ids):
                raise BadRequest(f"req.logprob_start_len={start} is higher than the number of input tokens "
                                 f"len(req.origin_input_ids)={len(ids)}. Please use a smaller logprob_start_len.")
        rids = body.get("rid")
        rids = rids if isinstance(rids, list) else [rids] * len(prompts)
        return_logprob = bool(body.get("return_logprob", False))
        with self.lock:
            self._check_memory("/generate")
            outputs = [self._generate_one(ids, sampling, start, rid, return_logprob)
                       for ids, sampling, start, rid in zip(prompts, samplings, starts, rids)]
        return outputs[0] if single else outputs

    def _sampling(self, sampling: Any) -> dict:
        defaults = sglang_contract.struct_defaults(sglang_contract.api_types().SamplingParams)
        check_implemented(sampling, defaults, SUPPORTED_SAMPLING, "/generate sampling_params")
        # sampling_params.py: SamplingParams.__init__ defaults and verify().
        parsed = {
            "temperature": sampling.get("temperature", 1.0), "top_p": sampling.get("top_p", 1.0),
            "top_k": sampling.get("top_k") if sampling.get("top_k") is not None else -1,
            "max_new_tokens": sampling.get("max_new_tokens", DEFAULT_MAX_NEW_TOKENS),
            "stop": sampling.get("stop") or [], "stop_token_ids": sampling.get("stop_token_ids") or [],
            "no_stop_trim": sampling.get("no_stop_trim", False), "ignore_eos": sampling.get("ignore_eos", False),
            "skip_special_tokens": sampling.get("skip_special_tokens", True), "seed": sampling.get("sampling_seed"),
        }
        if isinstance(parsed["stop"], str):
            parsed["stop"] = [parsed["stop"]]
        if parsed["temperature"] < 0:
            raise BadRequest(f"temperature must be non-negative, got {parsed['temperature']}.")
        if not 0.0 < parsed["top_p"] <= 1.0:
            raise BadRequest(f"top_p must be in (0, 1], got {parsed['top_p']}.")
        if parsed["top_k"] < 1 and parsed["top_k"] != -1:
            raise BadRequest(f"top_k must be -1 (disable) or at least 1, got {parsed['top_k']}.")
        if not isinstance(parsed["max_new_tokens"], int) or parsed["max_new_tokens"] < 0:
            raise BadRequest(f"max_new_tokens must be at least 0, got {parsed['max_new_tokens']}.")
        bad_stop_ids = [t for t in parsed["stop_token_ids"] if not (isinstance(t, int) and 0 <= t < self.vocab_size)]
        if bad_stop_ids:
            raise BadRequest(f"stop_token_ids {bad_stop_ids} are outside the vocabulary [0, {self.vocab_size})")
        return parsed

    def _check_memory(self, where: str) -> None:
        released = sorted(self.released & {"weights", "kv_cache"})
        if released:
            raise BadRequest(f"{where}: memory {released} is released (/release_memory_occupation); "
                             "call /resume_memory_occupation first")

    def _generate_one(self, ids: list[int], sampling: dict, start: int, rid: Optional[str],
                      return_logprob: bool) -> dict:
        started = time.perf_counter()
        max_new_tokens = sampling["max_new_tokens"]
        output_ids: list[int] = []
        output_logprobs: list[float] = []
        finish: dict = {"type": "length", "length": max_new_tokens}
        if max_new_tokens > 0:
            output_ids, output_logprobs, finish = self._sample(ids, sampling)
        text = self._text(output_ids, finish, sampling)
        meta_info = {
            "id": rid if rid is not None else uuid.uuid4().hex, "finish_reason": finish, "prompt_tokens": len(ids),
            "weight_version": self.weight_version, "total_retractions": 0,
        }
        if return_logprob:
            # Tuples (logprob, token_id, text); text is None without return_text_in_logprobs.
            meta_info["input_token_logprobs"] = self._input_logprobs(ids, start)
            meta_info["output_token_logprobs"] = [[lp, t, None] for lp, t in zip(output_logprobs, output_ids)]
            meta_info["output_token_logprobs_length"] = len(output_ids)
        meta_info.update({"reasoning_tokens": 0, "completion_tokens": len(output_ids), "cached_tokens": 0,
                          "e2e_latency": time.perf_counter() - started})
        return {"text": text, "output_ids": output_ids, "meta_info": meta_info}

    def _sample(self, ids: list[int], sampling: dict) -> tuple[list[int], list[float], dict]:
        stop_ids = () if sampling["ignore_eos"] else tuple(sorted(set(sampling["stop_token_ids"]) | self.eos_ids))
        seed = None
        if self.deterministic:
            seed = sampling["seed"] if sampling["seed"] is not None else DEFAULT_DETERMINISTIC_SEED
        params = SamplingParams(
            temperature=0.0 if sampling["temperature"] < SAMPLING_EPS else float(sampling["temperature"]),
            top_p=float(sampling["top_p"]), top_k=int(sampling["top_k"]), max_new_tokens=sampling["max_new_tokens"],
            stop=tuple(sampling["stop"]), stop_token_ids=stop_ids, seed=seed)
        # One prompt per engine call: its random numbers depend only on the seed, like SGLang's seeded sampler.
        generation = self.engine.generate([ids], params)[0]
        tokens = generation.token_ids
        # schedule_batch.py Req.check_finished: length first, then stop tokens, then stop strings.
        if len(tokens) >= sampling["max_new_tokens"]:
            finish = {"type": "length", "length": sampling["max_new_tokens"]}
        elif tokens[-1] in stop_ids:
            finish = {"type": "stop", "matched": tokens[-1]}
        else:
            decoded = self.tokenizer.decode(tokens, skip_special_tokens=True)
            finish = {"type": "stop", "matched": next(stop for stop in sampling["stop"] if stop in decoded)}
        return tokens, generation.logprobs, finish

    def _text(self, output_ids: list[int], finish: dict, sampling: dict) -> str:
        matched = finish.get("matched")
        # detokenizer_manager.py trim_matched_stop: the matched token is left out of the text, the string cut off.
        trim = not sampling["no_stop_trim"] and matched is not None
        ids = output_ids[:-1] if trim and isinstance(matched, int) else output_ids
        text = self.tokenizer.decode(ids, skip_special_tokens=sampling["skip_special_tokens"])
        if trim and isinstance(matched, str) and matched in text:
            text = text[:text.find(matched)]
        return text

    def _input_logprobs(self, ids: list[int], start: int) -> list[list]:
        if start < 0 or start >= len(ids):
            return []
        # Entry 0 has no log-prob (logprob_result_processor.py: [None] + logprobs[:-1]); prompt log-probs are at
        # temperature 1 in 0.5.23 (log_softmax of the raw logits).
        values = self.engine.compute_logprobs([ids[:start + 1]], [ids[start + 1:]], 1.0)[0]
        return [[None, ids[start], None]] + [[lp, t, None] for lp, t in zip(values, ids[start + 1:])]

    def health_generate(self) -> bool:
        with self.lock:
            if "weights" in self.released:
                return False
            self.engine.generate([[0]], SamplingParams(temperature=0.0, max_new_tokens=1))
        return True

    # -- memory ----------------------------------------------------------------------------------------

    def memory(self, path: str, body: Any) -> None:
        body = parse_request(path, body)
        tags_known = sglang_contract.memory_tags()
        # scheduler_components/weight_updater.py: no tags means all of them.
        tags = body.get("tags") or sorted(tags_known)
        unknown = sorted(set(tags) - tags_known)
        if unknown:
            raise BadRequest(f"{path}: unknown memory tag(s) {unknown}; SGLang's are {sorted(tags_known)}")
        with self.lock:
            if path == "/release_memory_occupation":
                self.released |= set(tags)
                if "weights" in tags and not self.weights_cpu_backup:
                    self._discard_weights()
            else:
                missing = sorted(set(tags) - self.released)
                if missing:
                    # SGLang: self.offload_tags.remove(tag) raises KeyError in the scheduler.
                    raise BadRequest(f"KeyError: {missing[0]!r} (memory tag(s) {missing} are not released)")
                self.released -= set(tags)

    def _discard_weights(self) -> None:
        """torch_memory_saver pauses the weights' region without a CPU copy: what a resume maps back is undefined.
        Noise stands for it, so generations after a resume without a re-sync are garbage, as on a GPU."""
        generator = torch.Generator().manual_seed(DISCARDED_WEIGHTS_SEED)
        with torch.no_grad():
            for tensor in self.model.state_dict().values():
                tensor.copy_(torch.randn(tensor.shape, generator=generator).to(tensor.dtype))
        logger.info("released weights discarded (no --enable-weights-cpu-backup): re-send them after the resume")

    # -- weights ---------------------------------------------------------------------------------------

    def weight_session(self, path: str, body: Any) -> tuple[bool, str]:
        """/begin_weight_update and /end_weight_update (scheduler_components/weight_updater.py)."""
        parse_request(path, body)
        begin = path == "/begin_weight_update"
        with self.lock:
            if self.session_open == begin:
                return False, SESSION_OPEN if begin else NO_SESSION_TO_END
            self.session_open = begin
        return True, "Success"

    def update_weights_from_tensor(self, body: Any) -> tuple[bool, str]:
        path = "/update_weights_from_tensor"
        body = parse_request(path, body)
        for entry in body["serialized_named_tensors"]:
            try:  # utils/msgspec_utils.py Base64Bytes: HTTP callers send base64 strings
                base64.b64decode(entry, validate=True)
            except (binascii.Error, TypeError, ValueError) as e:
                raise BadRequest(f"{path}: serialized_named_tensors: Expected base64-encoded bytes ({e})") from e
        if not self.session_open:
            return False, NO_SESSION.format(path.lstrip("/"))
        return False, ("CUDA IPC weight updates need a GPU; this CPU stand-in takes /update_weights_from_distributed "
                       "only")

    def flush_cache(self, timeout_s: float) -> bool:
        """True when no /generate request is running or waiting (after up to ``timeout_s`` of waiting for that)."""
        with self.idle:
            return self.idle.wait_for(lambda: self.active_requests == 0, timeout=timeout_s)

    def init_weights_update_group(self, body: Any) -> tuple[bool, str]:
        body = parse_request("/init_weights_update_group", body)
        group_name = body.get("group_name", DEFAULT_GROUP_NAME)
        backend = body.get("backend", "nccl")
        ranks = [body["rank_offset"] + tp_rank for tp_rank in range(self.tp_size)]
        logger.info("init custom process group: master_address=%s, master_port=%s, ranks=%s, world_size=%d, "
                    "group_name=%s, backend=%s", body["master_address"], body["master_port"], ranks,
                    body["world_size"], group_name, backend)
        try:
            if group_name in self.groups:
                raise ValueError(f"a group named {group_name!r} already exists in this server")
            if ranks[-1] >= body["world_size"]:  # SGLang's TCP rendezvous refuses such a rank
                raise ValueError(f"TP rank {self.tp_size - 1} of this tp_size={self.tp_size} server would be rank "
                                 f"{ranks[-1]} of a world_size={body['world_size']} group")
            self.groups[group_name] = join_as_server_ranks(
                body["master_address"], body["master_port"], ranks, body["world_size"], backend, group_name)
            return True, "Succeeded to initialize custom process group."
        except Exception as e:  # SGLang answers any failure as {"success": false} (model_runner.py)
            message = f"Failed to initialize custom process group: {e}."
            logger.error(message)
            return False, message

    def destroy_weights_update_group(self, body: Any) -> tuple[bool, str]:
        body = parse_request("/destroy_weights_update_group", body)
        ranks = self.groups.pop(body.get("group_name", DEFAULT_GROUP_NAME), None)
        if ranks is None:  # model_runner.py's answer, HTTP 400
            return False, "The group to be destroyed does not exist."
        for server_rank in ranks:
            server_rank.destroy()
        return True, "Succeeded to destroy custom process group."

    def update_weights_from_distributed(self, body: Any) -> tuple[bool, str]:
        path = "/update_weights_from_distributed"
        body = parse_request(path, body)
        if not self.session_open:
            return False, NO_SESSION.format(path.lstrip("/"))
        names, dtypes, shapes = body["names"], body["dtypes"], body["shapes"]
        if not len(names) == len(dtypes) == len(shapes):
            raise BadRequest(f"{path}: {len(names)} names, {len(dtypes)} dtypes and {len(shapes)} shapes")
        if body.get("load_format") is not None:
            raise BadRequest(f"{path}: load_format={body['load_format']!r} is not implemented by this CPU stand-in "
                             "(only per-tensor broadcasts, load_format None)")
        group_name = body.get("group_name", DEFAULT_GROUP_NAME)
        ranks = self.groups.get(group_name)
        if ranks is None:
            raise BadRequest(f"Group {group_name} not in {list(self.groups)}. "
                             "Please call `init_weights_update_group` first.")
        # SGLang's writer lock: no request runs while the weights change.
        with self.lock:
            try:
                received = receive_broadcasts(names, dtypes, shapes, ranks)
                self._check_memory(path)
                if not self.ignore_weight_updates:
                    received, updated_pairs = fold_fp8(received, self.fp8_weights, self.model.dtype)
                    load_into(self.model, received)
                    if self.fp8_weights is not None:
                        self.fp8_weights.update(updated_pairs)
            except Exception as e:  # model_runner.py: update_weights_from_distributed
                message = (f"Failed to update parameter online: {e}. The full weights of the ModelRunner are "
                           "partially updated. Please discard the whole weights.")
                logger.error(message)
                return False, message
        message = "Succeeded to update parameter online."
        if body.get("weight_version") is not None:
            self.weight_version = body["weight_version"]
            message += f" Weight version updated to {self.weight_version}."
        logger.info("received %d tensors%s", len(names), " (ignored)" if self.ignore_weight_updates else "")
        return True, message


def eos_token_ids(model: torch.nn.Module, tokenizer: Any) -> set[int]:
    """The ids SGLang stops at unless ``ignore_eos``: config.json's and generation_config.json's eos_token_id
    (model_config.py _get_hf_eos_token_id) and the tokenizer's (schedule_batch.py _check_token_based_finish)."""
    ids: set[int] = set()
    generation_config = getattr(model, "generation_config", None)
    for value in (getattr(model.config, "eos_token_id", None), getattr(generation_config, "eos_token_id", None),
                  getattr(tokenizer, "eos_token_id", None)):
        if value is not None:
            ids |= {value} if isinstance(value, int) else set(value)
    return ids


def join_custom_process_group(master_address: str, master_port: int, rank: int, world_size: int, backend: str,
                              group_name: str) -> torch.distributed.ProcessGroup:
    """Join a weight-broadcast group as SGLang 0.5.23 does (srt/utils/common.py init_custom_process_group): TCP
    rendezvous (rank 0 hosts the store), the store prefixed with the group name, a group of its own built by
    torch's private helper, and its ranks mapped to themselves so ``broadcast(src=0)`` names the trainer."""
    store, rank, world_size = next(c10d.rendezvous(f"tcp://{master_address}:{master_port}", rank, world_size,
                                                   timeout=GROUP_TIMEOUT))
    store.set_timeout(GROUP_TIMEOUT)
    group, _ = c10d._new_process_group_helper(world_size, rank, [], c10d.Backend(backend),
                                              c10d.PrefixStore(group_name, store), group_name=group_name,
                                              backend_options=None, timeout=GROUP_TIMEOUT, device_id=None)
    c10d._world.pg_group_ranks[group] = {i: i for i in range(world_size)}
    return group


@dataclasses.dataclass
class ServerRank:
    """One TP rank's membership of a weight-broadcast group: how it receives rank 0's broadcast, how it leaves."""

    rank: int
    receive: Callable[[torch.Tensor], Any]  # posts the receive into the tensor, returns the pending work
    destroy: Callable[[], None]


def join_as_server_ranks(master_address: str, master_port: int, ranks: list[int], world_size: int, backend: str,
                         group_name: str) -> list[ServerRank]:
    """Join as every TP rank of this server. One rank takes SGLang's own path (``join_custom_process_group``).
    Several cannot: torch registers a group name once per process and prefixes the group's store keys with it, so
    each rank here builds the gloo backend that path would build, on the same store keys, in a thread of its own
    (the rendezvous completes only when every rank is in)."""
    if len(ranks) == 1:
        group = join_custom_process_group(master_address, master_port, ranks[0], world_size, backend, group_name)
        return [ServerRank(ranks[0], lambda tensor: torch.distributed.broadcast(tensor, src=0, group=group,
                                                                                async_op=True),
                           lambda: torch.distributed.destroy_process_group(group))]
    if backend != "gloo":
        raise ValueError(f"backend {backend!r}: the ranks of a tp_size={len(ranks)} CPU stand-in join gloo groups only")

    def join(rank: int) -> ServerRank:
        store, rank, size = next(c10d.rendezvous(f"tcp://{master_address}:{master_port}", rank, world_size,
                                                 timeout=GROUP_TIMEOUT))
        store.set_timeout(GROUP_TIMEOUT)
        # The keys _new_process_group_helper gives a gloo group named group_name on SGLang's prefixed store.
        keys = c10d.PrefixStore("cpu/", c10d.PrefixStore(f"{group_name}/", c10d.PrefixStore(group_name, store)))
        backend = torch.distributed.ProcessGroupGloo(keys, rank, size, GROUP_TIMEOUT)
        options = torch.distributed.BroadcastOptions()
        options.rootRank = 0
        return ServerRank(rank, lambda tensor: backend.broadcast([tensor], options), lambda: None)

    with concurrent.futures.ThreadPoolExecutor(len(ranks), thread_name_prefix="tp-rank") as pool:
        return list(pool.map(join, ranks))


def receive_broadcasts(names: list[str], dtypes: list[str], shapes: list[list[int]],
                       ranks: list[ServerRank]) -> list[tuple[str, torch.Tensor]]:
    """One broadcast from rank 0 per name, in order, all in flight at once (model_runner.py), on every TP rank;
    the first rank's tensors, after checking every rank got the same."""
    per_rank, handles = [], []
    for server_rank in ranks:
        received = []
        for name, dtype, shape in zip(names, dtypes, shapes):
            tensor = torch.empty(shape, dtype=getattr(torch, dtype))
            # gloo has no float8: received as bytes, as NCCL does (fp8_weights.as_bytes).
            handles.append(server_rank.receive(fp8_weights_module.as_bytes(tensor)))
            received.append((name, tensor))
        per_rank.append(received)
    for handle in handles:
        handle.wait()
    for server_rank, received in zip(ranks[1:], per_rank[1:]):
        for (name, tensor), (_, first) in zip(received, per_rank[0]):
            if not torch.equal(tensor, first):
                raise ValueError(f"server rank {server_rank.rank} received another {name!r} than rank {ranks[0].rank}")
    return per_rank[0]


def fold_fp8(received: list[tuple[str, torch.Tensor]], fp8_weights: Optional[dict[str, list[torch.Tensor]]],
             dtype: torch.dtype) -> tuple[list[tuple[str, torch.Tensor]], dict[str, list[torch.Tensor]]]:
    """What an FP8 server makes of received tensors: ``X.weight`` and ``X.weight_scale_inv`` replace their half
    of X's stored pair, a weight sent in another dtype is cast into the FP8 parameter as SGLang's loader copies it
    (no new scale: the served weight is then wrong, which the health check sees); returns the tensors to load, with
    each touched pair dequantized to ``dtype`` under X's name, and the new pairs (stored once the load succeeded)."""
    if fp8_weights is None:
        return received, {}
    pairs: dict[str, list[torch.Tensor]] = {}
    out = []
    for name, tensor in received:
        base = name.removesuffix(fp8_weights_module.SCALE_SUFFIX)
        if base in fp8_weights:
            pair = pairs.setdefault(base, list(fp8_weights[base]))
            if name == base:
                pair[0] = tensor.to(fp8_weights_module.FP8_DTYPE)
            else:
                pair[1] = tensor.float()
        else:
            out.append((name, tensor))
    out += [(base, fp8_weights_module.dequantize_block_fp8(fp8, scale, dtype)) for base, (fp8, scale) in pairs.items()]
    return out, pairs


def load_fp8_checkpoint(model_path: str, dtype: torch.dtype) -> tuple[torch.nn.Module, dict[str, list[torch.Tensor]]]:
    """The model of an FP8 checkpoint (rollout/fp8_weights.py ``write_fp8_checkpoint``) computing with its
    dequantized weights, and the [FP8 weight, scale] pairs. Loaded by hand: transformers would pick its CUDA-only
    FP8 quantizer from config.json's quantization_config."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from megatron_zero.models.hf_io import HFCheckpointReader

    config = AutoConfig.from_pretrained(model_path)
    delattr(config, "quantization_config")
    model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    reader = HFCheckpointReader(model_path)
    tensors = {name: reader.get(name) for name in reader.names()}
    reader.close()
    pairs = {name: [tensor, tensors.pop(name + fp8_weights_module.SCALE_SUFFIX).float()]
             for name, tensor in list(tensors.items()) if tensor.dtype == fp8_weights_module.FP8_DTYPE}
    for name in pairs:
        tensors.pop(name)
    loaded, _ = fold_fp8(list(tensors.items()) + [(name, fp8) for name, (fp8, _) in pairs.items()], pairs, dtype)
    missing, unexpected = model.load_state_dict(dict(loaded), strict=False)
    tied = {"lm_head.weight"} if getattr(config, "tie_word_embeddings", False) else set()
    if unexpected or set(missing) - tied:
        raise ValueError(f"{model_path}: tensors missing {sorted(set(missing) - tied)[:3]}, unexpected "
                         f"{sorted(unexpected)[:3]}")
    return model, pairs


def load_into(model: torch.nn.Module, received: list[tuple[str, torch.Tensor]]) -> None:
    """Copy HF-named tensors into the model's state_dict, after checking all of them (a bad one loads nothing)."""
    targets = model.state_dict()
    for name, tensor in received:
        if name not in targets:
            raise ValueError(f"the model has no tensor {name!r} (it has {len(targets)}, such as {sorted(targets)[:3]})")
        if tensor.shape != targets[name].shape:
            raise ValueError(f"tensor {name!r} has shape {list(tensor.shape)} but the model's is "
                             f"{list(targets[name].shape)}")
    with torch.no_grad():
        for name, tensor in received:
            targets[name].copy_(tensor)


# --- HTTP -------------------------------------------------------------------------------------------------


class Serving:
    """What the handler serves: None while the model loads (ServerStatus.Starting), then the CPUServer."""

    def __init__(self) -> None:
        self.server: Optional[CPUServer] = None

    def up(self) -> CPUServer:
        if self.server is None:
            raise Unavailable("the server is starting")
        return self.server


def make_handler(serving: Serving) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"  # keep-alive, as uvicorn answers the client's requests.Session

        def log_message(self, format: str, *args: Any) -> None:
            logger.debug("%s " + format, self.address_string(), *args)

        def _send(self, status: int, body: Any = None, text: Optional[str] = None) -> None:
            if not send_answer(self, status, body, text):
                logger.warning("%s: the client closed the connection before the answer", self.path)

        def do_GET(self) -> None:
            path = urlsplit(self.path).path
            if path in ("/health", "/health_generate", "/ready"):
                # http_server.py: an empty Response, 503 while Starting; /health generates like /health_generate.
                server = serving.server
                healthy = server is not None and (path == "/ready" or server.health_generate())
                return self._send(200 if healthy else 503, text="")
            if path == "/flush_cache":  # GET or POST in 0.5.23
                return self._answer(lambda: self._route(path, {}))
            self._send(404, {"detail": "Not Found"})

        def do_POST(self) -> None:
            def route() -> None:
                raw = self.rfile.read(int(self.headers.get("Content-Length", 0)))
                try:
                    body = json.loads(raw) if raw else {}
                except json.JSONDecodeError as e:
                    raise BadRequest(f"{self.path}: the body is not JSON ({e})")
                self._route(urlsplit(self.path).path, body)

            self._answer(route)

        def _answer(self, route) -> None:
            try:
                route()
            except Unavailable as e:
                self._send(503, {"error": {"message": str(e)}})
            except BadRequest as e:
                logger.warning("%s -> 400: %s", self.path, e)
                self._send(400, {"error": {"message": str(e)}})
            except Exception as e:  # an answer instead of a dropped connection, which the client would retry
                logger.exception("%s failed", self.path)
                self._send(500, {"error": {"message": f"{type(e).__name__}: {e}"}})

        def _route(self, path: str, body: Any) -> None:
            server = serving.up()
            if path == "/generate":
                return self._send(200, server.generate(body))
            if path == "/flush_cache":
                # http_server.py: plain text, 400 while requests run or wait (scheduler.py flush_cache).
                timeout = parse_qs(urlsplit(self.path).query).get("timeout", ["0"])[0]
                if not server.flush_cache(float(timeout)):
                    return self._send(400, text="Flush cache failed.\n")
                return self._send(200, text="Cache flushed.\nPlease check backend logs for more details. (When there "
                                            "are running or waiting requests, the operation will not be performed.)\n")
            if path in ("/release_memory_occupation", "/resume_memory_occupation"):
                server.memory(path, body)
                return self._send(200, None)  # the handlers return None: JSON null
            if path in ("/begin_weight_update", "/end_weight_update"):
                success, message = server.weight_session(path, body)
            elif path in ("/init_weights_update_group", "/update_weights_from_distributed",
                          "/destroy_weights_update_group", "/update_weights_from_tensor"):
                success, message = getattr(server, path.lstrip("/"))(body)
            else:
                return self._send(404, {"detail": "Not Found"})
            self._send(200 if success else 400, {"success": success, "message": message})

    return Handler


# --- command line -----------------------------------------------------------------------------------------


def parse_args(argv: Optional[list[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model-path", required=True)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=30000)
    parser.add_argument("--dtype", default="auto")
    parser.add_argument("--tp-size", type=int, default=1)
    parser.add_argument("--enable-deterministic-inference", action="store_true")
    parser.add_argument("--ignore-weight-updates", action="store_true",
                        help="receive broadcast weights but do not load them (negative control)")
    parser.add_argument("--warmup-s", type=float, default=0.0,
                        help="seconds of SGLang's warm-up to stand for after loading (the port answers 503 meanwhile)")
    parser.add_argument("--enable-weights-cpu-backup", action="store_true",
                        help="keep released weights (SGLang copies them to CPU memory and back)")
    # Emitted by launch_server_command; about GPUs, memory and caching, which mean nothing on this CPU server.
    parser.add_argument("--base-gpu-id", type=int)
    parser.add_argument("--mem-fraction-static", type=float)
    parser.add_argument("--enable-memory-saver", action="store_true")
    parser.add_argument("--disable-radix-cache", action="store_true")
    parser.add_argument("--random-seed", type=int)
    parser.add_argument("--context-length", type=int)
    parser.add_argument("--trust-remote-code", action="store_true")
    args = parser.parse_args(argv)
    if args.tp_size < 1:
        parser.error(f"--tp-size {args.tp_size}: a server has at least one TP rank")
    if args.dtype not in DTYPES:
        parser.error(f"--dtype {args.dtype}: the CPU stand-in (TorchEngine) takes one of {sorted(DTYPES)}")
    return args


def build_server(args: argparse.Namespace) -> CPUServer:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    dtype = DTYPES[args.dtype]
    fp8_weights = None
    if fp8_weights_module.is_fp8_checkpoint(args.model_path):
        model, fp8_weights = load_fp8_checkpoint(args.model_path, getattr(torch, dtype))
    else:
        model = AutoModelForCausalLM.from_pretrained(args.model_path, dtype=getattr(torch, dtype))
    tokenizer = AutoTokenizer.from_pretrained(args.model_path)
    return CPUServer(model, tokenizer, dtype, deterministic=args.enable_deterministic_inference,
                     ignore_weight_updates=args.ignore_weight_updates,
                     weights_cpu_backup=args.enable_weights_cpu_backup, tp_size=args.tp_size,
                     fp8_weights=fp8_weights)


def main(argv: Optional[list[str]] = None) -> None:
    logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(asctime)s %(levelname)s %(message)s")
    args = parse_args(argv)
    missing = sglang_contract.missing_reason()
    if missing is not None:
        sys.exit(f"the SGLang CPU stand-in judges requests by the pinned wheel's contract, but {missing}")
    sglang_contract.api_types()  # loaded before the first request thread needs it
    serving = Serving()
    httpd = ThreadingHTTPServer((args.host, args.port), make_handler(serving))
    httpd.daemon_threads = True
    # The port answers (503) while the model loads, as SGLang's does before its warm-up.
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    logger.info("SGLang CPU stand-in starting on http://%s:%d", args.host, args.port)
    server = build_server(args)
    time.sleep(args.warmup_s)
    serving.server = server
    logger.info("SGLang CPU stand-in serving %s on http://%s:%d", args.model_path, args.host, args.port)
    try:
        threading.Event().wait()
    finally:
        httpd.server_close()


if __name__ == "__main__":
    main()
