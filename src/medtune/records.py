"""Reading back what medtune wrote (results.json, cost.json), which a user may have edited: every field medtune acts
on is checked, and a file that is not as medtune writes it is one MedtuneError naming the file and the field.

  read_record(path, kind)   kind: "eval" (one evaluation), "run" (before/after), "cost" (a cost.json)
  read_rows(path, kind)     a JSONL file, every row checked: "predictions", "metrics" (training curves),
                            "explanations" (the report's generated answers)
"""

from __future__ import annotations

import math
from pathlib import Path

from medtune.data.formats import load_json
from medtune.errors import MedtuneError


def _number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _texts(v) -> bool:
    return isinstance(v, list) and all(isinstance(x, str) for x in v)


def _share(v) -> bool:
    return _number(v) and 0 <= v <= 1


EVAL_FIELDS = {"metrics": lambda v: isinstance(v, dict) and _share(v.get("accuracy")) and isinstance(v.get("n"), int)
               and isinstance(v.get("ci95"), list) and len(v["ci95"]) == 2 and all(_share(x) for x in v["ci95"])}
COMPARISON = {"diff": lambda v: _number(v) and -1 <= v <= 1, "won": _texts, "lost": _texts}
def _count(v, high: float) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and 0 <= v <= high


# bounds no real run reaches (a century of wall time, a million devices): an edited file cannot price at inf or below 0
COST_FIELDS = {"kind": lambda v: isinstance(v, str), "wall_s": lambda v: _number(v) and 0 <= v <= 3e9,
               "device_kind": lambda v: isinstance(v, str), "device_name": lambda v: isinstance(v, str),
               "device_count": lambda v: _count(v, 10**6) and v >= 1,
               "energy_j": lambda v: v is None or (_number(v) and 0 <= v <= 1e15),
               "train_tokens": lambda v: v is None or _count(v, 10**15),
               "energy_note": lambda v: v is None or isinstance(v, str),
               "sessions": lambda v: v is None or (_count(v, 10**6) and v >= 1),  # None: earlier ones unknown
               "earlier_sessions": lambda v: isinstance(v, str)}


def read_record(path: Path, kind: str) -> dict:
    """A results.json (`eval`: one evaluation; `run`: before/after) or cost.json (`cost`) that medtune wrote, checked
    for the fields medtune reads back: a file edited into something else is one MedtuneError naming it and the field."""
    try:
        record = load_json(Path(path).read_text(encoding="utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError) as e:
        raise MedtuneError(f"{path}: not valid JSON ({str(e)[:120]}); it is corrupt or truncated: restore or "
                           "rewrite it") from None
    if not isinstance(record, dict):
        raise MedtuneError(f"{path}: expected a JSON object, got {type(record).__name__}; not a file medtune wrote")
    checks: list[tuple[str, object, object]] = []
    if kind == "eval":
        checks = [(k, record.get(k), ok) for k, ok in EVAL_FIELDS.items()]
    elif kind == "cost":
        checks = [(k, record.get(k), ok) for k, ok in COST_FIELDS.items() if k in record or k in ("kind", "wall_s",
                  "device_kind", "device_name", "device_count")]
    elif kind == "run":
        if record.get("kind") != "run":
            raise MedtuneError(f"{path}: not a `medtune run` result (it has no before/after comparison)")
        comparison = record.get("comparison")
        checks = [(f"{side}.metrics", record.get(side), lambda v: isinstance(v, dict) and EVAL_FIELDS["metrics"](
            v.get("metrics"))) for side in ("base", "tuned")]
        checks.append(("comparison.raw", comparison, lambda v: isinstance(v, dict) and isinstance(v.get("raw"), dict)))
        if isinstance(comparison, dict):
            for part in ("raw", "debiased"):
                value = comparison.get(part)
                if isinstance(value, dict):
                    checks += [(f"comparison.{part}.{k}", value.get(k), ok) for k, ok in COMPARISON.items()]
    bad = next((name for name, value, ok in checks if not ok(value)), None)
    if bad:
        raise MedtuneError(f"{path}: {bad} is missing or not as medtune writes it; not a file medtune wrote "
                           "(re-run, or restore it)")
    return record


def _letter_map(v, ok) -> bool:
    return isinstance(v, dict) and all(isinstance(k, str) and ok(x) for k, x in v.items())


def bad_prediction(row) -> str | None:
    """What is wrong with one predictions.jsonl row, for the fields compare, conformal and the report read."""
    if not isinstance(row, dict):
        return f"expected a JSON object, got {type(row).__name__}"
    if not isinstance(row.get("id"), str) or not row["id"]:
        return f"id: expected text, got {row.get('id')!r:.40}"
    if not isinstance(row.get("correct"), bool):
        return f"correct: expected true or false, got {row.get('correct')!r:.40}"
    for key in ("pred", "gold"):
        if key not in row:
            return f"{key}: missing (every row has it; null when no answer was parsed)"
        if row[key] is not None and not isinstance(row[key], str):
            return f"{key}: expected a letter or null, got {row[key]!r:.40}"
    if row.get("logprobs") is not None and not _letter_map(row["logprobs"], lambda v: _number(v) and abs(v) <= 1e6):
        return "logprobs: expected {letter: log-probability, finite and within 1e6 of 0}"
    if "probs" in row and not _letter_map(row["probs"], _share):
        return f"item {row['id']}: probs must be numbers in [0, 1], one per letter"
    return None


def _bad_metric(row) -> str | None:
    if not isinstance(row, dict):
        return f"expected a JSON object, got {type(row).__name__}"
    if not isinstance(row.get("step"), int) or isinstance(row["step"], bool) or row["step"] < 0:
        return f"step: expected a step number, got {row.get('step')!r:.40}"
    bad = next((k for k in ("loss", "lr") if not _number(row.get(k))), None)
    if bad:
        return f"{bad}: expected a finite number, got {row.get(bad)!r:.40}"
    if "val_accuracy" in row and not (_share(row["val_accuracy"]) and isinstance(row.get("val_ci95"), list)
                                      and len(row["val_ci95"]) == 2 and all(_share(x) for x in row["val_ci95"])):
        return "val_accuracy, val_ci95: expected a share in [0, 1] and its interval"
    return None


def _bad_explanation(row) -> str | None:
    if not isinstance(row, dict):
        return f"expected a JSON object, got {type(row).__name__}"
    if not isinstance(row.get("id"), str) or not isinstance(row.get("explanation"), str):
        return "id, explanation: expected text"
    if row.get("pred") is not None and not isinstance(row["pred"], str):
        return f"pred: expected a letter or null, got {row['pred']!r:.40}"
    return None


ROW_CHECKS = {"predictions": bad_prediction, "metrics": _bad_metric, "explanations": _bad_explanation}


def read_rows(path: Path, kind: str) -> list[dict]:
    """Every row of a JSONL file medtune wrote, checked as `kind`; a line that is not as medtune writes it is one
    MedtuneError naming the file, the line and the field."""
    rows = []
    try:
        text = Path(path).read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise MedtuneError(f"{path}: not UTF-8 text (byte {e.start}); not a file medtune wrote") from None
    for n, line in enumerate(text.split("\n"), start=1):
        if not line.strip():
            continue
        try:
            row = load_json(line)
        except (ValueError, RecursionError) as e:
            raise MedtuneError(f"{path}:{n}: not valid JSON ({str(e)[:120]}); it is corrupt or truncated: restore "
                               "or rewrite it") from None
        problem = ROW_CHECKS[kind](row)
        if problem:
            raise MedtuneError(f"{path}:{n}: {problem}; medtune did not write this line (re-run, or restore the "
                               "file)")
        rows.append(row)
    return rows
