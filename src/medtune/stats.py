"""The statistics every result carries: intervals, calibration, paired tests, selective accuracy, letter bias.

Pure Python, no numpy or scipy. Every function documents its formula so a reader can check a number by hand.
Inputs are plain lists in item order; mismatched lengths or empty inputs raise ValueError (a caller bug, not a
user error), except `wilson_ci(k, 0)`, which returns the uninformative interval (0, 1).
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Callable, Sequence

Z95 = 1.959964  # two-sided 95% normal quantile


def wilson_ci(k: int, n: int, z: float = Z95) -> tuple[float, float]:
    """Wilson score interval for a binomial proportion p = k/n.

    centre = (p + z²/2n) / (1 + z²/n);  half = z·sqrt(p(1−p)/n + z²/4n²) / (1 + z²/n).
    Unlike the Wald interval it stays inside [0, 1] and is sensible at k = 0 and k = n. n = 0 gives (0, 1).
    """
    if n < 0 or k < 0 or k > n:
        raise ValueError(f"wilson_ci needs 0 <= k <= n, got k={k}, n={n}")
    if n == 0:
        return (0.0, 1.0)
    p = k / n
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    low = 0.0 if k == 0 else max(0.0, centre - half)  # the exact bounds at k = 0 and k = n, free of rounding
    high = 1.0 if k == n else min(1.0, centre + half)
    return (low, high)


def accuracy(golds: list[int], preds: list[int | None]) -> float:
    """Share of items whose prediction equals the gold index: (1/n)·Σ 1[pred_i = gold_i]. None (unanswered) is wrong."""
    _check_lengths(golds=golds, preds=preds)
    return sum(p is not None and p == g for g, p in zip(golds, preds)) / len(golds)


def ece(confidences: list[float], correct: list[bool], bins: int = 10) -> float:
    """Expected calibration error with `bins` equal-width bins over [0, 1].

    ECE = Σ_b (n_b / n)·|acc_b − conf_b|, where acc_b and conf_b are the accuracy and mean confidence of the items
    in bin b. A confidence c falls in bin min(⌊c·bins⌋, bins − 1), so c = 1.0 lands in the last bin.
    """
    rows = reliability_table(confidences, correct, bins)
    n = len(confidences)
    return sum(r["n"] / n * abs(r["accuracy"] - r["mean_confidence"]) for r in rows if r["n"])


def reliability_table(confidences: list[float], correct: list[bool], bins: int = 10) -> list[dict]:
    """One row per bin (same binning as `ece`): low, high, n, mean_confidence, accuracy (None for empty bins)."""
    _check_lengths(confidences=confidences, correct=correct)
    if bins < 1:
        raise ValueError(f"bins must be >= 1, got {bins}")
    members: list[list[int]] = [[] for _ in range(bins)]
    for i, c in enumerate(confidences):
        if not 0.0 <= c <= 1.0:
            raise ValueError(f"confidence {c} at position {i} is outside [0, 1]")
        members[min(int(c * bins), bins - 1)].append(i)
    rows = []
    for b, idx in enumerate(members):
        rows.append({
            "low": b / bins,
            "high": (b + 1) / bins,
            "n": len(idx),
            "mean_confidence": sum(confidences[i] for i in idx) / len(idx) if idx else None,
            "accuracy": sum(bool(correct[i]) for i in idx) / len(idx) if idx else None,
        })
    return rows


def brier(probs: list[list[float]], golds: list[int]) -> float:
    """Multi-class Brier score: (1/n)·Σ_i Σ_k (p_ik − 1[k = gold_i])². 0 is perfect; uniform over 4 options is 0.75."""
    _check_lengths(probs=probs, golds=golds)
    total = 0.0
    for p, g in zip(probs, golds):
        if not 0 <= g < len(p):
            raise ValueError(f"gold index {g} out of range for {len(p)} options")
        total += sum((pk - (k == g)) ** 2 for k, pk in enumerate(p))
    return total / len(golds)


def mcnemar_exact(b: int, c: int) -> float:
    """Two-sided exact McNemar test on the discordant pairs.

    b = items A got right and B wrong, c = items A wrong and B right. Under H0 each discordant item is a fair coin,
    so X ~ Bin(b + c, ½) and p = min(1, 2·P(X ≤ min(b, c))) = min(1, 2·Σ_{i≤min(b,c)} C(b+c, i) / 2^(b+c)).
    Computed with exact integers; b + c = 0 gives 1.0.
    """
    if b < 0 or c < 0:
        raise ValueError(f"counts must be >= 0, got b={b}, c={c}")
    n = b + c
    if n == 0:
        return 1.0
    tail = sum(math.comb(n, i) for i in range(min(b, c) + 1))
    return min(1.0, 2 * tail / 2**n)  # int / int is correctly rounded even for huge n


def paired_compare(correct_a: list[bool], correct_b: list[bool], ids: list[str], z: float = Z95) -> dict:
    """Compare systems A and B on the same items (e.g. base vs tuned).

    diff = acc_b − acc_a = (c − b)/n. Its CI is `paired_diff_ci` (Newcombe's method 10), which keeps a width when no
    item is discordant, where the Wald interval collapses to [0, 0]. The p-value is `mcnemar_exact(b, c)`.
    Returns n, acc_a, acc_b, diff, diff_ci (low, high), b, c, mcnemar_p, won (ids right in B, wrong in A),
    lost (ids right in A, wrong in B).
    """
    _check_lengths(correct_a=correct_a, correct_b=correct_b, ids=ids)
    n = len(ids)
    won = [i for i, a, bb in zip(ids, correct_a, correct_b) if bb and not a]
    lost = [i for i, a, bb in zip(ids, correct_a, correct_b) if a and not bb]
    b, c = len(lost), len(won)
    diff = (c - b) / n
    both = sum(bool(x) and bool(y) for x, y in zip(correct_a, correct_b))
    return {
        "n": n,
        "acc_a": sum(map(bool, correct_a)) / n,
        "acc_b": sum(map(bool, correct_b)) / n,
        "diff": diff,
        "diff_ci": paired_diff_ci(both, c, b, n - both - b - c, z),
        "b": b,
        "c": c,
        "mcnemar_p": mcnemar_exact(b, c),
        "won": won,
        "lost": lost,
    }


def paired_diff_ci(e: int, f: int, g: int, h: int, z: float = Z95) -> tuple[float, float]:
    """Newcombe's method 10 interval for θ = p1 − p2 = (f − g)/n on paired data (Stat Med 1998;17:2635-50).

    e = right in both, f = right in 1 only, g = right in 2 only, h = wrong in both. With (l1, u1), (l2, u2) the
    Wilson intervals of p1 = (e+f)/n and p2 = (e+g)/n, and φ the correlation of the pairs (A = eh − fg; φ = (A − n/2)/
    sqrt((e+f)(g+h)(e+g)(f+h)) if A > n/2, A/sqrt(…) if A < 0, else 0; 0 when a margin is empty):
    low = θ − sqrt((p1−l1)² − 2φ(p1−l1)(u2−p2) + (u2−p2)²),  high = θ + sqrt((u1−p1)² − 2φ(u1−p1)(p2−l2) + (p2−l2)²).
    With no discordant pairs it is still as wide as the data warrant (27, 0, 0, 27 gives ±0.0351), not [0, 0].
    """
    n = e + f + g + h
    if min(e, f, g, h) < 0 or n == 0:
        raise ValueError(f"paired_diff_ci needs counts >= 0 with n > 0, got {(e, f, g, h)}")
    p1, p2 = (e + f) / n, (e + g) / n
    l1, u1 = wilson_ci(e + f, n, z)
    l2, u2 = wilson_ci(e + g, n, z)
    margins = (e + f) * (g + h) * (e + g) * (f + h)
    a = e * h - f * g
    phi = 0.0 if margins == 0 or 0 <= a <= n / 2 else (a - n / 2 if a > 0 else a) / math.sqrt(margins)
    low = p1 - p2 - math.sqrt(max(0.0, (p1 - l1) ** 2 - 2 * phi * (p1 - l1) * (u2 - p2) + (u2 - p2) ** 2))
    high = p1 - p2 + math.sqrt(max(0.0, (u1 - p1) ** 2 - 2 * phi * (u1 - p1) * (p2 - l2) + (p2 - l2) ** 2))
    return (max(-1.0, low), min(1.0, high))


def risk_coverage(confidences: list[float], correct: list[bool]) -> list[dict]:
    """Selective prediction: answer only items with confidence ≥ threshold, for every distinct confidence.

    Rows in order of falling threshold: threshold, n_answered = #{c_i ≥ t}, coverage = n_answered/n,
    accuracy (on the answered items), risk = 1 − accuracy. Tied confidences enter together, because no threshold
    can separate them.
    """
    _check_lengths(confidences=confidences, correct=correct)
    n = len(confidences)
    rows = []
    answered = right = 0
    for conf, members in _groups_by_confidence(confidences, correct):
        answered += len(members)
        right += sum(members)
        rows.append({
            "threshold": conf,
            "coverage": answered / n,
            "n_answered": answered,
            "accuracy": right / answered,
            "risk": 1 - right / answered,
        })
    return rows


def selective_summary(confidences: list[float], correct: list[bool],
                      coverages: Sequence[float] = (1.0, 0.9, 0.8, 0.7, 0.5, 0.25)) -> dict:
    """Accuracy when answering only the most confident share of items, and the area under the risk-coverage curve.

    Accuracy at coverage q answers the k = max(1, ⌈q·n⌉) most confident items. AURC = (1/n)·Σ_{k=1..n} risk(k),
    risk(k) = errors among the top k / k. Within a group of tied confidences the order is arbitrary, so the top k
    counts the expected number of correct items of a random order (group accuracy × items taken from the group).
    Returns {"accuracy_at_coverage": {"100": …, "90": …, …}, "aurc": float, "n": int}; lower AURC is better.
    """
    _check_lengths(confidences=confidences, correct=correct)
    n = len(confidences)
    right_at = _expected_right_in_top_k(confidences, correct)
    at_cov = {}
    for q in coverages:
        k = max(1, math.ceil(q * n - 1e-9))  # tolerance: 0.14·50 is 7.000000000000001 in floating point
        at_cov[f"{q * 100:g}"] = right_at[k] / k
    aurc = sum(1 - right_at[k] / k for k in range(1, n + 1)) / n
    return {"accuracy_at_coverage": at_cov, "aurc": aurc, "n": n}


def letter_baselines(golds: list[int], preds: list[int | None], gold_logprobs: list[float] | None,
                     n_options: list[int], letters: str = "ABCDEFGHIJ") -> dict:
    """What letter preference alone would score on these items, so an "always A" model can't pass as learning.

    - majority_letter / majority_baseline: the most common gold letter and its share of items (ties: first letter).
    - favourite_letter / favourite_letter_accuracy: the model's most predicted letter, and the accuracy of a model
      that always answers it (= that letter's share of golds). None / 0.0 when nothing was answered.
    - pred_distribution / gold_distribution: letter → share, every letter up to max(n_options). Preds are shares of
      answered items; unanswered_share is the share of items with no answer.
    - accuracy: the model's accuracy on these items (used by `letter_shift_explains`).
    - mean_gold_logprob: mean of log p(gold) where the caller normalised p over each item's options (log-softmax);
      None when gold_logprobs is None (generation scoring). uniform_logprob: mean of −log(n_options), the
      chance level to compare it with.
    """
    _check_lengths(golds=golds, preds=preds, n_options=n_options)
    if gold_logprobs is not None:
        _check_lengths(golds=golds, gold_logprobs=gold_logprobs)
    shown = letters[:max(n_options)]
    n = len(golds)
    gold_counts = Counter(golds)
    pred_counts = Counter(p for p in preds if p is not None)
    n_answered = sum(pred_counts.values())
    majority = max(range(len(shown)), key=lambda i: (gold_counts[i], -i))
    favourite = max(range(len(shown)), key=lambda i: (pred_counts[i], -i)) if n_answered else None
    return {
        "n": n,
        "accuracy": accuracy(golds, preds),
        "majority_letter": shown[majority],
        "majority_baseline": gold_counts[majority] / n,
        "favourite_letter": shown[favourite] if favourite is not None else None,
        "favourite_letter_accuracy": gold_counts[favourite] / n if favourite is not None else 0.0,
        "pred_distribution": {ch: pred_counts[i] / n_answered if n_answered else 0.0 for i, ch in enumerate(shown)},
        "gold_distribution": {ch: gold_counts[i] / n for i, ch in enumerate(shown)},
        "unanswered_share": (n - n_answered) / n,
        "mean_gold_logprob": sum(gold_logprobs) / n if gold_logprobs is not None else None,
        "uniform_logprob": sum(-math.log(k) for k in n_options) / n,
    }


SHIFT_TV = 0.2  # total variation distance between prediction distributions that counts as a changed preference
MIN_CHANGE = 0.02  # accuracy changes (and debiased changes) within 2 points are treated as noise


def letter_shift_explains(before: dict, after: dict, debiased_before: float | None,
                          debiased_after: float | None) -> str | None:
    """A warning when an accuracy change may come from a change of letter preference rather than knowledge.

    `before`/`after` are `letter_baselines` dicts on the same items. With raw = after.accuracy − before.accuracy:
      1. nothing to explain if |raw| < 2 points;
      2. the letter preference shifted if TV(pred_before, pred_after) = ½·Σ|Δshare| ≥ 0.2, or the
         favourite-letter accuracy moved in the same direction as raw by ≥ max(2 points, |raw|/2);
      3. if debiased accuracies (e.g. averaged over option permutations) are given, the shift is only blamed when
         the debiased change is small: within ±2 points, or less than half of raw in raw's direction.
    Flags, doesn't decide: the sentence says what moved so a reader can judge.
    """
    raw = after["accuracy"] - before["accuracy"]
    if abs(raw) < MIN_CHANGE:
        return None
    keys = set(before["pred_distribution"]) | set(after["pred_distribution"])
    tv = 0.5 * sum(abs(after["pred_distribution"].get(k, 0.0) - before["pred_distribution"].get(k, 0.0)) for k in keys)
    fav_change = after["favourite_letter_accuracy"] - before["favourite_letter_accuracy"]
    fav_moved = fav_change * raw > 0 and abs(fav_change) >= max(MIN_CHANGE, abs(raw) / 2)
    if tv < SHIFT_TV and not fav_moved:
        return None
    shift = (f"the model's letter preference shifted (prediction distribution TV distance {tv:.2f}; favourite "
             f"letter {before['favourite_letter']}→{after['favourite_letter']}, whose accuracy alone went "
             f"{before['favourite_letter_accuracy']:.1%}→{after['favourite_letter_accuracy']:.1%})")
    if debiased_before is None or debiased_after is None:
        return (f"Accuracy changed by {raw * 100:+.1f} points while {shift}; no debiased accuracy was measured, "
                "so part of the change may be letter bias rather than knowledge.")
    deb = debiased_after - debiased_before
    if abs(deb) <= MIN_CHANGE or deb * math.copysign(1.0, raw) < abs(raw) / 2:
        return (f"Accuracy changed by {raw * 100:+.1f} points but debiased accuracy only by {deb * 100:+.1f} "
                f"points, while {shift}: the change is plausibly letter bias rather than knowledge.")
    return None


def _check_lengths(**lists: Sequence) -> None:
    """Raise ValueError unless all lists are non-empty and equally long."""
    sizes = {name: len(v) for name, v in lists.items()}
    if len(set(sizes.values())) != 1:
        raise ValueError(f"length mismatch: {sizes}")
    if not next(iter(sizes.values())):
        raise ValueError(f"empty input: {', '.join(sizes)}")


def _groups_by_confidence(confidences: list[float], correct: list[bool]) -> list[tuple[float, list[bool]]]:
    """(confidence, [correct flags]) for each distinct confidence, highest first."""
    groups: dict[float, list[bool]] = {}
    for conf, ok in zip(confidences, correct):
        groups.setdefault(conf, []).append(bool(ok))
    return sorted(groups.items(), key=lambda kv: -kv[0])


def _expected_right_in_top_k(confidences: list[float], correct: list[bool]) -> list[float]:
    """right[k] = expected correct items among the k most confident (k = 0..n), ties in random order."""
    right = [0.0]
    for _, members in _groups_by_confidence(confidences, correct):
        base, rate = right[-1], sum(members) / len(members)
        right.extend(base + j * rate for j in range(1, len(members) + 1))
    return right


# Tests and power for the evaluation audits (issue 20): exact binomial test, Benjamini–Hochberg, minimum detectable
# effects. Normal quantiles come from the standard library (statistics.NormalDist), so there is still no scipy.


def binomial_test(k: int, n: int, p: float, alternative: str = "two-sided") -> float:
    """Exact binomial test of H0: success probability = p, for k successes in n trials.

    "greater": P(X ≥ k); "less": P(X ≤ k); "two-sided": Σ P(X = i) over every i with P(X = i) ≤ P(X = k)·(1 + 1e-7)
    (the minimum-likelihood rule scipy.stats.binomtest and R's binom.test use). X ~ Bin(n, p); the pmf is computed
    in log space (lgamma), so n in the tens of thousands is fine.
    """
    if n < 1 or not 0 <= k <= n:
        raise ValueError(f"binomial_test needs 0 <= k <= n and n >= 1, got k={k}, n={n}")
    if not 0.0 < p < 1.0:
        raise ValueError(f"binomial_test needs 0 < p < 1, got {p}")
    if alternative not in ("two-sided", "greater", "less"):
        raise ValueError(f"alternative must be two-sided, greater or less, got {alternative!r}")
    pmf = [_binom_pmf(i, n, p) for i in range(n + 1)]
    if alternative == "greater":
        return min(1.0, math.fsum(pmf[k:]))
    if alternative == "less":
        return min(1.0, math.fsum(pmf[: k + 1]))
    return min(1.0, math.fsum(q for q in pmf if q <= pmf[k] * (1 + 1e-7)))


def _binom_pmf(i: int, n: int, p: float) -> float:
    log = math.lgamma(n + 1) - math.lgamma(i + 1) - math.lgamma(n - i + 1) + i * math.log(p) + (n - i) * math.log1p(-p)
    return math.exp(log)


def benjamini_hochberg(pvalues: Sequence[float]) -> list[float]:
    """Benjamini–Hochberg (1995) adjusted p-values, in input order (what R's p.adjust(method="BH") and statsmodels'
    multipletests(method="fdr_bh") return).

    With p sorted ascending, p_(1) ≤ … ≤ p_(m): adj_(i) = min_{j ≥ i} min(1, m·p_(j) / j). Rejecting every
    adj ≤ q controls the false discovery rate at q for independent (or positively dependent) tests.
    """
    m = len(pvalues)
    if m == 0:
        return []
    if any(not 0.0 <= p <= 1.0 for p in pvalues):
        raise ValueError(f"p-values must lie in [0, 1], got {list(pvalues)}")
    order = sorted(range(m), key=lambda i: pvalues[i])
    adjusted = [0.0] * m
    running = 1.0
    for rank in range(m, 0, -1):  # from the largest p down, carrying the running minimum
        i = order[rank - 1]
        running = min(running, m * pvalues[i] / rank)
        adjusted[i] = running
    return adjusted


def _z(q: float) -> float:
    from statistics import NormalDist

    return NormalDist().inv_cdf(q)


def mde_one_sample(n: int, p: float, alpha: float = 0.05, power: float = 0.8) -> float | None:
    """Minimum detectable effect of a one-sample test of a proportion: the smallest δ > 0 such that a two-sided
    level-alpha z-test of H0: π = p has the given power against π = p + δ (or p − δ, whichever is smaller), with n
    items.

    Normal approximation (Chow, Shao & Wang, Sample Size Calculations in Clinical Research, 2nd ed. 2008, §4.1;
    Fleiss, Levin & Paik 2003, §2.5): the test detects δ when
        √n·|δ| ≥ z_{1−α/2}·√(p(1−p)) + z_{power}·√(p₁(1−p₁)),  p₁ = p ± δ,
    solved for δ by bisection. E.g. p = 0.5, n = 85 gives δ ≈ 0.15. None when no δ within [0, 1] is detectable
    (tiny n); p at 0 or 1 is treated as 0.5/n from the edge so the variance is not zero.
    """
    if n < 1:
        return None
    p = min(max(p, 0.5 / n), 1 - 0.5 / n)
    za, zb = _z(1 - alpha / 2), _z(power)
    best = None
    for sign in (1, -1):
        room = (1 - p) if sign > 0 else p
        def detects(d: float, sign: int = sign) -> bool:
            p1 = p + sign * d
            return math.sqrt(n) * d >= za * math.sqrt(p * (1 - p)) + zb * math.sqrt(max(0.0, p1 * (1 - p1)))
        if detects(room):
            d = _bisect(detects, 0.0, room)
            best = d if best is None else min(best, d)
    return best


def mde_paired(n: int, discordance: float, alpha: float = 0.05, power: float = 0.8) -> float | None:
    """Minimum detectable accuracy difference of a paired comparison (McNemar) on n items whose discordance rate
    (share of items where exactly one system is right, ψ = p₁₀ + p₀₁) is `discordance`.

    Connor (1987), "Sample size for testing differences in proportions for the paired-sample design", Biometrics
    43:207–211: with δ = p₀₁ − p₁₀ the two-sided level-alpha McNemar test has the given power when
        n·δ² ≥ (z_{1−α/2}·√ψ + z_{power}·√(ψ − δ²))²,
    solved for δ ∈ (0, ψ] by bisection. More disagreement between the systems (larger ψ) means a larger MDE for the
    same n. None when even δ = ψ (every discordant item going one way) is not detectable, or ψ = 0.
    """
    if n < 1 or discordance <= 0:
        return None
    psi = min(discordance, 1.0)
    za, zb = _z(1 - alpha / 2), _z(power)

    def detects(d: float) -> bool:
        return n * d * d >= (za * math.sqrt(psi) + zb * math.sqrt(max(0.0, psi - d * d))) ** 2

    return _bisect(detects, 0.0, psi) if detects(psi) else None


def _bisect(ok: Callable[[float], bool], low: float, high: float, steps: int = 60) -> float:
    """The smallest x in [low, high] with ok(x), for a predicate that is false at low and true at high (monotone)."""
    for _ in range(steps):
        mid = (low + high) / 2
        low, high = (low, mid) if ok(mid) else (mid, high)
    return high
