"""Weight push from the Megatron ranks into SGLang servers (trainer/weight_push.py).

Colocated: every rank feeds the SGLang server rank on its own GPU.

CUDA IPC handles need GPUs, so the ranks here (gloo, CPU) serialise with a stand-in that pickles their bucket
and rank; everything else is the production path: ``HFWeightStream(all_ranks=True)`` at TP=2 and PP=2, the gloo
groups per engine, the gather of per-rank payloads to each engine's first rank, and ``SGLangEngine``'s requests
and name bookkeeping against fake SGLang 0.5.23 servers (tests/test_sglang_engine.py). The payloads are checked
against the HF checkpoint bit for bit.

Disaggregated: rank 0 broadcasts over one gloo group to a CPU stand-in server of tp 2 (tests/sglang_cpu_server.py),
which starts from another model; afterwards its log-probs must equal the pushed model's, computed in float64. The
same pushes into the real SGLang server (tp 1 on CPU: its CPU tensor parallelism needs AMX) are
tests/test_sglang_real_server.py.

    python -m pytest tests/test_weight_push.py -q
"""

from __future__ import annotations

import base64
import pickle
import threading

import pytest
import torch

from megatron_zero.config.parallel import ParallelConfig
from megatron_zero.parallel.local_launch import run_local_workers
from test_sglang_engine import FakeSGLang

BUCKET_BYTES = 3000  # several buckets for the tiny model


def _cpu_serialize(bucket):
    """Stand-in for CUDA IPC serialisation: this rank's copy of the bucket, by value."""
    import torch.distributed as dist

    payload = {"rank": dist.get_rank(), "tensors": [(name, tensor.clone()) for name, tensor in bucket]}
    return base64.b64encode(pickle.dumps(payload)).decode(), torch.empty(0)


def _push_job(mcore_dir: str, hf_dir: str, urls: list[str], tp_size: int):
    from megatron_zero.actor.actor import load_model
    from megatron_zero.config.model import ModelConfig
    from megatron_zero.config.sglang import SGLangConfig
    from megatron_zero.parallel.reshard import HFWeightStream
    from megatron_zero.trainer.weight_push import ColocatedWeightPush

    model, info = load_model(mcore_dir, ModelConfig(params_dtype="float32"))
    push = ColocatedWeightPush(urls, SGLangConfig(model_path=hf_dir, tp_size=tp_size, retry_backoff_s=0.0),
                               serialize=_cpu_serialize)
    stream = HFWeightStream(model, info.arch, info.bridge, bucket_bytes=BUCKET_BYTES, all_ranks=True)
    return push.push(stream, version=3)


def _hf_tensors(hf_dir: str) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(f"{hf_dir}/model.safetensors")


def _check_engine(fake: FakeSGLang, leader: int, tp_size: int, expected: dict[str, torch.Tensor]) -> None:
    updates = [body for path, body in fake.requests if path == "/update_weights_from_tensor"]
    assert len(updates) > 1  # several buckets
    received: dict[str, torch.Tensor] = {}
    for body in updates:
        assert body["load_format"] == "flattened_bucket" and body["flush_cache"] is False
        entries = [pickle.loads(base64.b64decode(s)) for s in body["serialized_named_tensors"]]
        # Entry j is opened by server rank j, which runs on the GPU of Megatron rank leader + j.
        assert [entry["rank"] for entry in entries] == list(range(leader, leader + tp_size))
        for other in entries[1:]:  # every rank holds the same full bucket
            assert [n for n, _ in other["tensors"]] == [n for n, _ in entries[0]["tensors"]]
            assert all(torch.equal(a, b) for (_, a), (_, b) in zip(other["tensors"], entries[0]["tensors"]))
        for name, tensor in entries[0]["tensors"]:
            assert name not in received, f"{name} sent twice"
            received[name] = tensor
    assert sorted(received) == sorted(expected)
    for name, tensor in expected.items():
        assert torch.equal(received[name], tensor.float()), name
    assert fake.requests[-1][0] == "/flush_cache"  # after the last bucket, once


@pytest.mark.parametrize("parallel, num_engines", [
    (ParallelConfig(tensor_parallel_size=2), 1),    # one engine with tp 2: rank 0 gathers both payloads
    (ParallelConfig(pipeline_parallel_size=2), 2),  # two engines with tp 1: stage 1 broadcasts its layers
])
def test_every_rank_feeds_its_server_rank(tiny_qwen2, fakes, parallel, num_engines):
    hf_dir, mcore_dir = tiny_qwen2
    tp_size = 2 // num_engines
    urls = [f"http://127.0.0.1:{fake.port}" for fake in fakes[:num_engines]]
    per_rank = run_local_workers(_push_job, parallel, args=(mcore_dir, hf_dir, urls, tp_size))
    expected = _hf_tensors(hf_dir)
    for index in range(num_engines):
        leader = index * tp_size
        _check_engine(fakes[index], leader, tp_size, expected)
        stats = per_rank[leader]
        assert stats.version == 3 and stats.names == set(expected)
    assert [stats is None for stats in per_rank] == [rank % tp_size != 0 for rank in range(2)]


def test_push_refuses_a_layout_without_one_server_rank_per_rank(tiny_qwen2, fakes):
    hf_dir, mcore_dir = tiny_qwen2
    with pytest.raises(Exception, match=r"1 engines x rollout.sglang.tp_size=1 GPUs != 2 Megatron ranks"):
        run_local_workers(_push_job, ParallelConfig(tensor_parallel_size=2),
                          args=(mcore_dir, hf_dir, [f"http://127.0.0.1:{fakes[0].port}"], 1))


# --------------------------------------------------------------------------- disaggregated: broadcast from rank 0


def _broadcast_job(mcore_dir: str, server_model_dir: str, urls: list[str], tp_size: int = 1):
    from megatron_zero.actor.actor import load_model
    from megatron_zero.config.model import ModelConfig
    from megatron_zero.config.sglang import SGLangConfig
    from megatron_zero.parallel.reshard import HFWeightStream
    from megatron_zero.trainer.weight_push import BroadcastWeightPush

    model, info = load_model(mcore_dir, ModelConfig(params_dtype="float32"))
    config = SGLangConfig(model_path=server_model_dir, colocated=False, retry_backoff_s=0.0, control_timeout_s=60.0,
                          tp_size=tp_size)
    push = BroadcastWeightPush(urls, config, backend="gloo", master_address="127.0.0.1")
    stats = [push.push(HFWeightStream(model, info.arch, info.bridge, bucket_bytes=BUCKET_BYTES), version)
             for version in (1, 2)]  # the group serves every step's sync
    return [(s.version, s.num_buckets, sorted(s.names)) if s is not None else None for s in stats]


def test_a_two_rank_server_joins_as_both_ranks_and_serves_the_push(tiny_qwen2, tmp_path):
    """An engine with sglang.tp_size=2 is two server ranks (rank_offset and rank_offset + 1): the group of three
    forms only when both joined, and the served model is the pushed one. A trainer that counts one rank per engine
    is refused at once, naming the rank that does not fit."""
    from megatron_zero.config.sglang import SGLangConfig
    from megatron_zero.demo.tokenizer import build_char_tokenizer
    from megatron_zero.models.tiny import save_tiny_model
    from megatron_zero.rollout.sglang_engine import SGLangEngine
    from test_sglang_cpu_server import float64_logprobs, start_server, wait_healthy

    hf_dir, mcore_dir = tiny_qwen2
    model_dir = save_tiny_model("qwen2", tmp_path / "other", seed=1)
    build_char_tokenizer().save_pretrained(str(model_dir))
    process, port = start_server(model_dir, tmp_path / "server.log", "--tp-size", "2")
    try:
        wait_healthy(process, port, tmp_path / "server.log")
        url = f"http://127.0.0.1:{port}"
        prompt, response = [5, 17, 3, 99], [42, 7, 250, 1, 64]
        engine = SGLangEngine(SGLangConfig(model_path=str(model_dir), port=port, colocated=False, tp_size=2))
        pushed = float64_logprobs(hf_dir, prompt, response)
        assert max(abs(a - b) for a, b in zip(engine.compute_logprobs([prompt], [response], 1.0)[0], pushed)) > 0.1
        per_rank = run_local_workers(_broadcast_job, ParallelConfig(), args=(mcore_dir, str(model_dir), [url], 2))
        assert [version for version, _, _ in per_rank[0]] == [1, 2]
        assert engine.compute_logprobs([prompt], [response], 1.0)[0] == pytest.approx(pushed, abs=1e-5)
        with pytest.raises(Exception, match=r"TP rank 1 of this tp_size=2 server would be rank 2 of a world_size=2"):
            run_local_workers(_broadcast_job, ParallelConfig(), args=(mcore_dir, str(model_dir), [url], 1))
    finally:
        process.kill()
        process.wait()


def test_engine_that_refuses_the_group_fails_the_push_at_once(fakes, gloo_group_of_one):
    """An engine answering /init_weights_update_group with 400 never joins: the error names it at once, not at the
    rendezvous timeout (60 s here)."""
    import time

    from megatron_zero.config.sglang import SGLangConfig
    from megatron_zero.rollout.sglang_http import SGLangHTTPError
    from megatron_zero.trainer.weight_push import BroadcastWeightPush

    fake = fakes[0]
    fake.mode = "weights_fail"
    config = SGLangConfig(model_path="/ckpt/tiny", colocated=False, control_timeout_s=60.0, retry_backoff_s=0.0)
    start = time.monotonic()
    with pytest.raises(SGLangHTTPError, match=r"/init_weights_update_group failed \(HTTP 400\)") as failure:
        BroadcastWeightPush([f"http://127.0.0.1:{fake.port}"], config, backend="gloo", master_address="127.0.0.1")
    assert time.monotonic() - start < 10
    assert f"from http://127.0.0.1:{fake.port} while joining the weight broadcast group of 2 ranks" in str(
        failure.value.__notes__)
    # Nor is this side left waiting for the peer that will not come: a thread still in the store's C++ wait when
    # the interpreter exits aborts the process (CI once: every test passed, then exit 134).
    assert not [thread for thread in threading.enumerate() if thread.name == "weight-group-join"]


_EXIT_AFTER_A_FAILED_JOIN = """
import socket, sys, threading, time
from megatron_zero.parallel.weight_broadcast import abandon_rendezvous, init_weight_broadcast_group

probe = socket.socket(); probe.bind(("127.0.0.1", 0)); port = probe.getsockname()[1]; probe.close()
abandoned = threading.Event()

def join():
    try:
        init_weight_broadcast_group("127.0.0.1", port, 0, 3, backend="gloo", timeout_s=1.0, group_name="w",
                                    abandoned=abandoned)
    except Exception:
        pass

joining = threading.Thread(target=join, daemon=True)
joining.start()
time.sleep(0.3)  # the two peers never come
abandon_rendezvous("127.0.0.1", port, 3, abandoned, joining)
print("still waiting:", joining.is_alive())

class SlowTeardown:  # finalization outlasts the rendezvous timeout, as a large process's does
    def __del__(self, sleep=time.sleep):
        sleep(2.0)

keep = SlowTeardown()
"""


def test_a_process_exits_cleanly_after_giving_up_a_weight_group_join():
    """Rank 0's rendezvous thread, left waiting in C++ after a peer failed, woke during interpreter finalization and
    aborted the process (exit 134, 'terminate called without an active exception'; without abandon_rendezvous the
    script below does exactly that). Given up, the wait ends at once and the process exits 0."""
    import subprocess
    import sys

    done = subprocess.run([sys.executable, "-c", _EXIT_AFTER_A_FAILED_JOIN], capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "still waiting: False" in done.stdout
