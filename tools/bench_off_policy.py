"""Step time of one-step off-policy rollout against on-policy, the same demo run in one process, side by side.

Each mode trains the demo's config for ``--steps`` steps (from the demo model, its data, a fresh output directory)
with the actor at TP=1 on one Ray CPU worker and the torch engine in the driver with one thread: the engine and
the actor each get a core of their own, the CPU analogue of engines on GPUs of their own (cluster.colocate=false).
Off-policy adds ``rollout.off_policy_steps=1`` (and the TIS cap it requires, which the on-policy run also gets, so
the losses compute the same terms). Reported per mode: the mean wall time of steps 2.. (step 1 of the off-policy
run has nothing to overlap with), from the phases each step logs (they add up to its wall time), the phase
breakdown, and the off-policy / on-policy ratio. The ratio is what carries over; the seconds are this machine's.

    python tools/bench_off_policy.py [--steps 8] [--out bench_off_policy.json]
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
from pathlib import Path

import torch

# One core each: the actor's rank (a Ray worker, its own process) and the torch engine in this process.
COMMON = ["parallel.tensor_parallel_size=1", "cluster.cpu_workers_per_node=1", "run.save_every=0", "eval.path=null",
          "loss.tis_cap=2.0", "reward.num_workers=1"]
MODES = {"on-policy": [], "off-policy": ["rollout.off_policy_steps=1"]}


def run_mode(name: str, steps: int, root: Path) -> dict:
    from megatron_zero.trainer.demo import demo_config
    from megatron_zero.trainer.loop import Trainer

    config = demo_config(str(root / name), steps, [*COMMON, *MODES[name]])
    trainer = Trainer(config)
    try:
        trainer.fit()
    finally:
        trainer.close()
    records = [json.loads(line) for line in (root / name / "metrics.jsonl").read_text().splitlines()]
    phases = sorted({key for r in records for key in r if key.startswith("seconds_")})
    later = records[1:]
    step_seconds = [sum(v for k, v in r.items() if k.startswith("seconds_")) for r in later]
    return {"mode": name, "steps": steps, "mean_step_seconds": statistics.mean(step_seconds),
            "phases": {p.removeprefix("seconds_"): statistics.mean(r.get(p, 0.0) for r in later) for p in phases},
            "overlapped_generate_seconds": statistics.mean(r.get("overlapped_seconds_generate", 0.0) for r in later),
            "accuracy": [r["accuracy"] for r in records]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--out", default=None, help="write the results as JSON here")
    args = parser.parse_args()
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as root:
        results = [run_mode(name, args.steps, Path(root)) for name in MODES]
    on, off = results
    ratio = off["mean_step_seconds"] / on["mean_step_seconds"]
    for result in results:
        phases = ", ".join(f"{k} {v:.2f}" for k, v in result["phases"].items())
        print(f"{result['mode']:>10}: {result['mean_step_seconds']:.2f} s/step (steps 2-{args.steps}; {phases}; "
              f"generation overlapped with training {result['overlapped_generate_seconds']:.2f} s)")
    print(f"off-policy / on-policy step time: {ratio:.3f}")
    if args.out:
        Path(args.out).write_text(json.dumps({"results": results, "ratio": ratio}, indent=2))


if __name__ == "__main__":
    main()
