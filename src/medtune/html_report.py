"""`medtune report RUN_DIR`: one self-contained HTML file about a run, readable offline in any browser.

It reads only what the run wrote (results.json, metrics.jsonl, base/ and tuned/ predictions, cost.json, config.yaml)
and adds no scoring of its own. Figures are matplotlib PNGs embedded as base64 data URIs; no script, stylesheet or
font is loaded from anywhere, so the file can be mailed, archived or opened on an air-gapped machine.

The ten example questions are the first ten eval items, in order (not picked for looking good). Their explanation is,
in this order of preference: the run's own `generate` evaluation (tuned-generate/), else one generated now, greedily
and capped at EXPLAIN_TOKENS, with the run's tuned model when `explain=True` (`medtune run` does this), else none —
then the page shows the scored prediction with its probabilities and says that no explanation was generated.
"""

from __future__ import annotations

import base64
import json
from pathlib import Path

import yaml

from medtune.audit import change_in_points
from medtune.errors import MedtuneError

EXAMPLES = 10
EXPLAIN_TOKENS = 96
MAX_LISTED = 40  # won/lost rows shown per list
MAX_SUBJECTS = 25


def write_report(run_dir: Path | str, out: Path | str | None = None, price_per_hour: float | None = None,
                 explain: bool = False, log=print, loaded=None) -> Path:
    """Render RUN/report.html (or `out`); written beside and renamed, so a reader never sees half a page."""
    run_dir = Path(run_dir)
    out = Path(out) if out else run_dir / "report.html"
    page = render(build(run_dir, price_per_hour, explain, log, loaded))
    from medtune import io

    io.write_text(out, page)
    return out


def build(run_dir: Path, price_per_hour: float | None = None, explain: bool = False, log=print, loaded=None) -> dict:
    """Everything the template shows, as plain values and base64 PNGs. `loaded` = (tuned model, tokenizer) already
    in memory (`medtune run` passes its own), else explanations load the run's base model + adapter."""
    from medtune import figures
    from medtune.report import DISCLAIMER

    results = _load_results(run_dir)
    base_rows, tuned_rows = _rows(run_dir / "base"), _rows(run_dir / "tuned")
    items, items_note = _items(run_dir)
    base_m, tuned_m = results["base"]["metrics"], results["tuned"]["metrics"]
    images = {"accuracy": figures.accuracy_bars(accuracy_groups(results)),
              "letters": figures.letter_distributions(tuned_m["letters"]["gold_distribution"], {
                  "base": base_m["letters"]["pred_distribution"], "tuned": tuned_m["letters"]["pred_distribution"]})}
    subjects = subject_groups(base_m, tuned_m)
    if len(subjects) > 1:
        images["subjects"] = figures.accuracy_bars(subjects)
    if "calibration" in tuned_m and "calibration" in base_m:
        images["reliability"] = figures.reliability({"base": base_m["calibration"]["reliability"],
                                                     "tuned": tuned_m["calibration"]["reliability"]})
        if not any(r.get("precision") == "bf16" for r in base_rows + tuned_rows):  # report.metrics: why fp32 only
            images["risk_coverage"] = figures.risk_coverage({"base": risk_coverage(base_rows),
                                                             "tuned": risk_coverage(tuned_rows)})
    curves = _jsonl(run_dir / "metrics.jsonl", "metrics")
    if curves:
        images["training"] = figures.training_curves(curves)
    cost = run_cost(run_dir, price_per_hour)
    if cost:
        images["cost"] = figures.cost_bars({k: v["wall_s"] for k, v in cost["parts"].items()})
    examples, explain_note = _examples(run_dir, results, items, tuned_rows, explain, log, loaded)
    from medtune import checklist

    return {**reviewer_sections(results),
            "checklist": checklist.fill(run_dir, list(items.values()) or None, loaded[1] if loaded else None),
            "checklist_citations": checklist.CITATIONS,
        "title": f"{results['config']['model']} on {results['data']['eval']['source']}", "disclaimer": DISCLAIMER,
        "results": results, "headline": headline(results), "comparisons": comparisons(results),
        "images": {k: base64.b64encode(figures.png(v)).decode() for k, v in images.items()},
        "won_lost": won_lost(results, items, base_rows, tuned_rows), "items_note": items_note,
        "examples": examples, "explain_note": explain_note, "cost": cost, "subjects_cut": len(subjects) >= MAX_SUBJECTS,
        "config": yaml.safe_dump(results["config"], sort_keys=False),
        "data": json.dumps(results["data"], indent=1), "environment": json.dumps(results["environment"], indent=1),
    }


def reviewer_sections(results: dict) -> dict:
    """The audit, subject-with-power and conformal sections, preformatted; None where results.json lacks them,
    a {"skipped": why} dict passed through."""
    audit, conformal = results.get("audit"), results.get("conformal")
    return {"audit": _audit_section(audit) if isinstance(audit, dict) and "n" in audit else audit,
            "subgroups": _subject_section(results["subgroups"]) if "subgroups" in results else None,
            "conformal": _conformal_section(conformal) if isinstance(conformal, dict) and "alpha" in conformal
            else conformal}


def _audit_section(a: dict) -> dict:
    oo, nota, rot = a["options_only"], a["nota"], a["rotations"]
    rows = [{"what": "full prompt", "n": a["full"]["n"], "accuracy": _ci(a["full"]["accuracy"], a["full"]["ci95"]),
             "against": "", "diff": "", "p": ""},
            {"what": "options only (stem removed)", "n": oo["n"], "accuracy": _ci(oo["accuracy"], oo["ci95"]),
             "against": f"chance {oo['chance']:.3f} (exact binomial p = {oo['binomial_p']:.3g})",
             "diff": _points(oo["vs_full"]), "p": f"{oo['vs_full']['mcnemar_p']:.3g}"}]
    if nota is not None:
        rows.append({"what": "right option replaced by \"None of the other answers\"", "n": nota["n"],
                     "accuracy": _ci(nota["accuracy"], nota["ci95"]),
                     "against": f"{nota['accuracy_full']:.3f} with the original text; {change_in_points(nota['drop'])} "
                                f"({nota['n_ambiguous']} items have another none/all-of-the-above option)",
                     "diff": _points(nota["vs_full"]), "p": f"{nota['vs_full']['mcnemar_p']:.3g}"})
    positions = []
    if rot is not None:
        flips = rot["flip_rate_by_gold_position"]
        for pos, acc in rot["accuracy_by_gold_position"].items():
            f = flips.get(pos)
            positions.append({"pos": pos, "n": acc["n"], "accuracy": _ci(acc["accuracy"], acc["ci95"]),
                              "flip": f"{f['rate']:.1%} ({f['flips']} of {f['n']})" if f else "-"})
    rotation = None if rot is None else (
        f"{rot['changed']} of {rot['n']} items ({rot['changed_share']:.1%}, 95% CI [{rot['changed_ci95'][0]:.1%}, "
        f"{rot['changed_ci95'][1]:.1%}]) change their answer under some cyclic rotation of the options; "
        f"{rot['flip_rate']:.1%} of rotated predictions flip; right under every rotation: "
        f"{rot['accuracy_all_rotations']:.3f}")
    return {"rows": rows, "positions": positions, "rotation": rotation, "n": a["n"]}


def _points(paired: dict) -> str:
    lo, hi = paired["diff_ci"]
    return f"{paired['diff'] * 100:+.1f} [{lo * 100:+.1f}, {hi * 100:+.1f}]"


def _subject_section(sub: dict) -> dict:
    base = {r["group"]: r for r in sub["base"]}
    tuned = {r["group"]: r for r in sub["tuned"]}
    rows = [{"group": r["group"], "n": r["n"], "base": _ci(base[r["group"]]["accuracy"], base[r["group"]]["ci95"]),
             "tuned": _ci(tuned[r["group"]]["accuracy"], tuned[r["group"]]["ci95"]),
             "diff": _points(r), "p": f"{r['mcnemar_p']:.3g}", "p_bh": f"{r['p_bh']:.3g}", "mde": r["mde_text"]}
            for r in sub["before_after"]]
    psi = sub["before_after"][0]["discordance"] if sub["before_after"] else 0.0
    return {"field": sub["field"], "rows": rows, "discordance": psi}


def _conformal_section(c: dict) -> dict:
    from medtune.conformal import METHODS

    rows = []
    for m in METHODS:
        if m not in c:
            continue
        cal, ev = c[m]["calibration"], c[m]["evaluation"]
        acc = ev["singleton_accuracy"]
        rows.append({"method": m.upper(), "n_cal": cal["n"], "n": ev["n"],
                     "coverage": _ci(ev["coverage"], ev["coverage_ci95"]), "target": f"{ev['target_coverage']:.2f}",
                     "meets": ev["coverage_ci95"][1] >= ev["target_coverage"],
                     "coverage_pct": round(ev["coverage"] * 100), "target_pct": round(ev["target_coverage"] * 100),
                     "size": f"{ev['mean_set_size']:.2f}", "singleton": f"{ev['singleton_share']:.1%}",
                     "empty": f"{ev['empty_share']:.1%}",
                     "singleton_acc": _ci(acc, ev["singleton_accuracy_ci95"]) if acc is not None else "n/a"})
    return {"alpha": c["alpha"], "source": c["calibration_source"], "note": c.get("note"), "rows": rows}


def render(context: dict) -> str:
    import jinja2

    env = jinja2.Environment(loader=jinja2.PackageLoader("medtune", "templates"), autoescape=True,
                             undefined=jinja2.StrictUndefined)
    return env.get_template("report.html.j2").render(**context)


def _load_results(run_dir: Path) -> dict:
    path = run_dir / "results.json"
    if not path.is_file():
        raise MedtuneError(f"{run_dir}: no results.json; `medtune report` reads the directory of a finished "
                           "`medtune run`")
    from medtune.records import read_record

    return read_record(path, "run")


def _rows(d: Path) -> list[dict]:
    return _jsonl(d / "predictions.jsonl", "predictions")


def _jsonl(path: Path, kind: str) -> list[dict]:
    from medtune.records import read_rows

    return read_rows(path, kind) if path.is_file() else []


def _items(run_dir: Path) -> tuple[dict, str | None]:
    """The eval items (for question text), rebuilt from the run's config the way the run built them."""
    from medtune.config import load_config
    from medtune.data.prepare import prepare_data

    try:
        _, eval_items, _ = prepare_data(load_config(run_dir / "config.yaml"), log=lambda *_: None)
    except (MedtuneError, OSError) as e:
        return {}, f"question text unavailable (the eval data could not be read again: {e}); ids are shown"
    return {it.id: it for it in eval_items}, None


def headline(results: dict) -> list[dict]:
    """One row per model and method: accuracy with CI, debiased accuracy, baselines, calibration."""
    out = []
    for method, part in _parts(results):
        for label in ("base", "tuned"):
            m = part[label]["metrics"]
            row = {"model": label, "method": method, "n": m["n"], "accuracy": _ci(m["accuracy"], m["ci95"]),
                   "debiased": _ci(m["permute"]["debiased_accuracy"], m["permute"]["debiased_ci95"])
                   if "permute" in m else "not measured",
                   "baseline": f"{m['letters']['majority_baseline']:.3f} ({m['letters']['majority_letter']})",
                   "favourite": f"{m['letters']['favourite_letter']} ({m['letters']['favourite_letter_accuracy']:.3f})",
                   "ece": f"{m['calibration']['ece']:.3f}" if "calibration" in m else "-"}
            out.append(row)
    return out


def comparisons(results: dict) -> list[dict]:
    out = []
    for method, part in _parts(results):
        for kind in ("raw", "debiased"):
            c = part["comparison"].get(kind)
            if isinstance(c, dict):
                out.append({"method": method, "kind": kind, "change": f"{c['acc_a']:.3f} → {c['acc_b']:.3f}",
                            "diff": f"{c['diff'] * 100:+.1f} [{c['diff_ci'][0] * 100:+.1f}, "
                                    f"{c['diff_ci'][1] * 100:+.1f}]",
                            "won": len(c["won"]), "lost": len(c["lost"]), "p": f"{c['mcnemar_p']:.4g}"})
        if part["comparison"].get("letter_bias_warning"):
            out.append({"method": method, "kind": "warning", "change": part["comparison"]["letter_bias_warning"],
                        "diff": "", "won": "", "lost": "", "p": ""})
    return out


def _parts(results: dict) -> list[tuple[str, dict]]:
    """The run's main method, then each extra method it compared base and tuned with."""
    return [(results["base"]["method"], results)] + [(p["base"]["method"], p)
                                                     for p in results.get("extra_methods", {}).values()]


def _ci(value: float, ci: list[float]) -> str:
    return f"{value:.3f} [{ci[0]:.3f}, {ci[1]:.3f}]"


def accuracy_groups(results: dict) -> list[dict]:
    source = results["data"]["eval"]["source"]
    groups = []
    for method, part in _parts(results):
        b, t = part["base"]["metrics"], part["tuned"]["metrics"]
        groups.append({"label": f"{source}\n{method}, raw", "base": b["accuracy"], "tuned": t["accuracy"],
                       "base_ci": b["ci95"], "tuned_ci": t["ci95"], "baseline": t["letters"]["majority_baseline"]})
        if "permute" in b and "permute" in t:
            groups.append({"label": f"{source}\n{method}, debiased", "base": b["permute"]["debiased_accuracy"],
                           "tuned": t["permute"]["debiased_accuracy"], "base_ci": b["permute"]["debiased_ci95"],
                           "tuned_ci": t["permute"]["debiased_ci95"], "baseline": None})
    return groups


def subject_groups(base_m: dict, tuned_m: dict) -> list[dict]:
    """Per-subject raw accuracy (the largest MAX_SUBJECTS subjects), labelled with their n."""
    subjects = sorted(tuned_m["per_subject"], key=lambda s: -tuned_m["per_subject"][s]["n"])[:MAX_SUBJECTS]
    return [{"label": f"{s} (n={tuned_m['per_subject'][s]['n']})", "base": base_m["per_subject"][s]["accuracy"],
             "tuned": tuned_m["per_subject"][s]["accuracy"], "base_ci": base_m["per_subject"][s]["ci95"],
             "tuned_ci": tuned_m["per_subject"][s]["ci95"], "baseline": None} for s in sorted(subjects)]


def risk_coverage(rows: list[dict]) -> tuple[list[float], list[float]]:
    """Answer the most confident questions first: (coverage, error rate) at every confidence threshold. Tied
    confidences enter together (stats.risk_coverage): no threshold can separate them."""
    from medtune import stats

    curve = stats.risk_coverage([max(r["probs"].values()) for r in rows], [r["correct"] for r in rows])
    return [c["coverage"] for c in curve], [c["risk"] for c in curve]


def won_lost(results: dict, items: dict, base_rows: list[dict], tuned_rows: list[dict]) -> list[dict]:
    """Questions the tuned model got right and the base wrong (won), and the reverse (lost), main method, raw."""
    from medtune.report import shorten

    base, tuned = {r["id"]: r for r in base_rows}, {r["id"]: r for r in tuned_rows}
    out = []
    for kind in ("won", "lost"):
        ids = results["comparison"]["raw"][kind]
        rows = [{"id": i, "question": shorten(items[i].question, 140) if i in items else "", "gold": tuned[i]["gold"],
                 "base": base[i]["pred"], "tuned": tuned[i]["pred"]} for i in ids[:MAX_LISTED]]
        out.append({"kind": kind, "n": len(ids), "rows": rows, "more": max(0, len(ids) - MAX_LISTED)})
    return out


def _examples(run_dir: Path, results: dict, items: dict, tuned_rows: list[dict], explain: bool,
              log, loaded=None) -> tuple[list[dict], str]:
    """The first EXAMPLES eval items with the tuned model's scored answer, its probabilities and an explanation."""
    rows = tuned_rows[:EXAMPLES]
    generated = {r["id"]: r for r in (rows if rows and "explanation" in rows[0] else _rows(run_dir / "tuned-generate"))}
    saved = run_dir / "explanations.jsonl"  # written the first time they are generated, so a re-render keeps them
    if generated:
        note = "Explanations: from the run's greedy `generate` evaluation of the tuned model."
    elif saved.is_file() or (explain and rows and all(r["id"] in items for r in rows)):
        if explain or not saved.is_file():
            from medtune.report import write_jsonl

            write_jsonl(saved, explain_items(run_dir, results, [items[r["id"]] for r in rows], log, loaded))
        generated = {r["id"]: r for r in _jsonl(saved, "explanations")}
        note = (f"Explanations: generated greedily for this report by the tuned model (base + adapter), at most "
                f"{EXPLAIN_TOKENS} new tokens, with the run's prompt style (saved in explanations.jsonl).")
    else:
        why = "the question text is unavailable" if rows and not all(r["id"] in items for r in rows) else \
            "the run has no `generate` evaluation"
        note = (f"Explanations were not generated ({why}): shown is the tuned model's scored answer with its "
                f"option probabilities. `medtune report {run_dir} --explain` generates them.")
    out = []
    for r in rows:
        item, g = items.get(r["id"]), generated.get(r["id"])
        letters = sorted(r["probs"]) if "probs" in r else [chr(65 + j) for j in range(len(item.options) if item else 0)]
        options = [{"letter": ch, "text": item.options[j] if item and j < len(item.options) else "", "prob": r.get("probs", {}).get(ch),
                    "gold": ch == r["gold"], "pred": ch == r["pred"]} for j, ch in enumerate(letters)]
        out.append({"id": r["id"], "question": item.question if item else "", "options": options, "gold": r["gold"],
                    "pred": r["pred"], "correct": r["correct"], "subject": r.get("subject"),
                    "explanation": g["explanation"] if g else None, "generated_letter": g["pred"] if g else None,
                    "disagrees": bool(g) and g["pred"] != r["pred"]})
    return out, note


def explain_items(run_dir: Path, results: dict, items: list, log, loaded=None) -> list[dict]:
    """Greedy answer + explanation for a few items with the run's tuned model (generate.py, the eval's own code)."""
    from medtune.config import load_config
    from medtune.evaluate import adapter_style
    from medtune.generate import generate_rows
    from medtune.hardware import resolve_device
    from medtune.models import load_model

    cfg = load_config(run_dir / "config.yaml")
    adapter = run_dir / "adapter"
    if not adapter.is_dir():
        raise MedtuneError(f"{adapter}: no adapter, so there is no tuned model to explain with")
    style = adapter_style(str(adapter), results["tuned"]["prompt_style"], log)
    model, tokenizer = loaded or load_model(cfg.model, adapter=str(adapter), device=resolve_device(cfg.device), log=log)[:2]
    return generate_rows(model, tokenizer, items, style, EXPLAIN_TOKENS, len(items))


def run_cost(run_dir: Path, price_per_hour: float | None) -> dict | None:
    """The run's recorded cost (medtune cost's figures), in device-hours and, with a price, in money."""
    from medtune import cost

    if not [*Path(run_dir).glob("cost.json"), *Path(run_dir).glob("*/cost.json")]:
        return None  # a run from before cost.json; a cost.json that is not as medtune writes it is refused in collect
    c = cost.collect(run_dir)
    device_hours = c["wall_s"] * c["device_count"] / 3600
    train_dh = (c["train_wall_s"] or 0) * c["device_count"] / 3600
    c["device_hours"] = device_hours
    c["device_hours_per_m_tokens"] = train_dh / c["train_tokens"] * 1e6 if c["train_tokens"] and train_dh else None
    c["device_hours_per_point"] = device_hours / c["gain_points"] if c["gain_points"] and c["gain_points"] > 0 \
        else None
    c["priced"] = cost.price(c, price_per_hour) if price_per_hour is not None else None
    return c
