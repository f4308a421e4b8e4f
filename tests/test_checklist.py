"""The reporting checklist (MI-CLEAR-LLM 1-6, TRIPOD-LLM by section) filled from a run directory: from hand-made
files (fast) and from a real tiny `medtune run` (slow), where report.html shows every reviewer section and the
export's model card carries the checklist."""

import hashlib
import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from medtune import checklist
from medtune.cli import app
from medtune.data.items import MCQItem
from medtune.html_report import reviewer_sections

ROOT = Path(__file__).resolve().parents[1]


def _metrics(acc, n=20):
    return {"n": n, "accuracy": acc, "ci95": [acc - 0.1, acc + 0.1]}


def _run_dir(tmp_path: Path) -> tuple[Path, Path]:
    model = tmp_path / "models" / "base"
    model.mkdir(parents=True)
    (model / "model.safetensors").write_bytes(b"weights" * 1000)
    run = tmp_path / "run"
    (run / "adapter").mkdir(parents=True)
    (run / "adapter" / "adapter_model.safetensors").write_bytes(b"lora")
    for part, started in (("base", "2026-12-01T10:00:00Z"), ("tuned", "2026-12-01T10:05:00Z")):
        (run / part).mkdir()
        (run / part / "cost.json").write_text(json.dumps({"started": started}))
    tuned = {"method": "letter-logprob", "mode": "exact", "prompt_style": "harness", "permute": "none",
             "model_path": str(model), "metrics": _metrics(0.6),
             "contamination": {"exact": [{"eval_id": "e1"}], "near": [], "n_eval": 20, "n_train": 80, "ngram": 8}}
    res = {"kind": "run", "config": {"model": str(model), "data": {"seed": 7}, "train": {"seed": 11, "lr": 1e-3},
                                     "lora": {"r": 8, "alpha": 16, "target_modules": ["all-linear"]}},
           "data": {"eval": {"source": "medqa", "split": "test", "n": 20, "ids_sha256": "ab" * 32},
                    "train": {"source": "medqa", "split": "train", "n": 80, "ids_sha256": "cd" * 32}},
           "base": {**tuned, "metrics": _metrics(0.5)}, "tuned": tuned, "train": {"steps": 5},
           "comparison": {"raw": {"diff": 0.1, "diff_ci": [-0.05, 0.25], "mcnemar_p": 0.21}},
           "environment": {"device": "cpu", "device_names": [], "cpu_count": 2, "platform": "Linux", "python": "3.11",
                           "versions": {"torch": "2.5.0", "medtune": "0.1.0"}}, "wall_s": 12.5}
    (run / "results.json").write_text(json.dumps(res))
    return run, model


def test_fields_filled_from_the_run_files(tmp_path):
    run, model = _run_dir(tmp_path)
    item = MCQItem(id="e0", question="Which drug reverses acetaminophen toxicity?",
                   options=("Flumazenil", "N-acetylcysteine", "Naloxone", "Atropine"), answer=1)
    entries = checklist.fill(run, items=[item])
    by = {(e["checklist"], e["item"]): e for e in entries}
    assert [e["item"] for e in entries if e["checklist"] == "MI-CLEAR-LLM"] == ["1", "2", "3", "4", "5", "6"]
    ident = by[("MI-CLEAR-LLM", "1")]["text"]
    assert hashlib.sha256(b"weights" * 1000).hexdigest() in ident and hashlib.sha256(b"lora").hexdigest() in ident
    assert "2026-12-01T10:00:00Z" in ident and "2026-12-01T10:05:00Z" in ident
    assert json.loads((run / "weights_sha256.json").read_text())["model_path"] == str(model)  # cached for re-renders
    stoch = by[("MI-CLEAR-LLM", "2")]["text"]
    assert "no text is sampled" in stoch and "seed 7" in stoch and "seed 11" in stoch
    prompt = by[("MI-CLEAR-LLM", "3")]["text"]
    assert "'harness'" in prompt and "Question: Which drug reverses" in prompt and "B. N-acetylcysteine" in prompt
    independence = by[("MI-CLEAR-LLM", "6")]["text"]
    assert "80 training items: 1 exact and 0 near duplicates" in independence and "medqa (test), n = 20" in independence
    results = next(e for e in entries if e["item"] == "Results")["text"]
    assert "n = 20" in results and "0.600 [0.500, 0.700]" in results and "McNemar exact p = 0.21" in results
    compute = next(e for e in entries if e["item"] == "Methods: compute")["text"]
    assert "torch 2.5.0" in compute and "12.5 s" in compute


def test_author_only_items_are_listed_as_such(tmp_path):
    run, _ = _run_dir(tmp_path)
    entries = checklist.fill(run, items=[])
    author = [e for e in entries if e["status"] == "author"]
    assert {e["item"] for e in author} >= {"5", "Title and abstract", "Introduction", "Methods: ethics",
                                           "Patient and public involvement", "Discussion", "Open science"}
    assert all(checklist.AUTHOR in e["text"] for e in author)
    assert all(e["status"] in ("filled", "author") for e in entries)
    assert "could not be rendered" in next(e for e in entries if e["item"] == "3")["text"]


def test_markdown_section_and_paths_reduced_for_a_public_card(tmp_path):
    run, model = _run_dir(tmp_path)
    md = checklist.markdown(checklist.fill(run, items=[]), public=True)
    assert md.startswith("## Reporting checklist (MI-CLEAR-LLM, TRIPOD-LLM)")
    assert "Korean J Radiol 2024" in md and "Nat Med 2025" in md and "by section" in md
    assert str(tmp_path) not in md and "base model base" in md
    assert str(model) in checklist.markdown(checklist.fill(run, items=[]))  # the local report keeps the path


def test_report_sections_absent_without_their_data():
    assert reviewer_sections({}) == {"audit": None, "subgroups": None, "conformal": None}
    skipped = reviewer_sections({"conformal": {"skipped": "why"}})
    assert skipped["conformal"] == {"skipped": "why"}


@pytest.fixture(scope="module")
def tiny_run(tiny_model_dir, tmp_path_factory) -> Path:
    """The demo recipe on the tiny model with a held-out validation share: audit, subgroups and conformal sets."""
    out = tmp_path_factory.mktemp("checklist") / "run"
    result = CliRunner().invoke(app, [
        "run", "--config", str(ROOT / "recipes" / "demo.yaml"), "--model", tiny_model_dir, "--out", str(out),
        "--set", "train.max_steps=2", "--set", "train.dtype=float32", "--set", "data.limit=10",
        "--set", "eval.audit=true", "--set", "data.validation=16", "--quiet"])
    assert result.exit_code == 0, result.output
    return out


@pytest.mark.slow
def test_real_run_fills_results_report_and_card(tiny_run, tiny_model_dir):
    res = json.loads((tiny_run / "results.json").read_text())
    assert res["audit"]["n"] == 10 and (tiny_run / "tuned-audit" / "predictions.jsonl").is_file()
    assert {"base", "tuned", "before_after"} <= set(res["subgroups"])
    assert sum(r["n"] for r in res["subgroups"]["before_after"]) == 10
    conf = res["conformal"]
    assert conf["alpha"] == 0.1 and conf["n_calibration"] == 16 and conf["lac"]["evaluation"]["n"] == 10
    entries = checklist.fill(tiny_run)
    ident = next(e for e in entries if e["item"] == "1")["text"]
    weights = hashlib.sha256((Path(tiny_model_dir) / "model.safetensors").read_bytes()).hexdigest()
    assert weights in ident
    assert "Question:" in next(e for e in entries if e["item"] == "3")["text"]  # one rendered eval prompt
    assert "0 exact and 0 near duplicates" in next(e for e in entries if e["item"] == "6")["text"]
    page = (tiny_run / "report.html").read_text()
    for anchor in ('id="audit"', 'id="conformal"', 'id="subject-power"', 'id="checklist"'):
        assert anchor in page
    assert "options only (stem removed)" in page and "cannot detect" in page and "LAC" in page
    assert "MI-CLEAR-LLM" in page and "to be completed by the author" in page
    exported = CliRunner().invoke(app, ["export", str(tiny_run), "--no-merge", "--out", str(tiny_run / "card")])
    assert exported.exit_code == 0, exported.output
    card = (tiny_run / "card" / "README.md").read_text()
    assert "## Reporting checklist (MI-CLEAR-LLM, TRIPOD-LLM)" in card and weights in card
