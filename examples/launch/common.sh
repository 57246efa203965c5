#!/usr/bin/env bash
# Sourced by the launch scripts: the job's paths from the environment, Ray's token mode, log lines.

# Sets the array `overrides`: the job's paths (absolute: the driver and the Ray workers need not share a working
# directory) as config overrides. The caller appends its own key=value arguments.
read_job_paths() {
    : "${CONFIG:?set CONFIG to the experiment YAML, e.g. examples/configs/qwen2.5-7b-zero-2node.yaml}"
    : "${MODEL_PATH:?set MODEL_PATH to the base model (HF directory with config.json, safetensors, tokenizer)}"
    : "${DATA:?set DATA to the training problems (.jsonl / .parquet file or dataset directory)}"
    : "${OUTPUT_DIR:?set OUTPUT_DIR to the run directory (checkpoints, metrics.jsonl, logs) on storage every node sees}"
    CONFIG=$(realpath -m -- "$CONFIG")
    OUTPUT_DIR=$(realpath -m -- "$OUTPUT_DIR")
    overrides=("model_path=$(realpath -m -- "$MODEL_PATH")" "data.train.path=$(realpath -m -- "$DATA")"
               "run.output_dir=$OUTPUT_DIR")
    # MCORE_PATH (optional): a Megatron conversion of MODEL_PATH to reuse instead of converting it again.
    if [[ -n ${MCORE_PATH:-} ]]; then
        overrides+=("mcore_path=$(realpath -m -- "$MCORE_PATH")")
    fi
}

# Prints "[launch] <UTC time> <message>": the job log shows which stage it is in.
say() {
    echo "[launch] $(date -u +%H:%M:%S) $*"
}

# Ray (>= 2.52) authenticates connections with a token. `ray start --head` turns token mode on by itself when a
# token is available (RAY_AUTH_TOKEN, RAY_AUTH_TOKEN_PATH or ~/.ray/auth_token); workers and connections by
# address do not, so every launch script applies that rule itself. Older Ray versions ignore the variable.
use_ray_token_if_available() {
    if [[ -z ${RAY_AUTH_MODE:-} ]] &&
        [[ -n ${RAY_AUTH_TOKEN:-} || -f ${RAY_AUTH_TOKEN_PATH:-$HOME/.ray/auth_token} ]]; then
        export RAY_AUTH_MODE=token
    fi
}
