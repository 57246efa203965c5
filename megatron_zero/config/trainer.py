"""The experiment config: one YAML file maps onto ``TrainConfig``; ``key.sub=value`` overrides on the CLI.

Each component gets its own sub-config (defined beside the component's other configs in this
package); ``TrainConfig.__post_init__`` adds the checks that need several of them together. The checks that need
files live above config, in ``megatron_zero/preflight/`` (run before any worker starts).
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
from megatron_zero.config.problems import ConfigProblems, raise_problems
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
        problems: list[str] = []  # every value problem of this config, raised together
        for name in ("max_logprob_gap_mean", "max_logprob_gap_max", "max_initial_kl"):
            value = getattr(self, name)
            if value is not None and value <= 0:
                problems.append(f"health.{name}={value} must be > 0")
        if not (isinstance(self.off_policy_probe_samples, int) and self.off_policy_probe_samples >= 1):
            problems.append(f"health.off_policy_probe_samples={self.off_policy_probe_samples!r} must be an integer "
                            ">= 1")
        raise_problems(problems)


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
        problems: list[str] = []  # every value problem of this config, raised together
        if self.num_steps < 1:
            problems.append(f"run.num_steps={self.num_steps} must be >= 1")
        if self.num_minibatches < 1:
            problems.append(f"run.num_minibatches={self.num_minibatches} must be >= 1")
        for name in ("save_every", "eval_every"):
            if getattr(self, name) < 0:
                problems.append(f"run.{name}={getattr(self, name)} must be >= 0 (0 = off)")
        if self.weight_sync_bucket_mb < 1:
            problems.append(f"run.weight_sync_bucket_mb={self.weight_sync_bucket_mb} must be >= 1")
        if self.resume_from is not None and not self.resume:
            problems.append(f"run.resume_from={self.resume_from!r} with run.resume=false: drop one (resume_from "
                            "resumes there; resume=false starts at step 0)")
        raise_problems(problems)


@dataclass(kw_only=True, frozen=True)
class EvalSetConfig:
    """A held-out set scored with greedy decoding before and after training (and every eval_every steps)."""

    path: Optional[str] = None
    max_problems: Optional[int] = None
    max_new_tokens: int = 256

    def __post_init__(self) -> None:
        problems: list[str] = []  # every value problem of this config, raised together
        if not (isinstance(self.max_new_tokens, int) and self.max_new_tokens >= 1):
            problems.append(f"eval.max_new_tokens={self.max_new_tokens!r} must be an integer >= 1")
        if self.max_problems is not None and not (isinstance(self.max_problems, int) and self.max_problems >= 1):
            problems.append(f"eval.max_problems={self.max_problems!r} must be null (all) or an integer >= 1")
        raise_problems(problems)


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
        problems: list[str] = []  # every value problem of this config, raised together
        if not self.model_path:
            problems.append("model_path is empty; set it to the base model's HF directory (model_path=/models/X)")
        self.cluster.check_layout(self.parallel)
        num_samples = self.data.sampler.batch_size * self.rollout.num_samples_per_prompt
        if num_samples % self.run.num_minibatches:
            problems.append(
                f"run.num_minibatches={self.run.num_minibatches} must divide data.sampler.batch_size x "
                f"rollout.num_samples_per_prompt = {self.data.sampler.batch_size} x "
                f"{self.rollout.num_samples_per_prompt} = {num_samples}; use one of "
                f"{[d for d in range(1, num_samples + 1) if num_samples % d == 0][:12]}")
        if self.rollout.engine == "sglang":
            self._check_sglang(self.rollout.sglang)
        elif self.cluster.rollout_num_gpus:
            problems.append(f"cluster.rollout_num_gpus={self.cluster.rollout_num_gpus} reserves GPUs for SGLang "
                            f"engines, but rollout.engine={self.rollout.engine!r}; set rollout.engine=sglang or "
                            "cluster.rollout_num_gpus=0")
        if self.rollout.off_policy_steps:
            if self.cluster.colocate:
                problems.append("rollout.off_policy_steps=1 generates the next batch while the actor trains, but "
                                "cluster.colocate=True shares the GPUs between them by turns; set cluster.colocate="
                                "false (engines on GPUs of their own, cluster.rollout_num_gpus) or off_policy_steps=0")
            if self.rollout.engine == "sglang" and self.rollout.temperature != 1.0:
                problems.append(f"rollout.off_policy_steps=1 re-scores each batch on the engine, but SGLang 0.5.23 "
                                f"scores given tokens at temperature 1 only, and rollout.temperature="
                                f"{self.rollout.temperature}; sample at 1.0 (the recipe's) or set off_policy_steps=0")
            if self.loss.tis_cap is None:
                problems.append("rollout.off_policy_steps=1 trains on responses of the policy one step back; set "
                                "loss.tis_cap (e.g. 2.0) so truncated importance sampling on the engine's log-probs "
                                "corrects the update")
        if self.actor.temperature != self.rollout.temperature:
            problems.append(f"actor.temperature={self.actor.temperature} must equal rollout.temperature="
                            f"{self.rollout.temperature}: the loss's log-probs must use the sampling distribution")
        # The actor packs whole sequences into microbatches: the longest prompt + response must fit one.
        longest = self.rollout.max_new_tokens + (self.data.train.max_prompt_tokens or 0)
        if longest > self.actor.max_tokens_per_microbatch:
            prompt = ("" if self.data.train.max_prompt_tokens is None
                      else f"data.train.max_prompt_tokens={self.data.train.max_prompt_tokens} + ")
            problems.append(f"actor.max_tokens_per_microbatch={self.actor.max_tokens_per_microbatch} is smaller than "
                            f"one sequence of {prompt}rollout.max_new_tokens={self.rollout.max_new_tokens} = "
                            f"{longest} tokens; raise it to at least {longest}")
        raise_problems(problems)

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
            try:
                sglang.check_launch(self.cluster)
            except ValueError as error:  # SGLangConfig names its fields "sglang.X"; here they are rollout.sglang.X
                raise ValueError(re.sub(r"(?<![\w.])sglang\.(?=[a-z_])", "rollout.sglang.", str(error))) from None
            return
        # A server started by hand (rollout.sglang.host:port) sits on GPUs the trainer does not manage: it takes
        # weights by NCCL broadcast from rank 0, like launched disaggregated engines, and keeps its memory.
        if sglang.colocated:
            raise ValueError(f"rollout.sglang.launch=False with rollout.sglang.colocated=True: the server at "
                             f"{sglang.url} was started by hand, so CUDA IPC updates from the ranks' GPUs cannot reach "
                             "it; set rollout.sglang.colocated=false (weights by NCCL broadcast; start it without "
                             "--enable-memory-saver)")
        if self.cluster.colocate or self.cluster.rollout_num_gpus:
            raise ValueError(f"rollout.sglang.launch=False uses the server at {sglang.url}, but cluster.colocate="
                             f"{self.cluster.colocate} / cluster.rollout_num_gpus={self.cluster.rollout_num_gpus} place "
                             "launched engines; set cluster.colocate=False and cluster.rollout_num_gpus=0")


def parse_config(path: Optional[str], overrides: list[str], base: Optional[dict[str, Any]] = None) -> TrainConfig:
    """YAML file (optional) + ``a.b=value`` overrides -> a ``TrainConfig`` whose values are valid; errors name the
    key. Commands load configs with ``megatron_zero.preflight.config.load_config``, which also checks the names
    fields take against the registries (config/ imports no other package of ours)."""
    import yaml
    from omegaconf import OmegaConf
    from omegaconf.errors import OmegaConfBaseException

    # The schema gives types and defaults; validation runs once, on the final values (_build).
    schema = OmegaConf.structured(TrainConfig)
    problems = []
    try:
        merged = OmegaConf.merge(schema, base or {})
        # One section of the file and one override at a time, so that every mistyped key or wrong type is listed,
        # not only the first.
        if path is not None:
            for key, value in _read_yaml_mapping(path).items_ex(resolve=False):
                try:
                    merged = OmegaConf.merge(merged, {key: value})
                except OmegaConfBaseException as error:
                    problems.append(f"{_section_problem(schema, key, value) or _omegaconf_problem(error)} (in {path})")
        for override in overrides:
            key, equals, text = override.partition("=")
            if not equals:
                problems.append(f"{override!r} is not key=value (e.g. actor.lr=1e-6)")
                continue
            try:
                (section,) = OmegaConf.to_container(OmegaConf.from_dotlist([override])).items()
            except (OmegaConfBaseException, yaml.YAMLError) as error:
                reason = getattr(error, "problem", None) or error
                problems.append(f"{key}: the value {text!r} does not parse ({reason})")
                continue
            try:
                merged = OmegaConf.merge(merged, dict([section]))
            except OmegaConfBaseException as error:
                problems.append(_section_problem(schema, *section) or _omegaconf_problem(error))
        if problems:
            raise ConfigProblems(problems)
        plain = OmegaConf.to_container(merged, resolve=True)
    except OmegaConfBaseException as error:
        raise ValueError(f"config error: {_omegaconf_problem(error)}") from None
    return _build(TrainConfig, plain)


def _omegaconf_problem(error: Exception) -> str:
    """OmegaConf's message in one line, led by the key ("run.nsteps: Key 'nsteps' not in 'RunConfig'. Did you mean:
    'num_steps'?"); its own message adds full_key / reference_type / object_type lines."""
    first = str(error).splitlines()[0] if str(error) else type(error).__name__
    key = getattr(error, "full_key", None)
    return f"{key}: {first}" if key else first


def _section_problem(schema: Any, key: str, value: Any, prefix: str = "") -> Optional[str]:
    """Where a section of keys (``actor``, ``data.train``) is given one value (``actor: 3``), that in the user's
    words: OmegaConf's merge error names neither the key nor the file ("int is not a subclass of ActorConfig")."""
    from omegaconf import DictConfig

    if not isinstance(schema, DictConfig) or key not in schema:
        return None
    node, path = schema._get_node(key), f"{prefix}{key}"
    if not isinstance(node, DictConfig):
        return None
    if isinstance(value, (dict, DictConfig)):
        return next(filter(None, (_section_problem(node, child, child_value, f"{path}.")
                                  for child, child_value in value.items())), None)
    if value is None:  # an optional section left out
        return None
    section_type = node._metadata.object_type or node._metadata.ref_type  # an optional section unset: no keys
    example = dataclasses.fields(section_type)[0].name if dataclasses.is_dataclass(section_type) else "key"
    return f"{path} is a section of keys ({path}.{example}, ...), not a value: {value!r}"


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
                         "(e.g. 'run: {num_steps: 10}')")
    return loaded


# A message that starts by naming a field: "policy_loss.clip_low=1.5 ...", "data.template: ...".
_LEADING_FIELD = re.compile(r"^([A-Za-z_]+)\.(?=[A-Za-z_])")


def _build(cls: type, values: dict[str, Any], path: str = "") -> Any:
    """``cls`` from plain ``values``, sub-configs first. A sub-config names its fields by its own prefix
    (``PolicyLossConfig``: "policy_loss.clip_low"), which need not be where it sits in the experiment ("loss");
    its errors are renamed to the key path the user typed ("loss.clip_low", "data.train.template").
    Every sub-config is built before any error is raised, so one error lists the problems of all of them (a
    config's checks that need several sub-configs run only once those are valid)."""
    import typing

    hints = typing.get_type_hints(cls)
    kwargs = {}
    problems: list[str] = []
    for f in dataclasses.fields(cls):
        if f.name not in values:
            continue
        value = values[f.name]
        sub = _dataclass_type(hints[f.name])
        key = f"{path}.{f.name}" if path else f.name
        if sub is None or not isinstance(value, dict):
            kwargs[f.name] = value
            continue
        try:
            kwargs[f.name] = _build(sub, value, key)
        except ConfigProblems as error:
            problems += error.problems
    if problems:
        raise ConfigProblems(problems)
    try:
        return cls(**kwargs)
    except ValueError as error:
        raise ConfigProblems([_as_typed(message, path) for message in getattr(error, "problems", [str(error)])]
                             ) from None


def _as_typed(message: str, path: str) -> str:
    """``message`` of the sub-config at ``path`` with its own prefix renamed to the key the user typed."""
    leading = _LEADING_FIELD.match(message)
    if path and leading and not message.startswith(path + "."):
        # Every mention of the sub-config's own prefix ("policy_loss.clip_high ... policy_loss.clip_low").
        message = re.sub(rf"(?<![\w.]){leading.group(1)}\.(?=[A-Za-z_])", path + ".", message)
    return message


def _dataclass_type(annotation: Any) -> Optional[type]:
    import typing

    if dataclasses.is_dataclass(annotation):
        return annotation
    for arg in typing.get_args(annotation):
        if dataclasses.is_dataclass(arg):
            return arg
    return None
