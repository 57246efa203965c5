"""Shared test setup: tools/ on the import path, quiet megatron-core warnings, fake SGLang servers, the demo
model converted once."""

import sys
import threading
import warnings
from pathlib import Path

import pytest

from megatron_zero.utils.cpu_process import prepare_cpu_process  # noqa: E402

# As every process entry point of the package does: megatron-core's expected CPU warnings quiet, CUDA-only kernel
# packages that cannot load here seen as absent (the GPU image's pins install them).
prepare_cpu_process()

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tools"))


@pytest.fixture
def fakes():
    """Two fake SGLang servers on 127.0.0.1 (tests/test_sglang_engine.py), for routers and several engines."""
    from http.server import ThreadingHTTPServer

    from test_sglang_engine import FakeSGLang, make_handler

    states, servers = [], []
    for _ in range(2):
        state = FakeSGLang()
        server = ThreadingHTTPServer(("127.0.0.1", 0), make_handler(state))
        server.daemon_threads = True
        threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()
        state.port = server.server_address[1]
        states.append(state)
        servers.append(server)
    yield states
    for server in servers:
        server.shutdown()
        server.server_close()


@pytest.fixture
def gloo_group_of_one(tmp_path):
    """A gloo process group holding only this process (rank 0 of 1), for code that broadcasts from rank 0."""
    import torch.distributed as dist

    if dist.is_initialized():
        pytest.skip("a default process group is already initialised in this process")
    dist.init_process_group("gloo", init_method=f"file://{tmp_path}/store", rank=0, world_size=1)
    try:
        yield dist.new_group([0])
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="session")
def base_mcore(tmp_path_factory):
    """The demo model converted to Megatron once per session; trainer runs reuse it (mcore_path)."""
    from megatron_zero.config.parallel import ParallelConfig
    from megatron_zero.demo import BASE_MODEL_PATH
    from megatron_zero.models.mcore_checkpoint import convert_hf_to_mcore
    from megatron_zero.parallel.local_launch import run_local_workers

    out = tmp_path_factory.mktemp("base") / "mcore"
    run_local_workers(convert_hf_to_mcore, ParallelConfig(), args=(str(BASE_MODEL_PATH), str(out)))
    return str(out)


@pytest.fixture(scope="session")
def tiny_qwen2(tmp_path_factory):
    """A tiny random Qwen2 (tied embeddings: at PP=2 the embedding and output layer sit on different stages) as
    (HF directory, its Megatron conversion), made once per session; tests only read it."""
    from megatron_zero.config.parallel import ParallelConfig
    from megatron_zero.models.mcore_checkpoint import convert_hf_to_mcore
    from megatron_zero.models.tiny import save_tiny_model
    from megatron_zero.parallel.local_launch import run_local_workers

    root = tmp_path_factory.mktemp("tiny_qwen2")
    hf_dir = save_tiny_model("qwen2", root / "hf")
    run_local_workers(convert_hf_to_mcore, ParallelConfig(), args=(str(hf_dir), str(root / "mcore")))
    return str(hf_dir), str(root / "mcore")


@pytest.fixture
def real_sglang_own_ray():
    """For tests whose command launches the real SGLang server (tests/real_sglang.py: skipped, or failed in CI, where
    it cannot run) and starts its own local Ray cluster, sized for its bundles: one left by another test would not
    fit, so none is left before or after."""
    import ray

    from real_sglang import require_real_sglang

    require_real_sglang()
    if ray.is_initialized():
        ray.shutdown()
    yield
    if ray.is_initialized():
        ray.shutdown()
