#!/usr/bin/env bash
# Start this machine's Ray node for a megatron-zero job, tagged with its host name so that the launcher's join
# check (`megatron-zero launch wait`) can name a node that did not join.
#
#   examples/launch/ray_node.sh head [RAY START FLAGS...]                   # on the head node
#   examples/launch/ray_node.sh worker HEAD_IP:PORT [RAY START FLAGS...]    # on every other node
#
# Environment (all optional):
#   NODE_NAME       the name the join check knows this node by (default: SLURMD_NODENAME under Slurm, else
#                   `hostname`)
#   RAY_PORT        the head's GCS port (head only; default 6379)
#   RAY_TEMP_DIR    root of Ray's session files; each node uses RAY_TEMP_DIR/NODE_NAME, so nodes that share a
#                   machine (or a home directory) keep apart (default: Ray's, /tmp/ray)
#   RAY_START_ARGS  extra flags for `ray start` on every node, split on spaces (ports, --object-store-memory, ...)
#   RAY_HEAD_ARGS   extra flags for the head only (--include-dashboard=false, --dashboard-port=...)
#   RAY_NODE_LOG_DIR  write this script's and `ray start`'s output to RAY_NODE_LOG_DIR/ray-NODE_NAME.log
# Under Slurm the node offers Ray the CPUs the allocation gives it (SLURM_CPUS_ON_NODE); GPUs are detected by Ray
# from CUDA_VISIBLE_DEVICES. slurm_train.sbatch adds --block, so the node stops when its srun step is signalled.
set -euo pipefail

# shellcheck source=examples/launch/common.sh
source "$(dirname "$(realpath "$0")")/common.sh"
use_ray_token_if_available

usage="usage: $0 head|worker [HEAD_IP:PORT] [ray start flags...]"
role=${1:?$usage}
shift
node_name=${NODE_NAME:-${SLURMD_NODENAME:-$(hostname)}}
extra_args=()
read -ra extra_args <<< "${RAY_START_ARGS:-}"
head_args=()
read -ra head_args <<< "${RAY_HEAD_ARGS:-}"
if [[ -n ${RAY_NODE_LOG_DIR:-} ]]; then
    exec >> "${RAY_NODE_LOG_DIR}/ray-${node_name}.log" 2>&1
fi

# launch_host:<name> is megatron_zero.trainer.launch.HOST_RESOURCE_PREFIX: a resource nothing requests, only read.
flags=(--disable-usage-stats "--resources={\"launch_host:${node_name}\": 1}")
if [[ -n ${RAY_TEMP_DIR:-} ]]; then
    flags+=("--temp-dir=${RAY_TEMP_DIR}/${node_name}")
fi
if [[ -n ${SLURM_CPUS_ON_NODE:-} ]]; then
    flags+=("--num-cpus=${SLURM_CPUS_ON_NODE}")
fi

case $role in
    head)
        exec ray start --head "--port=${RAY_PORT:-6379}" "${flags[@]}" "${extra_args[@]}" "${head_args[@]}" "$@"
        ;;
    worker)
        address=${1:?a worker needs the address of the head, HEAD_IP:PORT; $usage}
        shift
        exec ray start "--address=${address}" "${flags[@]}" "${extra_args[@]}" "$@"
        ;;
    *)
        echo "$0: unknown role '$role'; $usage" >&2
        exit 2
        ;;
esac
