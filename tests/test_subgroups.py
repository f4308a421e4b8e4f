"""Subgroups with honest power: BH and the binomial test against published reference numbers, MDEs against the
closed-form sample-size formulas and against simulated power, and the per-group tables against hand counts."""

import math

import numpy as np
import pytest

from medtune import stats
from medtune.subgroups import NONE_GROUP, accuracy_by, before_after_by, mde_text, render_accuracy, render_before_after

# Benjamini & Hochberg (1995), Table/example of 15 p-values; adjusted values from statsmodels 0.15.0
# multipletests(p, method="fdr_bh") (computed once in a scratch environment, written here as literals).
BH_P = [0.0001, 0.0004, 0.0019, 0.0095, 0.0201, 0.0278, 0.0298, 0.0344, 0.0459, 0.3240, 0.4262, 0.5719, 0.6528,
        0.7590, 1.000]
BH_ADJ = [0.0015, 0.003, 0.0095, 0.035625, 0.0603, 0.06385714285714286, 0.06385714285714286, 0.0645, 0.0765,
          0.486, 0.5811818181818182, 0.714875, 0.7532307692307693, 0.8132142857142857, 1.0]


def test_bh_matches_statsmodels_on_the_1995_example():
    assert stats.benjamini_hochberg(BH_P) == pytest.approx(BH_ADJ, abs=1e-12)


def test_bh_unsorted_input_with_ties_keeps_input_order():
    p = [0.04, 0.01, 0.03, 0.03, 0.20, 0.9, 0.001]
    ref = [0.056, 0.035, 0.0525, 0.0525, 0.23333333333333336, 0.9, 0.007]  # statsmodels fdr_bh, as above
    assert stats.benjamini_hochberg(p) == pytest.approx(ref, abs=1e-12)
    assert stats.benjamini_hochberg([]) == []


@pytest.mark.parametrize("k,n,p,two_sided,greater", [  # scipy.stats.binomtest 1.x, computed once
    (30, 80, 0.25, 0.01359896281642017, 0.008939674293303156),
    (12, 40, 0.25, 0.4668097611024689, 0.28485560710188595),
    (3, 20, 0.25, 0.4393741000631053, 0.9087395675351218),
    (50, 100, 0.5, 1.0, 0.5397946186935889),
    (7, 10, 0.2, 0.0008643584000000003, 0.0008643584000000003),
])
def test_binomial_test_matches_scipy(k, n, p, two_sided, greater):
    assert stats.binomial_test(k, n, p) == pytest.approx(two_sided, rel=1e-9, abs=1e-12)
    assert stats.binomial_test(k, n, p, "greater") == pytest.approx(greater, rel=1e-9)


def test_one_sample_mde_inverts_the_sample_size_formula():
    # n = (1.96·√(.5·.5) + 0.8416·√(.65·.35))² / .15² = 84.8: 85 items detect 15 points around 50%
    assert stats.mde_one_sample(85, 0.5) == pytest.approx(0.15, abs=0.002)
    za, zb = 1.959964, 0.841621
    for n, p in [(30, 0.6), (200, 0.3), (1273, 0.28)]:
        d = stats.mde_one_sample(n, p)
        lhs = math.sqrt(n) * d
        rhs = min(za * math.sqrt(p * (1 - p)) + zb * math.sqrt(q * (1 - q)) for q in (p + d, p - d))
        assert lhs == pytest.approx(rhs, rel=1e-6)
    assert stats.mde_one_sample(30, 0.5) > stats.mde_one_sample(300, 0.5)


def test_paired_mde_inverts_connor_formula():
    # Connor 1987: n = (1.96·√.2 + 0.8416·√(.2 − .01))² / .1² = 154.6: 155 pairs with ψ = 0.2 detect 10 points
    assert stats.mde_paired(155, 0.2) == pytest.approx(0.1, abs=0.001)
    assert stats.mde_paired(10, 0.1) is None  # even all discordant items one way is not detectable
    assert stats.mde_paired(100, 0.0) is None


def test_one_sample_mde_has_80_percent_power_by_simulation():
    """The z-test of H0: π = p (SE from p) rejects about 80% of the time when the truth is p + MDE."""
    rng = np.random.default_rng(0)
    n, p = 400, 0.3
    d = stats.mde_one_sample(n, p)
    k = rng.binomial(n, p + d, size=20000)
    z = (k / n - p) / math.sqrt(p * (1 - p) / n)
    assert np.mean(np.abs(z) > 1.959964) == pytest.approx(0.8, abs=0.02)


def test_paired_mde_has_80_percent_power_by_simulation():
    """McNemar's asymptotic test (the one Connor's formula is for) rejects about 80% of the time at δ = MDE; the
    exact test, which the tables report, is slightly conservative."""
    rng = np.random.default_rng(1)
    n, psi = 300, 0.3
    d = stats.mde_paired(n, psi)
    counts = rng.multinomial(n, [(psi - d) / 2, (psi + d) / 2, 1 - psi], size=4000)
    b, c = counts[:, 0], counts[:, 1]
    z = (c - b) / np.sqrt(np.maximum(b + c, 1))
    assert np.mean(np.abs(z) > 1.959964) == pytest.approx(0.8, abs=0.025)
    exact = np.mean([stats.mcnemar_exact(int(x), int(y)) < 0.05 for x, y in zip(b[:1000], c[:1000])])
    assert 0.7 < exact <= 0.83


def _rows():
    rows = []
    for k in range(40):
        subject = ["anatomy", "pharmacology", None][k % 3]
        rows.append({"id": f"q{k}", "subject": subject, "correct": k % 4 == 0})
    return rows


def test_accuracy_by_equals_hand_counts():
    rows = _rows()
    table = {r["group"]: r for r in accuracy_by(rows)}
    assert list(table) == sorted(table)
    anatomy = [r for r in rows if r["subject"] == "anatomy"]
    k = sum(r["correct"] for r in anatomy)
    assert table["anatomy"]["n"] == len(anatomy) == 14 and table["anatomy"]["correct"] == k
    assert table["anatomy"]["ci95"] == list(stats.wilson_ci(k, 14))
    assert table[NONE_GROUP]["n"] == 13
    pooled = sum(r["correct"] for r in rows) / 40
    assert table["anatomy"]["mde"] == stats.mde_one_sample(14, pooled)
    assert "cannot detect less than" in table["anatomy"]["mde_text"]
    assert "anatomy" in render_accuracy(list(table.values()))


def test_accuracy_by_any_field_or_function():
    rows = _rows()
    table = accuracy_by(rows, field=lambda r: int(r["id"][1:]) % 2, p=0.25)
    assert [r["group"] for r in table] == ["0", "1"] and sum(r["n"] for r in table) == 40
    assert table[0]["mde"] == stats.mde_one_sample(20, 0.25)
    covered = [dict(r, covered=k < 30) for k, r in enumerate(rows)]  # another outcome field, e.g. conformal coverage
    by_subject = {r["group"]: r for r in accuracy_by(covered, outcome="covered")}
    assert by_subject["anatomy"]["correct"] == sum(r["covered"] for r in covered if r["subject"] == "anatomy")


def test_before_after_by_hand_counts_mcnemar_and_bh():
    before = _rows()
    after = [dict(r, correct=(int(r["id"][1:]) % 2 == 0)) for r in reversed(before)]  # order must not matter
    table = before_after_by(before, after)
    by_group = {r["group"]: r for r in table}
    anatomy_ids = [r["id"] for r in before if r["subject"] == "anatomy"]
    was = {r["id"]: r["correct"] for r in before}
    now = {r["id"]: r["correct"] for r in after}
    b = sum(was[i] and not now[i] for i in anatomy_ids)
    c = sum(now[i] and not was[i] for i in anatomy_ids)
    row = by_group["anatomy"]
    assert (row["b"], row["c"]) == (b, c) and row["mcnemar_p"] == stats.mcnemar_exact(b, c)
    assert row["diff"] == pytest.approx((c - b) / len(anatomy_ids))
    assert [r["p_bh"] for r in table] == stats.benjamini_hochberg([r["mcnemar_p"] for r in table])
    psi = sum(was[i] != now[i] for i in was) / len(was)
    assert row["discordance"] == psi and row["mde"] == stats.mde_paired(len(anatomy_ids), psi)
    assert "p_BH" in render_before_after(table)


def test_before_after_refuses_different_items():
    before = _rows()
    with pytest.raises(ValueError, match="same items"):
        before_after_by(before, before[:-1])


def test_mde_text():
    assert mde_text(0.1234) == "this comparison cannot detect less than 12.3 points"
    assert "cannot detect any" in mde_text(None)
