#!/usr/bin/env bash
# Submit a zero-RL run to a running multi-node Ray cluster (head started with `ray start --head`,
# workers with `ray start --address=HEAD:6379`); the driver joins it (cluster.ray_address=auto) and
# checks that every expected node and GPU has joined before step 0.
#
#   examples/launch_ray_job.sh examples/configs/qwen2.5-7b-zero.yaml model_path=/models/Qwen2.5-7B
set -euo pipefail
config=${1:?usage: $0 CONFIG.yaml [key=value ...]}
shift
ray job submit --working-dir . -- megatron-zero train --config "$config" "$@"
