"""The experiment config: one YAML file maps onto ``TrainConfig``; ``key.sub=value`` overrides on the CLI.

Each component gets its own sub-config (defined beside the component's other configs in this
package); ``TrainConfig.__post_init__`` adds the checks that need several of them together, and
``check_inputs`` the checks that need files (run before any worker starts).
"""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from megatron_zero.config.actor import ActorConfig
from megatron_zero.config.algorithm import AdvantageConfig, PolicyLossConfig
from megatron_zero.config.cluster import ClusterConfig
from megatron_zero.config.data import DataConfig
from megatron_zero.config.model import ModelConfig
from megatron_zero.config.parallel import ParallelConfig
from megatron_zero.config.reward import RewardConfig
from megatron_zero.config.rollout import RolloutConfig
from megatron_zero.config.sglang import SGLangConfig


# Default engine-vs-actor log-prob gap bounds (mean, max over the step's response tokens, in nats) by the
# precision of the pair; docs/sglang.md gives the reasoning. "fp32": both sides compute in float32 (measured on
# the CPU runs: max 1e-5 - 5e-5, so 1e-3 / 5e-2 leave 20x-1000x room while a stale sync at the demo's learning rate
# shows up at 1e-2 and above). "16bit": either side in bf16/fp16, FP8 GEMMs or FP8 rollout weights; published
# healthy bf16 runs report a mean |gap| of 0.011-0.036 (slime + SGLang, Qwen3-4B, 30 steps) and 0.041 / max 0.10
# (Megatron vs SGLang, bf16), and FP8 rollout weights against a float32 actor measured mean 0.036-0.052, max
# 0.27-0.97 on CPU (docs/benchmarks.md), so the mean bound is 0.1 and the max 2 nats (a token e^2 ~ 7x more or
# less likely than the actor says).
LOGPROB_GAP_BOUNDS = {"fp32": (1e-3, 5e-2), "16bit": (0.1, 2.0)}
_FP32_DTYPES = ("float32", "float", "float64")


@dataclass(kw_only=True, frozen=True)
class HealthConfig:
    """Bounds whose violation stops the run with a clear error (where RL trainers go silently wrong)."""

    # Engine vs actor per-token log-probs of the sampled responses (same weights, same temperature):
    # above this the weight sync is stale or broken. None: the default for the run's precision
    # (LOGPROB_GAP_BOUNDS, TrainConfig.logprob_gap_bounds).
    max_logprob_gap_mean: Optional[float] = None
    max_logprob_gap_max: Optional[float] = None
    # Policy vs reference KL at step 0 (both start from the same checkpoint).
    max_initial_kl: float = 1e-6
    # rollout.off_policy_steps=1: responses of each batch the engine re-scores after the sync, for the gap check
    # above (the first N of the batch; a stale or broken sync moves every token, so a probe is enough, and a full
    # re-score would cost a prefill of the whole batch every step).
    off_policy_probe_samples: int = 16

    def __post_init__(self) -> None:
        for name in ("max_logprob_gap_mean", "max_logprob_gap_max", "max_initial_kl"):
            value = getattr(self, name)
            if value is not None and value <= 0:
                raise ValueError(f"health.{name}={value} must be > 0")
        if not (isinstance(self.off_policy_probe_samples, int) and self.off_policy_probe_samples >= 1):
            raise ValueError(f"health.off_policy_probe_samples={self.off_policy_probe_samples!r} must be an integer "
                             ">= 1")


@dataclass(kw_only=True, frozen=True)
class RunConfig:
    output_dir: str = "outputs/run"
    num_steps: int = 100
    # PPO mini-batches per rollout batch (one optimizer step each); the recipe does 1 epoch.
    num_minibatches: int = 1
    # Save every N steps (0: only at the end and on SIGTERM).
    save_every: int = 0
    eval_every: int = 0
    # Weight-sync bucket size (MiB) on every path: driver to torch engine, ranks to colocated SGLang (CUDA IPC),
    # rank 0 to disaggregated SGLang (NCCL broadcast).
    weight_sync_bucket_mb: int = 512
    seed: int = 0
    # wandb runs offline when WANDB_API_KEY is not set; None disables it.
    wandb_project: Optional[str] = None
    # Also write every step's scalars as TensorBoard events under output_dir/tensorboard.
    tensorboard: bool = False
    # Resume from the latest complete checkpoint in output_dir when there is one.
    resume: bool = True
    # Resume from this checkpoint (a checkpoints/step_N folder) instead, e.g. the newest intact one when the latest
    # is damaged; checked before Ray starts (trainer/checkpoint.py).
    resume_from: Optional[str] = None

    def __post_init__(self) -> None:
        if self.num_steps < 1:
            raise ValueError(f"run.num_steps={self.num_steps} must be >= 1")
        if self.num_minibatches < 1:
            raise ValueError(f"run.num_minibatches={self.num_minibatches} must be >= 1")
        for name in ("save_every", "eval_every"):
            if getattr(self, name) < 0:
                raise ValueError(f"run.{name}={getattr(self, name)} must be >= 0 (0 = off)")
        if self.weight_sync_bucket_mb < 1:
            raise ValueError(f"run.weight_sync_bucket_mb={self.weight_sync_bucket_mb} must be >= 1")
        if self.resume_from is not None and not self.resume:
            raise ValueError(f"run.resume_from={self.resume_from!r} with run.resume=false: drop one (resume_from "
                             "resumes there; resume=false starts at step 0)")


@dataclass(kw_only=True, frozen=True)
class EvalSetConfig:
    """A held-out set scored with greedy decoding before and after training (and every eval_every steps)."""

    path: Optional[str] = None
    max_problems: Optional[int] = None
    max_new_tokens: int = 256

    def __post_init__(self) -> None:
        if not (isinstance(self.max_new_tokens, int) and self.max_new_tokens >= 1):
            raise ValueError(f"eval.max_new_tokens={self.max_new_tokens!r} must be an integer >= 1")
        if self.max_problems is not None and not (isinstance(self.max_problems, int) and self.max_problems >= 1):
            raise ValueError(f"eval.max_problems={self.max_problems!r} must be null (all) or an integer >= 1")


@dataclass(kw_only=True, frozen=True)
class TrainConfig:
    # HF model directory: the base model (tokenizer and config come from here).
    model_path: str = ""
    # Its Megatron conversion; None converts model_path into output_dir/base_mcore first.
    mcore_path: Optional[str] = None
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    cluster: ClusterConfig = field(default_factory=lambda: ClusterConfig(gpus_per_node=0, cpu_workers_per_node=1))
    model: ModelConfig = field(default_factory=ModelConfig)
    actor: ActorConfig = field(default_factory=ActorConfig)
    loss: PolicyLossConfig = field(default_factory=PolicyLossConfig)
    advantage: AdvantageConfig = field(default_factory=AdvantageConfig)
    reward: RewardConfig = field(default_factory=RewardConfig)
    data: DataConfig = field(default_factory=DataConfig)
    rollout: RolloutConfig = field(default_factory=RolloutConfig)
    health: HealthConfig = field(default_factory=HealthConfig)
    eval: EvalSetConfig = field(default_factory=EvalSetConfig)
    run: RunConfig = field(default_factory=RunConfig)

    def __post_init__(self) -> None:
        if not self.model_path:
            raise ValueError("model_path is empty; set it to the base model's HF directory (model_path=/models/X)")
        self.cluster.check_layout(self.parallel)
        num_samples = self.data.sampler.batch_size * self.rollout.num_samples_per_prompt
        if num_samples % self.run.num_minibatches:
            raise ValueError(
                f"run.num_minibatches={self.run.num_minibatches} must divide data.sampler.batch_size x "
                f"rollout.num_samples_per_prompt = {self.data.sampler.batch_size} x "
                f"{self.rollout.num_samples_per_prompt} = {num_samples}; use one of "
                f"{[d for d in range(1, num_samples + 1) if num_samples % d == 0][:12]}")
        from megatron_zero.actor.advantages import GROUP_BASELINE_ESTIMATORS

        if self.advantage.estimator in GROUP_BASELINE_ESTIMATORS and self.rollout.num_samples_per_prompt < 2:
            raise ValueError(
                f"advantage.estimator={self.advantage.estimator!r} compares each response with the other samples of "
                "its prompt, but rollout.num_samples_per_prompt=1: every advantage would be 0 (a group of one has "
                "no spread) and nothing would train; sample n >= 2 per prompt (recipe: 8) or use "
                "advantage.estimator='reinforce_plus_plus'")
        if self.rollout.engine == "sglang":
            self._check_sglang(self.rollout.sglang)
        elif self.cluster.rollout_num_gpus:
            raise ValueError(f"cluster.rollout_num_gpus={self.cluster.rollout_num_gpus} reserves GPUs for SGLang engines, "
                             f"but rollout.engine={self.rollout.engine!r}; set rollout.engine=sglang or "
                             "cluster.rollout_num_gpus=0")
        if self.rollout.off_policy_steps:
            if self.cluster.colocate:
                raise ValueError("rollout.off_policy_steps=1 generates the next batch while the actor trains, but "
                                 "cluster.colocate=True shares the GPUs between them by turns; set cluster.colocate="
                                 "false (engines on GPUs of their own, cluster.rollout_num_gpus) or off_policy_steps=0")
            if self.rollout.engine == "sglang" and self.rollout.temperature != 1.0:
                raise ValueError(f"rollout.off_policy_steps=1 re-scores each batch on the engine, but SGLang 0.5.23 "
                                 f"scores given tokens at temperature 1 only, and rollout.temperature="
                                 f"{self.rollout.temperature}; sample at 1.0 (the recipe's) or set off_policy_steps=0")
            if self.loss.tis_cap is None:
                raise ValueError("rollout.off_policy_steps=1 trains on responses of the policy one step back; set "
                                 "loss.tis_cap (e.g. 2.0) so truncated importance sampling on the engine's log-probs "
                                 "corrects the update")
        if self.actor.temperature != self.rollout.temperature:
            raise ValueError(f"actor.temperature={self.actor.temperature} must equal rollout.temperature="
                             f"{self.rollout.temperature}: the loss's log-probs must use the sampling distribution")
        # The actor packs whole sequences into microbatches: the longest prompt + response must fit one.
        longest = self.rollout.max_new_tokens + (self.data.train.max_prompt_tokens or 0)
        if longest > self.actor.max_tokens_per_microbatch:
            prompt = ("" if self.data.train.max_prompt_tokens is None
                      else f"data.train.max_prompt_tokens={self.data.train.max_prompt_tokens} + ")
            raise ValueError(f"actor.max_tokens_per_microbatch={self.actor.max_tokens_per_microbatch} is smaller than "
                             f"one sequence of {prompt}rollout.max_new_tokens={self.rollout.max_new_tokens} = "
                             f"{longest} tokens; raise it to at least {longest}")

    @property
    def logprob_precision(self) -> str:
        """``LOGPROB_GAP_BOUNDS`` key of the engine/actor pair: "fp32" only when both compute in float32."""
        engine_dtype = (self.rollout.torch.dtype if self.rollout.engine == "torch"
                        else self.rollout.sglang.served_dtype(self.cluster.use_gpus))
        both_fp32 = (self.model.params_dtype in _FP32_DTYPES and engine_dtype in _FP32_DTYPES
                     and self.model.fp8 is None and self.rollout.quantization is None)
        return "fp32" if both_fp32 else "16bit"

    @property
    def logprob_gap_bounds(self) -> tuple[float, float]:
        """(mean, max) engine-vs-actor gap bounds: health.* where set, else the precision's defaults."""
        mean, largest = LOGPROB_GAP_BOUNDS[self.logprob_precision]
        return (mean if self.health.max_logprob_gap_mean is None else self.health.max_logprob_gap_mean,
                largest if self.health.max_logprob_gap_max is None else self.health.max_logprob_gap_max)

    def _check_sglang(self, sglang: SGLangConfig) -> None:
        if sglang.launch:
            # With cluster.gpus_per_node=0 the servers run on CPU (rollout/sglang_cpu.py), on the CPU workers'
            # bundles (colocated) or on cluster.rollout_num_gpus CPU bundles of their own.
            sglang.check_launch(self.cluster)
            return
        # A server started by hand (rollout.sglang.host:port) sits on GPUs the trainer does not manage: it takes
        # weights by NCCL broadcast from rank 0, like launched disaggregated engines, and keeps its memory.
        if sglang.colocated:
            raise ValueError(f"rollout.sglang.launch=False with sglang.colocated=True: the server at {sglang.url} was "
                             "started by hand, so CUDA IPC updates from the ranks' GPUs cannot reach it; set "
                             "sglang.colocated=False (weights by NCCL broadcast; start it without --enable-memory-saver)")
        if self.cluster.colocate or self.cluster.rollout_num_gpus:
            raise ValueError(f"rollout.sglang.launch=False uses the server at {sglang.url}, but cluster.colocate="
                             f"{self.cluster.colocate} / cluster.rollout_num_gpus={self.cluster.rollout_num_gpus} place "
                             "launched engines; set cluster.colocate=False and cluster.rollout_num_gpus=0")

    def _check_fp8_rollout(self, arch) -> None:
        """SGLang must be able to load FP8 weights of this model, and a server started by hand must serve them."""
        from megatron_zero.rollout.fp8_weights import check_sglang_block_alignment, is_fp8_checkpoint

        sglang = self.rollout.sglang
        if not sglang.launch and not is_fp8_checkpoint(sglang.model_path):
            raise ValueError(f"rollout.quantization='fp8' sends FP8 weights, but rollout.sglang.model_path="
                             f"{sglang.model_path!r} (the server started by hand) is not an FP8 checkpoint; start the "
                             "server from `python tools/convert_checkpoint.py hf-to-fp8 --hf MODEL --out DIR`")
        try:
            check_sglang_block_alignment(arch, sglang.tp_size, "rollout.sglang.tp_size")
        except ValueError as error:
            raise ValueError(f"rollout.quantization='fp8' ({self.model_path}): {error}; or sync unquantized weights "
                             "(rollout.quantization=null)") from None

    def check_inputs(self) -> None:
        """File checks, run before any worker starts; raise naming the field and the path."""
        from megatron_zero.models.hf_io import INDEX_NAME, SINGLE_NAME
        from megatron_zero.models.registry import read_architecture

        if not Path(self.model_path, "config.json").is_file():
            raise FileNotFoundError(f"model_path={self.model_path!r}: no config.json there")
        arch = read_architecture(self.model_path)
        if self.parallel.expert_parallel_size > 1:
            # Every supported family is dense (models/registry.py): there are no experts to place.
            raise ValueError(f"parallel.expert_parallel_size={self.parallel.expert_parallel_size} needs a mixture-of-"
                             f"experts model, but model_type={arch.model_type!r} ({self.model_path}) is dense; set it "
                             "to 1")
        arch.check_parallel_sizes(self.parallel.tensor_parallel_size, self.parallel.pipeline_parallel_size,
                                  self.model.vocab_pad_multiple)
        # Held-out prompts are read with data.train's settings (the same length limit), then decoded greedily.
        generation_limits = [("rollout.max_new_tokens", self.rollout.max_new_tokens)]
        if self.eval.path is not None:
            generation_limits.append(("eval.max_new_tokens", self.eval.max_new_tokens))
        for name, max_new_tokens in generation_limits:
            if self.data.train.max_prompt_tokens is None:
                break
            longest = self.data.train.max_prompt_tokens + max_new_tokens
            if longest > arch.max_position_embeddings:
                raise ValueError(f"data.train.max_prompt_tokens={self.data.train.max_prompt_tokens} + "
                                 f"{name}={max_new_tokens} = {longest} tokens exceed the model's context, "
                                 f"max_position_embeddings={arch.max_position_embeddings} ({self.model_path}/"
                                 "config.json); lower one of them")
        # The HF directory also feeds the tokenizer and the rollout engine's weights, whatever mcore_path says.
        model_files = {path.name for path in Path(self.model_path).iterdir()}
        if not model_files & {SINGLE_NAME, INDEX_NAME}:
            raise FileNotFoundError(f"model_path={self.model_path!r} has no weights ({SINGLE_NAME} or {INDEX_NAME}); "
                                    "only safetensors checkpoints are supported")
        if not model_files & {"tokenizer.json", "tokenizer.model", "vocab.json"}:
            raise FileNotFoundError(f"model_path={self.model_path!r} has no tokenizer (tokenizer.json, tokenizer.model "
                                    "or vocab.json); copy the base model's tokenizer files there")
        if Path(self.run.output_dir).exists() and not Path(self.run.output_dir).is_dir():
            raise ValueError(f"run.output_dir={self.run.output_dir!r} is a file; choose a directory")
        if self.rollout.quantization == "fp8" and self.rollout.engine == "sglang":
            self._check_fp8_rollout(arch)
        if self.mcore_path is not None and not Path(self.mcore_path, "megatron_zero.json").is_file():
            raise FileNotFoundError(f"mcore_path={self.mcore_path!r} is not a converted checkpoint "
                                    "(no megatron_zero.json); omit it to convert model_path automatically")
        if not self.data.train.path:
            raise ValueError("data.train.path is empty; set it to a JSONL/Parquet file or dataset directory")
        if not Path(self.data.train.path).exists():
            raise FileNotFoundError(f"data.train.path={self.data.train.path!r} does not exist")
        if self.eval.path is not None and not Path(self.eval.path).exists():
            raise FileNotFoundError(f"eval.path={self.eval.path!r} does not exist")
        table = self.data.pass_rate_filter.pass_rate_file
        if table is not None and not Path(table).is_file():
            # Whether it matches the data is checked when the problems are read, also before Ray starts.
            raise FileNotFoundError(f"data.pass_rate_filter.pass_rate_file={table!r} does not exist; write it with "
                                    f"`megatron-zero difficulty --model {self.model_path} --data "
                                    f"{self.data.train.path} --out {table}`")
        from megatron_zero.trainer.checkpoint import check_resume_point

        # Last: it reads every byte of the checkpoint a run would resume from (once, before Ray starts).
        check_resume_point(self.run)


def load_config(path: Optional[str], overrides: list[str], base: Optional[dict[str, Any]] = None) -> TrainConfig:
    """YAML file (optional) + ``a.b=value`` overrides -> validated ``TrainConfig``; errors name the key."""
    from omegaconf import OmegaConf
    from omegaconf.errors import OmegaConfBaseException

    # The schema gives types and defaults; validation runs once, on the final values (_build).
    schema = OmegaConf.structured(TrainConfig)
    try:
        merged = OmegaConf.merge(schema, base or {})
        if path is not None:
            merged = OmegaConf.merge(merged, _read_yaml_mapping(path))
        merged = OmegaConf.merge(merged, OmegaConf.from_dotlist(overrides))
        plain = OmegaConf.to_container(merged, resolve=True)
    except OmegaConfBaseException as error:
        raise ValueError(f"config error: {error}") from None
    return _build(TrainConfig, plain)


def _read_yaml_mapping(path: str):
    """The experiment file as an OmegaConf mapping; one-line errors for a missing file, bad YAML or a non-mapping."""
    import yaml
    from omegaconf import DictConfig, OmegaConf

    if not Path(path).is_file():
        raise FileNotFoundError(f"config file {path} does not exist")
    try:
        loaded = OmegaConf.load(path)
    except yaml.YAMLError as error:
        where = getattr(error, "problem_mark", None)
        line = f" at line {where.line + 1}, column {where.column + 1}" if where is not None else ""
        raise ValueError(f"config file {path} is not valid YAML{line}: "
                         f"{getattr(error, 'problem', None) or error}") from None
    if not isinstance(loaded, DictConfig):
        raise ValueError(f"config file {path} holds a {type(loaded).__name__}, not a mapping of config keys "
                         "(e.g. 'run:\n  num_steps: 10')")
    return loaded


class _KeyedConfigError(ValueError):
    """A sub-config's error, already renamed to the key the user typed (see ``_build``)."""


# A message that starts by naming a field: "policy_loss.clip_low=1.5 ...", "data.template: ...".
_LEADING_FIELD = re.compile(r"^([A-Za-z_]+)\.(?=[A-Za-z_])")


def _build(cls: type, values: dict[str, Any], path: str = "") -> Any:
    """``cls`` from plain ``values``, sub-configs first. A sub-config names its fields by its own prefix
    (``PolicyLossConfig``: "policy_loss.clip_low"), which need not be where it sits in the experiment ("loss");
    its errors are renamed to the key path the user typed ("loss.clip_low", "data.train.template")."""
    import typing

    hints = typing.get_type_hints(cls)
    kwargs = {}
    for f in dataclasses.fields(cls):
        if f.name not in values:
            continue
        value = values[f.name]
        sub = _dataclass_type(hints[f.name])
        key = f"{path}.{f.name}" if path else f.name
        kwargs[f.name] = _build(sub, value, key) if sub is not None and isinstance(value, dict) else value
    try:
        return cls(**kwargs)
    except _KeyedConfigError:
        raise
    except ValueError as error:
        message = str(error)
        if path and not message.startswith(path + "."):
            message = _LEADING_FIELD.sub(path + ".", message, count=1)
        raise _KeyedConfigError(message) from None


def _dataclass_type(annotation: Any) -> Optional[type]:
    import typing

    if dataclasses.is_dataclass(annotation):
        return annotation
    for arg in typing.get_args(annotation):
        if dataclasses.is_dataclass(arg):
            return arg
    return None
