"""The real SGLang 0.5.23 server on CPU, launched by the project's own launch path, against everything the trainer
asks of it.

Two servers are started once for the module exactly as a run starts them on CPU workers (``start_sglang_servers``
on a local Ray placement: the server actors, the CPU mode of rollout/sglang_cpu.py, health polling), from a tiny
Qwen2 with the demo's character tokenizer. Then:
- generation and log-probs through the router equal HF transformers in float64 (fp32 bound);
- weights pushed the trainer's two ways, from Megatron ranks at TP=1, TP=2 and PP=2, land exactly: SGLang's own
  ``/weights_checker`` checksum after the push equals the checksum after SGLang loads the same checkpoint from disk,
  and log-probs equal the pushed model's in float64. Colocated: every rank serialises its CPU copy with SGLang's
  serializer (shared memory) into ``/update_weights_from_tensor``. Separate engines: rank 0 broadcasts over a gloo
  group the servers joined (``/init_weights_update_group``, ``/update_weights_from_distributed``);
- release/resume in the trainer's order and ``/flush_cache``: on CPU they free nothing (no memory saver without
  CUDA), so the weights survive; what a released GPU server discards is shown by the stand-in
  (tests/test_sglang_cpu_server.py, docs/sglang.md);
- a killed server is named by the router, and servers started again serve.

About 3 minutes on a 2-core machine (server start-up ~40 s). Skips where SGLang's dependencies are not installed,
fails there under MEGATRON_ZERO_REQUIRE_REAL_SGLANG=1 (tests/real_sglang.py).

    python -m pytest tests/test_sglang_real_server.py -q
"""

from __future__ import annotations

import os
import signal
import time

import pytest
import ray

from megatron_zero.config.cluster import ClusterConfig
from megatron_zero.config.parallel import ParallelConfig
from megatron_zero.config.sglang import SGLangConfig
from megatron_zero.parallel.local_launch import run_local_workers
from megatron_zero.rollout.engine import SamplingParams
from megatron_zero.rollout.sglang_engine import SGLangEngine
from megatron_zero.rollout.engine_router import EngineRouter
from megatron_zero.rollout.sglang_servers import start_sglang_servers
from megatron_zero.cluster.placement import create_placement, local_cluster_cpus, remove_placement
from real_sglang import (
    float64_greedy, float64_logprobs, load_weights_from_disk, require_real_sglang, weights_checksum,
)

CLUSTER = ClusterConfig(gpus_per_node=0, cpu_workers_per_node=2, colocate=True, ray_call_timeout_s=300.0,
                        startup_timeout_s=60.0)
BUCKET_BYTES = 3000  # several buckets for the tiny model
# fp32 on both sides: SGLang's CPU kernels against HF in float64 (measured gaps ~1e-6).
FP32_LOGPROB_TOLERANCE = 1e-4
PROMPTS = [[5, 17, 3, 99], [42, 7, 250, 1, 64, 9], [11, 12]]
RESPONSES = [[42, 7, 250, 1, 64], [3, 3, 8], [100, 101, 102, 103]]


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """(server model, pushed model): two tiny Qwen2s of one architecture (seeds 1 and 0) with the demo's character
    tokenizer, and the pushed one's Megatron conversion."""
    require_real_sglang()
    from megatron_zero.demo.tokenizer import build_char_tokenizer
    from megatron_zero.models.mcore_checkpoint import convert_hf_to_mcore
    from megatron_zero.models.tiny import save_tiny_model

    root = tmp_path_factory.mktemp("real_sglang")
    # The tokenizer's vocabulary (257): SGLang serves ids the tokenizer knows.
    served = save_tiny_model("qwen2", root / "served", seed=1, vocab_size=257)
    pushed = save_tiny_model("qwen2", root / "pushed", seed=0, vocab_size=257)
    for model_dir in (served, pushed):
        build_char_tokenizer().save_pretrained(str(model_dir))
    run_local_workers(convert_hf_to_mcore, ParallelConfig(), args=(str(pushed), str(root / "mcore")))
    return str(served), str(pushed), str(root / "mcore")


@pytest.fixture(scope="module")
def placement(models):
    """The CPU workers' bundles of a local Ray cluster, sized as the trainer sizes one (cluster/placement.py)."""
    ray.init(num_cpus=local_cluster_cpus(CLUSTER), include_dashboard=False)
    placement = create_placement(CLUSTER)
    yield placement
    remove_placement(placement)
    ray.shutdown()


def _launch(placement, served: str, log_dir):
    config = SGLangConfig(model_path=served, colocated=True, startup_timeout_s=300.0, retry_backoff_s=0.5)
    return start_sglang_servers(CLUSTER, placement, config, log_dir)


@pytest.fixture(scope="module")
def servers(models, placement, tmp_path_factory):
    """Two real servers launched on the CPU workers' bundles, as the trainer launches colocated engines."""
    launched = _launch(placement, models[0], tmp_path_factory.mktemp("logs"))
    yield launched
    launched.shutdown()


@pytest.fixture
def restored(servers, models):
    """The servers' own model back after a test that pushed another one into them."""
    yield
    for info in servers.infos:
        load_weights_from_disk(info.url, models[0])


def _running(pid: int) -> bool:
    """False once ``pid`` exited, also while it waits as a zombie for its parent (the server actor) to reap it."""
    try:
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def _gone(pid: int, within_s: float) -> bool:
    deadline = time.monotonic() + within_s
    while True:
        if not _running(pid):
            return True
        if time.monotonic() > deadline:
            return False
        time.sleep(0.2)


# --------------------------------------------------------------------------- serving


def test_launched_servers_run_on_cpu_with_the_cpu_mode(servers):
    for info in servers.infos:
        with open(info.log_path) as log:
            first = log.readline()
        assert "--device cpu" in first and "--dtype float32" in first and "--enable-memory-saver" not in first
        assert info.gpu_ids == ()


def test_generation_and_logprobs_equal_hf_in_float64(servers, models):
    served, _, _ = models
    router = EngineRouter(servers.engines())
    eos_ids = [0]  # the character tokenizer's eos (demo/tokenizer.py)
    greedy = SamplingParams(temperature=0.0, max_new_tokens=12, stop_token_ids=tuple(eos_ids))
    generations = router.generate(PROMPTS, greedy)
    for prompt, generation in zip(PROMPTS, generations):
        assert generation.token_ids == float64_greedy(served, prompt, 12, eos_ids)
    # Greedy log-probs are at temperature 1; so are prompt log-probs.
    reference = float64_logprobs(served, PROMPTS, [g.token_ids for g in generations])
    for generation, expected in zip(generations, reference):
        assert generation.logprobs == pytest.approx(expected, abs=FP32_LOGPROB_TOLERANCE)
    scored = router.compute_logprobs(PROMPTS, RESPONSES, 1.0)
    for values, expected in zip(scored, float64_logprobs(served, PROMPTS, RESPONSES)):
        assert values == pytest.approx(expected, abs=FP32_LOGPROB_TOLERANCE)
    # Sampling: n samples of one prompt stay on one server and come back complete, with finite log-probs.
    sampled = router.generate([PROMPTS[0]] * 4 + [PROMPTS[1]] * 4, SamplingParams(temperature=1.0, max_new_tokens=8))
    assert all(len(g.token_ids) == len(g.logprobs) >= 1 for g in sampled)


# --------------------------------------------------------------------------- weight sync from the ranks


def _colocated_push(mcore_dir: str, served: str, urls: list[str]):
    from megatron_zero.actor.actor import load_model
    from megatron_zero.config.model import ModelConfig
    from megatron_zero.parallel.reshard import HFWeightStream
    from megatron_zero.trainer.weight_push import ColocatedWeightPush

    model, info = load_model(mcore_dir, ModelConfig(params_dtype="float32"))
    # The production serializer: SGLang's own, each rank's CPU copy in shared memory.
    push = ColocatedWeightPush(urls, SGLangConfig(model_path=served, tp_size=1, retry_backoff_s=0.5))
    stream = HFWeightStream(model, info.arch, info.bridge, bucket_bytes=BUCKET_BYTES, all_ranks=True)
    stats = push.push(stream, version=3)
    return None if stats is None else (stats.version, stats.num_buckets, sorted(stats.names))


def _broadcast_push(mcore_dir: str, served: str, urls: list[str]):
    from megatron_zero.actor.actor import load_model
    from megatron_zero.config.model import ModelConfig
    from megatron_zero.parallel.reshard import HFWeightStream
    from megatron_zero.trainer.weight_push import BroadcastWeightPush

    model, info = load_model(mcore_dir, ModelConfig(params_dtype="float32"))
    config = SGLangConfig(model_path=served, colocated=False, retry_backoff_s=0.5, control_timeout_s=120.0)
    push = BroadcastWeightPush(urls, config, backend="gloo", master_address="127.0.0.1")
    stats = [push.push(HFWeightStream(model, info.arch, info.bridge, bucket_bytes=BUCKET_BYTES), version)
             for version in (1, 2)]  # the group serves every step's sync
    return [None if s is None else (s.version, s.num_buckets, sorted(s.names)) for s in stats]


LAYOUTS = {  # actor layout -> how many of the two servers it feeds (colocated: one server rank per actor rank)
    "tp1": (ParallelConfig(), 1),
    "tp2": (ParallelConfig(tensor_parallel_size=2), 2),
    "pp2": (ParallelConfig(pipeline_parallel_size=2), 2),
}


def _assert_serves_exactly(urls: list[str], pushed: str) -> None:
    """Each server holds exactly ``pushed``: its checksum equals the one after SGLang loads ``pushed`` from disk,
    and its log-probs are the pushed model's in float64."""
    after_push = [weights_checksum(url) for url in urls]
    expected = float64_logprobs(pushed, PROMPTS, RESPONSES)
    for url in urls:
        engine = SGLangEngine(SGLangConfig(model_path=pushed, port=int(url.rsplit(":", 1)[1]),
                                           host=url.split("//")[1].rsplit(":", 1)[0]))
        for values, reference in zip(engine.compute_logprobs(PROMPTS, RESPONSES, 1.0), expected):
            assert values == pytest.approx(reference, abs=FP32_LOGPROB_TOLERANCE)
        load_weights_from_disk(url, pushed)
    assert [weights_checksum(url) for url in urls] == after_push


@pytest.mark.parametrize("layout", sorted(LAYOUTS))
def test_colocated_push_from_every_rank_lands_exactly(servers, models, restored, layout):
    served, pushed, mcore_dir = models
    parallel, num_engines = LAYOUTS[layout]
    urls = [info.url for info in servers.infos[:num_engines]]
    before = [weights_checksum(url) for url in urls]
    # Without this the check could not fail: the servers start from another model.
    assert float64_logprobs(served, PROMPTS[:1], RESPONSES[:1])[0] != pytest.approx(
        float64_logprobs(pushed, PROMPTS[:1], RESPONSES[:1])[0], abs=0.1)
    per_rank = run_local_workers(_colocated_push, parallel, args=(mcore_dir, served, urls))
    assert per_rank[0][0] == 3 and per_rank[0][1] > 1  # version 3, several buckets
    assert [weights_checksum(url) for url in urls] != before
    _assert_serves_exactly(urls, pushed)


@pytest.mark.parametrize("layout", ["tp2", "pp2"])
def test_broadcast_from_rank_zero_lands_exactly_in_every_engine(servers, models, restored, layout):
    served, pushed, mcore_dir = models
    parallel, _ = LAYOUTS[layout]
    urls = [info.url for info in servers.infos]
    per_rank = run_local_workers(_broadcast_push, parallel, args=(mcore_dir, served, urls))
    assert [stats[0] for stats in per_rank[0]] == [1, 2] and per_rank[1] == [None, None]
    _assert_serves_exactly(urls, pushed)
    if layout == "tp2":
        # A restarted trainer (new processes) meets servers that still hold the old group: it drops and rebuilds it.
        per_rank = run_local_workers(_broadcast_push, parallel, args=(mcore_dir, served, urls))
        assert [stats[0] for stats in per_rank[0]] == [1, 2]
        _assert_serves_exactly(urls, pushed)


# --------------------------------------------------------------------------- memory, cache, failure


def test_release_and_resume_on_cpu_flush_only_and_keep_the_weights(servers, models):
    """The trainer's order (release all -> resume weights -> [sync] -> resume KV cache). Without CUDA there is no
    memory saver, so nothing is freed and the weights stay: the checksum is unchanged (on GPUs the weights are
    discarded and re-synced, which only the stand-in can show here)."""
    served, _, _ = models
    url = servers.infos[0].url
    engine = servers.engines()[0]
    before = weights_checksum(url)
    engine.release_memory()
    with pytest.raises(RuntimeError, match="while its memory .* is released; call resume_memory first"):
        engine.generate([PROMPTS[0]], SamplingParams(max_new_tokens=2))
    engine.resume_weights()
    engine.resume_kv_cache()
    engine.flush_cache()
    assert weights_checksum(url) == before
    scored = engine.compute_logprobs(PROMPTS, RESPONSES, 1.0)
    for values, expected in zip(scored, float64_logprobs(served, PROMPTS, RESPONSES)):
        assert values == pytest.approx(expected, abs=FP32_LOGPROB_TOLERANCE)


def test_a_killed_server_is_named_and_servers_started_again_serve(servers, placement, models, tmp_path):
    """Last in the module: it kills one of the module's servers."""
    served = models[0]
    router = EngineRouter(servers.engines())
    victim = servers.infos[1]
    os.killpg(victim.pid, signal.SIGKILL)
    assert _gone(victim.pid, within_s=30)
    with pytest.raises(Exception) as failure:
        router.health_check()
    assert victim.url in str(failure.value) + " ".join(getattr(failure.value, "__notes__", []))
    assert "rollout engine 1 of 2" in " ".join(failure.value.__notes__)
    # A restart: the launch path starts a fresh pair on the same bundles, which serve.
    servers.shutdown()
    assert _gone(servers.infos[0].pid, within_s=30)
    again = _launch(placement, served, tmp_path / "logs")
    try:
        assert {info.pid for info in again.infos}.isdisjoint({info.pid for info in servers.infos})
        EngineRouter(again.engines()).health_check()
        scored = EngineRouter(again.engines()).compute_logprobs(PROMPTS, RESPONSES, 1.0)
        for values, expected in zip(scored, float64_logprobs(served, PROMPTS, RESPONSES)):
            assert values == pytest.approx(expected, abs=FP32_LOGPROB_TOLERANCE)
    finally:
        again.shutdown()
    assert all(_gone(info.pid, within_s=30) for info in again.infos)
