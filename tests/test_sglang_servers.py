"""Tests of launching SGLang servers in Ray actors on the placement, and of the router in front of the engines.

No GPU and no sglang here, so the server is a stand-in: a tiny Python HTTP server answering GET /health,
started through the same code path as the real one (``server_command`` replaces only the argv). The real
``python -m sglang.launch_server`` is used where it must fail (not installed: exit code 1). The router runs
against two fake SGLang 0.5.23 servers from tests/test_sglang_engine.py. A local CPU Ray cluster with CPU
bundles stands in for the GPU placement; ~25 s on an idle 2-core machine.

Run: python -m pytest tests/test_sglang_servers.py -q
"""

from __future__ import annotations

import dataclasses
import importlib.util
import itertools
import re
import sys
import time
from pathlib import Path

import pytest
import ray
import requests
import torch

from megatron_zero.config.cluster import ClusterConfig
from megatron_zero.config.sglang import SGLangConfig
from megatron_zero.rollout.engine import SamplingParams
from megatron_zero.rollout.sglang_engine import SGLangEngine
from megatron_zero.rollout.sglang_http import SGLangHTTPError
from megatron_zero.rollout.engine_router import EngineRouter, split_by_prompt_runs
from megatron_zero.rollout.sglang_servers import (
    SGLangServerError, plan_engines, server_env, slot_server_launch, start_sglang_servers,
)
from megatron_zero.cluster.placement import Bundle, ClusterPlacement, create_placement, remove_placement
from real_sglang import real_sglang_missing
from test_sglang_engine import reference_logprob

CPU_CLUSTER = ClusterConfig(gpus_per_node=0, cpu_workers_per_node=2, cpus_per_worker=1, colocate=True,
                            ray_call_timeout_s=60.0, startup_timeout_s=30.0)
CONFIG = SGLangConfig(model_path="/ckpt/tiny", startup_timeout_s=20.0, retry_backoff_s=0.0)

# The stand-in server: answers GET /health with the status given on its command line, and prints the GPUs it sees.
STAND_IN = """
import os, sys
from http.server import BaseHTTPRequestHandler, HTTPServer
host, port, status = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
print("stand-in sees CUDA_VISIBLE_DEVICES=%s" % os.environ.get("CUDA_VISIBLE_DEVICES"), flush=True)

class Handler(BaseHTTPRequestHandler):
    def do_GET(self):
        self.send_response(status if self.path == "/health" else 404)
        self.end_headers()

    def log_message(self, *args):
        pass

HTTPServer((host, port), Handler).serve_forever()
"""


def _bundle(index: int, node: str, gpu: int | None) -> Bundle:
    return Bundle(index=index, node_id=f"id-{node}", node_ip=node, gpu_id=gpu)


def _gone(pid: int, within_s: float = 5.0) -> bool:
    """The process has exited (a zombie nobody reaped yet counts as exited)."""
    deadline = time.monotonic() + within_s
    while time.monotonic() < deadline:
        try:
            state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        except FileNotFoundError:
            return True
        if state == "Z":
            return True
        time.sleep(0.05)
    return False


# --------------------------------------------------------------------------- pure functions (no Ray)


def test_plan_engines_groups_consecutive_bundles_per_node():
    bundles = [_bundle(i, "10.0.0.1", gpu) for i, gpu in enumerate(range(4))]
    bundles += [_bundle(4 + i, "10.0.0.2", gpu) for i, gpu in enumerate(range(4))]
    for tp in (1, 2, 4):
        slots = plan_engines(bundles, tp)
        assert [s.index for s in slots] == list(range(8 // tp))
        assert [b for s in slots for b in s.bundles] == bundles  # every GPU in exactly one engine, in rank order
        for slot in slots:
            assert len({b.node_ip for b in slot.bundles}) == 1 and len(slot.gpu_ids) == tp
    assert plan_engines(bundles, 2)[3].gpu_ids == (2, 3) and plan_engines(bundles, 2)[3].node_ip == "10.0.0.2"
    cpu = plan_engines([_bundle(0, "h", None), _bundle(1, "h", None)], 1)
    assert [s.gpu_ids for s in cpu] == [(), ()]


def test_plan_engines_errors_name_the_problem():
    two_nodes = [_bundle(0, "10.0.0.1", 0), _bundle(1, "10.0.0.1", 1), _bundle(2, "10.0.0.2", 0)]
    with pytest.raises(ValueError, match=r"sglang.tp_size=2 must divide the 3 GPUs"):
        plan_engines(two_nodes, 2)
    with pytest.raises(ValueError, match=r"engine 0 with rollout.sglang.tp_size=3 would span nodes \(bundle 0 on "
                                         r"10.0.0.1 GPU 0, bundle 1 on 10.0.0.1 GPU 1, bundle 2 on 10.0.0.2 GPU 0\)"):
        plan_engines(two_nodes, 3)
    straddle = [_bundle(0, "a", 0), _bundle(1, "a", 1), _bundle(2, "a", 2), _bundle(3, "b", 0)]
    with pytest.raises(ValueError, match=r"engine 1 .* would span nodes \(bundle 2 on a GPU 2, bundle 3 on b"):
        plan_engines(straddle, 2)
    with pytest.raises(ValueError, match=r"engine 0 would use one GPU twice \(bundle 0 on a GPU 1, bundle 1 on a GPU"):
        plan_engines([_bundle(0, "a", 1), _bundle(1, "a", 1)], 2)
    with pytest.raises(ValueError, match="must be >= 1"):
        plan_engines(two_nodes, 0)
    with pytest.raises(ValueError, match="mixes bundles with and without a GPU"):
        plan_engines([_bundle(0, "a", 0), _bundle(1, "a", None)], 1)


def test_server_env_sets_the_engine_gpus_and_drops_original_logprob():
    base = {"PATH": "/bin", "CUDA_VISIBLE_DEVICES": "3", "SGLANG_RETURN_ORIGINAL_LOGPROB": "1"}
    assert server_env(base, (3, 5)) == {"PATH": "/bin", "CUDA_VISIBLE_DEVICES": "3,5"}
    # No GPUs: the CPU mode's variables (tests/test_sglang_cpu_mode.py), the caller's CUDA_VISIBLE_DEVICES untouched.
    on_cpu = server_env(base, ())
    assert on_cpu["CUDA_VISIBLE_DEVICES"] == "3" and on_cpu["SGLANG_USE_CPU_ENGINE"] == "1"
    assert "SGLANG_RETURN_ORIGINAL_LOGPROB" not in on_cpu
    assert base["SGLANG_RETURN_ORIGINAL_LOGPROB"] == "1"  # the caller's mapping is not changed


def test_slot_server_launch_is_what_the_actor_runs():
    """The pure function a dry run prints: the engine's argv bound to the host and port, its GPUs as the env."""
    slot = plan_engines([_bundle(0, "10.0.0.2", 4), _bundle(1, "10.0.0.2", 5)], 2)[0]
    config = dataclasses.replace(CONFIG, tp_size=2)
    command, env = slot_server_launch(config, slot, "10.0.0.2", 31234, {"PATH": "/bin"})
    assert command[1:3] == ["-m", "sglang.launch_server"] and env == {"PATH": "/bin", "CUDA_VISIBLE_DEVICES": "4,5"}
    flags = dict(zip(command, command[1:]))
    assert flags["--host"] == "10.0.0.2" and flags["--port"] == "31234" and flags["--tp-size"] == "2"
    assert flags["--base-gpu-id"] == "0" and "--enable-memory-saver" in command


def test_split_by_prompt_runs_keeps_runs_whole_and_balances():
    rng = torch.Generator().manual_seed(0)
    for trial in range(200):
        run_lengths = torch.randint(1, 6, (int(torch.randint(0, 9, (1,), generator=rng)),), generator=rng).tolist()
        prompts = [[run, 7] for run, length in enumerate(run_lengths) for _ in range(length)]
        num_parts = trial % 4 + 1
        parts = split_by_prompt_runs(prompts, num_parts)
        assert len(parts) == num_parts and [k for part in parts for k in part] == list(range(len(prompts)))
        for part in parts:  # no run is cut: a part starts at a run start and ends at a run end
            assert part.start == 0 or part.start == len(prompts) or prompts[part.start] != prompts[part.start - 1]
        # Brute force: no other choice of cuts at run boundaries has a smaller largest part.
        cuts = [0] + [i for i in range(1, len(prompts)) if prompts[i] != prompts[i - 1]] + [len(prompts)]
        best = min((max(b - a for a, b in zip((0,) + c, c + (len(prompts),)))
                    for c in itertools.combinations_with_replacement(cuts, num_parts - 1)), default=len(prompts))
        assert max(len(p) for p in parts) <= best + max(run_lengths, default=0)


def test_launch_refuses_configs_that_cannot_place_servers():
    placement = ClusterPlacement(placement_group=None, bundles=(_bundle(0, "a", 0),))
    with pytest.raises(ValueError, match="the SGLang servers have no GPUs"):
        start_sglang_servers(dataclasses.replace(CPU_CLUSTER, colocate=False), placement, CONFIG, "logs")
    disaggregated = dataclasses.replace(CPU_CLUSTER, colocate=False, rollout_num_gpus=1)
    with pytest.raises(ValueError, match="sglang.colocated=True, but the engines run on cluster.rollout_num_gpus=1"):
        start_sglang_servers(disaggregated, placement, CONFIG, "logs")
    with pytest.raises(ValueError, match="sglang.colocated=False"):
        start_sglang_servers(CPU_CLUSTER, placement, dataclasses.replace(CONFIG, colocated=False), "logs")
    with pytest.raises(ValueError, match="sglang.base_gpu_id=2"):
        start_sglang_servers(CPU_CLUSTER, placement, dataclasses.replace(CONFIG, base_gpu_id=2), "logs")


# --------------------------------------------------------------------------- servers in Ray actors


@pytest.fixture(scope="module")
def placement():
    ray.init(num_cpus=2, include_dashboard=False)
    placement = create_placement(CPU_CLUSTER)
    yield placement
    remove_placement(placement)
    ray.shutdown()


@pytest.fixture(scope="module")
def stand_in(tmp_path_factory) -> Path:
    script = tmp_path_factory.mktemp("stand_in") / "stand_in_server.py"
    script.write_text(STAND_IN)
    return script


def _command(script: Path, status: int) -> list[str]:
    return [sys.executable, str(script), "{host}", "{port}", str(status)]


def test_servers_start_on_their_bundles_and_stop(placement, stand_in, tmp_path):
    servers = start_sglang_servers(CPU_CLUSTER, placement, CONFIG, tmp_path / "logs",
                                   server_command=_command(stand_in, 200))
    try:
        node_ip = ray.util.get_node_ip_address()
        infos = servers.infos
        assert [i.engine_index for i in infos] == [0, 1] and {i.node_ip for i in infos} == {node_ip}
        assert len({i.port for i in infos}) == 2
        for info in infos:
            assert requests.get(info.url + "/health", timeout=5).status_code == 200
            assert not _gone(info.pid, within_s=0.0)
            assert Path(info.log_path) == (tmp_path / "logs" / f"sglang_engine_{info.engine_index}.log").resolve()
            assert "stand-in sees CUDA_VISIBLE_DEVICES=None" in Path(info.log_path).read_text()
        assert [e.url for e in servers.engines()] == [i.url for i in infos]
        # An actor that dies takes its server with it (Ray kills a dead worker's child processes).
        ray.kill(servers.actors[1], no_restart=True)
        assert _gone(infos[1].pid)
    finally:
        servers.shutdown(grace_s=5.0)
    assert _gone(infos[0].pid)
    with pytest.raises(requests.ConnectionError):
        requests.get(infos[0].url + "/health", timeout=5)


def test_server_sees_exactly_the_engine_gpus(placement, stand_in, tmp_path):
    # CPU bundles relabelled with GPU ids: the whole launch path runs, and the server reports what it was given.
    node = placement.bundles[0]
    relabelled = ClusterPlacement(placement_group=placement.placement_group, bundles=tuple(
        dataclasses.replace(bundle, gpu_id=gpu) for bundle, gpu in zip(placement.bundles, (3, 5))))
    servers = start_sglang_servers(CPU_CLUSTER, relabelled, dataclasses.replace(CONFIG, tp_size=2), tmp_path,
                                   server_command=_command(stand_in, 200))
    try:
        assert [(i.gpu_ids, i.node_ip) for i in servers.infos] == [((3, 5), node.node_ip)]
        log = Path(servers.infos[0].log_path).read_text()
        assert "stand-in sees CUDA_VISIBLE_DEVICES=3,5" in log
        assert log.startswith(f"# engine 0 (node {node.node_ip}, GPUs [3, 5]): CUDA_VISIBLE_DEVICES=3,5 ")
    finally:
        servers.shutdown(grace_s=5.0)
    assert _gone(servers.infos[0].pid)


@pytest.mark.skipif(importlib.util.find_spec("sglang") is not None and torch.cuda.is_available(),
                    reason="sglang and a GPU are here: the server would start")
def test_real_launch_command_that_exits_reports_engine_node_code_and_log(placement, tmp_path):
    config = dataclasses.replace(CONFIG, tp_size=2)
    start = time.monotonic()
    with pytest.raises(SGLangServerError) as failure:
        start_sglang_servers(CPU_CLUSTER, placement, config, tmp_path)
    message = str(failure.value)
    node_ip = ray.util.get_node_ip_address()
    assert f"SGLang server of engine 0 (node {node_ip}, GPUs []), pid " in message
    assert "exited with code 1 during startup" in message
    header = (tmp_path / "sglang_engine_0.log").read_text().splitlines()[0]
    assert "-m sglang.launch_server --model-path /ckpt/tiny --host" in header
    # The process's own stderr, from the log tail: without SGLang's dependencies (the quick start's stack: the wheel
    # alone) the import fails; with them (CI's second stack) the real server starts on CPU and refuses the model
    # path, which does not exist.
    if real_sglang_missing():
        assert "ModuleNotFoundError: No module named" in message
    else:
        assert "Repo id must be in the form 'repo_name' or 'namespace/repo_name': '/ckpt/tiny'" in message
    assert time.monotonic() - start < config.startup_timeout_s  # failed fast, not at the deadline


def test_unlaunchable_command_names_the_engine(placement, tmp_path):
    with pytest.raises(SGLangServerError, match=r"starting the SGLang server of engine 0 \(node .*, GPUs \[\]\) "
                                                r"failed: .*No such file or directory: '/nonexistent/sglang'"):
        start_sglang_servers(CPU_CLUSTER, placement, dataclasses.replace(CONFIG, tp_size=2), tmp_path,
                             server_command=["/nonexistent/sglang", "{port}"])


def test_server_never_healthy_is_stopped_at_the_startup_deadline(placement, stand_in, tmp_path):
    config = dataclasses.replace(CONFIG, tp_size=2, startup_timeout_s=1.5)
    with pytest.raises(SGLangServerError) as failure:
        start_sglang_servers(CPU_CLUSTER, placement, config, tmp_path, server_command=_command(stand_in, 503))
    message = str(failure.value)
    assert "did not answer GET http://" in message
    assert "/health with 200 within sglang.startup_timeout_s=1.5 s" in message
    assert "stopped it (was killed by signal 15)" in message
    assert "stand-in sees CUDA_VISIBLE_DEVICES" in message
    assert _gone(int(re.search(r"pid (\d+)", message).group(1)))


# --------------------------------------------------------------------------- the router


def _engines(fakes) -> list[SGLangEngine]:
    return [SGLangEngine(dataclasses.replace(CONFIG, port=fake.port, health_timeout_s=5.0)) for fake in fakes]


def test_router_splits_by_prompt_group_and_keeps_order(fakes):
    router = EngineRouter(_engines(fakes))
    prompts = [[p, p + 1, 2 * p] for p in (1, 4, 2, 9, 3) for _ in range(4)]  # 5 prompts x 4 samples
    params = SamplingParams(max_new_tokens=4)
    generations = router.generate(prompts, params)
    assert [g.prompt_ids for g in generations] == prompts
    for prompt, gen in zip(prompts, generations):
        context = list(prompt)
        for token, logprob in zip(gen.token_ids, gen.logprobs):
            assert logprob == pytest.approx(reference_logprob(context, token, 1.0), abs=1e-12)
            context.append(token)
    sent = [[ids for path, body in fake.requests if path == "/generate" for ids in body["input_ids"]]
            for fake in fakes]
    assert all(sent) and sent[0] + sent[1] == prompts  # both engines used, contiguous pieces
    for batch in sent:  # whole groups: each prompt appears 4 times on exactly one engine
        assert all(batch.count(prompt) == 4 for prompt in batch)
    # One engine alone gives the same answers (the split changes where, not what).
    assert router.generate(prompts, params) == EngineRouter(_engines(fakes[:1])).generate(prompts, params)
    responses = [g.token_ids for g in generations]
    assert router.compute_logprobs(prompts, responses, temperature=1.0) == [g.logprobs for g in generations]
    assert router.generate([], params) == []


def test_router_streams_from_every_engine_as_responses_finish(fakes):
    router = EngineRouter(_engines(fakes))
    prompts = [[1, 2, 3], [1, 2, 3], [5, 6], [5, 6]]  # engine 0 gets prompt [1, 2, 3], engine 1 [5, 6]
    params = SamplingParams(max_new_tokens=4)
    fakes[0].generate_delay_s = {(1, 2, 3): 1.0}  # engine 0 is slow
    order = [index for index, _ in router.generate_stream(prompts, params)]
    # Engine 1's responses arrive while engine 0 still works; every index exactly once.
    assert sorted(order) == [0, 1, 2, 3] and set(order[:2]) == {2, 3}
    fakes[0].generate_delay_s = {}
    streamed = dict(router.generate_stream(prompts, params))
    assert [streamed[i] for i in range(4)] == router.generate(prompts, params)
    fakes[1].mode = "bad_request"
    with pytest.raises(SGLangHTTPError) as failure:
        list(router.generate_stream(prompts, params))
    assert "rollout engine 1 of 2" in "\n".join(failure.value.__notes__)


def test_router_broadcasts_memory_cache_health_and_names_a_failing_engine(fakes):
    router = EngineRouter(_engines(fakes))
    router.release_memory()
    router.resume_memory()
    router.flush_cache()
    router.health_check()
    for fake in fakes:
        paths = [path for path, _ in fake.requests]
        assert paths == ["/release_memory_occupation"] * 3 + ["/resume_memory_occupation"] * 2 + [
            "/flush_cache", "/health_generate"]
        assert fake.released == set()
    fakes[1].mode = "bad_request"
    with pytest.raises(SGLangHTTPError, match="context length") as failure:
        router.generate([[1], [2]], SamplingParams(max_new_tokens=2))
    assert failure.value.__notes__ == ["in generate on rollout engine 1 of 2"]
    router.shutdown()


def test_router_weight_sync_reaches_every_engine(fakes, gloo_group_of_one):
    engines = [SGLangEngine(dataclasses.replace(CONFIG, port=fake.port, colocated=False),
                            expected_weight_names=["a.weight", "b.bias"], weight_group=gloo_group_of_one)
               for fake in fakes]
    router = EngineRouter(engines)
    buckets = [[("a.weight", torch.ones(2, 3))], [("b.bias", torch.ones(3, dtype=torch.bfloat16))]]
    stats = router.sync_weights(buckets, version=7)
    assert stats.version == 7 and stats.num_tensors == 2 and stats.num_bytes == 24 + 6
    assert stats.names == {"a.weight", "b.bias"} and stats.seconds > 0
    for fake in fakes:
        updates = [body["names"] for path, body in fake.requests if path == "/update_weights_from_distributed"]
        assert updates == [["a.weight"], ["b.bias"]] and fake.requests[-1][0] == "/flush_cache"
