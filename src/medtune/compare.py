"""`medtune compare A/results.json B/results.json`: a paired comparison of two evaluations on the same items."""

from __future__ import annotations

import json
from pathlib import Path

from medtune import stats
from medtune.errors import MedtuneError


def compare_files(a: Path, b: Path, as_json: bool = False) -> str:
    rows_a, rows_b = _rows(a), _rows(b)
    ids_a, ids_b = [r["id"] for r in rows_a], [r["id"] for r in rows_b]
    if sorted(ids_a) != sorted(ids_b):
        raise MedtuneError(f"{a} and {b} are not on the same items ({len(ids_a)} vs {len(ids_b)}; "
                           f"{len(set(ids_a) ^ set(ids_b))} ids differ): a paired comparison needs the same items")
    by_b = {r["id"]: r for r in rows_b}
    result = stats.paired_compare([r["correct"] for r in rows_a], [by_b[i]["correct"] for i in ids_a], ids_a)
    if as_json:
        return json.dumps({"a": str(a), "b": str(b), **result}, indent=1)
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


def _rows(path: Path) -> list[dict]:
    """A results.json (its predictions.jsonl beside it) or a predictions.jsonl."""
    path = Path(path)
    preds = path.with_name("predictions.jsonl") if path.name == "results.json" else path
    if not preds.is_file():
        raise MedtuneError(f"{path}: no predictions.jsonl beside it; pass an eval output dir's results.json")
    return [json.loads(line) for line in preds.read_text().splitlines() if line.strip()]
