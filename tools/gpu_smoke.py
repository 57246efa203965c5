"""GPU smoke run: what only a GPU exercises, in parts with their own time limits, one JSON (tools/gpu_smoke.sh).

Parts, in order (seconds allowed each; 450 in all, so the run ends inside 8 minutes):
  environment   torch, CUDA, the device and its peak-table entry, megatron-core / transformers versions, and
                which GPU-only packages (Transformer Engine, SGLang, Ray) are absent                          30
  ipc_handoff   a 512 MiB bucket handed to a second process by CUDA IPC (device_checks.ipc_handoff)           60
  actor_vs_hf   the Megatron actor on CUDA (megatron-core's local spec, bf16) against HF log-probs, on a random
                checkpoint of Qwen2.5-0.5B's shape cut to 4 layers (device_checks.compare_actor_with_hf)     100
  throughput    one colocated RL step at Qwen2.5-0.5B's shape (all 24 layers): torch engine on CUDA, train
                step TFLOP/s and MFU, log-prob pass, weight sync GB/s against a device copy
                (benchmark/throughput.py; grading only where math-verify is installed)                       260

Each part runs in a process of its own (a hung CUDA call cannot stall the rest) and its result is merged into
--out as soon as it finishes, so a run cut short still leaves the parts that finished. Exits 1 if any part failed
or timed out, 2 at once without CUDA.

What it covers and what it does not (``COVERS`` and ``DOES_NOT_COVER``, printed at the start and written into the
JSON): one GPU, megatron-core's local layers in bf16, the torch engine, and a plain torch CUDA IPC hand-off. It
touches no SGLang (no server, no /update_weights_from_tensor or its flattened_bucket load, no memory saver), no
Transformer Engine or FP8 (neither FP8 GEMMs nor TE's cached FP8 weight copies nor FP8 rollout weights), no THD
packing (TE's packed-sequence attention), no NCCL weight update (the broadcast to disaggregated engines), and
nothing across GPUs (TP/PP/DP, Ray).

    python tools/gpu_smoke.py --out gpu_smoke.json                  # normally through tools/gpu_smoke.sh
    python tools/gpu_smoke.py --out gpu_smoke.json --parts environment ipc_handoff
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

PARTS_TIMEOUT_S = {"environment": 30, "ipc_handoff": 60, "actor_vs_hf": 100, "throughput": 260}
SMOKE_SHAPE = "qwen2.5-0.5b"
COVERS = [
    "one GPU: torch, CUDA, the device and its peak-table entry",
    "the Megatron actor on CUDA with megatron-core's local layers (no Transformer Engine) in bf16 against HF "
    "log-probs",
    "a train step's TFLOP/s and MFU, a log-prob pass and the torch rollout engine on CUDA (Qwen2.5-0.5B's shape)",
    "the weight sync into the torch engine in one process (resharding + load), GB/s against a device copy",
    "a plain torch CUDA IPC hand-off of a flattened bucket to a second process",
]
DOES_NOT_COVER = [
    "SGLang: no server, no /update_weights_from_tensor (flattened_bucket) load, no memory saver release/resume",
    "Transformer Engine and FP8: no TE layers, FP8 GEMMs, cached FP8 weight copies or FP8 rollout weights",
    "THD packing: Transformer Engine's packed-sequence attention (the local layers use a dense mask)",
    "the NCCL weight update: the broadcast to disaggregated SGLang engines (update_weights_from_distributed)",
    "more than one GPU: TP, PP, DP, Ray placement",
]


def part_environment(workdir: Path) -> dict:
    import torch

    from megatron_zero.benchmark.devices import memory_bytes, table_peak_tflops
    from megatron_zero.benchmark.throughput import megatron_core_version

    device = torch.device("cuda")
    name = torch.cuda.get_device_name(device)
    entry, peak = table_peak_tflops(name, "bfloat16")
    import transformers

    return {"torch": torch.__version__, "cuda": torch.version.cuda, "device": name,
            "capability": list(torch.cuda.get_device_capability(device)),
            "memory_gib": memory_bytes(device) / 2**30, "peak_entry": entry, "peak_bf16_tflops": peak,
            "megatron_core": megatron_core_version(), "transformers": transformers.__version__,
            "python": sys.version.split()[0],
            "absent": [package for package in ("transformer_engine", "sglang", "ray", "math_verify")
                       if importlib.util.find_spec(package) is None]}


def part_actor_vs_hf(workdir: Path) -> dict:
    from megatron_zero.benchmark.device_checks import compare_actor_with_hf
    from megatron_zero.benchmark.shapes import load_shape, write_random_model
    from megatron_zero.config.parallel import ParallelConfig
    from megatron_zero.models.mcore_checkpoint import convert_hf_to_mcore
    from megatron_zero.parallel.local_launch import run_local_workers

    hf_dir = write_random_model(load_shape(SMOKE_SHAPE), workdir / "hf", num_layers=4, dtype="bfloat16")
    run_local_workers(convert_hf_to_mcore, ParallelConfig(), args=(str(hf_dir), str(workdir / "mcore")))
    result = compare_actor_with_hf(hf_dir, workdir / "mcore", "bfloat16", num_rows=8, seq_length=128)
    result.update(shape=SMOKE_SHAPE, num_layers=4)
    if not result["ok"]:
        raise AssertionError(f"actor vs HF log-prob gap mean {result['gap_mean']:.3g} / max {result['gap_max']:.3g} "
                             f"exceeds the bf16 bounds {result['bound_mean']} / {result['bound_max']}: {result}")
    return result


def part_throughput(workdir: Path) -> dict:
    from megatron_zero.benchmark.throughput import BenchmarkSpec, markdown_table, run_benchmark

    spec = BenchmarkSpec(shape=SMOKE_SHAPE, device="cuda", num_prompts=16, samples_per_prompt=8, prompt_tokens=128,
                         response_tokens=256, repeats=2)
    graded = None
    if importlib.util.find_spec("math_verify") is not None:
        from bench_rewards import make_batch

        graded = make_batch(spec.num_graded, spec.samples_per_prompt, spec.seed)
    result = run_benchmark(spec, workdir, graded=graded, timeout_s=PARTS_TIMEOUT_S["throughput"])
    result["table"] = markdown_table(result)
    return result


def part_ipc_handoff(workdir: Path) -> dict:
    import torch

    from megatron_zero.benchmark.device_checks import ipc_handoff

    result = ipc_handoff(torch.device("cuda"), num_bytes=512 * 2**20)
    if not result["checksums_equal"]:
        raise AssertionError(f"the consumer process read different values through the CUDA IPC handle: {result}")
    return result


PARTS = {"environment": part_environment, "ipc_handoff": part_ipc_handoff, "actor_vs_hf": part_actor_vs_hf,
         "throughput": part_throughput}


def wheels_to_fetch(report: dict) -> list[str]:
    """``name==version`` of every wheel a pip resolution (``pip install --dry-run --report``) installs, less torch
    and what torch requires, transitively: the GPU machine's image brings those. Requirements under an ``extra``
    marker are not followed; other markers are (the image is Linux x86_64, where torch's CUDA ones hold)."""
    installs = {_normalized(item["metadata"]["name"]): item["metadata"] for item in report["install"]}
    image, todo = set(), ["torch"]
    while todo:
        name = todo.pop()
        if name in image or name not in installs:
            continue
        image.add(name)
        for requirement in installs[name].get("requires_dist", []):
            if "extra ==" not in requirement:
                todo.append(_normalized(re.match(r"[A-Za-z0-9][A-Za-z0-9._-]*", requirement).group()))
    return sorted(f"{metadata['name']}=={metadata['version']}" for name, metadata in installs.items()
                  if name not in image)


def _normalized(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()  # PEP 503


def run_part(name: str, workdir: Path, timeout_s: float) -> dict:
    """``name`` in a process group of its own, killed whole after ``timeout_s`` (the part's own workers too); its
    status, seconds and result."""
    start = time.perf_counter()
    out, log = workdir / f"{name}.json", workdir / f"{name}.log"
    command = [sys.executable, __file__, "--run-part", name, "--workdir", str(workdir / name), "--part-out", str(out)]
    with open(log, "w") as log_file:
        process = subprocess.Popen(command, stdout=log_file, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            process.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()
    seconds = time.perf_counter() - start
    tail = log.read_text(errors="replace")[-4000:]
    if process.returncode != 0:
        status = "timeout" if seconds >= timeout_s else "failed"
        return {"status": status, "seconds": seconds, "timeout_s": timeout_s, "exit_code": process.returncode,
                "log_tail": tail}
    return {"status": "ok", "seconds": seconds, "result": json.loads(out.read_text())}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path("gpu_smoke.json"))
    parser.add_argument("--parts", nargs="+", choices=list(PARTS), default=list(PARTS))
    parser.add_argument("--workdir", type=Path, default=None, help="scratch space (default: a temp dir)")
    parser.add_argument("--run-part", choices=list(PARTS), help=argparse.SUPPRESS)  # one part, in its own process
    parser.add_argument("--part-out", type=Path, help=argparse.SUPPRESS)
    # tools/gpu_smoke.sh fetch-wheels: the wheels of a pip report to download (on a machine that may lack torch).
    parser.add_argument("--wheels-to-fetch", type=Path, metavar="REPORT", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.wheels_to_fetch:
        print("\n".join(wheels_to_fetch(json.loads(args.wheels_to_fetch.read_text()))))
        return 0

    import torch

    if not torch.cuda.is_available():
        print("gpu_smoke: no CUDA device visible to torch (torch.cuda.is_available() is False); run this on a GPU "
              "machine (see docs/benchmarks.md, 'GPU smoke run')", file=sys.stderr)
        return 2
    if args.run_part:
        args.workdir.mkdir(parents=True, exist_ok=True)
        args.part_out.write_text(json.dumps(PARTS[args.run_part](args.workdir), default=str))
        return 0

    print("gpu_smoke: covers: " + "; ".join(COVERS), flush=True)
    print("gpu_smoke: does NOT cover: " + "; ".join(DOES_NOT_COVER), flush=True)
    report: dict = {"command": " ".join([Path(sys.executable).name, *sys.argv]), "covers": COVERS,
                    "does_not_cover": DOES_NOT_COVER, "parts": {}}
    with tempfile.TemporaryDirectory(dir=args.workdir) as workdir:
        for name in args.parts:
            print(f"gpu_smoke: {name} (at most {PARTS_TIMEOUT_S[name]} s) ...", flush=True)
            report["parts"][name] = run_part(name, Path(workdir), PARTS_TIMEOUT_S[name])
            print(f"gpu_smoke: {name} {report['parts'][name]['status']} in {report['parts'][name]['seconds']:.0f} s",
                  flush=True)
            args.out.write_text(json.dumps(report, indent=2, default=str))  # what finished so far
    failed = [name for name, part in report["parts"].items() if part["status"] != "ok"]
    print(f"gpu_smoke: wrote {args.out}; " + (f"FAILED: {failed}" if failed else "all parts ok")
          + " (SGLang, Transformer Engine / FP8, THD packing, NCCL weight updates and multi-GPU not covered)",
          flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
