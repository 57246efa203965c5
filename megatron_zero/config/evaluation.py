"""Evaluation settings: which benchmarks, where their files are, and how to decode.

The defaults are the paper's RL-model setting on all six benchmarks (temperature 1.0, top-p 0.95,
16000 new tokens, one sample). Greedy baselines use ``temperature=0.0, top_p=1.0, n_samples=1``;
AIME24 as avg@32 uses ``n_samples=32``. Validated on construction; benchmark names are checked
against the registry in ``megatron_zero.evaluation.benchmarks`` before any generation starts.

``EngineConfig`` is the engine of the standalone commands (``megatron-zero eval`` and ``difficulty``): the torch
engine in this process (CPU, or one GPU), or SGLang, launched on this Ray cluster's GPUs like the trainer's
disaggregated engines, or a server already running.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional

from megatron_zero.config.cluster import RAY_ADDRESS_AUTO, ClusterConfig
from megatron_zero.config.problems import raise_problems
from megatron_zero.config.rollout import ROLLOUT_ENGINES, TorchEngineConfig
from megatron_zero.config.sglang import SGLangConfig

DEFAULT_BENCHMARKS = ("gsm8k", "math500", "minerva_math", "olympiadbench", "aime24", "amc23")


@dataclass(kw_only=True, frozen=True)
class EvalConfig:
    benchmarks: list[str] = field(default_factory=lambda: list(DEFAULT_BENCHMARKS))
    # Holds one folder per benchmark, Qwen2.5-Math layout: {data_dir}/{name}/test.{jsonl,parquet,json}.
    data_dir: str = "data/eval"
    # Name of the prompt template (resolved by the caller, who passes the formatter to `evaluate`).
    template: str = "qwen-boxed"
    n_samples: int = 1
    temperature: float = 1.0
    top_p: float = 0.95
    max_new_tokens: int = 16000
    # k values for pass@k and avg@k; empty means 1, 2, 4, ... up to n_samples, plus n_samples itself.
    pass_k: list[int] = field(default_factory=list)
    seed: int = 0
    # Evaluate only the first `max_problems` problems of each benchmark (smoke runs); None means all.
    max_problems: Optional[int] = None

    def __post_init__(self) -> None:
        problems: list[str] = []  # every value problem of this config, raised together
        if not self.benchmarks:
            problems.append(f"eval.benchmarks={self.benchmarks!r} is empty; name at least one, e.g. ['math500']")
        duplicates = sorted({name for name in self.benchmarks if self.benchmarks.count(name) > 1})
        if duplicates:
            problems.append(f"eval.benchmarks={self.benchmarks!r} lists {duplicates} more than once; list each once")
        if not self.template:
            problems.append("eval.template='' must name a prompt template, e.g. 'qwen-boxed'")
        n_samples_valid = isinstance(self.n_samples, int) and self.n_samples >= 1
        if not n_samples_valid:
            problems.append(f"eval.n_samples={self.n_samples!r} must be an integer >= 1")
        if self.temperature < 0:
            problems.append(f"eval.temperature={self.temperature} must be >= 0 (0 means greedy)")
        # Checks that read n_samples run only on a valid one: its own problem is said above, once.
        if self.temperature == 0 and n_samples_valid and self.n_samples != 1:
            problems.append(
                f"eval.temperature=0 (greedy) with eval.n_samples={self.n_samples} would repeat one sample; "
                "set n_samples=1 or temperature > 0"
            )
        if not 0 < self.top_p <= 1:
            problems.append(f"eval.top_p={self.top_p} must be in (0, 1]")
        if not isinstance(self.max_new_tokens, int) or self.max_new_tokens < 1:
            problems.append(f"eval.max_new_tokens={self.max_new_tokens!r} must be an integer >= 1")
        for k in self.pass_k if n_samples_valid else ():
            if not isinstance(k, int) or not 1 <= k <= self.n_samples:
                problems.append(
                    f"eval.pass_k={self.pass_k!r} contains {k!r}; each k must be an integer in "
                    f"[1, n_samples={self.n_samples}]"
                )
        if self.max_problems is not None and (not isinstance(self.max_problems, int) or self.max_problems < 1):
            problems.append(f"eval.max_problems={self.max_problems!r} must be None (all) or an integer >= 1")
        raise_problems(problems)

    @property
    def greedy(self) -> bool:
        return self.temperature == 0

    @property
    def k_values(self) -> list[int]:
        """The k of pass@k / avg@k: `pass_k` if given, else 1, 2, 4, ... <= n_samples, plus n_samples."""
        if self.pass_k:
            return sorted(set(self.pass_k))
        ks = [1 << i for i in range(self.n_samples.bit_length()) if (1 << i) <= self.n_samples]
        return sorted(set(ks) | {self.n_samples})


SGLANG_DEVICES = ("cuda", "cpu")


@dataclass(kw_only=True, frozen=True)
class EngineConfig:
    # "torch": the embedded engine (engine.torch); "sglang": SGLang (engine.sglang).
    engine: str = "torch"
    torch: TorchEngineConfig = field(default_factory=TorchEngineConfig)
    # Required with engine="sglang". sglang.launch=true starts one server per sglang.tp_size of num_gpus GPUs in Ray
    # actors (the trainer's launch path); nothing pushes weights, so sglang.colocated must be false.
    # sglang.launch=false uses the server running at sglang.host:port.
    sglang: Optional[SGLangConfig] = None
    num_gpus: int = 1
    ray_address: str = RAY_ADDRESS_AUTO
    # Where launched SGLang servers run: "cuda", num_gpus GPUs of the Ray cluster; "cpu", num_gpus CPU bundles (the
    # real server on CPU: rollout/sglang_cpu.py).
    sglang_device: str = "cuda"

    def __post_init__(self) -> None:
        problems: list[str] = []  # every value problem of this config, raised together
        if self.engine not in ROLLOUT_ENGINES:
            problems.append(f"engine={self.engine!r} is unknown; use one of {list(ROLLOUT_ENGINES)}")
        if self.engine == "sglang" and self.sglang is None:
            problems.append("engine='sglang' needs an SGLangConfig (sglang.model_path set)")
        gpus_ok = isinstance(self.num_gpus, int) and self.num_gpus >= 1
        device_ok = self.sglang_device in SGLANG_DEVICES
        if not gpus_ok:
            problems.append(f"num_gpus={self.num_gpus!r} must be an integer >= 1")
        if not device_ok:
            problems.append(f"sglang_device={self.sglang_device!r} is unknown; use one of {list(SGLANG_DEVICES)}")
        # The launch check reads the servers' layout, which is built from the two fields above: not said twice.
        if self.engine == "sglang" and self.sglang is not None and self.sglang.launch and gpus_ok and device_ok:
            if self.sglang.colocated:
                problems.append("sglang.colocated=True shares GPUs with training ranks, but evaluation has none; "
                                "set sglang.colocated=False")
            else:
                try:
                    self.sglang.check_launch(self.cluster)
                except ValueError as error:
                    problems += getattr(error, "problems", [str(error)])
        raise_problems(problems)

    def sample_settings(self) -> dict[str, Any]:
        """What of the engine changes the samples, which a resumed `eval` or `difficulty` run must keep: its kind and
        the dtype its weights compute in."""
        chosen = self.torch if self.engine == "torch" else self.sglang
        return {"engine": self.engine, "dtype": getattr(chosen, "dtype", None)}

    @property
    def cluster(self) -> ClusterConfig:
        """Launched servers' Ray layout: num_gpus GPUs of their own, as the trainer's disaggregated engines (no
        Megatron ranks are placed)."""
        if self.sglang_device == "cpu":
            return ClusterConfig(num_nodes=1, gpus_per_node=0, cpu_workers_per_node=self.num_gpus,
                                 rollout_num_gpus=self.num_gpus, ray_address=self.ray_address)
        return ClusterConfig(num_nodes=1, gpus_per_node=self.num_gpus, rollout_num_gpus=self.num_gpus,
                            ray_address=self.ray_address)
