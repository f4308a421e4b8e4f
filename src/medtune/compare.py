"""`medtune compare A B`: a paired comparison of two evaluations on the same items, or (`parity=True`) a parity
certificate that two evaluations of the same model (two devices, bf16 vs fp32) gave the same answers.

A and B are eval output dirs, their results.json (predictions.jsonl sits beside it) or predictions.jsonl files.

Parity tolerance defaults, from docs/benchmarks.md ("Scoring precision" and the default-vs-exact tables):
- max |Δ log-prob| ≤ 0.6 nats per option: the largest bf16-vs-fp32 difference measured on the whole MedQA test set
  was 0.57 nats (base model, default mode vs exact); two fp32 devices differ only by summation order, orders of
  magnitude less. A larger difference is more than a change of precision explains.
- prediction flip rate ≤ 1%: medtune's default mode (bf16, close calls re-scored in fp32) changed 0 of 1,273 MedQA
  answers against fp32, while scoring a near-uniform tuned model in pure bf16 changed 94 of 406 (23%); the
  certificate must pass the first and fail the second. 1% leaves room for exact near-ties between devices.
Accuracy's McNemar test is reported but does not decide: a non-significant difference is not evidence of equality.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

from medtune import stats
from medtune.errors import MedtuneError
from medtune.records import read_rows

DEFAULT_TOLERANCE = {"max_abs_dlogprob": 0.6, "flip_rate": 0.01}


def compare_files(a: Path, b: Path, as_json: bool = False, parity: bool = False, tolerance: dict | None = None
                  ) -> str:
    rows_a, rows_b = _rows(a), _rows(b)
    _same_items(rows_a, rows_b, f"{a} and {b}")
    if parity:
        return _parity_output(rows_a, rows_b, a, b, as_json, tolerance)
    ids_a = [r["id"] for r in rows_a]
    by_b = {r["id"]: r for r in rows_b}
    result = stats.paired_compare([r["correct"] for r in rows_a], [by_b[i]["correct"] for i in ids_a], ids_a)
    if as_json:
        return json.dumps({"path_a": str(a), "path_b": str(b), **result}, indent=1)  # result's a..d: McNemar counts
    lo, hi = result["diff_ci"]
    return "\n".join([
        f"A: {a}\nB: {b}\nitems: {result['n']}",
        (f"accuracy A {result['acc_a']:.3f}, B {result['acc_b']:.3f}; B - A = {result['diff'] * 100:+.1f} points "
         f"(95% CI [{lo * 100:+.1f}, {hi * 100:+.1f}])"),
        (f"B right where A wrong: {len(result['won'])}; A right where B wrong: {len(result['lost'])}; "
         f"McNemar exact p = {result['mcnemar_p']:.4g}"),
        f"won: {', '.join(result['won'][:30])}{' ...' if len(result['won']) > 30 else ''}",
        f"lost: {', '.join(result['lost'][:30])}{' ...' if len(result['lost']) > 30 else ''}",
    ])


def _parity_output(rows_a: list[dict], rows_b: list[dict], a: Path, b: Path, as_json: bool,
                   tolerance: dict | None = None) -> str:
    """compare_files' parity path (a helper, because compare_files' `parity` flag shadows the function's name)."""
    cert = parity(rows_a, rows_b, tolerance)
    return json.dumps({"a": str(a), "b": str(b), **cert}, indent=1) if as_json else render_parity(cert, a, b)


def parity_files(a: Path, b: Path, tolerance: dict | None = None) -> dict:
    """The parity certificate of two evaluation outputs (dirs, results.json or predictions.jsonl), for a caller that
    acts on the verdict (`medtune compare --parity` exits 3 on "fail")."""
    rows_a, rows_b = _rows(a), _rows(b)
    _same_items(rows_a, rows_b, f"{a} and {b}")
    return parity(rows_a, rows_b, tolerance)


def parity(rows_a: list[dict], rows_b: list[dict], tolerance: dict | None = None) -> dict:
    """The parity certificate of two evaluations of the same model on the same items (predictions.jsonl rows with
    `id`, `logprobs` per letter, `pred`, `correct`). JSON-able:

      n, tolerance {max_abs_dlogprob, flip_rate},
      logprob {max, median, p99, max_item, mean}: per item, the largest |Δ log-prob| over its options; their
        distribution (median and p99 by linear interpolation) and the item with the largest,
      flips {n, rate, ci95 (Wilson), ids, max_margin_a}: items whose predicted letter differs, and the largest
        top-two log-prob margin in A among them (how decided an answer that flipped was),
      accuracy {acc_a, acc_b, diff, diff_ci, b, c, mcnemar_p} (stats.paired_compare),
      verdict "pass" | "fail", reasons [one sentence per failed criterion], notes [a caveat when the flip rate's
        CI upper bound exceeds its tolerance: the verdict judges the observed rate, n decides what it can rule out],
      per_item [{id, max_abs_dlogprob, pred_a, pred_b, flip}] in A's order.
    Refuses (MedtuneError) rows on different items or without log-probs (generation scoring has none).
    """
    tol = _tolerance(tolerance)
    _same_items(rows_a, rows_b, "the two evaluations")
    by_b = {r["id"]: r for r in rows_b}
    per_item = [_item(r, by_b[r["id"]]) for r in rows_a]
    deltas = [p["max_abs_dlogprob"] for p in per_item]
    worst = max(range(len(deltas)), key=lambda i: deltas[i])
    flipped = [p for p in per_item if p["flip"]]
    n = len(per_item)
    cmp = stats.paired_compare([bool(r["correct"]) for r in rows_a], [bool(by_b[r["id"]]["correct"]) for r in rows_a],
                               [r["id"] for r in rows_a])
    cert = {
        "n": n,
        "tolerance": tol,
        "logprob": {"max": deltas[worst], "median": _quantile(deltas, 0.5), "p99": _quantile(deltas, 0.99),
                    "mean": math.fsum(deltas) / n, "max_item": per_item[worst]["id"]},
        "flips": {"n": len(flipped), "rate": len(flipped) / n, "ci95": list(stats.wilson_ci(len(flipped), n)),
                  "ids": [p["id"] for p in flipped],
                  "max_margin_a": max((_margin(r["logprobs"]) for r in rows_a if by_b[r["id"]]["pred"] != r["pred"]),
                                      default=None)},
        "accuracy": {k: cmp[k] for k in ("acc_a", "acc_b", "diff", "b", "c", "mcnemar_p")}
        | {"diff_ci": list(cmp["diff_ci"])},
        "per_item": per_item,
    }
    cert["reasons"] = _failures(cert)
    cert["verdict"] = "fail" if cert["reasons"] else "pass"
    high = cert["flips"]["ci95"][1]
    cert["notes"] = [(f"with {n} items the flip rate's 95% CI reaches {high:.2%}, above the {tol['flip_rate']:.2%} "
                     "tolerance: too few items to certify the rate itself")] if high > tol["flip_rate"] else []
    return cert


def render_parity(cert: dict, a: Path | str = "A", b: Path | str = "B") -> str:
    """The certificate as text: the verdict first, then each figure against its tolerance."""
    lp, fl, acc, tol = cert["logprob"], cert["flips"], cert["accuracy"], cert["tolerance"]
    lo, hi = fl["ci95"]
    dlo, dhi = acc["diff_ci"]
    lines = [
        f"parity certificate: {cert['verdict'].upper()}",
        f"A: {a}\nB: {b}\nitems: {cert['n']}",
        (f"max |Δ log-prob| per item: median {lp['median']:.3g}, p99 {lp['p99']:.3g}, max {lp['max']:.3g} nats "
         f"(item {lp['max_item']}); tolerance {tol['max_abs_dlogprob']:g}"),
        (f"predictions that differ: {fl['n']} of {cert['n']} = {fl['rate']:.2%} (95% CI [{lo:.2%}, {hi:.2%}]); "
         f"tolerance {tol['flip_rate']:.2%}"
         + (f"; largest A margin among them {fl['max_margin_a']:.3g} nats" if fl["max_margin_a"] is not None else "")),
        (f"accuracy A {acc['acc_a']:.4f}, B {acc['acc_b']:.4f}; B - A = {acc['diff'] * 100:+.2f} points "
         f"(95% CI [{dlo * 100:+.2f}, {dhi * 100:+.2f}]), McNemar exact p = {acc['mcnemar_p']:.4g} (reported, not "
         "part of the verdict)"),
    ]
    if fl["ids"]:
        lines.append(f"flipped: {', '.join(fl['ids'][:30])}{' ...' if len(fl['ids']) > 30 else ''}")
    lines += [f"fails: {reason}" for reason in cert["reasons"]] + [f"note: {note}" for note in cert["notes"]]
    return "\n".join(lines)


def _tolerance(tolerance: dict | None) -> dict:
    tol = dict(DEFAULT_TOLERANCE)
    unknown = set(tolerance or {}) - set(tol)
    if unknown:
        raise ValueError(f"unknown tolerance keys {sorted(unknown)}; valid: {sorted(tol)}")
    tol.update(tolerance or {})
    return tol


def _item(ra: dict, rb: dict) -> dict:
    """One item's row of the certificate: the largest log-prob difference over its options, and whether it flipped."""
    la, lb = ra.get("logprobs"), rb.get("logprobs")
    if not la or not lb:
        raise MedtuneError(f"item {ra['id']}: no per-option log-probs (generation scoring has none); parity needs "
                           "evaluations scored with --method letter or answer")
    if set(la) != set(lb):
        raise MedtuneError(f"item {ra['id']}: options {sorted(la)} vs {sorted(lb)}; not the same items")
    delta = max(abs(la[k] - lb[k]) for k in la)
    return {"id": ra["id"], "max_abs_dlogprob": delta, "pred_a": ra["pred"], "pred_b": rb["pred"],
            "flip": ra["pred"] != rb["pred"]}


def _failures(cert: dict) -> list[str]:
    tol, reasons = cert["tolerance"], []
    if cert["logprob"]["max"] > tol["max_abs_dlogprob"]:
        reasons.append(f"max |Δ log-prob| {cert['logprob']['max']:.3g} nats (item {cert['logprob']['max_item']}) "
                       f"exceeds {tol['max_abs_dlogprob']:g}")
    if cert["flips"]["rate"] > tol["flip_rate"]:
        reasons.append(f"{cert['flips']['n']} of {cert['n']} predictions differ ({cert['flips']['rate']:.2%}), "
                       f"over {tol['flip_rate']:.2%}")
    return reasons


def _margin(logprobs: dict) -> float:
    top = sorted(logprobs.values(), reverse=True)
    return top[0] - top[1] if len(top) > 1 else math.inf


def _quantile(values: list[float], q: float) -> float:
    """Linear interpolation between order statistics (numpy's default): position q·(n − 1)."""
    s = sorted(values)
    pos = q * (len(s) - 1)
    lo = math.floor(pos)
    hi = min(lo + 1, len(s) - 1)
    return s[lo] + (s[hi] - s[lo]) * (pos - lo)


def _same_items(rows_a: list[dict], rows_b: list[dict], what: str) -> None:
    """One-line refusal unless both lists hold the same ids, each once."""
    ids_a, ids_b = [r["id"] for r in rows_a], [r["id"] for r in rows_b]
    if not ids_a:
        raise MedtuneError(f"{what}: no predictions to compare")
    if len(set(ids_a)) != len(ids_a) or len(set(ids_b)) != len(ids_b):
        raise MedtuneError(f"{what}: duplicate item ids in the predictions; a paired comparison needs each item once")
    if set(ids_a) != set(ids_b):
        raise MedtuneError(f"{what} are not on the same items ({len(ids_a)} vs {len(ids_b)}; "
                           f"{len(set(ids_a) ^ set(ids_b))} ids differ): a paired comparison needs the same items")
    gold_b = {r["id"]: r.get("gold") for r in rows_b}
    differ = [r["id"] for r in rows_a if r.get("gold") != gold_b[r["id"]]]
    if differ:
        raise MedtuneError(f"{what}: {len(differ)} items have different gold answers (e.g. {differ[0]}): "
                           "not the same data")


def conformal_files(calibration: Path, evaluation: Path, alpha: float = 0.1, method: str = "lac") -> dict:
    """Split conformal sets from two evaluations of one model: calibrated on `calibration` (a non-test split the user
    names, e.g. MedQA dev), evaluated on `evaluation`. Refused: a calibration eval on a test split, evaluations of
    different models (or adapters, prompt styles, methods), shared items, rows without option probabilities."""
    from medtune.conformal import conformal_summary
    from medtune.data.sources import trains_on_test

    records = [_record(calibration), _record(evaluation)]
    data = records[0].get("data") or {}
    if not isinstance(data, dict):
        raise MedtuneError(f"{calibration}: results.json data is {type(data).__name__}, not the data record medtune "
                           "writes; re-run the evaluation")
    why = trains_on_test(str(data.get("source", "")), "eval" if data.get("split") == "eval" else "train")
    if why:
        raise MedtuneError(f"{calibration}: calibrated on a test split ({why}); calibrate on a split kept out of "
                           "every evaluation, e.g. MedQA dev")
    differ = [k for k in ("model", "adapter", "prompt_style", "method") if records[0].get(k) != records[1].get(k)]
    if differ:
        raise MedtuneError(f"{calibration} and {evaluation} differ in {', '.join(differ)}: conformal sets need the "
                           "same model scored the same way on both")
    rows = [_rows(calibration), _rows(evaluation)]
    for path, part in zip((calibration, evaluation), rows):
        if not part:
            raise MedtuneError(f"{path}: no predictions; conformal sets need scored items on both sides")
        bad = next(((r["id"], why) for r in part for why in [_bad_probs(r)] if why), None)
        if bad is not None:
            raise MedtuneError(f"{path}: item {bad[0]}: {bad[1]}; evaluate with --method letter or answer (generation "
                               "scoring has no option probabilities)")
    seen, ids = {_scored_as(r) for r in rows[0]} - {None}, {r["id"] for r in rows[0]}
    same = [r["id"] for r in rows[1] if r["id"] not in ids and _scored_as(r) in seen]  # same ids: conformal_summary
    if same:  # ids come from file names (MedQA has none): a renamed copy of the calibration file passed (probe 9)
        raise MedtuneError(f"{evaluation}: {len(same)} of its items (e.g. {same[0]}) were scored exactly as items of "
                           f"{calibration} (same answer text and log-probabilities): the same questions under other "
                           "ids; calibrate on items kept out of the evaluation")
    summary = conformal_summary(*rows, alpha=alpha, method=method)
    return {"calibration_source": str(calibration), "evaluation_source": str(evaluation), **summary}


def _scored_as(row: dict) -> tuple | None:
    """What identifies a question across files for one model: its gold letter, the predicted option's text and
    every option's log-probability (to 1e-4: fast mode's batches can move the last digits). None without them."""
    logprobs, text = row.get("logprobs"), row.get("pred_text")
    if not isinstance(logprobs, dict) or not logprobs or not isinstance(text, str):
        return None
    return row.get("gold"), text, tuple((k, round(v, 4)) for k, v in sorted(logprobs.items())
                                        if isinstance(v, (int, float)))


def _bad_probs(row: dict) -> str | None:
    """What is wrong with a row's option probabilities for conformal sets: letters A, B, ... in order, each a number
    in [0, 1], summing to 1, with the gold letter among them."""
    from medtune.data.items import LETTERS

    probs = row.get("probs")
    if not isinstance(probs, dict) or not 2 <= len(probs) <= len(LETTERS):
        return "no option probabilities (probs)"
    if list(probs) != list(LETTERS[: len(probs)]):
        return f"probs letters {list(probs)[:10]} are not A, B, ... in order"
    if not all(isinstance(v, (int, float)) and not isinstance(v, bool) and 0 <= v <= 1 for v in probs.values()):
        return "probs must be numbers in [0, 1]"
    if abs(math.fsum(probs.values()) - 1) > 1e-3:
        return f"probs sum to {math.fsum(probs.values()):.4g}, not 1"
    if row.get("gold") not in probs:
        return f"gold {row.get('gold')!r:.20} is not one of its options"
    return None


def _record(path: Path) -> dict:
    """An evaluation's results.json (beside predictions.jsonl), checked to be one."""
    path = Path(path)
    results = path / "results.json" if path.is_dir() else path.with_name("results.json")
    if not results.is_file():
        raise MedtuneError(f"{path}: no results.json; pass an eval output dir")
    from medtune.records import read_record

    return read_record(results, "eval")


def _rows(path: Path) -> list[dict]:
    """An eval output dir, its results.json (predictions.jsonl beside it) or a predictions.jsonl."""
    path = Path(path)
    preds = path / "predictions.jsonl" if path.is_dir() else (
        path.with_name("predictions.jsonl") if path.name == "results.json" else path)
    if not preds.is_file():
        raise MedtuneError(f"{path}: no predictions.jsonl beside it; pass an eval output dir or its results.json")
    return read_rows(preds, "predictions")


