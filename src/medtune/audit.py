"""Shortcut audits: does the model answer from the question, or from the options and their positions?

Three re-scorings of the same items, each compared with the full prompt on the same items (paired):
  options-only        the question stem removed, the prompt otherwise identical. Above-chance accuracy means the
                      options alone give the answer away (FreeMedQA, arXiv 2503.13508: +6.7 points over chance).
  none of the others  the gold option's text replaced by "None of the other answers", at the same position, so it
                      stays the right answer. A large drop means the model recognises the right text rather than
                      ruling out the wrong ones (JAMA Netw Open 2025;8:e2526021: 9–38 points).
  cyclic rotations    every rotation of the option order (scoring.rotations). A prediction that, mapped back to the
                      original option, changes with the order is position-driven; per item, which gold positions
                      it flipped at (inspect_ai #4304).

"Stem removed" means the question text is replaced by the empty string (STEM_REMOVED): the prompt style's own words
("Question:", MMLU's subject line, the option lines, "Answer:") stay byte-identical, so the stem is the only change.
A placeholder such as "[question removed]" would add words the model could read as a cue. For PubMedQA under the
harness style, whose prompt lists no options, the abstract and question go too: what is left is the model's prior over
" yes" / " no" / " maybe". The none-of-the-others audit needs lettered options and skips items without them.

Public API:
  options_only(item) / none_of_the_others(item)                   -> MCQItem (pure transforms, gold index kept)
  run_audit(model, tokenizer, items, style, method, mode, batch_size) -> (summary, rows)  (scores through scoring)
  audit_rows(items, full, options, nota, rotation_choices)          -> per-item rows (pure)
  audit_summary(items, rows)                                         -> summary (pure)
  render(summary)                                                    -> text
"""

from __future__ import annotations

import re
from dataclasses import replace

from medtune import stats
from medtune.data.items import LETTERS, MCQItem

STEM_REMOVED = ""
NOTA_TEXT = "None of the other answers"
_NOTA_LIKE = re.compile(r"\b(none|all|both|neither) of (the )?(above|these|others?|other answers)\b", re.IGNORECASE)


def options_only(item: MCQItem) -> MCQItem:
    """The item with its question text removed (STEM_REMOVED); options, gold and everything else unchanged."""
    return replace(item, question=STEM_REMOVED)


def none_of_the_others(item: MCQItem) -> MCQItem:
    """The item with the gold option's text replaced by NOTA_TEXT at the same index: it stays the right answer."""
    options = tuple(NOTA_TEXT if i == item.answer else text for i, text in enumerate(item.options))
    return replace(item, options=options)


def run_audit(model, tokenizer, items: list[MCQItem], style: str = "harness", method: str = "letter",
              mode: str = "fast", batch_size: int = 16) -> tuple[dict, list[dict]]:
    """Score the full prompt, options-only, none-of-the-others (lettered items) and every non-identity cyclic
    rotation in one scoring.score_items call; return (summary, per-item rows). Rotation 0 is the full prompt's own
    prediction, so a flip is always measured against the number the evaluation reports."""
    from medtune.prompts import lettered
    from medtune.scoring import rotations, score_items

    nota_at = [k for k, it in enumerate(items) if lettered(it, style)]
    # unlettered options (PubMedQA's yes/no/maybe under harness) are scored by their words: order cannot matter
    rotated = [(k, order) for k in nota_at for order in rotations(items[k])[1:]]
    batch = (list(items) + [options_only(it) for it in items] + [none_of_the_others(items[k]) for k in nota_at]
             + [items[k].permuted(order) for k, order in rotated])
    preds = [LETTERS.index(r["pred"]) for r in score_items(model, tokenizer, batch, style, method, mode,
                                                           batch_size=batch_size)]
    n = len(items)
    full, options, rest = preds[:n], preds[n: 2 * n], preds[2 * n:]
    nota: list[int | None] = [None] * n
    for k, p in zip(nota_at, rest[: len(nota_at)]):
        nota[k] = p
    choices = [[full[k]] for k in range(n)]
    for (k, order), p in zip(rotated, rest[len(nota_at):]):
        choices[k].append(order[p])  # the prediction as an index into the original option order
    rows = audit_rows(items, full, options, nota, choices)
    return audit_summary(items, rows, style=style, method=method, mode=mode), rows


def audit_rows(items: list[MCQItem], full: list[int], options: list[int], nota: list[int | None],
               rotation_choices: list[list[int]]) -> list[dict]:
    """Per-item audit rows. `rotation_choices[k][r]` is the original-option index chosen under rotation r
    (scoring.rotations order; r = 0 is the unrotated prompt). Fields: id, subject, gold, n_options, pred_full,
    correct_full, pred_options_only, correct_options_only, pred_nota / correct_nota (None where skipped),
    nota_ambiguous (another option reads like "none/all of the above"), rotation_gold_positions (gold letter shown
    under each rotation), rotation_choices (original letters chosen), rotation_correct, flips (rotations whose
    choice differs from rotation 0), flip_gold_positions (the gold letter shown in each flipped rotation)."""
    rows = []
    for it, f, o, x, ch in zip(items, full, options, nota, rotation_choices, strict=True):
        n_opt = len(it.options)
        gold_pos = [(it.answer - r) % n_opt for r in range(len(ch))]  # rotation r shows option (i + r) % n at i
        flipped = [r for r in range(1, len(ch)) if ch[r] != ch[0]]
        rows.append({
            "id": it.id, "subject": it.subject, "gold": it.gold_letter, "n_options": n_opt,
            "pred_full": LETTERS[f], "correct_full": f == it.answer,
            "pred_options_only": LETTERS[o], "correct_options_only": o == it.answer,
            "pred_nota": LETTERS[x] if x is not None else None,
            "correct_nota": (x == it.answer) if x is not None else None,
            "nota_ambiguous": any(_NOTA_LIKE.search(t) for i, t in enumerate(it.options) if i != it.answer),
            "rotation_gold_positions": [LETTERS[p] for p in gold_pos],
            "rotation_choices": [LETTERS[c] for c in ch],
            "rotation_correct": [c == it.answer for c in ch],
            "flips": len(flipped),
            "flip_gold_positions": [LETTERS[gold_pos[r]] for r in flipped],
        })
    return rows


def audit_summary(items: list[MCQItem], rows: list[dict], **record) -> dict:
    """The three audits' figures from the per-item rows (pure; `record` is kept as is, e.g. style and method)."""
    ids = [r["id"] for r in rows]
    full = [r["correct_full"] for r in rows]
    return {**record, "n": len(rows), "full": _accuracy(full),
            "options_only": _options_only(items, rows, ids, full),
            "nota": _nota(rows),
            "rotations": _rotations(rows)}


def _options_only(items: list[MCQItem], rows: list[dict], ids: list[str], full: list[bool]) -> dict:
    """Accuracy without the stem, against chance (exact binomial test at mean 1/n_options) and the full prompt."""
    right = [r["correct_options_only"] for r in rows]
    k, n = sum(right), len(right)
    chance = sum(1 / len(it.options) for it in items) / n
    paired = stats.paired_compare(full, right, ids)
    return {**_accuracy(right), "chance": chance, "above_chance": k / n - chance,
            "binomial_p": stats.binomial_test(k, n, chance),
            "binomial_p_greater": stats.binomial_test(k, n, chance, "greater"),
            "chance_exact": len({len(it.options) for it in items}) == 1,  # else Bin(n, mean chance) approximates
            "vs_full": _paired(paired)}


def _nota(rows: list[dict]) -> dict | None:
    """Paired drop from the full prompt to none-of-the-others, on the items where it was scored."""
    scored = [r for r in rows if r["correct_nota"] is not None]
    if not scored:
        return None
    full = [r["correct_full"] for r in scored]
    nota = [r["correct_nota"] for r in scored]
    paired = stats.paired_compare(full, nota, [r["id"] for r in scored])
    return {**_accuracy(nota), "accuracy_full": paired["acc_a"], "drop": -paired["diff"], "vs_full": _paired(paired),
            "n_ambiguous": sum(r["nota_ambiguous"] for r in scored)}


def _rotations(all_rows: list[dict]) -> dict | None:
    """Per-position accuracy over every rotation, flip rates per gold position over the non-identity rotations,
    and the share of items whose prediction changes under any rotation; over the items that were rotated."""
    rows = [r for r in all_rows if len(r["rotation_choices"]) > 1]
    if not rows:
        return None
    by_pos: dict[str, list[bool]] = {}
    flip_pos: dict[str, list[bool]] = {}
    for r in rows:
        choice = r["rotation_choices"]
        for q, (pos, ok) in enumerate(zip(r["rotation_gold_positions"], r["rotation_correct"])):
            by_pos.setdefault(pos, []).append(ok)
            if q:  # rotation 0 is the reference every other rotation is compared with
                flip_pos.setdefault(pos, []).append(choice[q] != choice[0])
    changed = sum(r["flips"] > 0 for r in rows)
    rotated = sum(len(r["rotation_choices"]) - 1 for r in rows)
    every = [all(r["rotation_correct"]) for r in rows]
    return {
        "n": len(rows), "changed": changed, "changed_share": changed / len(rows), "changed_ci95": list(stats.wilson_ci(changed, len(rows))),
        "flip_rate": sum(r["flips"] for r in rows) / rotated if rotated else 0.0,
        "accuracy_all_rotations": sum(every) / len(rows),
        "mean_rotation_accuracy": sum(sum(r["rotation_correct"]) / len(r["rotation_correct"]) for r in rows) / len(rows),
        "accuracy_by_gold_position": {p: _accuracy(v) for p, v in sorted(by_pos.items())},
        "flip_rate_by_gold_position": {p: {"n": len(v), "flips": sum(v), "rate": sum(v) / len(v)}
                                       for p, v in sorted(flip_pos.items())},
    }


def render(summary: dict) -> str:
    """The audit in a few lines: each shortcut's figure, its interval and its test."""
    oo, rot = summary["options_only"], summary["rotations"]
    lo, hi = oo["ci95"]
    lines = [
        f"shortcut audit on {summary['n']} items (full prompt accuracy {summary['full']['accuracy']:.3f})",
        (f"options only (stem removed): accuracy {oo['accuracy']:.3f} [{lo:.3f}, {hi:.3f}] vs chance {oo['chance']:.3f}"
         f" (exact binomial p = {oo['binomial_p']:.3g}); vs full prompt {oo['vs_full']['diff'] * 100:+.1f} points, "
         f"McNemar p = {oo['vs_full']['mcnemar_p']:.3g}"),
    ]
    nota = summary["nota"]
    if nota is not None:
        nlo, nhi = nota["ci95"]
        lines.append(f"none of the other answers: accuracy {nota['accuracy']:.3f} [{nlo:.3f}, {nhi:.3f}] vs "
                     f"{nota['accuracy_full']:.3f} with the original text: {change_in_points(nota['drop'])}, "
                     f"McNemar p = {nota['vs_full']['mcnemar_p']:.3g} (n = {nota['n']})")
    if rot is None:
        return "\n".join(lines)
    by_pos = ", ".join(f"{p} {v['accuracy']:.2f}" for p, v in rot["accuracy_by_gold_position"].items())
    lines.append(f"rotations: {rot['changed']} of {rot['n']} items ({rot['changed_share']:.1%}) change their answer "
                 f"under some rotation; {rot['flip_rate']:.1%} of rotated predictions flip; accuracy by gold position: "
                 f"{by_pos}")
    return "\n".join(lines)


def _accuracy(correct: list[bool]) -> dict:
    k, n = sum(map(bool, correct)), len(correct)
    return {"n": n, "correct": k, "accuracy": k / n if n else None, "ci95": list(stats.wilson_ci(k, n))}


def _paired(cmp: dict) -> dict:
    """paired_compare without its id lists (they are in the per-item rows)."""
    return {"diff": cmp["diff"], "diff_ci": list(cmp["diff_ci"]), "b": cmp["b"], "c": cmp["c"],
            "mcnemar_p": cmp["mcnemar_p"]}


def change_in_points(drop: float) -> str:
    """A paired drop as words: "a drop of 6.2 points", "a rise of 3.1 points" (never "drop -3.1"), "no change"."""
    if round(drop * 100, 1) == 0:
        return "no change"
    return f"a {'drop' if drop > 0 else 'rise'} of {abs(drop) * 100:.1f} points"
