"""Conformal prediction sets: "the answer is in this set of options with probability at least 1 − alpha".

Split conformal (Vovk et al. 2005; Angelopoulos & Bates, "A gentle introduction to conformal prediction", 2021):
a nonconformity score s(x, y) is computed for every calibration item at its gold option; q̂ is the
⌈(n+1)(1−alpha)⌉-th smallest of the n scores (the finite-sample quantile, level ⌈(n+1)(1−alpha)⌉/n; infinite when
that rank exceeds n, i.e. every option is kept); an evaluation item's set is every option y with s(x, y) ≤ q̂.
If calibration and evaluation items are exchangeable, P(gold ∈ set) ≥ 1 − alpha (marginally, over items). See
docs/conformal.md for what breaks that assumption.

Scores (p = the model's probabilities over the item's options, rows' `probs`):
  lac  least ambiguous set-valued classifier (Sadinle, Lei & Wasserman 2019): s = 1 − p_y. Smallest mean set size;
       a set can be empty (the model gives no option enough probability): that counts as an abstention.
  aps  adaptive prediction sets (Romano, Sesia & Candès 2020): options sorted by p (ties: lower index first),
       s = the probability of every option ranked above y, plus p_y. Non-randomized by default (reproducible, slightly
       conservative: coverage can exceed 1 − alpha); `randomized=True` uses s = above + u·p_y with u ~ U(0, 1) drawn
       per item from a seeded generator (coverage closer to exactly 1 − alpha, smaller sets).

Abstention: answer only items whose set is a single option (that option is the answer), abstain otherwise.

Public API:
  calibration_split(pool, eval_ids, share, seed)    -> (calibration, rest)   a seeded share of a non-test pool
  from_rows(rows)                                   -> (probs, golds)        predictions.jsonl rows to lists
  calibrate(probs, golds, alpha, method, ...)       -> {method, alpha, n, rank, qhat, randomized, seed}
  prediction_sets(probs, calibration)               -> [[option index, ...], ...]
  set_rows(rows, calibration)                       -> [{id, subject, set (letters), set_size, covered}]
  evaluate_sets(probs, golds, calibration)          -> {coverage, coverage_ci95, mean_set_size, singleton_share,
                                                        singleton_accuracy, singleton_accuracy_ci95, ...}
  conformal_summary(cal_rows, eval_rows, alpha, method, randomized) -> calibration + evaluation in one JSON-able dict
"""

from __future__ import annotations

import math
import random

from medtune import stats
from medtune.data.items import LETTERS
from medtune.errors import MedtuneError

METHODS = ("lac", "aps")
ALPHA = 0.1


def calibration_split(pool: list, eval_ids: set[str] | list[str], share: float = 0.5, seed: int = 0
                      ) -> tuple[list, list]:
    """A seeded `share` of `pool` (MCQItems or rows: anything with an `id`) for calibration, and the rest.

    The pool must be disjoint from the evaluation set (e.g. the training pool's held-out part, a validation split):
    calibrating on evaluation items would make the coverage claim circular, so overlapping ids are refused.
    The draw depends only on the seed and the sorted ids, not on the pool's order.
    """
    if not 0.0 < share <= 1.0:
        raise MedtuneError(f"calibration share must be in (0, 1], got {share}")
    ids = [_id(x) for x in pool]
    overlap = set(ids) & set(eval_ids)
    if overlap:
        raise MedtuneError(f"{len(overlap)} calibration-pool items are also evaluation items (e.g. "
                           f"{sorted(overlap)[:3]}); calibrate on items kept out of the evaluation set")
    if len(set(ids)) != len(ids):
        raise MedtuneError("the calibration pool has duplicate ids; de-duplicate it first")
    order = sorted(ids)
    random.Random(seed).shuffle(order)
    chosen = set(order[: max(1, round(share * len(order)))]) if order else set()
    return [x for x in pool if _id(x) in chosen], [x for x in pool if _id(x) not in chosen]


def from_rows(rows: list[dict]) -> tuple[list[list[float]], list[int]]:
    """(probs per option, gold index) from predictions.jsonl rows (`probs` by letter, `gold` letter)."""
    probs = [[r["probs"][ch] for ch in LETTERS if ch in r["probs"]] for r in rows]
    golds = [LETTERS.index(r["gold"]) for r in rows]
    return probs, golds


def calibrate(probs: list[list[float]], golds: list[int], alpha: float = ALPHA, method: str = "lac",
              randomized: bool = False, seed: int = 0) -> dict:
    """q̂ from calibration items: the ⌈(n+1)(1−alpha)⌉-th smallest nonconformity score at the gold option."""
    _check(probs, golds, alpha, method)
    if randomized and method != "aps":
        raise ValueError("randomized applies to aps only")
    rng = random.Random(seed)
    scores = sorted(_score(p, g, method, rng.random() if randomized else None) for p, g in zip(probs, golds))
    n = len(scores)
    rank = math.ceil((n + 1) * (1 - alpha))
    qhat = scores[rank - 1] if rank <= n else math.inf  # too few items for this alpha: every option is kept
    return {"method": method, "alpha": alpha, "n": n, "rank": rank, "level": min(rank / n, 1.0),
            "qhat": qhat if math.isfinite(qhat) else None, "randomized": randomized, "seed": seed}


def prediction_sets(probs: list[list[float]], calibration: dict, seed: int | None = None) -> list[list[int]]:
    """Each item's set: every option y with s(x, y) ≤ q̂ (in option order). Randomized APS draws one u per item
    from `seed` (default: the calibration seed + 1, so evaluation draws differ from calibration draws)."""
    qhat = math.inf if calibration["qhat"] is None else calibration["qhat"]
    rng = random.Random(calibration["seed"] + 1 if seed is None else seed)
    sets = []
    for p in probs:
        u = rng.random() if calibration["randomized"] else None
        sets.append([y for y in range(len(p)) if _score(p, y, calibration["method"], u) <= qhat])
    return sets


def evaluate_sets(probs: list[list[float]], golds: list[int], calibration: dict, seed: int | None = None) -> dict:
    """On evaluation items: coverage (share whose set holds the gold) with its Wilson CI, mean set size, the share
    of singleton and empty sets, and selective accuracy when answering only singleton sets, with its Wilson CI."""
    _check(probs, golds, calibration["alpha"], calibration["method"])
    sets = prediction_sets(probs, calibration, seed)
    n = len(sets)
    covered = sum(g in s for s, g in zip(sets, golds))
    singles = [(s[0], g) for s, g in zip(sets, golds) if len(s) == 1]
    right = sum(s == g for s, g in singles)
    sizes: dict[int, int] = {}
    for s in sets:
        sizes[len(s)] = sizes.get(len(s), 0) + 1
    return {
        "n": n,
        "coverage": covered / n,
        "coverage_ci95": list(stats.wilson_ci(covered, n)),
        "target_coverage": 1 - calibration["alpha"],
        "mean_set_size": sum(map(len, sets)) / n,
        "set_size_counts": {str(k): v for k, v in sorted(sizes.items())},
        "singleton_share": len(singles) / n,
        "empty_share": sizes.get(0, 0) / n,
        "singleton_n": len(singles),
        "singleton_accuracy": right / len(singles) if singles else None,
        "singleton_accuracy_ci95": list(stats.wilson_ci(right, len(singles))),
    }


def set_rows(rows: list[dict], calibration: dict, seed: int | None = None) -> list[dict]:
    """Per-item sets for predictions.jsonl rows: {id, subject, set (letters), set_size, covered}. Feed them to
    subgroups.accuracy_by(..., outcome="covered") for coverage per subject (the guarantee is only marginal)."""
    probs, golds = from_rows(rows)
    sets = prediction_sets(probs, calibration, seed)
    return [{"id": r["id"], "subject": r.get("subject"), "set": [LETTERS[y] for y in s], "set_size": len(s),
             "covered": g in s} for r, s, g in zip(rows, sets, golds)]


def conformal_summary(cal_rows: list[dict], eval_rows: list[dict], alpha: float = ALPHA, method: str = "lac",
                      randomized: bool = False, seed: int = 0) -> dict:
    """Calibrate on `cal_rows`, evaluate on `eval_rows` (predictions.jsonl rows of the same model, same scoring).
    Refuses calibration rows that are evaluation rows (same id): coverage would no longer be a guarantee."""
    shared = {r["id"] for r in cal_rows} & {r["id"] for r in eval_rows}
    if shared:
        raise MedtuneError(f"{len(shared)} calibration rows are evaluation rows (e.g. {sorted(shared)[:3]}); "
                           "calibrate on items kept out of the evaluation set")
    cal = calibrate(*from_rows(cal_rows), alpha=alpha, method=method, randomized=randomized, seed=seed)
    return {"calibration": cal, "evaluation": evaluate_sets(*from_rows(eval_rows), cal)}


def render(summary: dict) -> str:
    """Two lines: the guarantee and what it costs (set size, abstention)."""
    cal, ev = summary["calibration"], summary["evaluation"]
    lo, hi = ev["coverage_ci95"]
    acc = ev["singleton_accuracy"]
    slo, shi = ev["singleton_accuracy_ci95"]
    kind = f"{cal['method'].upper()}{' (randomized)' if cal['randomized'] else ''}"
    return (f"conformal {kind}, alpha {cal['alpha']:g}, calibrated on {cal['n']} items: coverage "
            f"{ev['coverage']:.3f} [{lo:.3f}, {hi:.3f}] (target >= {ev['target_coverage']:.2f}), mean set size "
            f"{ev['mean_set_size']:.2f}\nanswering only singleton sets ({ev['singleton_share']:.1%} of "
            f"{ev['n']}): accuracy " + (f"{acc:.3f} [{slo:.3f}, {shi:.3f}]" if acc is not None else "n/a"))


def _score(p: list[float], y: int, method: str, u: float | None) -> float:
    """Nonconformity of option y: higher means less plausible."""
    if method == "lac":
        return 1.0 - p[y]
    above = math.fsum(p[j] for j in range(len(p)) if p[j] > p[y] or (p[j] == p[y] and j < y))
    return above + (p[y] if u is None else u * p[y])


def _check(probs: list[list[float]], golds: list[int], alpha: float, method: str) -> None:
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    if not 0.0 < alpha < 1.0:
        raise ValueError(f"alpha must be in (0, 1), got {alpha}")
    if len(probs) != len(golds) or not probs:
        raise ValueError(f"need equally many non-zero probs and golds, got {len(probs)} and {len(golds)}")
    for p, g in zip(probs, golds):
        if not 0 <= g < len(p):
            raise ValueError(f"gold index {g} out of range for {len(p)} options")


def _id(x) -> str:
    return x["id"] if isinstance(x, dict) else x.id
