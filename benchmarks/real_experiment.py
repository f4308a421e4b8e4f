"""The real-benchmark experiment (issue 6): the embedded model fine-tuned on MedMCQA's standard 2,000-question
training split, evaluated before and after on the held-out MedMCQA questions and on MedQA test (never trained on),
with option shuffling on, reporting accuracy, the letter baselines and the permutation-debiased accuracy.

    .venv/bin/python benchmarks/real_experiment.py --eval-limit 500 --out runs/bench/real
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from medtune.config import load_config
from medtune.data.formats import read_file
from medtune.evaluate import run_eval
from medtune.report import render_table, summary_line
from medtune.run import compare, run

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared" / "data"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--eval-limit", type=int, default=None, help="first N held-out items of each benchmark")
    ap.add_argument("--epochs", type=float, default=1.0)
    ap.add_argument("--out", type=Path, default=ROOT / "runs" / "bench" / "real")
    ap.add_argument("--set", dest="sets", action="append", default=[], help="extra config overrides")
    args = ap.parse_args()
    started = time.time()
    sets = [f"out_dir={args.out / 'medmcqa'}", f"data.source={SHARED / 'medmcqa' / 'dev.jsonl'}",
            f"train.epochs={args.epochs}", "eval.permute=cyclic", *args.sets]
    if args.eval_limit:
        sets.append(f"data.limit={args.eval_limit}")
    cfg = load_config(ROOT / "recipes" / "medmcqa-split-embedded.yaml", sets)
    mm = run(cfg, quiet=True)
    medqa = read_file(SHARED / "medqa" / "test.jsonl")[: args.eval_limit]
    fp = {"source": str(SHARED / "medqa" / "test.jsonl"), "n": len(medqa)}
    base, base_rows = run_eval(medqa, cfg, args.out / "medqa-base", fingerprint=fp, quiet=True, label="base")
    tuned, tuned_rows = run_eval(medqa, cfg, args.out / "medqa-tuned", adapter=str(args.out / "medmcqa" / "adapter"),
                                 fingerprint=fp, quiet=True, label="tuned")
    summary = {
        "config": cfg.to_dict(), "train": mm["train"], "wall_s": round(time.time() - started, 1),
        "medmcqa": {"base": mm["base"]["metrics"], "tuned": mm["tuned"]["metrics"], "comparison": mm["comparison"]},
        "medqa": {"base": base["metrics"], "tuned": tuned["metrics"],
                  "comparison": compare(medqa, base, tuned, base_rows, tuned_rows)},
    }
    (args.out / "summary.json").write_text(json.dumps(summary, indent=1, default=str))
    for name in ("medmcqa", "medqa"):
        s = summary[name]
        print(render_table([summary_line("base", s["base"]), summary_line("tuned", s["tuned"])], title=name))
        for kind in ("raw", "debiased"):
            c = s["comparison"].get(kind)
            if c:
                print(f"{name} {kind}: {c['acc_a']:.3f} -> {c['acc_b']:.3f}, won {len(c['won'])}, lost {len(c['lost'])},"
                      f" McNemar p = {c['mcnemar_p']:.4g}")
        if s["comparison"].get("letter_bias_warning"):
            print(f"{name} letter bias: {s['comparison']['letter_bias_warning']}")
    print(f"training: {summary['train']}; whole experiment {summary['wall_s']} s")


if __name__ == "__main__":
    main()
