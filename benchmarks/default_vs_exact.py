"""Default (fast) mode against exact mode on the same items: do the figures medtune prints agree?

  python benchmarks/default_vs_exact.py --data ../shared/data/medqa/test.jsonl [--adapter RUN/adapter] [--limit N]
  python benchmarks/default_vs_exact.py --data demo:eval --adapter runs/demo/adapter --method answer --permute cyclic

Scores the items twice in one process through `evaluate.run_eval` (what `medtune eval` runs): `--mode fast` (bf16
weights where the CPU/GPU supports it, fp32 re-score of close calls) and `--mode exact` (fp32). Reports, for each
mode, the figures results.json holds (accuracy, ECE, Brier, mean log p(gold), computed by report.metrics exactly as
eval computes them; AURC and accuracy at 50% coverage computed from each mode's rows, since eval omits them where rows
are bf16), the differences, whether every prediction agrees, the largest per-option log-prob and confidence
differences, how many rows were bf16, and each mode's scoring time. The issue's limits: |Δ ECE|, |Δ Brier| <= 0.005
and |Δ mean log p(gold)| <= 0.01 nats.

  --force-bf16   keep the bf16 pass where fast mode would switch to exact (a freshly tuned, near-uniform model)
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", required=True, help="A file, demo:eval, or a preset.")
    p.add_argument("--adapter")
    p.add_argument("--limit", type=int)
    p.add_argument("--method", default="letter")
    p.add_argument("--permute", default="none")
    p.add_argument("--force-bf16", action="store_true",
                   help="Diagnostic: keep fast mode in bf16 even when its probe finds mostly close calls (a freshly "
                        "tuned model), to measure what bf16 would move. Off: exactly what `medtune eval` does.")
    args = p.parse_args(argv)

    from medtune import scoring, stats
    from medtune.config import load_config
    from medtune.data.sources import load
    from medtune.evaluate import run_eval
    from medtune.models import load_model

    items = load(args.data, "eval")[: args.limit or None]
    loaded = load_model("embedded", adapter=args.adapter, merge=True, log=lambda *_: None)
    if args.force_bf16:
        scoring.MAX_CLOSE = 1.0
    out, reported = {}, {}
    for mode in ("fast", "exact"):
        cfg = load_config(None, [f"eval.mode={mode}", f"eval.method={args.method}", f"eval.permute={args.permute}"])
        start = time.perf_counter()
        results, rows = run_eval(items, cfg, None, adapter=args.adapter, loaded=loaded, quiet=True,
                                 log=lambda *_: None)
        m = results["metrics"]
        conf = [max(r["probs"].values()) for r in rows]
        # selective accuracy from these rows' scores, also where eval omits it (bf16 rows: see report.metrics)
        sel = stats.selective_summary(conf, [bool(r["correct"]) for r in rows])
        out[mode] = {"rows": rows, "conf": conf, "s": time.perf_counter() - start, "accuracy": m["accuracy"],
                     "ece": m["calibration"]["ece"], "brier": m["calibration"]["brier"],
                     "mean_gold_logprob": m["letters"]["mean_gold_logprob"], "aurc": sel["aurc"],
                     "acc_at_50": sel["accuracy_at_coverage"]["50"],
                     **({"debiased_accuracy": m["permute"]["debiased_accuracy"]} if "permute" in m else {})}
        reported[mode] = "omitted" not in m["selective"]
    f, e = out["fast"], out["exact"]
    same = sum(a["pred"] == b["pred"] for a, b in zip(f["rows"], e["rows"]))
    same_deb = sum(a.get("debiased_pred") == b.get("debiased_pred") for a, b in zip(f["rows"], e["rows"])) \
        if args.permute != "none" else None  # no rotations, no debiased predictions
    lp = max(abs(x - y) for a, b in zip(f["rows"], e["rows"]) for x, y in zip(a["logprobs"].values(),
                                                                               b["logprobs"].values()))
    max_conf = max(abs(a - b) for a, b in zip(f["conf"], e["conf"]))
    margin = scoring.default_margin(args.method)
    probe = [scoring.margin_of(list(r["logprobs"].values())) < margin for r in e["rows"][: scoring.PROBE]]
    keys = [k for k in e if k not in ("rows", "conf")]
    summary = {"n": len(items), "data": args.data, "adapter": args.adapter, "method": args.method,
               "force_bf16": args.force_bf16, "probe_close_share": sum(probe) / max(1, len(probe)),
               "same_predictions": same, "same_debiased_predictions": same_deb, "max_logprob_diff": lp,
               "max_confidence_diff": max_conf,
               # how bunched the confidences are, and the share of items a band re-score around the coverage cuts
               # (within the largest bf16 confidence error of any cut) would have to re-score in fp32
               "confidence_quantiles_exact": {q: _quantile(e["conf"], q) for q in (0.1, 0.5, 0.9)},
               "band_rescore_share": _band_share(f["conf"], e["conf"], max_conf),
               "selective_reported": reported,
               "bf16_rows": sum(r.get("precision") == "bf16" for r in f["rows"]),
               **{k: {"fast": f[k], "exact": e[k], "diff": f[k] - e[k]} for k in keys}}
    print(json.dumps(summary, indent=1))
    return 0


def _quantile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def _band_share(fast: list[float], exact: list[float], delta: float,
                coverages: tuple[float, ...] = (0.9, 0.8, 0.7, 0.5, 0.25)) -> float:
    """Share of items whose bf16 confidence lies within `delta` of the exact confidence at a coverage cut."""
    ranked = sorted(exact, reverse=True)
    cuts = [ranked[max(1, math.ceil(q * len(ranked))) - 1] for q in coverages]
    return sum(any(abs(c - t) < delta for t in cuts) for c in fast) / len(fast)


if __name__ == "__main__":
    sys.exit(main())
