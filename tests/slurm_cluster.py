"""A real Slurm cluster on this machine for the launcher tests: munged, slurmctld and one slurmd per node, as root.

Several slurmd daemons on one machine (``slurmd -N nodeN``, each node its own port in slurm.conf) make an
allocation of more than one node, so ``srun`` starts a step per node exactly as on a cluster; only the machine
is shared. Everything lives in one short temporary directory (munge's socket path must fit in 108 bytes);
process tracking by process tree and no task plugin, because this container has no cgroup hierarchy to manage.

    with SlurmCluster(num_nodes=2) as slurm:
        job = slurm.run_batch(script, nodes=2, env=..., args=[...], timeout_s=300)
        job.returncode, job.log

Needs Debian's slurm-wlm and munge (``apt-get install -y slurm-wlm munge``) and root.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence

REQUIRED_PROGRAMS = ("munged", "slurmctld", "slurmd", "sbatch", "srun", "sinfo", "scontrol")


def missing_requirements() -> Optional[str]:
    """Why a cluster cannot start here, or None."""
    missing = [name for name in REQUIRED_PROGRAMS if shutil.which(name) is None]
    if missing:
        return f"{', '.join(missing)} not installed (apt-get install -y slurm-wlm munge)"
    if os.geteuid() != 0:
        return "slurmd must run as root to start jobs as the submitting user"
    return None


def _free_ports(count: int) -> list[int]:
    sockets = [socket.socket() for _ in range(count)]
    try:
        for sock in sockets:
            sock.bind(("127.0.0.1", 0))
        return [sock.getsockname()[1] for sock in sockets]
    finally:
        for sock in sockets:
            sock.close()


@dataclass(frozen=True)
class BatchResult:
    job_id: str
    returncode: int
    log: str


class SlurmCluster:
    def __init__(self, num_nodes: int = 2, cpus_per_node: int = 2) -> None:
        self.num_nodes = num_nodes
        self.cpus_per_node = cpus_per_node
        self.root = Path(tempfile.mkdtemp(prefix="mzsl-", dir="/tmp"))
        self.nodes = [f"node{i + 1}" for i in range(num_nodes)]
        self.env = {**os.environ, "SLURM_CONF": str(self.root / "slurm.conf")}
        self._daemons: list[tuple[str, Path]] = []  # (name, pid file)

    # ---- start / stop

    def __enter__(self) -> "SlurmCluster":
        try:
            self._start()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    def _start(self) -> None:
        root = self.root
        root.chmod(0o755)  # munged refuses a socket directory others cannot traverse (a warning) or write to
        key = root / "munge.key"
        key.write_bytes(os.urandom(128))
        key.chmod(0o400)
        socket_path = root / "munge.sock"
        subprocess.run(["munged", "--force", f"--key-file={key}", f"--socket={socket_path}",
                        f"--log-file={root / 'munged.log'}", f"--pid-file={root / 'munged.pid'}",
                        f"--seed-file={root / 'munged.seed'}"], check=True, capture_output=True, text=True)
        self._daemons.append(("munged", root / "munged.pid"))
        ctld_port, *node_ports = _free_ports(1 + self.num_nodes)
        host = socket.gethostname().split(".")[0]
        (root / "state").mkdir()
        (root / "spool").mkdir()
        nodes = "\n".join(f"NodeName={name} NodeHostname={host} NodeAddr=127.0.0.1 Port={port} "
                          f"CPUs={self.cpus_per_node} State=UNKNOWN" for name, port in zip(self.nodes, node_ports))
        (root / "slurm.conf").write_text(f"""\
ClusterName=mzci
SlurmctldHost={host}(127.0.0.1)
SlurmctldPort={ctld_port}
AuthType=auth/munge
AuthInfo=socket={socket_path}
CredType=cred/munge
SlurmUser=root
SlurmdUser=root
StateSaveLocation={root}/state
SlurmdSpoolDir={root}/spool/%n
SlurmctldPidFile={root}/slurmctld.pid
SlurmdPidFile={root}/slurmd.%n.pid
SlurmctldLogFile={root}/slurmctld.log
SlurmdLogFile={root}/slurmd.%n.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/linear
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
MpiDefault=none
ReturnToService=2
KillWait=5
{nodes}
PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP
""")
        conf = str(root / "slurm.conf")
        subprocess.run(["slurmctld", "-f", conf, "-i"], check=True, env=self.env, capture_output=True, text=True)
        self._daemons.append(("slurmctld", root / "slurmctld.pid"))
        for name in self.nodes:
            subprocess.run(["slurmd", "-f", conf, "-N", name], check=True, env=self.env, capture_output=True, text=True)
            self._daemons.append((f"slurmd {name}", root / f"slurmd.{name}.pid"))
        self._wait_idle(timeout_s=60.0)

    def _wait_idle(self, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        states = ""
        while time.monotonic() < deadline:
            result = subprocess.run(["sinfo", "-h", "-N", "-o", "%N %t"], env=self.env, capture_output=True, text=True)
            states = result.stdout.strip()
            if result.returncode == 0 and states and all(line.split()[1] == "idle" for line in states.splitlines()):
                return
            time.sleep(0.3)
        raise RuntimeError(f"Slurm nodes not idle after {timeout_s:.0f} s: {states!r}; logs in {self.root}")

    def stop(self) -> None:
        """Cancel the jobs, stop the daemons this cluster started, and end any process that still runs from its
        directory (a job's leftovers), then remove the directory."""
        subprocess.run(["scancel", "--full", "--quiet", "-u", "root"], env=self.env, capture_output=True)
        daemons = [pid for _, pid_file in self._daemons if (pid := _read_pid(pid_file)) is not None]
        terminate(daemons + processes_mentioning(str(self.root)))
        shutil.rmtree(self.root, ignore_errors=True)

    # ---- jobs

    def run_batch(self, script: Path, nodes: int, env: dict[str, str], args: Sequence[str] = (),
                  timeout_s: float = 300.0) -> BatchResult:
        """Submit the script on ``nodes`` nodes with ``env`` added to the environment, wait for it to end, and
        return its exit code and log. Polled here: ``sbatch --wait`` checks back ever more slowly, up to 10 s."""
        log = self.root / f"job-{time.monotonic_ns()}.log"
        command = ["sbatch", "--parsable", f"--nodes={nodes}", f"--output={log}", str(script), *args]
        submitted = subprocess.run(command, env={**self.env, **env}, capture_output=True, text=True, check=True)
        job_id = submitted.stdout.strip().split(";")[0]
        deadline = time.monotonic() + timeout_s
        while (state := self._job_field(job_id, "JobState")) in ("PENDING", "CONFIGURING", "RUNNING", "COMPLETING"):
            if time.monotonic() > deadline:
                subprocess.run(["scancel", "--full", job_id], env=self.env, capture_output=True)
                raise RuntimeError(f"batch job {job_id} did not finish within {timeout_s:.0f} s; its log so far:\n"
                                   f"{log.read_text() if log.exists() else '(none)'}")
            time.sleep(0.5)
        exit_code = int(self._job_field(job_id, "ExitCode").split(":")[0])
        text = log.read_text() if log.exists() else f"(no job log; final state {state})"
        return BatchResult(job_id=job_id, returncode=exit_code, log=text)

    def _job_field(self, job_id: str, field: str) -> str:
        shown = subprocess.run(["scontrol", "-o", "show", "job", job_id], env=self.env, capture_output=True,
                               text=True, check=True).stdout
        return next(item.split("=", 1)[1] for item in shown.split() if item.startswith(f"{field}="))


def processes_mentioning(text: str) -> list[int]:
    """PIDs of the processes whose command line contains ``text`` (this process excluded)."""
    found = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit() or int(proc.name) == os.getpid():
            continue
        try:
            cmdline = (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if text in cmdline:
            found.append(int(proc.name))
    return found


def _read_pid(path: Path) -> Optional[int]:
    try:
        return int(path.read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return None


def terminate(pids: Sequence[int], wait_s: float = 5.0) -> None:
    """SIGTERM ``pids``, then SIGKILL those still there after ``wait_s``."""
    for pid in pids:
        _signal(pid, signal.SIGTERM)
    deadline = time.monotonic() + wait_s
    alive = list(pids)
    while alive and time.monotonic() < deadline:
        time.sleep(0.1)
        alive = [pid for pid in alive if _signal(pid, 0)]
    for pid in alive:
        _signal(pid, signal.SIGKILL)


def _signal(pid: int, signum: int) -> bool:
    """Send ``signum``; False when the process is gone (a zombie counts as gone)."""
    try:
        if Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z":
            return False
        os.kill(pid, signum)
    except (ProcessLookupError, FileNotFoundError):
        return False
    return True
