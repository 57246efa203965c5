"""run_local_workers (megatron_zero/parallel/local_launch.py): workers start warm from a fork server on CPU, yet see
the caller's environment and working directory at the time of the call, and failures name the rank.

Run: python -m pytest tests/test_local_launch.py -q
"""

import os
import sys

import pytest

from megatron_zero.config.parallel import ParallelConfig
from megatron_zero.parallel.local_launch import WorkerFailed, run_local_workers


def _where_am_i(name: str):
    import torch.distributed as dist

    return {"rank": dist.get_rank(), "env": os.environ.get(name), "cwd": os.getcwd(), "parent": os.getppid(),
            "preloaded": "megatron.core.optimizer" in sys.modules, "relative": open("marker.txt").read()}


def _fail_on_rank_one():
    import torch.distributed as dist

    if dist.get_rank() == 1:
        raise ValueError("rank one says no")
    return "fine"


def _die():
    os._exit(3)


def _hang():
    import time

    time.sleep(60)


def test_workers_see_the_callers_environment_and_directory_of_now(tmp_path, monkeypatch):
    run_local_workers(os.getpid, ParallelConfig(), world_size=1)  # the fork server is up before what follows
    monkeypatch.setenv("MEGATRON_ZERO_TEST_MARK", "set after the server started")
    (tmp_path / "marker.txt").write_text("found by a relative path")
    monkeypatch.chdir(tmp_path)
    seen = run_local_workers(_where_am_i, ParallelConfig(), world_size=2, args=("MEGATRON_ZERO_TEST_MARK",))
    assert [s["rank"] for s in seen] == [0, 1]
    for s in seen:
        assert s["env"] == "set after the server started" and s["cwd"] == str(tmp_path)
        assert s["relative"] == "found by a relative path"
        # Forked from the server, which imported megatron-core once: not children of this process, already warm.
        assert s["parent"] != os.getpid() and s["preloaded"]


def test_a_failing_rank_is_named_with_its_traceback():
    with pytest.raises(WorkerFailed, match=r"(?s)local worker rank 1 failed:.*ValueError: rank one says no"):
        run_local_workers(_fail_on_rank_one, ParallelConfig(), world_size=2)


def test_a_dead_or_silent_worker_is_named():
    with pytest.raises(WorkerFailed, match=r"rank\(s\) \[0\] died with exit code\(s\) \[3\]"):
        run_local_workers(_die, ParallelConfig(), world_size=1)
    with pytest.raises(WorkerFailed, match=r"rank\(s\) \[0\] did not finish within 3 s"):
        run_local_workers(_hang, ParallelConfig(), world_size=1, timeout_s=3)
