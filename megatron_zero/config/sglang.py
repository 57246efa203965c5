"""Config of one SGLang rollout server: how it is launched and how the trainer talks to it over HTTP.

Why: ``megatron_zero.rollout.sglang_engine.SGLangEngine`` drives one ``sglang.launch_server`` process
(tensor-parallel over ``tp_size`` GPUs starting at ``base_gpu_id``); everything it needs is here, validated
at construction so a bad value fails before a GPU is touched. The pinned server is sglang==0.5.23
(see docs/sglang.md); the flag names used by ``launch_server_command`` are checked against its
``sglang/srt/arg_groups/fields/`` by tests/test_sglang_engine.py.

How: ``SGLangConfig(model_path="/ckpt/Qwen2.5-Math-7B", tp_size=2, port=30000)`` or
``OmegaConf.structured(SGLangConfig)``.
"""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING, Optional

from megatron_zero.config.problems import raise_problems

if TYPE_CHECKING:
    from megatron_zero.config.cluster import ClusterConfig

# The --dtype choices of sglang 0.5.23 (sglang/srt/arg_groups/fields/model.py).
SGLANG_DTYPES = ("auto", "half", "float16", "bfloat16", "float", "float32")
# sglang.dtype when left unset: bfloat16 on GPUs; float32 on CPU, where the server's float32 output equals HF
# transformers' (log-prob gap <= 2.2e-6, measured) and "auto" would serve an fp32 checkpoint in float16.
DEFAULT_DTYPE = {True: "bfloat16", False: "float32"}  # keyed by "the server has GPUs"
# sglang.max_total_tokens when left unset. On GPUs None: the KV-cache pool is what mem_fraction_static leaves. On
# CPU SGLang reads mem_fraction_static as a share of the machine's RAM and allocates it all at start (0.7 of a
# 24 GiB machine: 14 GB of KV cache, 16 s to allocate, measured), so the pool gets a size that fits beside the
# trainer; 65536 tokens is 256 responses of 256 tokens.
DEFAULT_MAX_TOTAL_TOKENS = {True: None, False: 65536}


@dataclasses.dataclass(kw_only=True, frozen=True)
class SGLangConfig:
    # HF checkpoint directory the server loads; weight syncs must name exactly the tensors it holds.
    model_path: str = ""
    # true: the trainer launches one server per engine in Ray actors, on the Megatron ranks' GPUs (colocated) or on
    # GPUs of their own (disaggregated); rollout/sglang_servers.py; host and port are then the node's IP and a
    # free port found there.
    # false: connect to the one server already running at host:port (started by hand, without
    # --enable-memory-saver); in training it takes weights by broadcast from rank 0 (colocated=False).
    launch: bool = True
    host: str = "127.0.0.1"
    port: int = 30000
    # Tensor-parallel size of this one server (its GPUs are base_gpu_id .. base_gpu_id + tp_size - 1).
    tp_size: int = 1
    base_gpu_id: int = 0
    # Share of each GPU's memory for weights + KV cache. Colocated with the actor, the actor's memory is
    # released during rollout, so this is the share while the actor is offloaded.
    mem_fraction_static: float = 0.7
    # None: DEFAULT_DTYPE (bfloat16 on GPUs, float32 on CPU); see served_dtype.
    dtype: Optional[str] = None
    # KV-cache pool in tokens (--max-total-tokens). None: DEFAULT_MAX_TOTAL_TOKENS (on GPUs what
    # mem_fraction_static leaves; a fixed pool on CPU); see served_max_total_tokens.
    max_total_tokens: Optional[int] = None
    # Colocated (cluster.colocate): weights arrive as CUDA IPC handles (/update_weights_from_tensor) and GPU memory
    # is released during training (needs --enable-memory-saver). Disaggregated (cluster.rollout_num_gpus): weights
    # arrive by NCCL broadcast (/update_weights_from_distributed) and memory is never released.
    colocated: bool = True
    # Prefix caching across requests; prompts repeat n times per step, so keep it on unless debugging.
    disable_radix_cache: bool = False
    # SGLang honours a per-request sampling seed only in deterministic mode (sampling backend becomes
    # "pytorch", slower); SamplingParams.seed is refused when this is off rather than silently ignored.
    enable_deterministic_inference: bool = False
    random_seed: Optional[int] = None
    context_length: Optional[int] = None
    trust_remote_code: bool = False
    # Streaming rollouts send one request per prompt; this many are in flight at once (one thread each). The
    # server schedules them together like one batch; slime's default per server is the same.
    max_concurrent_requests: int = 512
    # HTTP timeouts (seconds). A /generate call holds a whole rollout batch, so it gets the long one.
    generate_timeout_s: float = 3600.0
    control_timeout_s: float = 600.0
    # Longer than the server's own SGLANG_HEALTH_CHECK_TIMEOUT (20 s), so the server answers 503 first.
    health_timeout_s: float = 30.0
    startup_timeout_s: float = 900.0
    # Connection failures and 503 answers are retried this many times, with linear back-off.
    max_retries: int = 3
    retry_backoff_s: float = 2.0
    # Passed verbatim to `python -m sglang.launch_server` after our flags, e.g. ["--chunked-prefill-size", "8192"].
    extra_server_args: list[str] = dataclasses.field(default_factory=list)

    def __post_init__(self) -> None:
        problems: list[str] = []  # every value problem of this config, raised together
        if not self.model_path:
            problems.append("sglang.model_path is empty; set it to the HF checkpoint directory the server loads")
        if not 0 < self.port < 65536:
            problems.append(f"sglang.port={self.port} must be in 1..65535")
        if self.tp_size < 1:
            problems.append(f"sglang.tp_size={self.tp_size} must be >= 1")
        if self.base_gpu_id < 0:
            problems.append(f"sglang.base_gpu_id={self.base_gpu_id} must be >= 0")
        if not 0 < self.mem_fraction_static < 1:
            problems.append(f"sglang.mem_fraction_static={self.mem_fraction_static} must be in (0, 1)")
        if self.dtype is not None and self.dtype not in SGLANG_DTYPES:
            problems.append(f"sglang.dtype={self.dtype!r} is not an SGLang dtype; use one of {list(SGLANG_DTYPES)}")
        for name in ("generate_timeout_s", "control_timeout_s", "health_timeout_s", "startup_timeout_s"):
            if not getattr(self, name) > 0:
                problems.append(f"sglang.{name}={getattr(self, name)} must be > 0 seconds")
        if self.max_concurrent_requests < 1:
            problems.append(f"sglang.max_concurrent_requests={self.max_concurrent_requests} must be >= 1")
        if self.max_retries < 0:
            problems.append(f"sglang.max_retries={self.max_retries} must be >= 0 (0 = no retry)")
        if self.retry_backoff_s < 0:
            problems.append(f"sglang.retry_backoff_s={self.retry_backoff_s} must be >= 0")
        if self.max_total_tokens is not None and self.max_total_tokens < 1:
            problems.append(f"sglang.max_total_tokens={self.max_total_tokens} must be >= 1 or None (the default)")
        if self.context_length is not None and self.context_length < 1:
            problems.append(f"sglang.context_length={self.context_length} must be >= 1 or None (model default)")
        reserved = {"--model-path", "--host", "--port", "--tp-size", "--tensor-parallel-size", "--base-gpu-id",
                    "--mem-fraction-static", "--dtype", "--enable-memory-saver", "--max-total-tokens"}
        clashes = sorted(reserved & {arg.split("=", 1)[0] for arg in self.extra_server_args})
        if clashes:
            problems.append(f"sglang.extra_server_args sets {clashes}, which are SGLangConfig fields; set the fields")
        raise_problems(problems)

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def served_dtype(self, on_gpus: bool) -> str:
        """The --dtype the server runs: ``dtype``, or ``DEFAULT_DTYPE`` for its device when unset."""
        return self.dtype if self.dtype is not None else DEFAULT_DTYPE[on_gpus]

    def served_max_total_tokens(self, on_gpus: bool) -> Optional[int]:
        """The --max-total-tokens the server runs (None: not passed): ``max_total_tokens``, or the device's default."""
        return self.max_total_tokens if self.max_total_tokens is not None else DEFAULT_MAX_TOTAL_TOKENS[on_gpus]

    def check_launch(self, cluster: "ClusterConfig") -> None:
        """Can the trainer launch these servers on ``cluster`` (``launch=true``)? Colocated on the Megatron ranks'
        GPUs (``cluster.colocate``) or disaggregated on GPUs of their own (``cluster.rollout_num_gpus``)."""
        if cluster.colocate:
            if not self.colocated:
                raise ValueError("sglang.colocated=False, but servers on the actor's GPUs must release their memory "
                                 "during training (--enable-memory-saver); set sglang.colocated=True")
        elif cluster.rollout_num_gpus:
            if self.colocated:
                raise ValueError(f"sglang.colocated=True, but the engines run on cluster.rollout_num_gpus="
                                 f"{cluster.rollout_num_gpus} GPUs of their own, where CUDA IPC weight updates cannot "
                                 "reach them; set sglang.colocated=False (weights by NCCL broadcast)")
            if cluster.rollout_num_gpus % self.tp_size:
                raise ValueError(f"sglang.tp_size={self.tp_size} must divide cluster.rollout_num_gpus="
                                 f"{cluster.rollout_num_gpus} (one engine per tp_size GPUs)")
        else:
            raise ValueError("the SGLang servers have no GPUs: set cluster.colocate=True to share the Megatron ranks' "
                             "GPUs, or cluster.rollout_num_gpus=N (with sglang.colocated=False) for GPUs of their own")
        if self.base_gpu_id != 0:
            raise ValueError(f"sglang.base_gpu_id={self.base_gpu_id}: launched servers see only their engine's GPUs "
                             "(CUDA_VISIBLE_DEVICES from the placement), numbered from 0; leave base_gpu_id at 0")
        if cluster.use_gpus and cluster.gpus_per_node % self.tp_size:
            raise ValueError(f"sglang.tp_size={self.tp_size} must divide cluster.gpus_per_node={cluster.gpus_per_node}: "
                             "an engine's GPUs must lie on one node")
