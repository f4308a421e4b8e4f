"""medtune's exact mode against numbers lm-evaluation-harness 0.4.13 computed itself (tests/fixtures/lmeval/, made by
benchmarks/lmeval_fixtures.py): the same items of MedQA, MedMCQA, PubMedQA and MMLU, on the embedded model and with a
LoRA adapter. Per-option log-likelihoods agree within 1e-3 and predictions are identical except ties within 1e-4."""

import json
from pathlib import Path

import pytest
from conftest import SHARED

from medtune.data.formats import read_file
from medtune.models import load_model
from medtune.scoring import argmax, margin_of, score_items

FIXTURES = Path(__file__).parent / "fixtures" / "lmeval"
BENCHMARKS = ("medqa", "medmcqa", "pubmedqa", "mmlu")
TOL, TIE = 1e-3, 1e-4


@pytest.fixture(scope="module")
def models():
    if not (SHARED / "medqa" / "test.jsonl").is_file():
        pytest.skip("../shared/data is not beside the checkout")
    quiet = {"log": lambda *_: None}
    # what `medtune eval --mode exact` loads: fp32, the adapter merged in (eval.merge_adapter defaults to true)
    return {"base": load_model("embedded", **quiet)[:2],
            "adapter": load_model("embedded", adapter=str(FIXTURES / "adapter"), merge=True, **quiet)[:2]}


def _items(fixture: dict):
    files = [SHARED / f for f in fixture["files"]]
    items = [it for f in files for it in read_file(f, cop_base=1 if fixture["benchmark"] == "medmcqa" else None)]
    picked = [items[e["index"]] for e in fixture["items"]]
    assert [it.id for it in picked] == [e["id"] for e in fixture["items"]]
    assert [it.answer for it in picked] == [e["gold"] for e in fixture["items"]]
    return picked


@pytest.mark.slow
@pytest.mark.parametrize("benchmark", BENCHMARKS)
def test_exact_mode_matches_lmeval(models, benchmark):
    fixture = json.loads((FIXTURES / f"{benchmark}.json").read_text())
    items = _items(fixture)
    assert len(items) >= 25
    for label, (model, tokenizer) in models.items():
        rows = score_items(model, tokenizer, items, "harness", mode="exact", batch_size=8)
        worst = 0.0
        for entry, row in zip(fixture["items"], rows):
            theirs, ours = entry[label], list(row["logprobs"].values())
            assert len(theirs) == len(ours), entry["id"]
            worst = max(worst, *(abs(a - b) for a, b in zip(theirs, ours)))
            if margin_of(theirs) >= TIE:
                assert "ABCDEFGHIJ"[argmax(theirs)] == row["pred"], (label, entry["id"])
        assert worst <= TOL, (label, worst)


def test_fixtures_hold_numbers_not_text():
    """ids, indices and log-likelihoods only; the adapter's predictions vary (it is not a no-op)."""
    preds = set()
    for benchmark in BENCHMARKS:
        fixture = json.loads((FIXTURES / f"{benchmark}.json").read_text())
        for entry in fixture["items"]:
            assert set(entry) == {"index", "id", "gold", "base", "adapter"}
            assert all(isinstance(x, float) for x in entry["base"] + entry["adapter"])
        preds |= {argmax(e["adapter"]) for e in fixture["items"] if len(e["adapter"]) == 4}
    assert len(preds) > 1
    assert sorted(p.name for p in (FIXTURES / "adapter").iterdir()) == ["adapter_config.json",
                                                                         "adapter_model.safetensors"]
