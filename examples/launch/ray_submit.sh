#!/usr/bin/env bash
# Zero-RL training on a Ray cluster started by hand: run this on the head node once every node has joined.
#
#   head:     examples/launch/ray_node.sh head                      # Ray's GCS on port 6379, dashboard on 8265
#   workers:  examples/launch/ray_node.sh worker HEAD_IP:6379
#   head:     CONFIG=examples/configs/qwen2.5-7b-zero-2node.yaml MODEL_PATH=/models/Qwen2.5-7B \
#             DATA=/data/simplerl/hard.jsonl OUTPUT_DIR=/checkpoints/qwen2.5-7b-zero RAY_HOSTS=gpu01,gpu02 \
#             examples/launch/ray_submit.sh [key=value ...]
#
# Before anything is submitted: the config and its files are checked and MODEL_PATH is converted once into
# OUTPUT_DIR/base_mcore (unless MCORE_PATH or the config's mcore_path names a conversion), here on the head, where
# the trainer's driver runs; then every node must have joined (RAY_HOSTS: the NODE_NAMEs ray_node.sh gave them,
# named when missing; without it only their number and GPUs are checked). The run is a Ray job (`ray job submit`,
# logs streamed here); the driver joins the cluster with cluster.ray_address=auto.
# Optional: MCORE_PATH, RAY_HOSTS, RAY_HEAD (the GCS, default 127.0.0.1:${RAY_PORT:-6379}), RAY_JOB_ADDRESS (the
# dashboard, default http://127.0.0.1:8265). See docs/launching.md.
set -euo pipefail

launch_dir=$(dirname "$(realpath "$0")")
# shellcheck source=examples/launch/common.sh
source "$launch_dir/common.sh"
read_job_paths
overrides+=("$@")
head_address=${RAY_HEAD:-127.0.0.1:${RAY_PORT:-6379}}

use_ray_token_if_available

say "checking the config and preparing the Megatron checkpoint"
mcore_path=$(megatron-zero launch prepare --config "$CONFIG" "${overrides[@]}" | tail -n 1)
say "Megatron checkpoint: $mcore_path"
megatron-zero launch wait --config "$CONFIG" --address "$head_address" --hosts "${RAY_HOSTS:-}" "${overrides[@]}"

say "submitting: megatron-zero train --config $CONFIG ${overrides[*]}"
ray job submit --address "${RAY_JOB_ADDRESS:-http://127.0.0.1:8265}" -- \
    megatron-zero train --config "$CONFIG" "${overrides[@]}" "mcore_path=$mcore_path" cluster.ray_address=auto
