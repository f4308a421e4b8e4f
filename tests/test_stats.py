"""Statistics against hand-computed values (the arithmetic is in the comments)."""

from __future__ import annotations

import math

import pytest

from medtune.stats import (
    accuracy,
    brier,
    ece,
    letter_baselines,
    letter_shift_explains,
    mcnemar_exact,
    paired_compare,
    reliability_table,
    risk_coverage,
    selective_summary,
    wilson_ci,
)


def test_wilson_ci_hand_values():
    # k=81, n=263, z=1.959964: p=0.307985, z²/n=0.014606, centre=(p+0.0073031)/1.014606=0.310749,
    # half=z·sqrt(p(1−p)/n + z²/4n²)/1.014606 = z·sqrt(0.00081038+0.00001388)/1.014606 = 0.055461
    low, high = wilson_ci(81, 263)
    assert low == pytest.approx(0.2553, abs=1e-4)
    assert high == pytest.approx(0.3662, abs=1e-4)
    # k=0: upper = z²/(n+z²) = 3.841459/13.841459 = 0.27753
    assert wilson_ci(0, 10) == (0.0, pytest.approx(0.2775, abs=1e-4))
    assert wilson_ci(10, 10) == (pytest.approx(0.7225, abs=1e-4), 1.0)
    assert wilson_ci(0, 0) == (0.0, 1.0)
    with pytest.raises(ValueError):
        wilson_ci(5, 3)


def test_accuracy_counts_unanswered_as_wrong():
    assert accuracy([0, 1, 2, 3], [0, None, 2, 0]) == 0.5
    with pytest.raises(ValueError):
        accuracy([0, 1], [0])


# confidences and correctness used for calibration: bins of width 0.1
CONF = [0.95, 0.85, 0.82, 0.55, 0.35]
OK = [True, True, False, True, False]


def test_ece_hand_example():
    # bin 9: {0.95: right} gap 0.05; bin 8: {0.85, 0.82} mean 0.835, acc 0.5, gap 0.335;
    # bin 5: {0.55: right} gap 0.45; bin 3: {0.35: wrong} gap 0.35.
    # ECE = (1·0.05 + 2·0.335 + 1·0.45 + 1·0.35) / 5 = 1.52 / 5 = 0.304
    assert ece(CONF, OK) == pytest.approx(0.304)
    assert ece([1.0, 1.0], [True, True]) == 0.0  # confidence 1.0 lands in the last bin


def test_reliability_table_rows():
    rows = reliability_table(CONF, OK)
    assert len(rows) == 10
    assert rows[8] == {"low": 0.8, "high": 0.9, "n": 2, "mean_confidence": pytest.approx(0.835), "accuracy": 0.5}
    assert rows[0]["n"] == 0 and rows[0]["accuracy"] is None
    assert sum(r["n"] for r in rows) == 5


def test_brier_hand_example():
    # item 1: (0.7−1)² + 3·0.1² = 0.09 + 0.03 = 0.12; item 2 (uniform): 0.75² + 3·0.25² = 0.75; item 3: 0
    probs = [[0.7, 0.1, 0.1, 0.1], [0.25] * 4, [0.0, 1.0, 0.0, 0.0]]
    assert brier(probs, [0, 2, 1]) == pytest.approx(0.87 / 3)


@pytest.mark.parametrize(("b", "c", "p"), [
    (1, 9, 0.021484375),  # 2·(C(10,0)+C(10,1))/2¹⁰ = 2·11/1024
    (9, 1, 0.021484375),
    (5, 5, 1.0),
    (0, 0, 1.0),
    (1, 2, 1.0),  # 2·(1+3)/8 = 1
    (0, 6, 0.03125),  # 2/64
])
def test_mcnemar_exact(b, c, p):
    assert mcnemar_exact(b, c) == p


def test_mcnemar_exact_large_counts_stay_finite():
    assert 0.0 < mcnemar_exact(400, 600) < 1e-9


def test_paired_compare_won_and_lost():
    ids = ["q1", "q2", "q3", "q4", "q5", "q6"]
    a = [True, True, False, False, True, False]
    b = [True, False, True, True, True, False]
    r = paired_compare(a, b, ids)
    assert r["won"] == ["q3", "q4"] and r["lost"] == ["q2"]
    assert (r["b"], r["c"], r["n"]) == (1, 2, 6)
    assert r["acc_a"] == 0.5 and r["acc_b"] == pytest.approx(4 / 6)
    assert r["diff"] == pytest.approx(1 / 6)
    # Newcombe method 10 with e, f, g, h = 2, 2, 1, 1: eh − fg = 0, so φ = 0 and the limits are square-and-add of the
    # Wilson intervals of 4/6 (l1, u1) and 3/6 (l2, u2): 1/6 − sqrt((4/6 − l1)² + (u2 − 3/6)²), likewise above
    (l1, u1), (l2, u2) = wilson_ci(4, 6), wilson_ci(3, 6)
    assert r["diff_ci"][0] == pytest.approx(1 / 6 - math.hypot(4 / 6 - l1, u2 - 3 / 6), abs=1e-12)
    assert r["diff_ci"][1] == pytest.approx(1 / 6 + math.hypot(u1 - 4 / 6, 3 / 6 - l2), abs=1e-12)
    assert r["diff_ci"] == pytest.approx((-0.315031, 0.558515), abs=1e-6)
    assert r["mcnemar_p"] == 1.0


def test_paired_compare_ci_is_clipped():
    r = paired_compare([False] * 3, [True] * 3, ["a", "b", "c"])
    assert r["diff"] == 1.0 and r["diff_ci"][1] == 1.0


# confidences with a tie at 0.8 (one right, one wrong)
RC_CONF = [0.9, 0.8, 0.8, 0.6, 0.3]
RC_OK = [True, True, False, True, False]


def test_risk_coverage_rows():
    rows = risk_coverage(RC_CONF, RC_OK)
    assert [r["threshold"] for r in rows] == [0.9, 0.8, 0.6, 0.3]  # the tie enters together
    assert [r["n_answered"] for r in rows] == [1, 3, 4, 5]
    assert [r["coverage"] for r in rows] == [0.2, 0.6, 0.8, 1.0]
    assert [r["accuracy"] for r in rows] == pytest.approx([1.0, 2 / 3, 0.75, 0.6])


def test_selective_summary_hand_example():
    # expected right in top k (tie averaged): 1, 1.5, 2, 3, 3 → risk 0, 0.25, 1/3, 0.25, 0.4
    s = selective_summary(RC_CONF, RC_OK)
    assert s["aurc"] == pytest.approx((0 + 0.25 + 1 / 3 + 0.25 + 0.4) / 5)
    # k = ceil(q·5): 100%→5, 90%→5, 80%→4, 70%→4, 50%→3, 25%→2
    assert s["accuracy_at_coverage"] == pytest.approx(
        {"100": 0.6, "90": 0.6, "80": 0.75, "70": 0.75, "50": 2 / 3, "25": 0.75})
    assert s["n"] == 5


def test_selective_summary_exact_coverage_is_not_rounded_up():
    # 0.14·50 = 7.000000000000001 in floating point; 14% of 50 items is 7 items, not 8
    s = selective_summary([i / 50 for i in range(50, 0, -1)], [True] * 7 + [False] * 43, coverages=(0.14,))
    assert s["accuracy_at_coverage"] == {"14": 1.0}


# gold letters: A×4, B×2, C×2, D×2
GOLDS = [0, 0, 0, 1, 1, 2, 3, 3, 0, 2]


def test_letter_baselines_always_a_model():
    r = letter_baselines(GOLDS, [0] * 10, [-0.5] * 10, [4] * 10)
    assert r["favourite_letter"] == "A" and r["majority_letter"] == "A"
    assert r["favourite_letter_accuracy"] == r["majority_baseline"] == r["accuracy"] == 0.4
    assert r["pred_distribution"] == {"A": 1.0, "B": 0.0, "C": 0.0, "D": 0.0}
    assert r["gold_distribution"] == {"A": 0.4, "B": 0.2, "C": 0.2, "D": 0.2}
    assert r["mean_gold_logprob"] == -0.5
    assert r["uniform_logprob"] == pytest.approx(-math.log(4))


def test_letter_baselines_favourite_letter_differs_from_majority():
    preds = [1, 1, 1, 1, None, 2, 3, 1, 0, 1]  # favourite B, one unanswered
    r = letter_baselines(GOLDS, preds, None, [4] * 8 + [5, 5])
    assert r["favourite_letter"] == "B" and r["favourite_letter_accuracy"] == 0.2
    assert list(r["pred_distribution"]) == ["A", "B", "C", "D", "E"]
    assert r["pred_distribution"]["B"] == pytest.approx(6 / 9) and r["unanswered_share"] == 0.1
    assert r["mean_gold_logprob"] is None
    assert r["uniform_logprob"] == pytest.approx(-(8 * math.log(4) + 2 * math.log(5)) / 10)


def test_letter_shift_flags_always_a_then_less_a():
    before = letter_baselines(GOLDS, [0] * 10, None, [4] * 10)  # acc 0.4
    after = letter_baselines(GOLDS, [0, 0, 1, 1, 1, 2, 3, 3, 2, 2], None, [4] * 10)  # acc 0.8, spread letters
    warning = letter_shift_explains(before, after, 0.50, 0.51)
    assert warning is not None and "+40.0 points" in warning and "+1.0" in warning
    assert letter_shift_explains(before, after, None, None) is not None  # no debiased check possible: flag


def test_letter_shift_does_not_flag_genuine_debiased_gain():
    before = letter_baselines(GOLDS, [0] * 10, None, [4] * 10)
    after = letter_baselines(GOLDS, [0, 0, 1, 1, 1, 2, 3, 3, 2, 2], None, [4] * 10)
    assert letter_shift_explains(before, after, 0.40, 0.75) is None  # debiased +35 of raw +40


def test_letter_shift_does_not_flag_unchanged_preference():
    rotated = GOLDS[-1:] + GOLDS[:-1]  # same letter distribution, 4/10 right
    before = letter_baselines(GOLDS, rotated, None, [4] * 10)
    after = letter_baselines(GOLDS, GOLDS, None, [4] * 10)
    assert before["accuracy"] == 0.4 and after["accuracy"] == 1.0
    assert letter_shift_explains(before, after, None, None) is None


def test_letter_shift_flags_switch_to_majority_letter():
    # always-B (acc 0.2) → always-A (acc 0.4): the gain is exactly the favourite-letter accuracy change
    before = letter_baselines(GOLDS, [1] * 10, None, [4] * 10)
    after = letter_baselines(GOLDS, [0] * 10, None, [4] * 10)
    assert "B→A" in letter_shift_explains(before, after, 0.25, 0.25)


def test_letter_shift_flags_small_debiased_change_within_two_points():
    # raw +2.5 points; debiased +1.5 is more than half of raw but within ±2 points, so the shift is blamed
    def baseline(acc: float, share_a: float) -> dict:
        return {"accuracy": acc, "favourite_letter": "A", "favourite_letter_accuracy": 0.3,
                "pred_distribution": {"A": share_a, "B": 1 - share_a}}
    before, after = baseline(0.400, 0.9), baseline(0.425, 0.5)
    assert letter_shift_explains(before, after, 0.500, 0.515) is not None
    assert letter_shift_explains(before, after, 0.500, 0.530) is None
    assert letter_shift_explains(before, baseline(0.410, 0.5), None, None) is None  # +1 point: nothing to explain
