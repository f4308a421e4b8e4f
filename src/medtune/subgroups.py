"""Subgroups with honest power: per-group accuracy, before/after per group, and what each comparison could detect.

MedMCQA has 21 subjects; at n = 30 a subject's accuracy has a 95% interval about ±17 points wide, and a before/after
difference there has to be large to reach significance. Every figure here therefore carries its interval, multiple
before/after tests are Benjamini–Hochberg adjusted, and each comparison states its minimum detectable effect (MDE) at
80% power and alpha 0.05: "this comparison cannot detect less than X points".

Inputs are predictions.jsonl rows (dicts with `id`, `correct` and the grouping field, e.g. `subject`); items can be
grouped the same way with `[item.to_dict() | row for ...]`. Pure Python: the formulas live in medtune.stats.

Public API:
  accuracy_by(rows, field, p=None, outcome="correct")   -> [{group, n, correct, accuracy, ci95, mde, mde_text}]
  before_after_by(rows_before, rows_after, field, ...)  -> [{group, n, acc_before, acc_after, diff, diff_ci, b, c,
                                                            mcnemar_p, p_bh, discordance, mde, mde_text}]
  mde_text(mde)                                         -> the sentence printed beside a result
  render_accuracy(table) / render_before_after(table)   -> plain-text tables
"""

from __future__ import annotations

from collections.abc import Callable

from medtune import stats

NONE_GROUP = "(none)"  # rows without the field (e.g. items with no subject) form one group of their own
ALPHA = 0.05
POWER = 0.8


def accuracy_by(rows: list[dict], field: str | Callable[[dict], object] = "subject", p: float | None = None,
                alpha: float = ALPHA, power: float = POWER, outcome: str = "correct") -> list[dict]:
    """Accuracy per group with its Wilson 95% CI and the one-sample MDE for the group's n.

    `outcome` names the boolean field counted: `correct` for predictions.jsonl, e.g. `correct_options_only` for
    audit rows or `covered` for conformal set rows (per-subject coverage).

    The MDE is computed around `p` (default: the pooled accuracy of all rows), not around each group's own
    accuracy, so that it depends on n alone and a lucky group does not look better powered. It answers "how far
    from p must this group's true accuracy be for a test on n items to notice, 80% of the time" (stats.mde_one_sample).
    Groups are sorted by name.
    """
    if not rows:
        raise ValueError("accuracy_by needs at least one row")
    centre = p if p is not None else sum(bool(r[outcome]) for r in rows) / len(rows)
    table = []
    for group, members in _groups(rows, field).items():
        k, n = sum(bool(r[outcome]) for r in members), len(members)
        mde = stats.mde_one_sample(n, centre, alpha, power)
        table.append({"group": group, "n": n, "correct": k, "accuracy": k / n, "ci95": list(stats.wilson_ci(k, n)),
                      "mde": mde, "mde_text": mde_text(mde)})
    return table


def before_after_by(rows_before: list[dict], rows_after: list[dict], field: str | Callable[[dict], object] = "subject",
                    discordance: float | None = None, alpha: float = ALPHA, power: float = POWER) -> list[dict]:
    """Paired before/after accuracy per group (rows matched by `id`; groups read from the `before` rows), each with
    McNemar's exact p, the Benjamini–Hochberg-adjusted p over all groups, and the paired MDE.

    The paired MDE (stats.mde_paired, Connor 1987) needs the discordance rate ψ, the share of items where exactly one
    of before/after is right. By default it is the pooled rate over all paired items: a group's own ψ at n = 30 is
    itself noisy, and with ψ = 0 (no item changed) there would be no MDE at all. Pass `discordance` to assume one.
    diff = acc_after − acc_before; b = right before and wrong after, c = wrong before and right after.
    """
    after = {r["id"]: r for r in rows_after}
    missing = [r["id"] for r in rows_before if r["id"] not in after]
    if missing or len(after) != len(rows_before):
        raise ValueError(f"before/after rows are not on the same items ({len(rows_before)} vs {len(rows_after)}; "
                         f"e.g. {missing[:3]} missing after)")
    if not rows_before:
        raise ValueError("before_after_by needs at least one row")
    pooled = sum(bool(r["correct"]) != bool(after[r["id"]]["correct"]) for r in rows_before) / len(rows_before)
    psi = pooled if discordance is None else discordance
    table = []
    for group, members in _groups(rows_before, field).items():
        ids = [r["id"] for r in members]
        cmp = stats.paired_compare([bool(r["correct"]) for r in members], [bool(after[i]["correct"]) for i in ids], ids)
        mde = stats.mde_paired(cmp["n"], psi, alpha, power)
        table.append({"group": group, "n": cmp["n"], "acc_before": cmp["acc_a"], "acc_after": cmp["acc_b"],
                      "diff": cmp["diff"], "diff_ci": list(cmp["diff_ci"]), "b": cmp["b"], "c": cmp["c"],
                      "mcnemar_p": cmp["mcnemar_p"], "discordance": psi, "mde": mde, "mde_text": mde_text(mde)})
    for row, adjusted in zip(table, stats.benjamini_hochberg([r["mcnemar_p"] for r in table])):
        row["p_bh"] = adjusted
    return table


def mde_text(mde: float | None) -> str:
    """The sentence printed beside a result, in accuracy points."""
    if mde is None:
        return "this comparison cannot detect any difference (too few items)"
    return f"this comparison cannot detect less than {mde * 100:.1f} points"


def render_accuracy(table: list[dict]) -> str:
    """One line per group: accuracy, its CI and its MDE."""
    lines = [f"{'group':<28} {'n':>5} {'accuracy':>8}  95% CI            MDE (80% power, alpha 0.05)"]
    for r in table:
        lo, hi = r["ci95"]
        lines.append(f"{str(r['group'])[:28]:<28} {r['n']:>5} {r['accuracy']:>8.3f}  [{lo:.3f}, {hi:.3f}]  "
                     f"{r['mde_text']}")
    return "\n".join(lines)


def render_before_after(table: list[dict]) -> str:
    """One line per group: before, after, difference, McNemar p, BH-adjusted p and the MDE."""
    lines = [f"{'group':<28} {'n':>5} {'before':>6} {'after':>6} {'diff':>7} {'p':>7} {'p_BH':>7}  MDE"]
    for r in table:
        lines.append(f"{str(r['group'])[:28]:<28} {r['n']:>5} {r['acc_before']:>6.3f} {r['acc_after']:>6.3f} "
                     f"{r['diff'] * 100:>+6.1f} {r['mcnemar_p']:>7.3g} {r['p_bh']:>7.3g}  {r['mde_text']}")
    return "\n".join(lines)


def _groups(rows: list[dict], field: str | Callable[[dict], object]) -> dict[str, list[dict]]:
    """Rows by group name, sorted; a missing or empty field is NONE_GROUP."""
    key = field if callable(field) else (lambda r: r.get(field))
    groups: dict[str, list[dict]] = {}
    for r in rows:
        value = key(r)
        groups.setdefault(NONE_GROUP if value in (None, "") else str(value), []).append(r)
    return dict(sorted(groups.items()))
