"""Conformal prediction sets: coverage >= 1 - alpha on a synthetic task (LAC, APS, randomized APS), the
finite-sample quantile and the sets by hand, and a calibration split that never touches the evaluation set."""

import math

import numpy as np
import pytest

from medtune.conformal import (
    calibrate,
    calibration_split,
    conformal_summary,
    evaluate_sets,
    from_rows,
    prediction_sets,
    render,
    set_rows,
)
from medtune.data.items import LETTERS, MCQItem
from medtune.errors import MedtuneError

ALPHA = 0.1


def _synthetic(n, seed, sharpen=1.0, k=4):
    """n items with Dirichlet(0.7) option probabilities, gold drawn from them (a calibrated model); `sharpen` > 1
    reports overconfident probabilities p^sharpen (renormalized) while the gold still follows the true ones."""
    rng = np.random.default_rng(seed)
    true = rng.dirichlet([0.7] * k, size=n)
    golds = [int(rng.choice(k, p=p)) for p in true]
    shown = true ** sharpen
    shown /= shown.sum(axis=1, keepdims=True)
    return shown.tolist(), golds


@pytest.mark.parametrize("method,randomized", [("lac", False), ("aps", False), ("aps", True)])
@pytest.mark.parametrize("sharpen", [1.0, 3.0])
def test_coverage_at_least_1_minus_alpha_on_synthetic_task(method, randomized, sharpen):
    cal_p, cal_g = _synthetic(2000, seed=1, sharpen=sharpen)
    ev_p, ev_g = _synthetic(2000, seed=2, sharpen=sharpen)
    cal = calibrate(cal_p, cal_g, ALPHA, method, randomized=randomized, seed=3)
    out = evaluate_sets(ev_p, ev_g, cal)
    # the sampling error of one draw: the evaluation items' and the calibration quantile's, each about √(α(1−α)/n)
    se = math.sqrt(ALPHA * (1 - ALPHA) * (1 / 2000 + 1 / 2000))
    assert out["coverage"] >= 1 - ALPHA - 3 * se
    if method == "lac" or randomized:  # continuous scores: coverage is also at most 1 - alpha + 1/(n+1)
        assert out["coverage"] <= 1 - ALPHA + 1 / 2001 + 3 * se
    assert 0.0 < out["mean_set_size"] < 4.0
    assert sum(out["set_size_counts"].values()) == 2000
    assert out["coverage_ci95"][0] <= out["coverage"] <= out["coverage_ci95"][1]
    assert 0.0 < out["singleton_share"] < 1.0 and out["singleton_accuracy"] > 0.5


@pytest.mark.parametrize("method", ["lac", "aps"])
def test_coverage_averaged_over_many_splits(method):
    """The guarantee is on average over calibration draws: 20 independent draws of 300 + 300 items average to at
    least 1 - alpha within 3 standard errors of that average (√(α(1−α)·(2/300)/20) ≈ 0.0055)."""
    covs = []
    for rep in range(20):
        cal_p, cal_g = _synthetic(300, seed=100 + rep)
        ev_p, ev_g = _synthetic(300, seed=200 + rep)
        covs.append(evaluate_sets(ev_p, ev_g, calibrate(cal_p, cal_g, ALPHA, method))["coverage"])
    se = math.sqrt(ALPHA * (1 - ALPHA) * (2 / 300) / 20)
    assert np.mean(covs) >= 1 - ALPHA - 3 * se


def test_lac_sets_are_smallest_on_average():
    cal_p, cal_g = _synthetic(2000, seed=4)
    ev_p, ev_g = _synthetic(2000, seed=5)
    sizes = {m: evaluate_sets(ev_p, ev_g, calibrate(cal_p, cal_g, ALPHA, m))["mean_set_size"] for m in ("lac", "aps")}
    assert sizes["lac"] <= sizes["aps"]


def test_finite_sample_quantile_rank():
    golds = [0] * 19
    probs = [[1 - s, s] for s in [i / 20 for i in range(19)]]  # LAC scores 1 - p_gold = 0.00, 0.05, ..., 0.90
    cal = calibrate(probs, golds, alpha=0.1, method="lac")
    assert cal["rank"] == 18 and cal["qhat"] == pytest.approx(17 / 20)  # ceil(20 * 0.9) = 18th smallest
    small = calibrate(probs[:5], golds[:5], alpha=0.1, method="lac")
    assert small["rank"] == 6 and small["qhat"] is None  # ceil(6 * 0.9) = 6 > 5: too few items, keep every option
    assert prediction_sets([[0.9, 0.05, 0.05]], small) == [[0, 1, 2]]


def test_sets_by_hand():
    lac = {"method": "lac", "qhat": 0.7, "randomized": False, "seed": 0}
    assert prediction_sets([[0.5, 0.3, 0.15, 0.05], [0.1, 0.2, 0.2, 0.5]], lac) == [[0, 1], [3]]
    aps = {"method": "aps", "qhat": 0.85, "randomized": False, "seed": 0}
    # sorted 0.5 (A), 0.3 (B), 0.15 (C), 0.05 (D): cumulative 0.5, 0.8, 0.95, 1.0 -> A and B within 0.85
    assert prediction_sets([[0.5, 0.3, 0.15, 0.05]], aps) == [[0, 1]]
    # ties break by option index, so the score is well defined: B's score counts A above it
    assert prediction_sets([[0.4, 0.4, 0.2]], {**aps, "qhat": 0.5}) == [[0]]


def test_singleton_accuracy_and_empty_sets_by_hand():
    cal = {"method": "lac", "alpha": 0.1, "qhat": 0.6, "randomized": False, "seed": 0}
    probs = [[0.7, 0.2, 0.1], [0.5, 0.45, 0.05], [0.1, 0.8, 0.1], [0.34, 0.33, 0.33]]
    out = evaluate_sets(probs, [0, 1, 0, 2], cal)  # sets: {A}, {A, B}, {B}, {} (no p >= 0.4)
    assert out["set_size_counts"] == {"0": 1, "1": 2, "2": 1}
    assert out["coverage"] == 0.5 and out["singleton_n"] == 2 and out["singleton_accuracy"] == 0.5
    assert out["empty_share"] == 0.25 and out["mean_set_size"] == 1.0


def test_randomized_aps_is_reproducible_by_seed():
    cal_p, cal_g = _synthetic(300, seed=6)
    a = calibrate(cal_p, cal_g, method="aps", randomized=True, seed=7)
    b = calibrate(cal_p, cal_g, method="aps", randomized=True, seed=7)
    assert a == b and prediction_sets(cal_p[:50], a) == prediction_sets(cal_p[:50], b)
    with pytest.raises(ValueError, match="aps only"):
        calibrate(cal_p, cal_g, method="lac", randomized=True)


def _items(n, prefix="q"):
    return [MCQItem(id=f"{prefix}{k}", question="?", options=("a", "b", "c", "d"), answer=k % 4) for k in range(n)]


def test_calibration_split_is_seeded_disjoint_and_never_the_eval_set():
    pool = _items(100, "train")
    cal, rest = calibration_split(pool, eval_ids={"test1", "test2"}, share=0.3, seed=1)
    assert len(cal) == 30 and len(rest) == 70 and not {x.id for x in cal} & {x.id for x in rest}
    again, _ = calibration_split(list(reversed(pool)), eval_ids=set(), share=0.3, seed=1)
    assert {x.id for x in again} == {x.id for x in cal}  # order of the pool does not matter
    other, _ = calibration_split(pool, eval_ids=set(), share=0.3, seed=2)
    assert {x.id for x in other} != {x.id for x in cal}
    with pytest.raises(MedtuneError, match="also evaluation items"):
        calibration_split(pool + _items(3, "test"), eval_ids={"test1"}, share=0.3)
    rows, _ = calibration_split([{"id": f"r{k}"} for k in range(10)], eval_ids=[], share=0.5)
    assert len(rows) == 5


def _rows(probs, golds, prefix):
    return [{"id": f"{prefix}{k}", "gold": LETTERS[g], "probs": {LETTERS[j]: x for j, x in enumerate(p)}}
            for k, (p, g) in enumerate(zip(probs, golds))]


def test_summary_from_prediction_rows_refuses_eval_rows_in_calibration():
    cal_p, cal_g = _synthetic(500, seed=8)
    ev_p, ev_g = _synthetic(400, seed=9)
    cal_rows, ev_rows = _rows(cal_p, cal_g, "c"), _rows(ev_p, ev_g, "e")
    assert from_rows(cal_rows[:1]) == ([cal_p[0]], [cal_g[0]])
    summary = conformal_summary(cal_rows, ev_rows, alpha=0.2, method="aps")
    assert summary["calibration"]["n"] == 500 and summary["evaluation"]["n"] == 400
    assert summary["evaluation"]["target_coverage"] == pytest.approx(0.8)
    assert "coverage" in render(summary) and "singleton" in render(summary)
    per_item = set_rows(ev_rows, summary["calibration"])
    assert len(per_item) == 400 and per_item[0]["id"] == "e0"
    assert sum(r["covered"] for r in per_item) / 400 == summary["evaluation"]["coverage"]
    assert sum(r["set_size"] for r in per_item) / 400 == pytest.approx(summary["evaluation"]["mean_set_size"])
    with pytest.raises(MedtuneError, match="calibration rows are evaluation rows"):
        conformal_summary(cal_rows, cal_rows[:10])


def test_conformal_verb_calibrates_on_one_eval_and_covers_another(tmp_path, tiny_model_dir):
    """`medtune conformal CAL EVAL`: two real evaluations of one model (a dev-like file and an eval file), sets and
    coverage printed and in --json; a calibration eval on a test split, or of another model, is one line, exit 2."""
    import json
    import shutil

    from typer.testing import CliRunner

    from medtune.cli import app
    from medtune.data.sources import demo_items

    items = demo_items()
    for name, part in (("dev.jsonl", items[:24]), ("eval.jsonl", items[24:40])):
        (tmp_path / name).write_text("".join(json.dumps({"id": it.id, "question": it.question,
                                                         "options": list(it.options), "answer": it.answer}) + "\n"
                                             for it in part))
    runner = CliRunner()
    for name in ("dev", "eval"):
        result = runner.invoke(app, ["eval", "--model", tiny_model_dir, "--data", str(tmp_path / f"{name}.jsonl"),
                                     "--out", str(tmp_path / name), "--quiet", "--mode", "exact"])
        assert result.exit_code == 0, result.output
    result = runner.invoke(app, ["conformal", str(tmp_path / "dev"), str(tmp_path / "eval"), "--json"])
    assert result.exit_code == 0, result.output
    summary = json.loads(result.output)
    cal, ev = summary["calibration"], summary["evaluation"]
    assert cal["n"] == 24 and ev["n"] == 16 and cal["alpha"] == 0.1
    assert 0 <= ev["coverage"] <= 1 and 0 <= ev["mean_set_size"] <= 4
    text = runner.invoke(app, ["conformal", str(tmp_path / "dev"), str(tmp_path / "eval"), "--method", "aps"])
    assert text.exit_code == 0 and "conformal APS, alpha 0.1, calibrated on 24 items: coverage" in text.output
    # calibrating on a test split is refused, as training on one is
    shutil.copytree(tmp_path / "dev", tmp_path / "test")
    rec = json.loads((tmp_path / "test" / "results.json").read_text())
    rec["data"]["source"] = str(tmp_path / "medqa_test.jsonl")
    (tmp_path / "test" / "results.json").write_text(json.dumps(rec))
    refused = runner.invoke(app, ["conformal", str(tmp_path / "test"), str(tmp_path / "eval")])
    assert refused.exit_code == 2 and "test split" in refused.output, refused.output
    # another model's evaluation is refused
    rec = json.loads((tmp_path / "dev" / "results.json").read_text())
    (tmp_path / "dev" / "results.json").write_text(json.dumps({**rec, "model": "someone/else"}))
    refused = runner.invoke(app, ["conformal", str(tmp_path / "dev"), str(tmp_path / "eval")])
    assert refused.exit_code == 2 and "differ in model" in refused.output, refused.output
    # the same items in both: refused (coverage would be circular)
    refused = runner.invoke(app, ["conformal", str(tmp_path / "eval"), str(tmp_path / "eval")])
    assert refused.exit_code == 2 and "calibration rows are evaluation rows" in refused.output, refused.output
