"""The embedded rollout engine: an HF transformers causal LM sampled by our own loop over a KV cache.

Why: SGLang needs a GPU. The CPU demo, the tests and debugging runs need an engine with the same contract
(``megatron_zero/rollout/engine.py``) whose numbers can be checked exactly: log-probs come from the very
logits the token was sampled from, stop handling is ours, and weight updates are checked name by name.

How::

    engine = TorchEngine.from_pretrained("ckpt/", TorchEngineConfig(max_batch_size=64), tokenizer=tok)
    gens = engine.generate(prompt_ids, SamplingParams(temperature=1.0, max_new_tokens=40, seed=0))
    engine.sync_weights(buckets_of_hf_named_tensors, version=1)

Sampling: prompts are left-padded into a batch (attention mask + position ids, so padding never changes a
row's numbers; fully masked padding queries give finite outputs with HF's 2D-mask path, checked by the
left-padding tests). One prefill fills a ``transformers.DynamicCache``, then one token per step; finished
rows are dropped from the batch and the cache, and ``generate_stream`` hands each out at the step it finishes
(``generate`` gathers that stream into prompt order). Log-probs are ``log_softmax(logits / T)`` over the model's
full output vocabulary at the sampled token, before top-p/top-k; greedy (T = 0) reports T = 1 log-probs,
in ``generate`` and ``compute_logprobs`` alike. Top-p then top-k are applied to the sorted distribution as
SGLang does (top-p on the untruncated cumulative probabilities).

Seeding: a request's random numbers are one uniform per (prompt, step), drawn row after row from one
generator seeded with ``params.seed``: the same seed and prompts give the same tokens whatever
``max_batch_size`` is, and a prompt's draws depend only on its index in the request.

Stops: a stop token id is kept and ends the row; stop strings are searched in the decoded response after
every token, so the response ends with the token that completes the first match (the match is kept; the
text is always the decode of the kept tokens, so it may run past the stop string within that last token).
Stop takes precedence over length when both happen at the last allowed token.

Memory: ``release_memory`` frees the weights' storage (no KV cache outlives a ``generate`` call or a
``generate_stream`` iterated to its end; a stream resumed after a weight update or release raises), like SGLang
without a CPU backup: after ``resume_memory`` the weights are undefined until a full weight sync, and the
engine refuses to serve until then.
"""

from __future__ import annotations

import inspect
import logging
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Iterator, Optional, Sequence

import torch

from megatron_zero.config.rollout import TorchEngineConfig
from megatron_zero.rollout.engine import Generation, RolloutEngine, SamplingParams, WeightUpdateStats, gather
from megatron_zero.rollout.fp8_weights import FP8_DTYPE, dequantize_bucket, is_quantized_weight, round_trip_fp8_

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

logger = logging.getLogger(__name__)


@dataclass
class _WeightSync:
    """One weight update in progress."""

    version: int
    start: float
    # Tied tensors (one storage under several state_dict names) count as one entry, keyed by their first name.
    received: dict[str, str] = field(default_factory=dict)  # canonical name -> name it was sent as
    stats: WeightUpdateStats = field(default_factory=WeightUpdateStats)


class TorchEngine(RolloutEngine):
    """Rollout engine over an HF causal LM held in this process; see the module docstring."""

    def __init__(self, model: torch.nn.Module, config: TorchEngineConfig = TorchEngineConfig(),
                 tokenizer: Optional["PreTrainedTokenizerBase"] = None, quantization: Optional[str] = None) -> None:
        """``model``: an HF ``*ForCausalLM`` of dtype ``config.dtype``; ``tokenizer`` (an HF tokenizer) is needed
        for ``Generation.text`` and for stop strings. ``quantization="fp8"`` (rollout.quantization): the engine runs
        the weights a block-FP8 engine holds: its linear weights are rounded through FP8 now (as if loaded from the
        model's FP8 checkpoint) and weight updates must send them as FP8 + ``_scale_inv`` (rollout/fp8_weights.py),
        which it dequantizes to its dtype."""
        dtype = getattr(torch, config.dtype)
        model_dtype = next(model.parameters()).dtype
        if model_dtype != dtype:
            raise ValueError(f"the model's weights are {model_dtype} but rollout.torch.dtype={config.dtype!r}; "
                             "load the model in that dtype or change the config")
        self._config = config
        self._device = torch.device(config.device)
        self._model = model.to(self._device).eval().requires_grad_(False)
        if quantization not in (None, "fp8"):
            raise ValueError(f"rollout.quantization={quantization!r} is unknown to the torch engine; use null or 'fp8'")
        self._quantization = quantization
        if quantization == "fp8":
            round_trip_fp8_(self._model)
        self._tokenizer = tokenizer
        self._cache_argument = _cache_argument(model)
        self._vocab_size = model.get_input_embeddings().num_embeddings
        # state_dict names -> tensors; tied weights appear under several names with one tensor object.
        self._targets: dict[str, torch.Tensor] = self._model.state_dict(keep_vars=True)
        first_name_of: dict[int, str] = {}
        self._canonical = {name: first_name_of.setdefault(id(tensor), name) for name, tensor in self._targets.items()}
        self._sync: Optional[_WeightSync] = None
        self._released_shapes: Optional[dict[str, torch.Size]] = None
        # Why the engine cannot serve (weights missing or half-updated); None when it can.
        self._unservable: Optional[str] = None
        # Version of the last completed weight sync; 0: the weights the engine was built with.
        self.weight_version = 0

    @classmethod
    def from_pretrained(cls, model_path: str, config: TorchEngineConfig = TorchEngineConfig(),
                        tokenizer: Optional["PreTrainedTokenizerBase"] = None,
                        quantization: Optional[str] = None) -> "TorchEngine":
        from transformers import AutoModelForCausalLM

        model = AutoModelForCausalLM.from_pretrained(model_path, dtype=getattr(torch, config.dtype))
        return cls(model, config, tokenizer, quantization)

    # --- sampling -----------------------------------------------------------------------------------------

    def generate(self, prompts: Sequence[Sequence[int]], params: SamplingParams) -> list[Generation]:
        return gather(self.generate_stream(prompts, params), len(prompts))

    def generate_stream(self, prompts: Sequence[Sequence[int]],
                        params: SamplingParams) -> Iterator[tuple[int, Generation]]:
        """Each response the moment its row stops (stop token or string), the rest when the chunk reaches
        ``max_new_tokens``; the tokens do not depend on how fast the caller consumes."""
        if params.stop and self._tokenizer is None:
            raise ValueError(f"stop strings {list(params.stop)} need a tokenizer; pass tokenizer= to TorchEngine")
        self._check_token_ids(prompts, "prompt")
        bad_stop_ids = [i for i in params.stop_token_ids if not 0 <= i < self._vocab_size]
        if bad_stop_ids:
            raise ValueError(f"stop_token_ids {bad_stop_ids} are outside the vocabulary [0, {self._vocab_size})")
        self._check_serving()
        generator = None
        if not params.greedy:
            seed = params.seed if params.seed is not None else int(torch.randint(2**62, ()).item())
            generator = torch.Generator().manual_seed(seed)
        # The checks above run at the call; the sampling below runs as the caller iterates.
        return self._stream_chunks([list(p) for p in prompts], params, generator, self.weight_version)

    def _stream_chunks(self, prompts: list[list[int]], params: SamplingParams, generator: Optional[torch.Generator],
                       version: int) -> Iterator[tuple[int, Generation]]:
        for start in range(0, len(prompts), self._config.max_batch_size):
            chunk = prompts[start:start + self._config.max_batch_size]
            uniforms = None
            if generator is not None:
                # Drawn on the CPU generator row by row: chunking does not change a prompt's numbers.
                uniforms = torch.rand(len(chunk), params.max_new_tokens, generator=generator, dtype=torch.float64)
            for row, generation in self._generate_chunk(chunk, params, uniforms, version):
                yield start + row, generation

    @torch.inference_mode()
    def _generate_chunk(self, prompts: list[list[int]], params: SamplingParams, uniforms: Optional[torch.Tensor],
                        version: int) -> Iterator[tuple[int, Generation]]:
        """``(row, generation)`` for each row of the chunk, yielded at the step where the row finishes;
        ``version``: the weight version the stream started with."""
        from transformers import DynamicCache

        self._check_stream(version)
        input_ids, mask = self._left_pad(prompts)
        position_ids = (mask.cumsum(-1) - 1).clamp(min=0)
        cache = DynamicCache(config=self._model.config)
        logits = self._model(input_ids=input_ids, attention_mask=mask, position_ids=position_ids,
                             **{self._cache_argument: cache}, use_cache=True, logits_to_keep=1).logits[:, -1]
        next_position = position_ids[:, -1] + 1
        rows = list(range(len(prompts)))  # request row of each batch row still decoding
        token_ids: list[list[int]] = [[] for _ in prompts]
        logprobs: list[list[float]] = [[] for _ in prompts]
        finish: list[Optional[str]] = [None] * len(prompts)
        stop_ids = set(params.stop_token_ids)
        for step in range(params.max_new_tokens):
            step_uniforms = None if uniforms is None else uniforms[rows, step].to(self._device)
            tokens, token_logprobs = _sample(logits, params, step_uniforms)
            for row, token, logprob in zip(rows, tokens.tolist(), token_logprobs.tolist()):
                token_ids[row].append(token)
                logprobs[row].append(logprob)
                if token in stop_ids:
                    finish[row] = "stop"
            if params.stop:
                # The whole response is decoded each step (a token may complete a string begun several tokens
                # earlier); fine for the short responses this engine serves.
                open_rows = [row for row in rows if finish[row] is None]
                texts = self._tokenizer.batch_decode([token_ids[row] for row in open_rows], skip_special_tokens=True)
                for row, text in zip(open_rows, texts):
                    if any(stop in text for stop in params.stop):
                        finish[row] = "stop"
            last_step = step == params.max_new_tokens - 1
            done = [row for row in rows if finish[row] is not None or last_step]
            texts = (self._tokenizer.batch_decode([token_ids[row] for row in done], skip_special_tokens=True)
                     if self._tokenizer is not None else [""] * len(done))
            # Handed out before the next forward, so the caller can grade them while the other rows decode.
            for row, text in zip(done, texts):
                yield row, Generation(prompt_ids=prompts[row], token_ids=token_ids[row], logprobs=logprobs[row],
                                      finish_reason=finish[row] or "length", text=text)
            keep = [index for index, row in enumerate(rows) if finish[row] is None]
            if not keep or last_step:
                break
            self._check_stream(version)  # the caller ran since the yields above
            if len(keep) < len(rows):
                # Finished rows leave the batch and the cache, so they cost no more compute.
                keep_index = torch.tensor(keep, device=self._device)
                cache.batch_select_indices(keep_index)
                mask, tokens, next_position = mask[keep_index], tokens[keep_index], next_position[keep_index]
                rows = [rows[index] for index in keep]
            mask = torch.cat([mask, mask.new_ones(len(rows), 1)], dim=1)
            logits = self._model(input_ids=tokens[:, None], attention_mask=mask, position_ids=next_position[:, None],
                                 **{self._cache_argument: cache}, use_cache=True).logits[:, -1]
            next_position = next_position + 1

    @torch.inference_mode()
    def compute_logprobs(self, prompt_ids: Sequence[Sequence[int]], response_ids: Sequence[Sequence[int]],
                         temperature: float) -> list[list[float]]:
        if len(prompt_ids) != len(response_ids):
            raise ValueError(f"compute_logprobs got {len(prompt_ids)} prompts but {len(response_ids)} responses")
        if temperature < 0:
            raise ValueError(f"temperature={temperature} must be >= 0 (0 = greedy, scored at temperature 1)")
        self._check_token_ids(prompt_ids, "prompt")
        self._check_token_ids(response_ids, "response", allow_empty=True)
        self._check_serving()
        scale = temperature if temperature > 0 else 1.0
        result: list[list[float]] = []
        for start in range(0, len(prompt_ids), self._config.max_batch_size):
            prompts = [list(p) for p in prompt_ids[start:start + self._config.max_batch_size]]
            responses = [list(r) for r in response_ids[start:start + self._config.max_batch_size]]
            # Prompts left-padded, responses right-padded: every response starts in the same column, so the
            # LM head runs only on the response columns (logits_to_keep).
            prompt_batch, prompt_mask = self._left_pad(prompts)
            num_columns = max(len(r) for r in responses)
            if num_columns == 0:
                result.extend([] for _ in responses)
                continue
            response_batch = torch.zeros(len(responses), num_columns, dtype=torch.long)
            response_mask = torch.zeros(len(responses), num_columns, dtype=torch.long)
            for row, response in enumerate(responses):
                response_batch[row, :len(response)] = torch.tensor(response, dtype=torch.long)
                response_mask[row, :len(response)] = 1
            response_batch, response_mask = response_batch.to(self._device), response_mask.to(self._device)
            input_ids = torch.cat([prompt_batch, response_batch], dim=1)
            mask = torch.cat([prompt_mask, response_mask], dim=1)
            position_ids = (mask.cumsum(-1) - 1).clamp(min=0)
            logits = self._model(input_ids=input_ids, attention_mask=mask, position_ids=position_ids,
                                 logits_to_keep=num_columns + 1).logits[:, :-1]
            logp = torch.log_softmax(logits.float() / scale, dim=-1).gather(-1, response_batch[..., None])[..., 0]
            result.extend(logp[row, :len(response)].tolist() for row, response in enumerate(responses))
        return result

    def _left_pad(self, prompts: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
        """Right-aligned [batch, longest prompt] ids (padding id 0, masked) and the attention mask."""
        width = max(len(p) for p in prompts)
        input_ids = torch.zeros(len(prompts), width, dtype=torch.long)
        mask = torch.zeros(len(prompts), width, dtype=torch.long)
        for row, prompt in enumerate(prompts):
            input_ids[row, width - len(prompt):] = torch.tensor(prompt, dtype=torch.long)
            mask[row, width - len(prompt):] = 1
        return input_ids.to(self._device), mask.to(self._device)

    def _check_token_ids(self, sequences: Sequence[Sequence[int]], what: str, allow_empty: bool = False) -> None:
        for index, sequence in enumerate(sequences):
            if len(sequence) == 0:
                if allow_empty:
                    continue
                raise ValueError(f"{what} {index} is empty; every {what} needs at least one token")
            low, high = min(sequence), max(sequence)
            if low < 0 or high >= self._vocab_size:
                raise ValueError(f"{what} {index} has token id {low if low < 0 else high} outside the model's "
                                 f"vocabulary [0, {self._vocab_size})")

    def _check_stream(self, version: int) -> None:
        """A stream's caller runs between its steps: it must not have changed or released the weights."""
        self._check_serving()
        if self.weight_version != version:
            raise RuntimeError(f"the weights changed (version {version} -> {self.weight_version}) while a "
                               "generate_stream was in progress; finish a stream before syncing weights")

    def _check_serving(self) -> None:
        if self._released_shapes is not None:
            raise RuntimeError("the torch engine's memory is released; call resume_memory() and sync weights first")
        if self._unservable is not None:
            raise RuntimeError(f"the torch engine cannot serve: {self._unservable}")

    # --- weight updates -----------------------------------------------------------------------------------

    def begin_weight_update(self, version: int) -> None:
        if self._released_shapes is not None:
            raise RuntimeError(f"weight update version {version}: the engine's memory is released; "
                               "call resume_memory() first")
        if self._sync is not None:
            logger.warning("weight update version %d abandoned (never finished); starting version %d",
                           self._sync.version, version)
        self._sync = _WeightSync(version=version, start=time.perf_counter())
        self._sync.stats.version = version
        self._unservable = f"weight update version {version} is in progress (finish_weight_update() not called)"

    def update_weights(self, bucket: Sequence[tuple[str, torch.Tensor]]) -> None:
        sync = self._sync
        if sync is None:
            raise RuntimeError("update_weights called outside a weight update; call begin_weight_update() first")
        received_bytes = sum(tensor.numel() * tensor.element_size() for _, tensor in bucket)
        if self._quantization == "fp8":
            bucket = self._dequantized(bucket, sync.version)
        # Check the whole bucket before copying anything, so a bad bucket changes no weight.
        in_bucket: dict[str, torch.Tensor] = {}
        for name, tensor in bucket:
            target = self._targets.get(name)
            if target is None:
                raise ValueError(f"weight update version {sync.version}: unknown tensor {name!r}; the model has "
                                 f"{len(self._targets)} tensors such as {sorted(self._targets)[:3]}")
            if name in sync.stats.names or name in in_bucket:
                raise ValueError(f"weight update version {sync.version}: tensor {name!r} was sent twice")
            if tensor.shape != target.shape or tensor.dtype != target.dtype:
                raise ValueError(f"weight update version {sync.version}: tensor {name!r} is {tensor.dtype} "
                                 f"{tuple(tensor.shape)} but the model holds {target.dtype} {tuple(target.shape)}")
            canonical = self._canonical[name]
            # A tied tensor may arrive under each of its names (lm_head.weight and embed_tokens.weight): the
            # copies must agree, else one of them would be silently lost.
            earlier = next((t for sent, t in in_bucket.items() if self._canonical[sent] == canonical), None)
            if earlier is None and canonical in sync.received:
                earlier = target
            if earlier is not None and not torch.equal(earlier.to(tensor.device), tensor):
                raise ValueError(f"weight update version {sync.version}: {name!r} is tied to {canonical!r} in this "
                                 "model but was sent with different values")
            in_bucket[name] = tensor
        with torch.no_grad():
            for name, tensor in in_bucket.items():
                self._targets[name].copy_(tensor)
                sync.received.setdefault(self._canonical[name], name)
                sync.stats.names.add(name)
                sync.stats.num_tensors += 1
        sync.stats.num_bytes += received_bytes
        sync.stats.num_buckets += 1

    def _dequantized(self, bucket: Sequence[tuple[str, torch.Tensor]], version: int) -> list[tuple[str, torch.Tensor]]:
        """An FP8 bucket in the engine's dtype; a linear weight sent unquantized is refused: the sender forgot to
        quantize, and the engine would silently serve other weights than an FP8 engine."""
        unquantized = [name for name, tensor in bucket if tensor.dtype != FP8_DTYPE and name in self._targets
                       and is_quantized_weight(name, self._targets[name])]
        if unquantized:
            dtype = dict(bucket)[unquantized[0]].dtype
            raise ValueError(f"weight update version {version}: {unquantized[0]!r} arrived as {dtype}, "
                             "but this engine holds FP8 weights (rollout.quantization='fp8'); the sync must "
                             "quantize them (rollout/fp8_weights.py encode_bucket)")
        return dequantize_bucket(bucket, getattr(torch, self._config.dtype))

    def finish_weight_update(self) -> WeightUpdateStats:
        sync = self._sync
        if sync is None:
            raise RuntimeError("finish_weight_update called outside a weight update; call begin_weight_update() first")
        self._sync = None
        missing = sorted(set(self._canonical.values()) - set(sync.received))
        if missing:
            self._unservable = (f"weight update version {sync.version} missed {len(missing)} tensors "
                                f"(e.g. {missing[:5]}); the weights are mixed, run a full weight sync")
            raise RuntimeError(self._unservable)
        sync.stats.seconds = time.perf_counter() - sync.start
        self._unservable = None
        self.weight_version = sync.version
        logger.info("weights version %d: %d tensors, %.1f MB in %d buckets, %.3f s", sync.version,
                    sync.stats.num_tensors, sync.stats.num_bytes / 1e6, sync.stats.num_buckets, sync.stats.seconds)
        return sync.stats

    # --- memory and health --------------------------------------------------------------------------------

    def release_memory(self) -> None:
        if self._sync is not None:
            raise RuntimeError(f"cannot release memory during weight update version {self._sync.version}")
        if self._released_shapes is not None:
            return
        # Parameters are swapped for empty storage in place, so tied modules keep sharing one Parameter.
        parameters = dict(self._model.named_parameters())
        self._released_shapes = {name: parameter.shape for name, parameter in parameters.items()}
        for parameter in parameters.values():
            parameter.data = parameter.data.new_empty(0)
        logger.info("torch engine released its weights (%d tensors)", len(parameters))

    def resume_memory(self) -> None:
        if self._released_shapes is None:
            return
        for name, parameter in self._model.named_parameters():
            parameter.data = parameter.data.new_empty(self._released_shapes[name])
        self._released_shapes = None
        self._unservable = "the weights were released by release_memory(); sync weights after resume_memory()"

    def flush_cache(self) -> None:
        """Nothing to drop: every ``generate`` call (or stream) builds its own KV cache and frees it at its end,
        and a stream refuses to go on after a weight update, so no cached prefix outlives one."""

    def health_check(self) -> None:
        self._check_serving()
        with torch.inference_mode():
            logits = self._model(input_ids=torch.zeros(1, 1, dtype=torch.long, device=self._device)).logits
        if not torch.isfinite(logits).all():
            raise RuntimeError("the torch engine's one-token forward gave non-finite logits; the weights are broken")


def _cache_argument(model: torch.nn.Module) -> str:
    """The name the model's forward takes its KV cache under: transformers 4.x and 5.19 (SGLang 0.5.23's pin)
    call it ``past_key_values``, 5.25 calls it ``cache`` (keeping ``past_key_values`` as a deprecated alias
    until 5.40). A forward swallows a name it does not know in ``**kwargs`` and decodes without the cache,
    silently giving wrong tokens, so the name is read from the signature, never guessed."""
    parameters = inspect.signature(model.forward).parameters
    for name in ("cache", "past_key_values"):
        if name in parameters:
            return name
    import transformers

    raise ValueError(f"{type(model).__name__}.forward (transformers {transformers.__version__}) takes neither "
                     f"'cache' nor 'past_key_values', so the torch engine cannot pass it a KV cache; use a "
                     f"transformers release whose causal LMs take one of them (SGLang 0.5.23 pins 5.19.0)")


def _sample(logits: torch.Tensor, params: SamplingParams,
            uniforms: Optional[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Next tokens [batch] and their log-probs (module docstring's convention) from last-position logits."""
    logits = logits.float()
    if params.greedy:
        tokens = logits.argmax(dim=-1)
        logp = torch.log_softmax(logits, dim=-1)
    else:
        logp = torch.log_softmax(logits / params.temperature, dim=-1)
        tokens = _sample_truncated(logp.exp(), params.top_p, params.top_k, uniforms)
    return tokens, logp.gather(-1, tokens[:, None])[:, 0]


def _sample_truncated(probs: torch.Tensor, top_p: float, top_k: int, uniforms: torch.Tensor) -> torch.Tensor:
    """Inverse-CDF sampling with one uniform per row from the top-p / top-k truncated distribution."""
    order = None
    if top_p < 1 or top_k > 0:
        # Sorting is the costliest step on small models, so it is done only when something is truncated.
        probs, order = probs.sort(dim=-1, descending=True, stable=True)
        if top_p < 1:
            # Keep tokens whose preceding mass is below top_p: the smallest prefix reaching top_p.
            probs = probs.masked_fill(probs.cumsum(-1) - probs > top_p, 0.0)
        if top_k > 0:
            probs[:, top_k:] = 0.0
    cdf = probs.double().cumsum(-1)
    # u < 1 puts the target below the total mass, so the first cdf entry above it is a token of positive
    # probability; the clamp only guards against rounding of the product.
    picks = torch.searchsorted(cdf, (uniforms * cdf[:, -1])[:, None], right=True)[:, 0].clamp(max=cdf.shape[-1] - 1)
    return picks if order is None else order.gather(-1, picks[:, None])[:, 0]
