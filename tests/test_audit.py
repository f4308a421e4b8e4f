"""Shortcut audits: the transforms keep the gold index right and change only what they say, the audit's figures equal
hand counts, and on the tiny model run_audit's rows equal scoring each variant separately."""

import pytest

from medtune import stats
from medtune.audit import (
    NOTA_TEXT,
    STEM_REMOVED,
    audit_rows,
    audit_summary,
    none_of_the_others,
    options_only,
    render,
    run_audit,
)
from medtune.data.items import LETTERS, MCQItem
from medtune.prompts import build_prompt
from medtune.scoring import rotations


def _items(n=8, benchmark="medqa"):
    return [MCQItem(id=f"q{k}", question=f"A 45-year-old presents with sign {k}. What is the diagnosis?",
                    options=(f"alpha {k}", "beta", "gamma", "delta"), answer=k % 4, subject=["a", "b"][k % 2],
                    explanation="because", benchmark=benchmark) for k in range(n)]


@pytest.mark.parametrize("benchmark", ["generic", "medqa", "medmcqa", "mmlu"])
@pytest.mark.parametrize("style", ["harness", "seed"])
def test_options_only_removes_the_stem_and_nothing_else(benchmark, style):
    item = _items(1, benchmark)[0]
    stripped = options_only(item)
    assert stripped.question == STEM_REMOVED
    assert (stripped.options, stripped.answer, stripped.gold_letter) == (item.options, item.answer, item.gold_letter)
    assert (stripped.id, stripped.subject, stripped.benchmark) == (item.id, item.subject, item.benchmark)
    full = build_prompt(item, style)
    assert build_prompt(stripped, style) == full.replace(item.question, "", 1)
    assert "sign" not in build_prompt(stripped, style) and "alpha 0" in build_prompt(stripped, style)


def test_none_of_the_others_keeps_the_gold_index():
    for item in _items(4):
        nota = none_of_the_others(item)
        assert nota.answer == item.answer and nota.options[nota.answer] == NOTA_TEXT
        assert [t for i, t in enumerate(nota.options) if i != item.answer] == \
               [t for i, t in enumerate(item.options) if i != item.answer]
        assert nota.question == item.question
        for order in rotations(nota):  # wherever the rotation puts it, the replaced option stays the answer
            shown = nota.permuted(order)
            assert shown.options[shown.answer] == NOTA_TEXT


def _position_a_model(items):
    """Choices of a model that always answers position A: under rotation r it picks original option r."""
    return [list(range(len(it.options))) for it in items]


def test_rows_and_summary_equal_hand_counts():
    items = _items(8)  # golds 0,1,2,3,0,1,2,3
    full = [0, 1, 2, 3, 0, 0, 0, 0]  # 5 right
    opts = [0, 0, 0, 3, 0, 1, 1, 1]  # right on q0, q3, q4, q5: 4 right
    nota = [0, 2, 2, 0, 1, 1, 2, 0]  # right on q0, q2, q5, q6: 4 right
    choices = [[f] + [f] * 3 for f in full]
    choices[1] = [1, 1, 2, 1]  # q1 flips once, at rotation 2
    choices[4] = [0, 1, 2, 3]  # q4 flips at every rotation
    rows = audit_rows(items, full, opts, nota, choices)
    assert [r["correct_full"] for r in rows] == [True] * 5 + [False] * 3
    assert rows[1]["flips"] == 1 and rows[4]["flips"] == 3 and rows[0]["flips"] == 0
    # q1's gold is option 1 (B); rotation r shows it at (1 - r) % 4: B, A, D, C; the flip is at rotation 2: D
    assert rows[1]["rotation_gold_positions"] == ["B", "A", "D", "C"] and rows[1]["flip_gold_positions"] == ["D"]
    for it, row in zip(items, rows):  # gold positions agree with MCQItem.permuted
        assert row["rotation_gold_positions"] == [LETTERS[it.permuted(o).answer] for o in rotations(it)]

    s = audit_summary(items, rows, style="harness")
    assert s["style"] == "harness" and s["n"] == 8 and s["full"]["correct"] == 5
    oo = s["options_only"]
    assert oo["correct"] == 4 and oo["chance"] == 0.25 and oo["chance_exact"]
    assert oo["binomial_p"] == stats.binomial_test(4, 8, 0.25)
    assert oo["binomial_p_greater"] == stats.binomial_test(4, 8, 0.25, "greater")
    # full right & options-only wrong: q1, q2 (b = 2); full wrong & options-only right: q5 (c = 1)
    assert (oo["vs_full"]["b"], oo["vs_full"]["c"]) == (2, 1) and oo["vs_full"]["mcnemar_p"] == stats.mcnemar_exact(2, 1)
    assert oo["ci95"] == list(stats.wilson_ci(4, 8))
    nt = s["nota"]
    # full right & NOTA wrong: q1, q3, q4 (b = 3); full wrong & NOTA right: q5, q6 (c = 2)
    assert (nt["vs_full"]["b"], nt["vs_full"]["c"]) == (3, 2) and nt["drop"] == pytest.approx(1 / 8)
    rot = s["rotations"]
    assert rot["changed"] == 2 and rot["changed_share"] == 0.25 and rot["flip_rate"] == pytest.approx(4 / 24)
    assert sum(v["n"] for v in rot["accuracy_by_gold_position"].values()) == 32
    assert sum(v["flips"] for v in rot["flip_rate_by_gold_position"].values()) == 4
    assert "options only" in render(s) and "none of the other answers" in render(s)


def test_a_position_biased_model_is_caught_by_rotations():
    items = _items(8)
    full = [0] * 8
    rows = audit_rows(items, full, full, full, _position_a_model(items))
    rot = audit_summary(items, rows)["rotations"]
    assert rot["changed_share"] == 1.0 and rot["flip_rate"] == 1.0
    assert rot["accuracy_by_gold_position"]["A"]["accuracy"] == 1.0  # right exactly when the gold is shown at A
    assert all(rot["accuracy_by_gold_position"][p]["accuracy"] == 0.0 for p in "BCD")
    assert rot["accuracy_all_rotations"] == 0.0 and rot["mean_rotation_accuracy"] == 0.25


def test_nota_skipped_items_and_ambiguous_options():
    items = _items(4)
    items[2] = MCQItem(id="q2", question="?", options=("x", "None of the above", "z", "w"), answer=0)
    rows = audit_rows(items, [0, 1, 2, 3], [0] * 4, [0, None, 0, 3], [[0], [1], [2], [3]])
    assert rows[1]["pred_nota"] is None and rows[1]["correct_nota"] is None
    assert rows[2]["nota_ambiguous"] and not rows[0]["nota_ambiguous"]
    summary = audit_summary(items, rows)
    assert summary["nota"]["n"] == 3 and summary["nota"]["n_ambiguous"] == 1
    assert summary["rotations"] is None and "rotations" not in render(summary)  # no item was rotated


@pytest.fixture(scope="module")
def tiny(tiny_model_dir):
    from medtune.models import load_model

    model, tok, _ = load_model(tiny_model_dir, device="cpu", log=lambda *_: None)
    return model, tok


def test_run_audit_on_tiny_model_equals_scoring_each_variant(tiny):
    from medtune.scoring import score_items

    model, tok = tiny
    items = _items(4) + [MCQItem(id="pq", question="Abstract: a trial.\nQuestion: Does it work?",
                                 options=("yes", "no", "maybe"), answer=1, benchmark="pubmedqa")]
    rotated = [it.permuted(o) for it in items[:4] for o in rotations(it)]
    variants = items + [options_only(i) for i in items] + [none_of_the_others(i) for i in items[:4]] + rotated
    # one call, batch_size 1: each prompt scored alone, so batch composition cannot move a near tie
    flat = [LETTERS.index(r["pred"]) for r in score_items(model, tok, variants, "harness", mode="exact", batch_size=1)]
    full, opts, nota, rot = flat[:5], flat[5:10], flat[10:14], flat[14:]

    summary, rows = run_audit(model, tok, items, "harness", mode="exact", batch_size=1)
    assert [r["pred_full"] for r in rows] == [LETTERS[p] for p in full]
    assert [r["pred_options_only"] for r in rows] == [LETTERS[p] for p in opts]
    assert [r["pred_nota"] for r in rows[:4]] == [LETTERS[p] for p in nota]
    assert rows[4]["pred_nota"] is None  # PubMedQA lists no lettered options under the harness style
    start = 0
    for it, row in zip(items[:4], rows):
        orders = rotations(it)
        expected = [order[p] for order, p in zip(orders, rot[start: start + len(orders)])]
        start += len(orders)
        assert row["rotation_choices"] == [LETTERS[c] for c in expected]
        assert row["rotation_choices"][0] == row["pred_full"]
    assert summary["n"] == 5 and summary["mode"] == "exact" and summary["method"] == "letter"
    assert summary["options_only"]["correct"] == sum(r["correct_options_only"] for r in rows)
    assert summary["options_only"]["chance"] == pytest.approx((4 / 4 + 1 / 3) / 5)
    assert not summary["options_only"]["chance_exact"]
    assert rows[4]["rotation_choices"] == [rows[4]["pred_full"]]  # unlettered options are not rotated
    assert summary["rotations"]["changed"] == sum(r["flips"] > 0 for r in rows) and summary["rotations"]["n"] == 4


def test_a_paired_change_is_worded_by_its_sign():
    """A none-of-the-others score above the full prompt's is a rise, never "drop -6.2 points" (demo report)."""
    from medtune.audit import change_in_points

    assert change_in_points(0.0625) == "a drop of 6.2 points"
    assert change_in_points(-0.0625) == "a rise of 6.2 points"
    assert change_in_points(0.0) == "no change"
