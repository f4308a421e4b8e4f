"""Validation during training: its overhead on the demo recipe, validation on vs off, side by side in one run.

Both variants train recipes/demo.yaml's model, data and LoRA with recipes/demo.yaml's validation split (the same
training items in both), for --steps optimizer steps:

  off  train.eval_every=0 (no validation; train.keep=last)
  on   the recipe's train.eval_every / train.eval_method / train.keep

The demo validates every eval_every steps and at the last step; with --steps a multiple of eval_every the shortened run
validates at the demo's density. The parent alternates off/on over --repeats (each variant in its own subprocess, so
neither inherits the other's warm caches or threads) and reports each run's training wall time (summary wall_s: the
loop, validations included, model load excluded), the per-pair on/off ratios and their median. Target: <= 1.10.
The on runs also time every validation (wall seconds inside Validation.validate): wall / (wall - validation) is the
same overhead measured within one run, which a shared machine's changing load does not skew.

    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/val_overhead.py --steps 16 --repeats 3 --out runs/bench/val_overhead.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RECIPE = ROOT / "recipes" / "demo.yaml"


def one(variant: str, steps: int, extra: list[str]) -> dict:
    """Train one variant in this process; its summary as JSON on stdout's last line."""
    from medtune import validation
    from medtune.config import load_config
    from medtune.data.prepare import prepare_data, validation_split
    from medtune.train import train

    spent = []  # wall seconds inside each validation: the within-run overhead, robust to a machine's load changing
    real = validation.Validation.validate

    def timed(self, model, step):
        t0 = time.perf_counter()
        try:
            return real(self, model, step)
        finally:
            spent.append(time.perf_counter() - t0)

    validation.Validation.validate = timed

    sets = [f"train.max_steps={steps}", *extra]
    if variant == "off":
        sets += ["train.eval_every=0", "train.keep=last", "train.patience=0"]
    cfg = load_config(RECIPE, sets)
    train_items, eval_items, data = prepare_data(cfg, log=lambda *_: None)
    train_items, val_items, data = validation_split(cfg, train_items, eval_items, data)
    with tempfile.TemporaryDirectory() as out:
        summary = train(cfg, train_items, Path(out), quiet=True, log=lambda *_: None, val_items=val_items)
        vals = [json.loads(x) for x in (Path(out) / "metrics.jsonl").read_text().splitlines()]
    return {"variant": variant, "wall_s": summary["wall_s"], "steps": summary["steps"], "val_s": sum(spent),
            "validations": len(spent),
            "val_accuracy": {r["step"]: r["val_accuracy"] for r in vals if "val_accuracy" in r},
            "validation": summary.get("validation"), "train_n": len(train_items), "val_n": len(val_items)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=16)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--out", type=Path)
    ap.add_argument("--set", action="append", default=[], help="a config override for both variants (key=value)")
    ap.add_argument("--one", choices=("off", "on"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.one:
        print(json.dumps(one(args.one, args.steps, args.set)))
        return
    runs: list[dict] = []
    started = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    for r in range(args.repeats):
        for variant in ("off", "on"):
            proc = subprocess.run([sys.executable, __file__, "--one", variant, "--steps", str(args.steps),
                                   *(f"--set={x}" for x in args.set)],
                                  capture_output=True, text=True, check=False,
                                  env={**os.environ, "HF_HUB_OFFLINE": "1"})
            if proc.returncode:
                sys.exit(f"{variant} run failed:\n{proc.stderr[-3000:]}")
            runs.append({"repeat": r, **json.loads(proc.stdout.strip().splitlines()[-1])})
            print(f"repeat {r} {variant}: {runs[-1]['wall_s']} s", file=sys.stderr)
    off = [x["wall_s"] for x in runs if x["variant"] == "off"]
    on = [x["wall_s"] for x in runs if x["variant"] == "on"]
    ratios = [b / a for a, b in zip(off, on)]
    within = [x["wall_s"] / (x["wall_s"] - x["val_s"]) for x in runs if x["variant"] == "on"]
    result = {"benchmark": "val_overhead", "date": started, "command": " ".join(sys.argv),
              "machine": {"platform": platform.platform(), "processor": platform.processor(),
                          "cpus": os.cpu_count(), "threads": _threads()},
              "steps": args.steps, "repeats": args.repeats, "runs": runs, "off_wall_s": off, "on_wall_s": on,
              "ratios": [round(x, 4) for x in ratios], "median_ratio": round(statistics.median(ratios), 4),
              "within_run_ratios": [round(x, 4) for x in within],
              "median_within_run_ratio": round(statistics.median(within), 4),
              "target": 1.10}
    text = json.dumps(result, indent=1)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text)
    print(text)


def _threads() -> int:
    import torch

    return torch.get_num_threads()


if __name__ == "__main__":
    main()
