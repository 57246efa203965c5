"""What one RL step costs per phase and per GPU, measured on the trainer's real components at a real model shape.

Why: users choose layouts and budgets from tokens/s and MFU; those depend on the model's shape, not its weights.
So a random checkpoint of a published shape (``shapes.py``) is trained on one device by the same pieces a
colocated run uses, in one process: the torch rollout engine (``rollout/torch_engine.py``) samples, the grader
pool (``rewards/``) grades, the Megatron actor (``actor/actor.py``, DDP + distributed optimizer) computes old
log-probs and takes one optimizer step (every row has the same length, so padded rows waste nothing and need no
packing mask), and the weight stream (``parallel/reshard.py``) loads the
new weights into the engine. One warm-up step, then ``repeats`` timed steps; each phase's median is reported.

What is measured, per phase:
* generate: response tokens per second (every row decodes exactly ``response_tokens``: no stop token).
* reward: responses graded per second. Random weights write no mathematics, so the grader gets a synthetic set
  of paper-like responses (``graded``: one per sample and step, e.g. tools/bench_rewards.py's mix) instead of
  the engine's text; without one the phase is skipped and every reward is 0 (the train step costs the same).
* logprob / train: seconds, the token positions the model ran (counted from its inputs by ``TokenCounter``), the
  model FLOPs (``DecoderArchitecture.forward_flops`` per row; a train step is forward + backward, 3x) and
  TFLOP/s; MFU against the device's peak (``devices.py``) where one is known or given.
* sync: seconds and GB/s of the whole weight sync (resharding + the engine's load), the resharding alone, and a
  plain on-device copy of the same bytes as the ceiling.
* step: the phases' sum, its prompt + response tokens per second per GPU (as the trainer's
  ``tokens_per_s_per_gpu``) and each phase's share.

How (the CLI is tools/benchmark_throughput.py)::

    result = run_benchmark(BenchmarkSpec(shape="qwen2.5-0.5b", device="cuda"), workdir, graded=(texts, truths))
    print(markdown_table(result))
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import statistics
import time
from pathlib import Path
from typing import Any, Iterator, Optional, Sequence

import torch

from megatron_zero.benchmark.devices import copy_gb_per_s, device_name, memory_bytes, synchronize, table_peak_tflops
from megatron_zero.benchmark.shapes import fit_num_layers, load_shape, parameter_counts, write_random_model
from megatron_zero.config.parallel import ParallelConfig
from megatron_zero.parallel.local_launch import run_local_workers
from megatron_zero.rollout.fp8_weights import encode_bucket

DEVICES = ("auto", "cpu", "cuda")
DTYPES = ("float32", "bfloat16")
PHASES = ("generate", "reward", "logprob", "train", "sync")


@dataclasses.dataclass(frozen=True, kw_only=True)
class BenchmarkSpec:
    # A name of shapes.MODEL_SHAPES or a path to an HF config.json (or a directory holding one).
    shape: str
    # None: the config's layer count, cut to what fits the device (stated in the result).
    num_layers: Optional[int] = None
    # "auto": CUDA when present; "cpu" hides the GPUs from the benchmark's processes.
    device: str = "auto"
    # None: bfloat16 on CUDA, float32 on the CPU (megatron-core's CPU path).
    dtype: Optional[str] = None
    num_prompts: int = 8
    samples_per_prompt: int = 8
    prompt_tokens: int = 64
    response_tokens: int = 128
    max_tokens_per_microbatch: int = 8192
    engine_batch_size: int = 256
    bucket_mb: int = 512
    # Grader processes; 0: one per CPU.
    grader_workers: int = 0
    repeats: int = 1
    # Peak dense TFLOP/s of the device in ``dtype``, for MFU where devices.PEAK_TFLOPS has no entry.
    peak_tflops: Optional[float] = None
    seed: int = 0
    # rollout.quantization: "fp8" syncs block-FP8 linear weights into an engine that runs their dequantization,
    # which measures the sync's bytes and the policy the engine then holds, not FP8 decode speed (that needs
    # SGLang's FP8 kernels; this engine computes in ``dtype`` either way).
    rollout_quantization: Optional[str] = None

    def __post_init__(self) -> None:
        if self.device not in DEVICES:
            raise ValueError(f"device={self.device!r} is unknown; use one of {list(DEVICES)}")
        if self.dtype is not None and self.dtype not in DTYPES:
            raise ValueError(f"dtype={self.dtype!r} is not supported; use one of {list(DTYPES)}")
        for name in ("num_prompts", "samples_per_prompt", "prompt_tokens", "response_tokens", "engine_batch_size",
                     "bucket_mb", "repeats"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}={getattr(self, name)} must be >= 1")
        if self.num_layers is not None and self.num_layers < 1:
            raise ValueError(f"num_layers={self.num_layers} must be >= 1 (or None for the config's, cut to fit)")
        if self.prompt_tokens + self.response_tokens > self.max_tokens_per_microbatch:
            raise ValueError(f"max_tokens_per_microbatch={self.max_tokens_per_microbatch} is below one row of "
                             f"prompt_tokens + response_tokens = {self.prompt_tokens + self.response_tokens}; raise it")
        if self.grader_workers < 0:
            raise ValueError(f"grader_workers={self.grader_workers} must be >= 0 (0: one per CPU)")
        if self.peak_tflops is not None and self.peak_tflops <= 0:
            raise ValueError(f"peak_tflops={self.peak_tflops} must be > 0")

    @property
    def num_rows(self) -> int:
        return self.num_prompts * self.samples_per_prompt

    @property
    def num_graded(self) -> int:
        """Responses the reward phases of the warm-up and the timed steps grade, each step its own."""
        return self.num_rows * (self.repeats + 1)


def resolve_device(requested: str) -> torch.device:
    """The device the benchmark runs on; refuses "cuda" without one before any work."""
    if requested == "cuda" and not torch.cuda.is_available():
        raise ValueError("device='cuda' but torch sees no CUDA device here; use --device cpu (or auto)")
    return torch.device("cuda" if requested != "cpu" and torch.cuda.is_available() else "cpu")


def run_benchmark(spec: BenchmarkSpec, workdir: str | Path,
                  graded: Optional[tuple[Sequence[str], Sequence[str]]] = None, timeout_s: float = 1800.0) -> dict:
    """On one worker: write the random model under ``workdir``, convert it, run the steps; the result dict.

    ``graded``: (responses, ground truths) to grade in the reward phase, ``spec.num_graded`` of each (every
    step, the warm-up too, grades texts of its own).
    """
    from megatron_zero.models.registry import get_bridge

    hf_config = load_shape(spec.shape)
    full_arch = get_bridge(hf_config).parse(hf_config)  # refuses an unsupported config before any work
    if graded is not None and min(len(graded[0]), len(graded[1])) < spec.num_graded:
        raise ValueError(f"graded holds {min(len(graded[0]), len(graded[1]))} responses; the {spec.repeats + 1} "
                         f"steps grade {spec.num_rows} each (num_prompts x samples_per_prompt), give {spec.num_graded}")
    if spec.num_layers is not None and spec.num_layers > full_arch.num_layers:
        raise ValueError(f"num_layers={spec.num_layers} exceeds the shape's num_hidden_layers="
                         f"{full_arch.num_layers}; use at most that")
    device = resolve_device(spec.device)
    dtype = spec.dtype or ("bfloat16" if device.type == "cuda" else "float32")
    device_memory = memory_bytes(device)
    num_layers = spec.num_layers or fit_num_layers(full_arch, dtype, device_memory)
    if num_layers == full_arch.num_layers:
        layers_note = "all layers of the config"
    elif spec.num_layers is not None:
        layers_note = "fewer, as asked (num_layers)"
    else:
        layers_note = (f"cut to fit: the whole model with its optimizer state and the engine's copy would exceed "
                       f"70% of the device's {device_memory / 2**30:.0f} GiB")

    # One worker writes the model, converts it and runs the steps: each spawned process costs seconds of imports.
    # On CPU the spawned worker must not see a GPU (it would build there); the caller's environment is restored.
    hidden = {"CUDA_VISIBLE_DEVICES": ""} if device.type == "cpu" else {}
    with _environment(hidden):
        result = run_local_workers(_benchmark_job, ParallelConfig(), world_size=1,
                                   args=(hf_config, str(workdir), num_layers, spec, dtype, graded),
                                   timeout_s=timeout_s)[0]
    per_layer, outside = parameter_counts(full_arch)
    result["model"] = {"shape": spec.shape, "model_type": full_arch.model_type, "dtype": dtype,
                       "num_layers_config": full_arch.num_layers, "num_layers": num_layers, "layers_note": layers_note,
                       "num_parameters": per_layer * num_layers + outside,
                       "num_parameters_config": per_layer * full_arch.num_layers + outside}
    result["spec"] = dataclasses.asdict(spec)
    return result


# --------------------------------------------------------------------------- the worker


@contextlib.contextmanager
def _timed(seconds: dict[str, float], phase: str, device: torch.device) -> Iterator[None]:
    synchronize(device)
    start = time.perf_counter()
    yield
    synchronize(device)
    seconds[phase] = time.perf_counter() - start


def _benchmark_job(hf_config: dict[str, Any], workdir: str, num_layers: int, spec: BenchmarkSpec, dtype: str,
                   graded: Optional[tuple[Sequence[str], Sequence[str]]]) -> dict:
    """Worker: write and convert the random model, build engine, actor and grader, run the warm-up and the timed
    steps; return the measurements."""
    from megatron_zero.actor.actor import MegatronActor
    from megatron_zero.config.actor import ActorConfig
    from megatron_zero.config.algorithm import PolicyLossConfig
    from megatron_zero.config.model import ModelConfig
    from megatron_zero.config.rollout import TorchEngineConfig
    from megatron_zero.models.mcore_checkpoint import convert_hf_to_mcore, read_checkpoint_info
    from megatron_zero.parallel.init import compute_device
    from megatron_zero.rollout.torch_engine import TorchEngine

    hf_dir = str(write_random_model(hf_config, Path(workdir) / "hf", num_layers=num_layers, dtype=dtype,
                                    seed=spec.seed))
    mcore_dir = str(Path(workdir) / "mcore")
    convert_hf_to_mcore(hf_dir, mcore_dir)
    device = compute_device()
    engine = TorchEngine.from_pretrained(hf_dir, quantization=spec.rollout_quantization,
                                         config=TorchEngineConfig(max_batch_size=spec.engine_batch_size, dtype=dtype,
                                                                   device=str(device)))
    actor_config = ActorConfig(lr=1e-6, temperature=1.0, max_tokens_per_microbatch=spec.max_tokens_per_microbatch,
                               pack_sequences=False)
    actor = MegatronActor(actor_config, PolicyLossConfig(kl_coef=0.0), ModelConfig(params_dtype=dtype), mcore_dir)
    info = read_checkpoint_info(mcore_dir)
    with contextlib.ExitStack() as stack:
        grader = None
        if graded is not None:
            from megatron_zero.config.reward import RewardConfig
            from megatron_zero.rewards import GraderPool

            grader = stack.enter_context(GraderPool(RewardConfig(num_workers=spec.grader_workers or None)))
        step = _RLStep(engine, actor, grader, graded, info, spec, device)
        steps = [step.run(version) for version in range(1, spec.repeats + 2)][1:]  # the first is warm-up
    return summarise(steps, spec, info.arch, device, dtype)


class _RLStep:
    """One colocated RL step on one device, phase by phase as the trainer's loop runs it."""

    def __init__(self, engine, actor, grader, graded, info, spec: BenchmarkSpec, device: torch.device) -> None:
        self.engine, self.actor, self.grader, self.info, self.spec, self.device = (engine, actor, grader, info,
                                                                                   spec, device)
        # Each step grades responses of its own: the grader's workers cache parsed answers, so grading the same
        # texts again would measure the cache.
        self.graded = graded

    def run(self, version: int) -> dict[str, Any]:
        """Timings and counts of one step; ``version`` numbers the weight sync and seeds the prompts."""
        from megatron_zero.actor.advantages import compute_advantages
        from megatron_zero.config.algorithm import AdvantageConfig
        from megatron_zero.data.rollout_batch import RolloutBatch, RolloutSample
        from megatron_zero.parallel.reshard import HFWeightStream
        from megatron_zero.rollout.engine import SamplingParams

        spec, actor, seconds = self.spec, self.actor, {}
        out: dict[str, Any] = {"seconds": seconds}
        generator = torch.Generator().manual_seed(spec.seed + version)
        prompts = torch.randint(0, self.info.arch.vocab_size, (spec.num_prompts, spec.prompt_tokens),
                                generator=generator)
        rows = prompts.repeat_interleave(spec.samples_per_prompt, dim=0).tolist()
        params = SamplingParams(temperature=1.0, max_new_tokens=spec.response_tokens, seed=spec.seed + version)
        with _timed(seconds, "generate", self.device):
            generations = self.engine.generate(rows, params)
        out["generated_tokens"] = sum(len(g.token_ids) for g in generations)

        responses, truths = [""] * spec.num_rows, [""] * spec.num_rows
        scores = [0.0] * spec.num_rows  # no grader: every reward 0, zero advantages, the same compute
        if self.grader is not None:
            rows_of_step = slice((version - 1) * spec.num_rows, version * spec.num_rows)
            responses, truths = list(self.graded[0][rows_of_step]), list(self.graded[1][rows_of_step])
            with _timed(seconds, "reward", self.device):
                grades = self.grader.grade_batch(responses, truths)
            scores, out["grade_counts"] = grades.scores, grades.counts
        rollout = RolloutBatch([
            RolloutSample(group=i // spec.samples_per_prompt, uid=str(i // spec.samples_per_prompt), prompt_ids=row,
                          response_ids=g.token_ids, rollout_logprobs=g.logprobs, finish_reason=g.finish_reason,
                          prompt_text="", response_text=responses[i], ground_truth=truths[i],
                          reward=scores[i])
            for i, (row, g) in enumerate(zip(rows, generations))])
        batch = rollout.to_actor_batch()
        out["lengths"] = batch.lengths.tolist()

        counted = actor.tokens.num_tokens
        with _timed(seconds, "logprob", self.device):
            old_logp, _ = actor.compute_logprobs(batch)
        out["logprob_model_tokens"] = actor.tokens.num_tokens - counted
        advantages = compute_advantages(rollout.rewards(), rollout.group_ids(), batch.response_mask,
                                        AdvantageConfig(), rollout.truncated())
        train_batch = dataclasses.replace(batch, old_logp=old_logp, advantages=advantages.advantages_NT,
                                          response_mask=advantages.loss_mask_NT)
        counted = actor.tokens.num_tokens
        with _timed(seconds, "train", self.device):
            out["train_metrics"] = actor.train_step(train_batch, max_response_length=rollout.max_response_length())
        out["train_model_tokens"] = actor.tokens.num_tokens - counted

        stream = HFWeightStream(actor.model, self.info.arch, self.info.bridge, bucket_bytes=spec.bucket_mb * 2**20)
        with _timed(seconds, "sync", self.device):
            engine_stats = self.engine.sync_weights((encode_bucket(bucket, spec.rollout_quantization)
                                                     for bucket in stream), version=version)
        # num_bytes: what the engine received (FP8 and scales under rollout_quantization), the resharding moved
        # the actor's own bytes.
        out["sync"] = {"num_bytes": engine_stats.num_bytes, "num_buckets": stream.stats.num_buckets,
                       "reshard_seconds": stream.stats.reshard_seconds, "engine_tensors": engine_stats.num_tensors,
                       "resharded_bytes": stream.stats.num_bytes}
        return out


# --------------------------------------------------------------------------- the report


def summarise(steps: list[dict[str, Any]], spec: BenchmarkSpec, arch, device: torch.device, dtype: str) -> dict:
    """The per-phase medians over ``steps`` with their rates, FLOPs and MFU (module docstring)."""
    from megatron_zero.parallel.data_parallel import row_costs

    last = steps[-1]  # every step has the same lengths and counts; the seconds differ
    batch_tokens = sum(last["lengths"])
    forward_flops = float(sum(row_costs(last["lengths"], arch)))
    name = device_name(device)
    entry, table_peak = table_peak_tflops(name, dtype) if device.type == "cuda" else (None, None)
    peak = spec.peak_tflops or table_peak
    seconds = {phase: statistics.median(step["seconds"][phase] for step in steps)
               for phase in PHASES if phase in last["seconds"]}

    def model_phase(phase: str, flops: float, model_tokens: int) -> dict[str, Any]:
        tflops_per_s = flops / seconds[phase] / 1e12
        return {"seconds": seconds[phase], "batch_tokens": batch_tokens, "model_tokens": model_tokens,
                "tokens_per_s": batch_tokens / seconds[phase], "flops": flops, "tflops_per_s": tflops_per_s,
                "mfu": tflops_per_s / peak if peak else None}

    num_bytes = last["sync"]["num_bytes"]
    phases: dict[str, Any] = {
        "generate": {"seconds": seconds["generate"], "prompt_tokens": spec.num_rows * spec.prompt_tokens,
                     "generated_tokens": last["generated_tokens"],
                     "tokens_per_s": last["generated_tokens"] / seconds["generate"]},
        "reward": None,
        "logprob": model_phase("logprob", forward_flops, last["logprob_model_tokens"]),
        "train": {**model_phase("train", 3 * forward_flops, last["train_model_tokens"]),
                  "loss": last["train_metrics"]["loss"], "grad_norm": last["train_metrics"]["grad_norm"]},
        "sync": {"seconds": seconds["sync"], "num_bytes": num_bytes, "num_buckets": last["sync"]["num_buckets"],
                 "gb_per_s": num_bytes / 1e9 / seconds["sync"],
                 "reshard_seconds": statistics.median(step["sync"]["reshard_seconds"] for step in steps),
                 "device_copy_gb_per_s": copy_gb_per_s(num_bytes, device)},
    }
    resharded = last["sync"]["resharded_bytes"]
    phases["sync"]["resharded_bytes"] = resharded
    phases["sync"]["reshard_gb_per_s"] = resharded / 1e9 / phases["sync"]["reshard_seconds"]
    if "reward" in seconds:
        phases["reward"] = {"seconds": seconds["reward"], "responses": spec.num_rows,
                            "responses_per_s": spec.num_rows / seconds["reward"], "counts": last["grade_counts"]}
    step_seconds = sum(seconds.values())
    return {
        "device": {"type": device.type, "name": name, "dtype": dtype, "memory_gib": memory_bytes(device) / 2**30,
                   "peak_tflops": peak, "peak_source": "--peak-tflops" if spec.peak_tflops else entry,
                   "mfu_note": None if peak else "not applicable: no peak TFLOP/s known for this device; give "
                                                 "--peak-tflops"},
        "batch": {"num_rows": spec.num_rows, "prompt_tokens": spec.prompt_tokens,
                  "response_tokens": spec.response_tokens, "num_tokens": batch_tokens,
                  "layout": "padded rows of equal length (no padding, no packing mask)"},
        "phases": phases,
        "step": {"seconds": step_seconds, "num_tokens": batch_tokens,
                 "tokens_per_s_per_gpu": batch_tokens / step_seconds,
                 "share": {phase: value / step_seconds for phase, value in seconds.items()}},
        "seconds_per_step": [step["seconds"] for step in steps],
        "versions": {"torch": torch.__version__, "megatron_core": megatron_core_version()},
        "load_average": os.getloadavg()[0], "cpu_count": os.cpu_count(),
    }


def megatron_core_version() -> str:
    from importlib.metadata import version

    return version("megatron-core")


def markdown_table(result: dict) -> str:
    """The result as a short header and one table row per phase plus the whole step."""
    model, device, phases, step = result["model"], result["device"], result["phases"], result["step"]
    share = step["share"]

    def mfu(phase: dict) -> str:
        return f"{phase['mfu']:.1%}" if phase["mfu"] is not None else "n/a"

    rows = [("generate", f"{phases['generate']['generated_tokens']} response tokens",
             f"{phases['generate']['tokens_per_s']:,.0f} tokens/s", "", "")]
    if phases["reward"] is not None:
        rows.append(("reward", f"{phases['reward']['responses']} responses",
                     f"{phases['reward']['responses_per_s']:,.1f} responses/s", "", ""))
    for name in ("logprob", "train"):
        rows.append((name, f"{phases[name]['batch_tokens']} tokens", f"{phases[name]['tokens_per_s']:,.0f} tokens/s",
                     f"{phases[name]['tflops_per_s']:.3g}", mfu(phases[name])))
    sync = phases["sync"]
    rate = (f"{sync['gb_per_s']:.3g} GB/s (reshard {sync['reshard_gb_per_s']:.3g}, device copy "
            f"{sync['device_copy_gb_per_s']:.3g})")
    rows.append(("sync", f"{sync['num_bytes'] / 1e6:,.1f} MB", rate, "", ""))
    header = (
        f"{model['shape']} ({model['model_type']}): {model['num_layers']} of {model['num_layers_config']} layers "
        f"({model['layers_note']}), {model['num_parameters'] / 1e6:,.1f}M parameters, {model['dtype']}; "
        f"{device['name']}, peak {device['peak_tflops'] or 'n/a'} TFLOP/s ({device['peak_source'] or 'no entry'}); "
        f"{result['batch']['num_rows']} rows of {result['batch']['prompt_tokens']} + "
        f"{result['batch']['response_tokens']} tokens; median of {len(result['seconds_per_step'])} step(s) after one "
        f"warm-up; load average {result['load_average']:.1f} on {result['cpu_count']} CPUs")
    lines = [
        header,
        "",
        "| phase | seconds | share of step | work | rate | TFLOP/s | MFU |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    lines += [f"| {name} | {phases[name]['seconds']:.3f} | {share[name]:.0%} | {work} | {rate} | {tflops} | {m} |"
              for name, work, rate, tflops, m in rows]
    lines.append(f"| step | {step['seconds']:.3f} | 100% | {step['num_tokens']} tokens | "
                 f"{step['tokens_per_s_per_gpu']:,.0f} tokens/s/GPU | | |")
    return "\n".join(lines)


@contextlib.contextmanager
def _environment(values: dict[str, str]):
    """``os.environ`` updated with ``values`` inside the block (for processes spawned there), restored after."""
    saved = {key: os.environ.get(key) for key in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
