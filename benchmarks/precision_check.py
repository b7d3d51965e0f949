"""Mixed precision against float32: does a bf16 (or fp16) run train like a float32 one?

    python benchmarks/precision_check.py [--device cuda] [--steps 1500] [--data digits] [--preset digits] [--out DIR]

Trains the same run (same seed, data order and noise) in float32, under bf16 autocast and, on
CUDA, under fp16 autocast with a gradient scaler; plus float32 with another seed, which says how
far apart two runs that differ only by chance land ("noise"). Prints each run's steps/s and mean
loss over each fifth of the budget, and for the last fifth the gap to float32 (same seed) next to
the seed-to-seed gap. Writes each run's final EMA sample grid (look at them) into --out.
On a CPU without native bf16 (no avx512_bf16/AMX) bf16 is emulated and very slow: use a GPU.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import sys
from pathlib import Path

import diffusekit  # noqa: F401  (before torch: it picks OpenMP's wait policy by the machine's load)
import torch

from diffusekit.train import TrainConfig, train


def run(args, precision: str, seed: int) -> dict:
    out = Path(args.out) / f"{precision}-seed{seed}"
    cfg = TrainConfig(data=args.data, preset=args.preset, out=str(out), steps=args.steps, precision=precision,
                      seed=seed, device=args.device, batch_size=args.batch_size, log_every=max(1, args.steps // 50),
                      checkpoint_every=args.steps, sample_every=args.steps, save_minutes=None)
    train(cfg, overwrite=True, progress=False)
    log = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in log if "loss" in r]
    fifths = [statistics.mean(losses[i * len(losses) // 5:(i + 1) * len(losses) // 5]) for i in range(5)]
    shutil.copyfile(out / "samples.png", Path(args.out) / f"samples-{precision}-seed{seed}.png")
    return {"fifths": fifths, "steps_per_s": statistics.median(r["steps_per_s"] for r in log[1:] or log)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--steps", type=int, default=1500)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--data", default="digits")
    parser.add_argument("--preset", default=None)
    parser.add_argument("--out", default="runs/precision_check")
    args = parser.parse_args()
    if args.steps < 5:  # checked before training: the report averages the loss over fifths of the run
        raise ValueError(f"--steps {args.steps}: give at least 5 steps")
    precisions = ["fp32", "bf16"] + (["fp16"] if args.device.startswith("cuda") else [])
    name = torch.cuda.get_device_name(args.device) if args.device.startswith("cuda") else "CPU"
    print(f"{args.data}, {args.steps} steps of batch {args.batch_size} on {args.device} ({name}), torch {torch.__version__}")
    print(f"{'run':14} {'steps/s':>8}  mean loss per fifth of the run", flush=True)
    results = {}
    for p, seed in [(p, 0) for p in precisions] + [("fp32", 1)]:
        r = results[p, seed] = run(args, p, seed)
        print(f"{p + ' seed ' + str(seed):14} {r['steps_per_s']:>8.1f}  " + " ".join(f"{v:.4f}" for v in r["fifths"]),
              flush=True)
    base, noise = results["fp32", 0]["fifths"][-1], results["fp32", 1]["fifths"][-1]
    print(f"last fifth, gap to fp32 seed 0: fp32 seed 1 (noise) {noise - base:+.4f}; " +
          "; ".join(f"{p} {results[p, 0]['fifths'][-1] - base:+.4f}" for p in precisions[1:]))


if __name__ == "__main__":
    from diffusekit._utils import run_script

    sys.exit(run_script(main))
