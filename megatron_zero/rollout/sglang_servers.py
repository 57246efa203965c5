"""SGLang servers on the Megatron ranks' GPUs: one Ray actor per engine launches and watches one server process,
and a small router in front spreads rollouts over the engines.

Why: colocated RL runs the rollout engine on the same GPUs as the actor (their memory is handed over by
release/resume, see ``rollout/sglang_engine.py``). Each engine is one ``sglang.launch_server`` process,
tensor-parallel over ``sglang.tp_size`` GPUs of one node; it must start on the right node, see the right GPUs,
never hang the trainer when it fails to start, and die with the run.

How::

    placement = create_placement(cluster)                    # cluster/placement.py, cluster.colocate=True
    router = launch_sglang_router(cluster, placement, sglang_config, log_dir="runs/exp/logs")
    generations = router.generate(prompts, SamplingParams())  # split over the engines, results in prompt order
    router.shutdown()                                         # closes clients, stops every server process

Layout (``plan_engines``): engine i uses the bundles [i*tp, (i+1)*tp) of the placement (ranks are ordered by
node and GPU id, so these are tp consecutive GPUs of one node). Its actor (``SGLangServerActor``) sits on the
engine's first bundle with ``ENGINE_GPU_SHARE`` of that GPU, beside the Megatron rank's
``COLOCATED_GPU_SHARE``; the share is a scheduling reservation only.

GPUs: Ray narrows an actor's CUDA_VISIBLE_DEVICES to the GPUs it asked for (``NvidiaGPUAcceleratorManager.
set_current_process_visible_accelerator_ids`` in ray 2.60; with RAY_EXPERIMENTAL_NOSET_CUDA_VISIBLE_DEVICES set
it leaves the variable alone), so the actor sees only its own bundle's GPU. The server needs all tp GPUs of its
engine, so the actor sets the server's CUDA_VISIBLE_DEVICES to the engine's GPU ids explicitly, which works either
way. The ids are those of ``ray.get_gpu_ids()`` (the placement probed them), which ray 2.60 maps through the
raylet's own CUDA_VISIBLE_DEVICES, i.e. the values Ray itself would write there. The server then numbers its GPUs
from 0, so ``sglang.base_gpu_id`` must stay 0.

Placement also decides host and port: each server binds its node's IP on a port found free on that node
(``sglang.host`` and ``sglang.port`` are for a server started by hand). SGLang's other endpoints use IPC sockets
and a port it finds free itself (``PortArgs.init_new`` in 0.5.23, server_args.py), so several servers on one node
do not clash.

Process lifetime: the server runs in its own process group (SGLang's scheduler and detokenizer processes join
it), with stdout and stderr in ``<log_dir>/sglang_engine_<i>.log`` on its node. ``shutdown`` sends SIGTERM to the
group, SIGKILL after a grace period. If the actor itself dies (``ray.kill``, a crash), Ray's raylet kills its
child processes (kill_child_processes_on_worker_exit, on by default in 2.60) and SGLang's own processes kill
themselves when their parent dies (``kill_itself_when_parent_died``).

The router in front of the engines is rollout/engine_router.py (``EngineRouter``).

Tests: tests/test_sglang_servers.py (local CPU Ray cluster, a stand-in server script, fake SGLang servers).
"""

from __future__ import annotations

import dataclasses
import logging
import os
import signal
import subprocess
import time
from pathlib import Path
from typing import Any, Mapping, Optional, Sequence

import ray
import requests
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from megatron_zero.config.cluster import ClusterConfig
from megatron_zero.config.sglang import SGLangConfig
from megatron_zero.rollout.engine_router import EngineRouter
from megatron_zero.rollout.sglang_cpu import build_driver_stub
from megatron_zero.rollout.sglang_engine import SGLangEngine
from megatron_zero.rollout.sglang_launch import launch_server_command, launch_server_env
from megatron_zero.cluster.node_files import LOG_TAIL_LINES, free_port, read_log_tail, read_log_tail_on_node
from megatron_zero.cluster.placement import COLOCATED_GPU_SHARE, Bundle, ClusterPlacement

logger = logging.getLogger(__name__)

# Share of its first bundle's GPU (and CPUs) an engine actor reserves; the Megatron rank holds COLOCATED_GPU_SHARE.
ENGINE_GPU_SHARE = 0.2
assert ENGINE_GPU_SHARE <= 1 - COLOCATED_GPU_SHARE
# Stand-in command placeholders (see SGLangServerActor): replaced by the node IP and the port found free there.
HOST_PLACEHOLDER = "{host}"
PORT_PLACEHOLDER = "{port}"
# SGLang 0.5.23 answers GET /health with 503 while ServerStatus is Starting (until its warm-up generation has run),
# then runs a one-token generation per call, like /health_generate (SGLANG_ENABLE_HEALTH_ENDPOINT_GENERATION on by
# default; http_server.py). /ready (new: healthy and not paused) would refuse a server paused for a weight update.
_HEALTH_ENDPOINT = "/health"
_HEALTH_POLL_S = 0.5
_HEALTH_REQUEST_TIMEOUT_S = 5.0
SHUTDOWN_GRACE_S = 15.0
# Deadline of reading a log tail on another node when reporting a failure.
_LOG_READ_TIMEOUT_S = 10.0


class SGLangServerError(RuntimeError):
    """A server did not start or stopped; the message names engine, node, GPUs, exit code and the log's last lines."""


# --------------------------------------------------------------------------- layout


@dataclasses.dataclass(frozen=True)
class EngineSlot:
    """Where one engine runs: its placement bundles (one per GPU, all on one node)."""

    index: int
    bundles: tuple[Bundle, ...]

    @property
    def node_ip(self) -> str:
        return self.bundles[0].node_ip

    @property
    def node_id(self) -> str:
        return self.bundles[0].node_id

    @property
    def gpu_ids(self) -> tuple[int, ...]:
        """The engine's GPU ids on its node; empty in CPU mode (bundles without GPUs)."""
        return tuple(bundle.gpu_id for bundle in self.bundles if bundle.gpu_id is not None)

    def describe(self) -> str:
        return f"engine {self.index} (node {self.node_ip}, GPUs {list(self.gpu_ids)})"


def plan_engines(bundles: Sequence[Bundle], tp_size: int) -> list[EngineSlot]:
    """Engine i gets bundles [i*tp_size, (i+1)*tp_size); each engine's bundles must share a node and have
    distinct GPU ids. ``bundles`` is ``ClusterPlacement.bundles`` (rank order)."""
    if tp_size < 1:
        raise ValueError(f"rollout.sglang.tp_size={tp_size} must be >= 1")
    if not bundles or len(bundles) % tp_size:
        raise ValueError(f"rollout.sglang.tp_size={tp_size} must divide the {len(bundles)} GPUs of the placement (one "
                         "engine per tp_size GPUs); choose a tp_size that divides the GPUs per node")
    if len({bundle.gpu_id is None for bundle in bundles}) > 1:
        raise ValueError(f"placement mixes bundles with and without a GPU: {list(bundles)}")
    slots = []
    for index in range(len(bundles) // tp_size):
        slot = EngineSlot(index=index, bundles=tuple(bundles[index * tp_size:(index + 1) * tp_size]))
        where = ", ".join(f"bundle {b.index} on {b.node_ip} GPU {b.gpu_id}" for b in slot.bundles)
        if len({bundle.node_id for bundle in slot.bundles}) > 1:
            raise ValueError(f"engine {index} with rollout.sglang.tp_size={tp_size} would span nodes ({where}); one "
                             "server's tensor parallelism stays on one node: use a tp_size that divides the GPUs per "
                             "node")
        if len(set(slot.gpu_ids)) < len(slot.gpu_ids):
            raise ValueError(f"engine {index} would use one GPU twice ({where}); the placement's GPU probe "
                             "returned duplicate ids on one node")
        slots.append(slot)
    return slots


def server_env(base: Mapping[str, str], gpu_ids: Sequence[int]) -> dict[str, str]:
    """The server's environment: ``launch_server_env(base)``, seeing exactly the engine's GPUs; an engine without
    GPUs (CPU bundles) gets the CPU mode's variables (rollout/sglang_cpu.py)."""
    env = launch_server_env(base, on_cpu=not gpu_ids)
    if gpu_ids:
        env["CUDA_VISIBLE_DEVICES"] = ",".join(str(gpu) for gpu in gpu_ids)
    return env


def slot_server_launch(config: SGLangConfig, slot: EngineSlot, host: str, port: int,
                       base_env: Mapping[str, str]) -> tuple[list[str], dict[str, str]]:
    """The argv and environment ``slot``'s server is started with, bound to ``host:port``: pure (no Ray, no network),
    so the actor runs exactly what a dry run prints. The GPUs are CUDA_VISIBLE_DEVICES, numbered from 0 inside; a
    slot without GPUs (a CPU placement) runs the server on CPU."""
    command = launch_server_command(dataclasses.replace(config, host=host, port=port), on_cpu=not slot.gpu_ids)
    return command, server_env(base_env, slot.gpu_ids)


# --------------------------------------------------------------------------- one server, inside a Ray actor


@dataclasses.dataclass(frozen=True)
class ServerInfo:
    engine_index: int
    node_ip: str
    node_id: str
    gpu_ids: tuple[int, ...]
    port: int
    pid: int
    log_path: str

    @property
    def url(self) -> str:
        return f"http://{self.node_ip}:{self.port}"


def _exit_text(code: int) -> str:
    return f"was killed by signal {-code}" if code < 0 else f"exited with code {code}"


def _is_healthy(url: str) -> bool:
    try:
        return requests.get(url + _HEALTH_ENDPOINT, timeout=_HEALTH_REQUEST_TIMEOUT_S).status_code == 200
    except requests.RequestException:
        return False


class SGLangServerActor:
    """Launches one engine's server on its node, waits until it is healthy, stops it; see the module docstring.

    ``server_command``: None launches ``launch_server_command(config)`` (the production path); a list is an argv
    template whose ``{host}`` and ``{port}`` are replaced (tests start a stand-in server through the same path).
    """

    def __init__(self, slot: EngineSlot, config: SGLangConfig, log_path: str,
                 server_command: Optional[Sequence[str]] = None) -> None:
        self._slot = slot
        self._config = config
        self._log_path = log_path
        self._server_command = list(server_command) if server_command is not None else None
        self._process: Optional[subprocess.Popen] = None

    def start(self) -> ServerInfo:
        """Spawn the server and return once GET /health answers 200 (``config.startup_timeout_s``)."""
        self._check_gpus()
        node_ip = ray.util.get_node_ip_address()
        port = free_port()
        command, env = slot_server_launch(self._config, self._slot, node_ip, port, os.environ)
        if self._server_command is not None:
            command = [arg.replace(HOST_PLACEHOLDER, node_ip).replace(PORT_PLACEHOLDER, str(port))
                       for arg in self._server_command]
        elif not self._slot.gpu_ids:
            build_driver_stub()  # the CPU server's libcuda.so.1, compiled once per machine
        Path(self._log_path).parent.mkdir(parents=True, exist_ok=True)
        with open(self._log_path, "a") as log:
            log.write(f"# {self._slot.describe()}: CUDA_VISIBLE_DEVICES={env.get('CUDA_VISIBLE_DEVICES')} "
                      f"{' '.join(command)}\n")
            log.flush()
            # Own process group: shutdown signals the server and every process it forked, and nothing else.
            self._process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env,
                                             stdin=subprocess.DEVNULL, start_new_session=True)
        info = ServerInfo(engine_index=self._slot.index, node_ip=node_ip,
                          node_id=ray.get_runtime_context().get_node_id(), gpu_ids=self._slot.gpu_ids, port=port,
                          pid=self._process.pid, log_path=self._log_path)
        logger.info("%s: started server pid %d on port %d, log %s", self._slot.describe(), info.pid, port,
                    self._log_path)
        self._wait_healthy(info.url)
        logger.info("%s: server %s is healthy", self._slot.describe(), info.url)
        return info

    def _check_gpus(self) -> None:
        # The engine's first GPU is this actor's own bundle GPU: a mismatch means the placement's probe and
        # Ray disagree, and the server would land on another rank's GPU.
        assigned = [str(gpu) for gpu in ray.get_gpu_ids()]
        if assigned and self._slot.gpu_ids and assigned != [str(self._slot.gpu_ids[0])]:
            raise SGLangServerError(f"{self._slot.describe()}: Ray gave this actor GPU(s) {assigned} but the "
                                    f"placement put the engine's first GPU at {self._slot.gpu_ids[0]}")

    def _wait_healthy(self, url: str) -> None:
        timeout_s = self._config.startup_timeout_s
        deadline = time.monotonic() + timeout_s
        while True:
            code = self._process.poll()
            if code is not None:
                raise SGLangServerError(self._failure(f"{_exit_text(code)} during startup"))
            if _is_healthy(url):
                return
            if time.monotonic() > deadline:
                code = self.shutdown()
                raise SGLangServerError(self._failure(
                    f"did not answer GET {url}{_HEALTH_ENDPOINT} with 200 within sglang.startup_timeout_s="
                    f"{timeout_s} s; stopped it ({_exit_text(code)})"))
            time.sleep(_HEALTH_POLL_S)

    def _failure(self, what: str) -> str:
        return (f"SGLang server of {self._slot.describe()}, pid {self._process.pid}, {what}; last lines of "
                f"{self._log_path}:\n{read_log_tail(self._log_path, LOG_TAIL_LINES)}")

    def poll(self) -> Optional[int]:
        """The server's exit code, None while it runs."""
        return None if self._process is None else self._process.poll()

    def shutdown(self, grace_s: float = SHUTDOWN_GRACE_S) -> Optional[int]:
        """SIGTERM to the server's process group, SIGKILL after ``grace_s``; returns the exit code."""
        if self._process is None:
            return None
        group = self._process.pid  # start_new_session: the server leads its own group
        if self._process.poll() is None:
            _signal_group(group, signal.SIGTERM)
            try:
                self._process.wait(timeout=grace_s)
            except subprocess.TimeoutExpired:
                logger.warning("%s: server pid %d ignored SIGTERM for %.0f s; killing it", self._slot.describe(),
                               group, grace_s)
        # Children the server left behind (or a server that ignored SIGTERM) go with the group.
        _signal_group(group, signal.SIGKILL)
        return self._process.wait()


def _signal_group(group: int, sig: signal.Signals) -> None:
    try:
        os.killpg(group, sig)
    except ProcessLookupError:
        pass  # the group is already empty


# --------------------------------------------------------------------------- all servers, driver side


class SGLangServers:
    """The running servers of one run, started by ``start_sglang_servers``; ``engines()`` talks to them."""

    def __init__(self, config: SGLangConfig, slots: list[EngineSlot], actors: list[Any],
                 infos: list[ServerInfo]) -> None:
        self.config = config
        self.slots = slots
        self.actors = actors
        self.infos = infos

    def engines(self, **engine_kwargs: Any) -> list[SGLangEngine]:
        """One ``SGLangEngine`` per server (``engine_kwargs``: e.g. ``expected_weight_names``)."""
        return [SGLangEngine(dataclasses.replace(self.config, host=info.node_ip, port=info.port), **engine_kwargs)
                for info in self.infos]

    def shutdown(self, grace_s: float = SHUTDOWN_GRACE_S) -> None:
        """Stop every server (SIGTERM, SIGKILL after ``grace_s``), then its actor."""
        _stop_actors(self.actors, grace_s)
        self.actors = []


def _stop_actors(actors: list[Any], grace_s: float) -> None:
    """Each actor stops its server (SIGTERM, SIGKILL after ``grace_s``), then the actor is killed; one that does
    not answer in time is killed anyway, and Ray's raylet takes its server with it."""
    refs = [actor.shutdown.remote(grace_s) for actor in actors]
    ray.wait(refs, num_returns=len(refs), timeout=grace_s + _HEALTH_REQUEST_TIMEOUT_S)
    for actor in actors:
        ray.kill(actor, no_restart=True)


def start_sglang_servers(cluster: ClusterConfig, placement: ClusterPlacement, config: SGLangConfig,
                         log_dir: str | Path, *, server_command: Optional[Sequence[str]] = None) -> SGLangServers:
    """Start one server per ``config.tp_size`` GPUs of the placement, all in parallel, and wait until every one
    is healthy. Any failure stops all of them and raises ``SGLangServerError`` naming the engine."""
    config.check_launch(cluster)
    slots = plan_engines(placement.bundles, config.tp_size)
    log_dir = Path(log_dir).resolve()
    remote_actor = ray.remote(SGLangServerActor)
    actors = [
        remote_actor.options(
            num_cpus=cluster.cpus_per_worker * ENGINE_GPU_SHARE,
            num_gpus=ENGINE_GPU_SHARE if cluster.use_gpus else 0,
            scheduling_strategy=PlacementGroupSchedulingStrategy(
                placement.placement_group, placement_group_bundle_index=slot.bundles[0].index),
        ).remote(slot, config, str(log_dir / f"sglang_engine_{slot.index}.log"), server_command)
        for slot in slots
    ]
    # The actors' own startup deadline plus time for Ray to schedule them and spawn the processes.
    timeout_s = config.startup_timeout_s + cluster.startup_timeout_s
    refs = [actor.start.remote() for actor in actors]
    try:
        infos = _gather_started(slots, refs, log_dir, timeout_s)
    except BaseException:
        # Actors still busy in start() would answer a shutdown only after it: killed at once.
        finished, _ = ray.wait(refs, num_returns=len(refs), timeout=0)
        _stop_actors([actor for actor, ref in zip(actors, refs) if ref in finished], SHUTDOWN_GRACE_S)
        for actor, ref in zip(actors, refs):
            if ref not in finished:
                ray.kill(actor, no_restart=True)
        raise
    logger.info("SGLang servers up: %s", ", ".join(f"engine {i.engine_index} {i.url} GPUs {list(i.gpu_ids)} "
                                                   f"pid {i.pid}" for i in infos))
    return SGLangServers(config, slots, actors, infos)


def _gather_started(slots: list[EngineSlot], refs: list[ray.ObjectRef], log_dir: Path,
                    timeout_s: float) -> list[ServerInfo]:
    index_of = {ref: index for index, ref in enumerate(refs)}
    infos: list[Optional[ServerInfo]] = [None] * len(refs)
    deadline = time.monotonic() + timeout_s
    while index_of:
        ready, _ = ray.wait(list(index_of), num_returns=1, timeout=max(0.0, deadline - time.monotonic()))
        if not ready:
            late = [slots[index] for index in sorted(index_of.values())]
            raise SGLangServerError(f"SGLang server(s) of {', '.join(s.describe() for s in late)} did not start "
                                    f"within {timeout_s:.0f} s (actor scheduling + sglang.startup_timeout_s):\n"
                                    + "\n".join(_remote_tail(slot, log_dir) for slot in late))
        index = index_of.pop(ready[0])
        try:
            infos[index] = ray.get(ready[0])
        except ray.exceptions.RayTaskError as err:
            # The actor's own SGLangServerError already names engine, node, GPUs, exit code and log tail.
            if isinstance(err.cause, SGLangServerError):
                raise SGLangServerError(str(err.cause)) from err
            cause = f"{type(err.cause).__name__}: {err.cause}" if err.cause is not None else str(err)
            raise SGLangServerError(f"starting the SGLang server of {slots[index].describe()} failed: {cause}") from err
        except ray.exceptions.RayError as err:
            raise SGLangServerError(f"the Ray actor of {slots[index].describe()} died while starting its server "
                                    f"({err.__class__.__name__}):\n{_remote_tail(slots[index], log_dir)}") from err
    return infos


def _remote_tail(slot: EngineSlot, log_dir: Path) -> str:
    log_path = str(log_dir / f"sglang_engine_{slot.index}.log")
    tail = read_log_tail_on_node(log_path, slot.node_id, slot.node_ip, LOG_TAIL_LINES, _LOG_READ_TIMEOUT_S)
    return f"last lines of {log_path} on {slot.node_ip}:\n{tail}"


def launch_sglang_router(cluster: ClusterConfig, placement: ClusterPlacement, config: SGLangConfig,
                         log_dir: str | Path, *, server_command: Optional[Sequence[str]] = None,
                         **engine_kwargs: Any) -> EngineRouter:
    """Start the servers on the placement and return the router over their engines (its shutdown stops them)."""
    servers = start_sglang_servers(cluster, placement, config, log_dir, server_command=server_command)
    return EngineRouter(servers.engines(**engine_kwargs), servers=servers)
