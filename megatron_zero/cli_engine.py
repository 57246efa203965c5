"""The --engine flags `eval` and `difficulty` share, and config errors written back as the flags the user typed.

    add_engine_arguments(parser)             # --engine torch|sglang, --num-gpus, --tp-size, --sglang-url, ...
    engine = engine_config(args)             # -> EngineConfig; its errors name --num-gpus, not cluster.*
    raise as_flags(error, ("eval",), {"n_samples": "--n"})
"""

from __future__ import annotations

import argparse
import re


def as_flags(error: ValueError, prefixes: tuple[str, ...], renamed: dict[str, str],
             bare: tuple[str, ...] = ()) -> ValueError:
    """A command config's error with its keys ("eval.n_samples", "data.train.max_prompt_tokens", and the fields in
    `bare`, which a config names without a prefix) written as the command's flags ("--n", "--max-prompt-tokens"):
    what the user typed. A bare field is a key only with its value or in a sum ("num_prompts=0", "shape 'x'",
    "prompt_tokens + response_tokens"), not as a plain word ("a known shape")."""
    def flag(match: re.Match) -> str:
        return renamed.get(match.group(2), "--" + match.group(2).replace("_", "-"))

    keys = []
    if prefixes:
        keys.append(rf"({'|'.join(re.escape(prefix) for prefix in prefixes)})\.([a-z_]+)")
    if bare:
        keys.append(rf"()({'|'.join(bare)})(?=\s?[=+'])")
    text = str(error)
    for key in keys:
        text = re.sub(rf"(?<![\w.-]){key}", flag, text)
    return ValueError(text)


# The --engine flags for the SGLangConfig / EngineConfig fields they set (the rest: --field-name).
ENGINE_FLAGS = {"rollout_num_gpus": "--num-gpus", "gpus_per_node": "--num-gpus", "cpu_workers_per_node": "--num-gpus",
                "extra_server_args": "--sglang-arg", "enable_deterministic_inference": "--deterministic",
                "sglang_device": "--device"}
# The `difficulty` command's flags for its DatasetConfig and PassRateEstimateConfig fields (the rest: --field-name).
DIFFICULTY_FLAGS = {"num_samples": "--n", "path": "--data"}


def difficulty_flag(field: str) -> str:
    """How `difficulty` names a DatasetConfig field (``data.problems.DatasetKeys``)."""
    return DIFFICULTY_FLAGS.get(field, "--" + field.replace("_", "-"))


def engine_config(args: argparse.Namespace):
    """The --engine options as an EngineConfig: the torch engine here, SGLang launched on --num-gpus GPUs through
    Ray, or the SGLang server at --sglang-url."""
    from urllib.parse import urlsplit

    from megatron_zero.config.evaluation import EngineConfig
    from megatron_zero.config.rollout import TorchEngineConfig
    from megatron_zero.config.sglang import SGLangConfig

    dtype = {"dtype": args.dtype} if args.dtype else {}
    if args.engine == "torch":
        return EngineConfig(engine="torch", torch=TorchEngineConfig(device=args.device or "cpu", **dtype))
    if args.sglang_url:
        url = urlsplit(args.sglang_url)
        if not url.hostname or not url.port:
            raise ValueError(f"--sglang-url {args.sglang_url!r} must be http://HOST:PORT")
        where = {"launch": False, "host": url.hostname, "port": url.port}
    else:
        where = {"launch": True}
    try:
        sglang = SGLangConfig(model_path=args.model, colocated=False, tp_size=args.tp_size,
                              enable_deterministic_inference=args.deterministic, context_length=args.context_length,
                              max_total_tokens=args.max_total_tokens,
                              extra_server_args=list(args.sglang_arg), **where, **dtype)
        return EngineConfig(engine="sglang", sglang=sglang, num_gpus=args.num_gpus, ray_address=args.ray_address,
                            sglang_device=args.device or "cuda")
    except ValueError as error:
        # The servers' layout is --num-gpus GPUs (or CPU bundles) of their own, one server per --tp-size.
        raise as_flags(error, ("sglang", "cluster"), ENGINE_FLAGS, bare=("num_gpus", "sglang_device")) from None


def add_engine_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("engine", "torch: in this process (CPU or one GPU); sglang: servers launched "
                                                "on --num-gpus GPUs of the Ray cluster, or the one at --sglang-url")
    group.add_argument("--engine", choices=("torch", "sglang"), default="torch")
    group.add_argument("--device", default=None,
                       help="torch engine: cpu (default), cuda or cuda:N; launched SGLang servers: cuda (default) or "
                            "cpu (the real server on CPU, docs/sglang.md)")
    group.add_argument("--dtype", default=None,
                       help="weights dtype (default: torch float32, SGLang bfloat16 on GPUs and float32 on CPU)")
    group.add_argument("--sglang-url", default=None, help="use the SGLang server running at http://HOST:PORT")
    group.add_argument("--num-gpus", type=int, default=1,
                       help="GPUs for launched SGLang servers (with --device cpu: CPU bundles, one per server rank)")
    group.add_argument("--tp-size", type=int, default=1, help="tensor-parallel GPUs per SGLang server")
    group.add_argument("--context-length", type=int, default=None,
                       help="launched SGLang servers' context (default: the model's max_position_embeddings)")
    group.add_argument("--max-total-tokens", type=int, default=None,
                       help="launched SGLang servers' KV pool in tokens (default: what --mem-fraction-static leaves on "
                            "GPUs, 65536 on CPU)")
    group.add_argument("--deterministic", action="store_true",
                       help="SGLang deterministic inference: honours --seed (slower sampling)")
    group.add_argument("--sglang-arg", action="append", default=[],
                       help="extra sglang.launch_server argument (repeatable), e.g. --sglang-arg=--disable-cuda-graph")
    group.add_argument("--ray-address", default="auto")
