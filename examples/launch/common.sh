#!/usr/bin/env bash
# Sourced by ray_submit.sh and slurm_train.sbatch: the job's paths from the environment, and Ray's token.

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
