"""What any process of a run needs on any node: a free port, and the last lines of a log file, read on the node
that holds it (the process that wrote it may be dead). Used by the rank workers (trainer/) and the SGLang server
actors (rollout/) alike."""

from __future__ import annotations

import socket
from collections import deque
from pathlib import Path

import ray
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

# Lines of a failed process's log shown in its error.
LOG_TAIL_LINES = 20


def read_log_tail(log_path: str, num_lines: int) -> str:
    """The last ``num_lines`` lines of a worker's log file, or a note saying why there are none."""
    path = Path(log_path)
    if not path.exists():
        return f"(no log file {log_path} on this node)"
    with path.open(errors="replace") as handle:
        return "".join(deque(handle, maxlen=num_lines)).rstrip("\n") or f"({log_path} is empty)"


@ray.remote(num_cpus=0)
def read_log_tail_remote(log_path: str, num_lines: int) -> str:
    """``read_log_tail`` as a Ray task, to run on the node that holds the log (a dead worker cannot answer)."""
    return read_log_tail(log_path, num_lines)


def read_log_tail_on_node(log_path: str, node_id: str, node_ip: str, num_lines: int = 20,
                          timeout_s: float = 10.0) -> str:
    """The last lines of a log on node ``node_id``: read here if it is this node, else by a task pinned there
    (the process that wrote it may be dead), with a deadline so a failure report never hangs."""
    if node_id == ray.get_runtime_context().get_node_id():
        return read_log_tail(log_path, num_lines)
    ref = read_log_tail_remote.options(
        scheduling_strategy=NodeAffinitySchedulingStrategy(node_id, soft=False)).remote(log_path, num_lines)
    try:
        return ray.get(ref, timeout=timeout_s)
    except (ray.exceptions.RayError, TimeoutError) as err:
        return f"(log unreadable: node {node_ip} did not answer: {err.__class__.__name__})"


def free_port() -> int:
    # Bound on all interfaces, not loopback: ranks on other nodes connect to this port.
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("", 0))
        return sock.getsockname()[1]
