"""The launch scripts (examples/launch/): shellcheck, and the sbatch launcher run for real under Slurm.

A Slurm cluster of two nodes on this machine (tests/slurm_cluster.py: munged, slurmctld, one slurmd per node)
runs examples/launch/slurm_train.sbatch with the demo's model at smoke size in CPU mode:

* two nodes: the Ray head on node1 and a worker on node2 start through srun, the join check sees both, the
  trainer converts nothing itself (the launcher converted model_path once, before Ray), trains two steps across
  the two Ray nodes and the launcher stops Ray on both (no process of the job's Ray left);
* a config for two nodes in a one-node allocation is refused with one line before Ray starts;
* a node whose Ray fails to start (node2's `ray start` exits 1) is named by the join check, and the job still
  tears down.

Without slurm-wlm, munge or shellcheck these tests skip, or fail when MEGATRON_ZERO_CI=1 (CI installs them).

    python -m pytest -q tests/test_launchers.py
"""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from slurm_cluster import SlurmCluster, missing_requirements, processes_mentioning

REPO = Path(__file__).resolve().parents[1]
SBATCH = REPO / "examples" / "launch" / "slurm_train.sbatch"
IN_CI = os.environ.get("MEGATRON_ZERO_CI") == "1"


def _require(reason):
    """Skip with ``reason`` (None: available); in CI a missing tool is a failure, not a skip."""
    if reason is None:
        return
    if IN_CI:
        pytest.fail(f"MEGATRON_ZERO_CI=1 but {reason}; .ci/run installs it")
    pytest.skip(reason)


def _shell_scripts():
    """Files under examples/ whose first line runs sh or bash (the launchers have no common suffix: .sh, .sbatch)."""
    def is_shell(path):
        first_line = path.read_bytes().split(b"\n", 1)[0]
        return first_line.startswith(b"#!") and first_line.split(b"/")[-1].split()[-1] in (b"sh", b"bash")

    return sorted(path for path in (REPO / "examples").rglob("*") if path.is_file() and is_shell(path))


def test_every_example_script_passes_shellcheck():
    _require(None if shutil.which("shellcheck") else "shellcheck not installed (apt-get install -y shellcheck)")
    scripts = _shell_scripts()
    assert SBATCH in scripts and len(scripts) >= 4, scripts
    # -x follows `source` (the scripts source examples/launch/common.sh); run from the root its directive names.
    result = subprocess.run(["shellcheck", "-x", *map(str, scripts)], cwd=REPO, capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


def test_allocation_check_counts_rollout_nodes_and_names_each_mismatch():
    from megatron_zero.config.cluster import ClusterConfig
    from megatron_zero.trainer.launch import check_allocation, missing_hosts, required_nodes

    # The 32B example's layout: ranks on 4 nodes, 32 rollout GPUs of their own = 4 more nodes of 8.
    disaggregated = ClusterConfig(num_nodes=4, gpus_per_node=8, rollout_num_gpus=32)
    assert required_nodes(disaggregated) == 8
    check_allocation(disaggregated, num_nodes=8, gpus_per_node=8, cpus_per_node=64)
    with pytest.raises(ValueError, match=r"^the allocation has 4 node\(s\) but the config needs 8 \(cluster."
                                         r"num_nodes=4 \+ 4 for cluster.rollout_num_gpus=32\); submit with --nodes=8"):
        check_allocation(disaggregated, num_nodes=4, gpus_per_node=8, cpus_per_node=64)
    with pytest.raises(ValueError, match=r"^the allocation has 4 GPU\(s\) per node but cluster.gpus_per_node=8; "
                                         r"request --gpus-per-node=8"):
        check_allocation(disaggregated, num_nodes=8, gpus_per_node=4, cpus_per_node=64)
    cpu = ClusterConfig(gpus_per_node=0, cpu_workers_per_node=2, cpus_per_worker=2)
    with pytest.raises(ValueError, match=r"^the allocation has 2 CPU\(s\) per node but 2 ranks x "
                                         r"cluster.cpus_per_worker=2 need 4"):
        check_allocation(cpu, num_nodes=1, gpus_per_node=0, cpus_per_node=2)
    # Nodes are told apart by their launch_host resource; a dead node has not joined.
    nodes = [{"Alive": True, "Resources": {"CPU": 2.0, "launch_host:node1": 1.0}},
             {"Alive": False, "Resources": {"CPU": 2.0, "launch_host:node2": 1.0}},
             {"Alive": True, "Resources": {"CPU": 2.0}}]
    assert missing_hosts(["node1", "node2", "node3"], nodes) == ["node2", "node3"]


# ---------------------------------------------------------------- Slurm


@pytest.fixture(scope="module")
def slurm():
    _require(missing_requirements())
    with SlurmCluster(num_nodes=2, cpus_per_node=2) as cluster:
        yield cluster


def _smoke_config(path, num_nodes):
    """The demo's CPU config (local transformer layers, float32, torch engine) at smoke size: one rank per node,
    two steps of 4 prompts x 2 samples."""
    from megatron_zero.trainer.demo import DEMO_DEFAULTS

    config = json.loads(json.dumps(DEMO_DEFAULTS))  # a deep copy
    config.pop("model_path")
    config["data"]["train"].pop("path")
    config["parallel"]["tensor_parallel_size"] = 1
    config["cluster"].update(num_nodes=num_nodes, cpu_workers_per_node=1, startup_timeout_s=60.0)
    config["data"]["sampler"]["batch_size"] = 4
    config["rollout"].update(num_samples_per_prompt=2, max_new_tokens=12)
    config["eval"] = {"path": None}
    config["run"].update(num_steps=2, num_minibatches=1, save_every=0)
    path.write_text(yaml.safe_dump(config))
    return path


def _job_env(tmp_path, config, ray_dir, path_prefix="", **extra):
    """The launcher's inputs, and Ray kept to this test: its own session directory (the test checks nothing of
    it outlives the job), small object stores, no dashboard, and ports picked by Ray (two nodes share the
    machine). RAY_STOP_ALL=0: `ray stop` would end every Ray on the machine, other tests' included."""
    from megatron_zero.demo import BASE_MODEL_PATH, TRAIN_PROMPTS_PATH
    from megatron_zero.parallel.local_launch import find_free_port

    return {
        "CONFIG": str(config), "MODEL_PATH": str(BASE_MODEL_PATH), "DATA": str(TRAIN_PROMPTS_PATH),
        "OUTPUT_DIR": str(tmp_path / "run"), "LAUNCH_DIR": str(SBATCH.parent),
        "PATH": f"{path_prefix}{Path(sys.executable).parent}:{os.environ['PATH']}",
        "RAY_PORT": str(find_free_port()), "RAY_TEMP_DIR": str(ray_dir), "RAY_STOP_ALL": "0",
        "RAY_START_ARGS": "--dashboard-agent-listen-port=0 --object-store-memory=100000000",
        "RAY_HEAD_ARGS": "--include-dashboard=false",
        **extra,
    }


def _ray_dir(slurm, name):
    # Under the cluster's short /tmp directory: Ray's socket paths must fit in 108 bytes.
    path = slurm.root / name
    path.mkdir()
    return path


def test_sbatch_trains_on_two_nodes_and_tears_down(slurm, tmp_path):
    ray_dir = _ray_dir(slurm, "ray-train")
    env = _job_env(tmp_path, _smoke_config(tmp_path / "smoke.yaml", num_nodes=2), ray_dir)
    job = slurm.run_batch(SBATCH, nodes=2, env=env, timeout_s=400)
    assert job.returncode == 0, job.log
    run = tmp_path / "run"
    # Converted once by the launcher, before Ray, where the trainer was pointed (mcore_path).
    assert f"Megatron checkpoint: {run / 'base_mcore'}" in job.log
    assert (run / "base_mcore" / "megatron_zero.json").is_file()
    assert job.log.index("Megatron checkpoint:") < job.log.index("starting the Ray head on node1")
    # Ray through srun: each step wrote its node's log where the launcher pointed srun.
    logs = run / "logs" / f"slurm-{job.job_id}"
    assert "Ray runtime started" in (logs / "ray-node1.log").read_text()
    assert "Ray runtime started" in (logs / "ray-node2.log").read_text()
    assert "every node joined the Ray cluster at" in job.log and "(node1, node2)" in job.log
    steps = [json.loads(line)["step"] for line in (run / "metrics.jsonl").read_text().splitlines() if line.strip()]
    assert steps == [1, 2]
    assert "training finished" in job.log and "stopping Ray on node1 node2" in job.log
    assert processes_mentioning(str(ray_dir)) == [], "Ray processes outlived the job"


def test_sbatch_refuses_a_node_count_that_does_not_fit_before_ray(slurm, tmp_path):
    ray_dir = _ray_dir(slurm, "ray-refuse")
    env = _job_env(tmp_path, _smoke_config(tmp_path / "two.yaml", num_nodes=2), ray_dir)
    job = slurm.run_batch(SBATCH, nodes=1, env=env, timeout_s=120)
    assert job.returncode != 0
    errors = [line for line in job.log.splitlines() if line.startswith("error:")]
    assert errors == ["error: the allocation has 1 node(s) but the config needs 2 (cluster.num_nodes=2); submit "
                      "with --nodes=2 or change cluster.num_nodes"], job.log
    assert "starting the Ray head" not in job.log
    assert not any(ray_dir.iterdir()), "Ray started although the allocation does not fit"


def test_sbatch_names_the_node_that_did_not_join(slurm, tmp_path, base_mcore):
    # node2 stands for a node whose Ray cannot start: its `ray start` exits 1; everything else is the real thing.
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    ray = bin_dir / "ray"
    ray.write_text(f"""#!/usr/bin/env bash
if [[ ${{SLURMD_NODENAME:-}} == node2 && $1 == start ]]; then echo "ray start fails on node2 (test)" >&2; exit 1; fi
exec {Path(sys.executable).parent / 'ray'} "$@"
""")
    ray.chmod(0o755)
    ray_dir = _ray_dir(slurm, "ray-missing")
    env = _job_env(tmp_path, _smoke_config(tmp_path / "smoke.yaml", num_nodes=2), ray_dir,
                   path_prefix=f"{bin_dir}:", MCORE_PATH=base_mcore)
    job = slurm.run_batch(SBATCH, nodes=2, env=env, args=["cluster.startup_timeout_s=5"], timeout_s=200)
    assert job.returncode != 0
    assert "error: node(s) node2 did not join the Ray cluster at" in job.log, job.log
    assert "(expected: node1, node2)" in job.log
    node2_log = tmp_path / "run" / "logs" / f"slurm-{job.job_id}" / "ray-node2.log"
    assert "ray start fails on node2" in node2_log.read_text()
    assert "training:" not in job.log
    assert "stopping Ray on node1 node2" in job.log
    assert processes_mentioning(str(ray_dir)) == [], "Ray processes outlived the failed job"
