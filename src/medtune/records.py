"""Reading back what medtune wrote (results.json, cost.json), which a user may have edited: every field medtune acts
on is checked, and a file that is not as medtune writes it is one MedtuneError naming the file and the field.

  read_record(path, kind)   kind: "eval" (one evaluation), "run" (before/after), "cost" (a cost.json)
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
COST_FIELDS = {"kind": lambda v: isinstance(v, str), "wall_s": lambda v: _number(v) and v >= 0,
               "device_kind": lambda v: isinstance(v, str), "device_name": lambda v: isinstance(v, str),
               "device_count": lambda v: isinstance(v, int) and not isinstance(v, bool) and v >= 1,
               "energy_j": lambda v: v is None or _number(v), "train_tokens": lambda v: v is None or isinstance(v, int),
               "energy_note": lambda v: v is None or isinstance(v, str)}


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
