"""results.json (one schema for eval and run), the environment record, and the printed tables."""

from __future__ import annotations

import math
import os
import platform
import sys
from collections import defaultdict
from importlib import metadata
from pathlib import Path

from medtune import stats
from medtune.data.items import LETTERS, MCQItem

DISCLAIMER = ("Research and education only: not medical advice. A model's answers to exam questions say nothing about "
              "its safety for patient care.")
PACKAGES = ("medtune", "torch", "transformers", "peft", "accelerate", "datasets", "safetensors")


def environment() -> dict:
    """Hardware and library versions, so every number can be traced to what produced it."""
    from medtune.hardware import decide, detect

    info = detect()
    versions = {}
    for name in PACKAGES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = None
    return {"python": sys.version.split()[0], "platform": platform.platform(), "device": info.kind,
            "device_names": info.names, "cpu_count": os.cpu_count(), "policy_train_dtype": decide(info).train_dtype,
            "versions": versions}


def metrics(items: list[MCQItem], rows: list[dict], debiased: list[list[float]] | None = None,
            details: list[dict] | None = None) -> dict:
    """Accuracy with its CI and beside it everything that keeps it honest: letter baselines, calibration, per-subject
    accuracy, selective accuracy, and (with --permute cyclic) rotation and debiased accuracy."""
    golds = [it.answer for it in items]
    preds = [LETTERS.index(r["pred"]) if r.get("pred") else None for r in rows]
    correct = [bool(r["correct"]) for r in rows]
    k, n = sum(correct), len(rows)
    out = {"n": n, "correct": k, "accuracy": k / n, "ci95": list(stats.wilson_ci(k, n))}
    probs = [[r["probs"][ch] for ch in LETTERS[: len(it.options)]] for it, r in zip(items, rows)] \
        if rows and "probs" in rows[0] else None
    gold_logprobs = [math.log(max(p[g], 1e-300)) for p, g in zip(probs, golds)] if probs else None
    out["letters"] = stats.letter_baselines(golds, preds, gold_logprobs, [len(it.options) for it in items])
    if probs:
        conf = [max(p) for p in probs]
        out["calibration"] = {"ece": stats.ece(conf, correct), "brier": stats.brier(probs, golds),
                              "reliability": stats.reliability_table(conf, correct)}
        bf16 = sum(r.get("precision") == "bf16" for r in rows)
        # Selective accuracy ranks items by confidence, and bf16 reorders near-tied confidences: on MedQA it moved
        # accuracy at 50% coverage by 0.011 (docs/benchmarks.md), so it is computed from fp32 scores only.
        out["selective"] = {"omitted": f"{bf16} of {n} items were scored in bf16 (default mode), which reorders "
                                       f"near-tied confidences; run --mode exact for selective accuracy"} \
            if bf16 else stats.selective_summary(conf, correct)
    if any("correct_norm" in r for r in rows):  # choices of different lengths: lm-eval's acc_norm beside acc
        # an item whose choices are all one length has no correct_norm: dividing by one constant keeps acc's argmax
        kn = sum(bool(r.get("correct_norm", r["correct"])) for r in rows)
        out["accuracy_norm"], out["ci95_norm"] = kn / n, list(stats.wilson_ci(kn, n))
    out["per_subject"] = per_subject(items, correct)
    if debiased is not None:
        out["permute"] = permute_metrics(items, debiased, details)
    return out


def per_subject(items: list[MCQItem], correct: list[bool]) -> dict:
    groups = defaultdict(list)
    for it, c in zip(items, correct):
        groups[it.subject or "(none)"].append(c)
    return {s: {"n": len(v), "accuracy": sum(v) / len(v), "ci95": list(stats.wilson_ci(sum(v), len(v)))}
            for s, v in sorted(groups.items())}


def permute_metrics(items: list[MCQItem], debiased: list[list[float]], details: list[dict]) -> dict:
    deb_correct = [max(range(len(d)), key=lambda j: d[j]) == it.answer for it, d in zip(items, debiased)]
    rot = [sum(d["rotation_correct"]) / len(d["rotation_correct"]) for d in details]
    consistent = [len(set(d["rotation_choice"])) == 1 for d in details]
    k, n = sum(deb_correct), len(items)
    return {"method": "cyclic", "debiased_accuracy": k / n, "debiased_ci95": list(stats.wilson_ci(k, n)),
            "mean_rotation_accuracy": sum(rot) / n, "consistency": sum(consistent) / n,
            "debiased_correct": deb_correct}


def write_json(path: Path, data: dict) -> None:
    """Written beside and renamed into place: a reader never sees half a file (medtune.io)."""
    from medtune import io

    io.write_json(path, data)


def write_jsonl(path: Path, rows: list[dict]) -> None:
    from medtune import io

    io.write_jsonl(path, rows)


def summary_line(label: str, m: dict) -> dict:
    """The columns of the before/after table for one result."""
    lo, hi = m["ci95"]
    letters = m["letters"]
    row = {"model": label, "n": m["n"], "accuracy": f"{m['accuracy']:.3f} [{lo:.3f}, {hi:.3f}]",
           "majority-letter baseline": f"{letters['majority_baseline']:.3f} ({letters['majority_letter']})",
           "favourite letter": f"{letters['favourite_letter']} ({letters['favourite_letter_accuracy']:.3f})",
           "predicted letters": " ".join(f"{k}{v:.0%}" for k, v in letters["pred_distribution"].items()),
           "mean log p(gold)": "-" if letters["mean_gold_logprob"] is None else
           f"{letters['mean_gold_logprob']:.2f} (uniform {letters['uniform_logprob']:.2f})"}
    if "accuracy_norm" in m:
        row["acc_norm (per char)"] = f"{m['accuracy_norm']:.3f}"
    if "permute" in m:
        p = m["permute"]
        row["debiased accuracy"] = f"{p['debiased_accuracy']:.3f} [{p['debiased_ci95'][0]:.3f}, " \
                                   f"{p['debiased_ci95'][1]:.3f}]"
        row["consistency"] = f"{p['consistency']:.2f}"
    return row


def _comparison_lines(comparison: dict) -> list[str]:
    lines = []
    for kind, c in comparison.items():
        if isinstance(c, dict):
            lo, hi = c["diff_ci"]
            lines.append(f"{kind:>9}: {c['acc_a']:.3f} -> {c['acc_b']:.3f} ({c['diff'] * 100:+.1f} points, 95% CI "
                         f"[{lo * 100:+.1f}, {hi * 100:+.1f}]); won {len(c['won'])}, lost {len(c['lost'])}, "
                         f"McNemar exact p = {c['mcnemar_p']:.4g}")
    if comparison.get("letter_bias_warning"):
        lines.append(f"letter bias: {comparison['letter_bias_warning']}")
    return lines


def shorten(text: str, width: int) -> str:
    """`text` cut to `width` characters with an ellipsis, for a table cell or a bar label."""
    return text if len(text) <= width else text[: width - 1] + "…"


def render_table(rows: list[dict], title: str = "") -> str:
    """A plain-text table (columns from the first row), readable in a log and in a terminal."""
    from rich.console import Console
    from rich.table import Table

    table = Table(title=title or None)
    for col in rows[0]:
        table.add_column(col)
    for row in rows:
        table.add_row(*[str(row.get(c, "")) for c in rows[0]])
    with open(os.devnull, "w") as sink:
        console = Console(width=200, record=True, file=sink)
        console.print(table)
        return console.export_text()


def render_results(results: dict) -> str:
    """The printed summary: one table row per model, then the paired comparison and any letter-bias warning."""
    if "suite" in results:
        su = results["suite"]
        rows = [{"benchmark": k, "n": v["n"], "accuracy": f"{v['accuracy']:.3f} [{v['ci95'][0]:.3f}, {v['ci95'][1]:.3f}]"}
                for k, v in su["parts"].items()]
        rows.append({"benchmark": "size-weighted", "n": su["n"],
                     "accuracy": f"{su['weighted_accuracy']:.3f} [{su['ci95'][0]:.3f}, {su['ci95'][1]:.3f}]"})
        return render_table(rows, title=su["suite"])
    if "eval" in results:
        r = results["eval"]
        return render_table([summary_line(Path(str(r.get("adapter") or r["model"])).name, r["metrics"])],
                            title=f"{r['data']['source']} — {r['method']}, {r['prompt_style']} prompt, {r['mode']} mode")
    lines = []
    for method, part in {results["base"]["method"]: results, **{
            r["base"]["method"]: r for r in results.get("extra_methods", {}).values()}}.items():
        rows = [summary_line("base", part["base"]["metrics"]), summary_line("tuned", part["tuned"]["metrics"])]
        lines.append(render_table(rows, title=f"{results['data']['eval']['source']}: before / after fine-tuning — "
                                              f"{method}, {part['base']['prompt_style']} prompt").rstrip())
        lines += _comparison_lines(part["comparison"])
    t = results["train"]
    lines.append(f"training: {t['steps']} steps, {t['wall_s']} s, {t['tokens_per_s']} real tokens/s, final loss "
                 f"{t['final_loss']:.4f}; whole run {results['wall_s']} s")
    return "\n".join(lines)
