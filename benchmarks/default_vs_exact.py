"""Default (fast) mode against exact mode on the same items: do the figures medtune prints agree?

  python benchmarks/default_vs_exact.py --data ../shared/data/medqa/test.jsonl [--adapter RUN/adapter] [--limit N]
  python benchmarks/default_vs_exact.py --data demo:eval --adapter runs/demo/adapter --method answer --permute cyclic

Scores the items twice in one process through `evaluate.run_eval` (what `medtune eval` runs): `--mode fast` (bf16
weights where the CPU/GPU supports it, fp32 re-score of close calls) and `--mode exact` (fp32). Reports, for each
mode, the figures results.json holds (accuracy, ECE, Brier, mean log p(gold), AURC and accuracy at 50% coverage,
computed by report.metrics exactly as eval computes them), the differences, whether every prediction agrees, the
largest per-option log-prob difference, how many rows were bf16, and each mode's scoring time. The issue's limits:
|Δ ECE|, |Δ Brier| <= 0.005 and |Δ mean log p(gold)| <= 0.01 nats.
"""

from __future__ import annotations

import argparse
import json
import sys
import time


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", required=True, help="A file, demo:eval, or a preset.")
    p.add_argument("--adapter")
    p.add_argument("--limit", type=int)
    p.add_argument("--method", default="letter")
    p.add_argument("--permute", default="none")
    args = p.parse_args(argv)

    from medtune.config import load_config
    from medtune.data.sources import load
    from medtune.evaluate import run_eval
    from medtune.models import load_model

    items = load(args.data, "eval")[: args.limit or None]
    loaded = load_model("embedded", adapter=args.adapter, merge=True, log=lambda *_: None)
    out = {}
    for mode in ("fast", "exact"):
        cfg = load_config(None, [f"eval.mode={mode}", f"eval.method={args.method}", f"eval.permute={args.permute}"])
        start = time.perf_counter()
        results, rows = run_eval(items, cfg, None, adapter=args.adapter, loaded=loaded, quiet=True,
                                 log=lambda *_: None)
        m = results["metrics"]
        out[mode] = {"rows": rows, "s": time.perf_counter() - start, "accuracy": m["accuracy"],
                     "ece": m["calibration"]["ece"], "brier": m["calibration"]["brier"],
                     "mean_gold_logprob": m["letters"]["mean_gold_logprob"], "aurc": m["selective"]["aurc"],
                     "acc_at_50": m["selective"]["accuracy_at_coverage"]["50"],
                     **({"debiased_accuracy": m["permute"]["debiased_accuracy"]} if "permute" in m else {})}
    f, e = out["fast"], out["exact"]
    same = sum(a["pred"] == b["pred"] for a, b in zip(f["rows"], e["rows"]))
    same_deb = sum(a.get("debiased_pred") == b.get("debiased_pred") for a, b in zip(f["rows"], e["rows"]))
    lp = max(abs(x - y) for a, b in zip(f["rows"], e["rows"]) for x, y in zip(a["logprobs"].values(),
                                                                               b["logprobs"].values()))
    keys = [k for k in e if k != "rows"]
    summary = {"n": len(items), "data": args.data, "adapter": args.adapter, "method": args.method,
               "same_predictions": same, "same_debiased_predictions": same_deb, "max_logprob_diff": lp,
               "bf16_rows": sum(r.get("precision") == "bf16" for r in f["rows"]),
               **{k: {"fast": f[k], "exact": e[k], "diff": f[k] - e[k]} for k in keys}}
    print(json.dumps(summary, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
