"""Export: a merged model scores exactly like base + adapter; the card carries front matter, provenance, the recipe,
the evaluation and the disclaimer; an unmerged export stays a loadable adapter; bad inputs are refused."""

import json
import random
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from medtune.config import load_config
from medtune.data.items import MCQItem
from medtune.errors import MedtuneError
from medtune.export import export
from medtune.models import load_model
from medtune.report import DISCLAIMER, metrics
from medtune.scoring import encode, predictions, score
from medtune.train import train


def items(n, seed=0):
    rng = random.Random(seed)
    colours = ["red", "green", "blue", "cyan", "pink", "gray", "gold"]
    return [MCQItem(id=f"x{seed}-{k}", question=f"Which colour is item {k}?", answer=k % 4, subject="s",
                    options=tuple(f"option {w}" for w in rng.sample(colours, 4)), explanation=f"Item {k} is so.")
            for k in range(n)]


@pytest.fixture(scope="module")
def run_dir(tiny_model_dir, tmp_path_factory) -> Path:
    """A run dir with a tiny adapter trained a few steps at a high lr (so the LoRA B matrices are far from zero)."""
    out = tmp_path_factory.mktemp("run")
    cfg = load_config(None, [f"model={tiny_model_dir}", "device=cpu", f"out_dir={out}", "train.dtype=float32",
                             "train.max_steps=3", "train.lr=1e-2", "train.batch_size=4", "train.max_length=96",
                             "train.warmup=0", "lora.r=4", "lora.alpha=8"])
    train(cfg, items(12), out, quiet=True, log=lambda *_: None)
    return out


def _scores(model, tokenizer, its):
    return score(model, encode(its, "harness", tokenizer), batch_size=4, mode="exact")[0]


def test_merged_model_scores_like_base_plus_adapter(run_dir, tiny_model_dir):
    lora_b = [t for k, t in load_file(str(run_dir / "adapter" / "adapter_model.safetensors")).items() if "lora_B" in k]
    assert lora_b and all(t.abs().max() > 1e-3 for t in lora_b)  # the adapter really changes the model

    merged = export(run_dir, log=lambda *_: None)
    assert merged == run_dir / "merged"
    assert (merged / "model.safetensors").is_file() and not (merged / "adapter_config.json").exists()
    assert not list(run_dir.glob(".merged*"))  # the temporary dir was renamed away
    assert (merged / "tokenizer_config.json").is_file()

    test_items = items(6, seed=1)
    peft_model, peft_tok, _ = load_model(tiny_model_dir, adapter=str(run_dir / "adapter"), log=lambda *_: None)
    merged_model, merged_tok, _ = load_model(str(merged), log=lambda *_: None)
    base_model, base_tok, _ = load_model(tiny_model_dir, log=lambda *_: None)
    want, got = _scores(peft_model, peft_tok, test_items), _scores(merged_model, merged_tok, test_items)
    base = _scores(base_model, base_tok, test_items)
    assert torch.allclose(torch.tensor(got), torch.tensor(want), atol=1e-4)
    assert [r["pred"] for r in predictions(test_items, got)] == [r["pred"] for r in predictions(test_items, want)]
    assert not torch.allclose(torch.tensor(base), torch.tensor(want), atol=1e-3)  # so the comparison means something

    meta = json.loads((merged / "medtune.json").read_text())
    assert meta["export"]["merged"] is True and meta["export"]["run"] == run_dir.name  # no local paths
    assert meta["export"]["base_model"] == Path(tiny_model_dir).name and meta["prompt_style"] == "harness"
    assert len(meta["train_ids"]) == 12 and "train_items" not in meta  # ids, not the training texts


def test_card_front_matter_sections_and_disclaimer(run_dir, tiny_model_dir):
    card = (export(run_dir, log=lambda *_: None, overwrite=True) / "README.md").read_text()
    assert card.startswith("---\n")
    front = yaml.safe_load(card.split("---\n")[1])
    assert front["library_name"] == "transformers" and front["tags"] == ["medical", "multiple-choice", "lora", "medtune"]
    assert "license" not in front and "base_model" not in front  # a local base dir is not a Hub id
    assert f"local directory {Path(tiny_model_dir).name}" in card and tiny_model_dir not in card
    for heading in ("## Model", "## Training data", "## Recipe", "## Evaluation", "## Intended use", "## Limitations"):
        assert heading in card
    assert DISCLAIMER in card
    assert "r = 4, alpha = 8" in card and "Training items: 12" in card
    assert "Not evaluated" in card
    assert "Question: {question}\nA. {option A}" in card and "Answer:" in card  # the prompt template
    recipe = card.split("```yaml\n")[1].split("```")[0]
    assert yaml.safe_load(recipe)["lora"]["r"] == 4


def test_card_reports_results_json(run_dir, tiny_model_dir, tmp_path):
    """With RUN/results.json (written here from real scores through report.metrics and run.compare)."""
    from medtune.run import compare

    test_items = items(8, seed=2)
    rows = {}
    for label, adapter in (("base", None), ("tuned", str(run_dir / "adapter"))):
        model, tok, _ = load_model(tiny_model_dir, adapter=adapter, log=lambda *_: None)
        rows[label] = predictions(test_items, _scores(model, tok, test_items))
    res = {k: {"metrics": metrics(test_items, r), "method": "letter-logprob", "mode": "exact", "prompt_style": "harness"}
           for k, r in rows.items()}
    results = {"kind": "run", "base": res["base"], "tuned": res["tuned"],
               "data": {"eval": {"source": "colours:eval", "n": 8, "ids_sha256": "abc"}},
               "comparison": compare(test_items, res["base"], res["tuned"], rows["base"], rows["tuned"])}
    (run_dir / "results.json").write_text(json.dumps(results))
    try:
        card = (export(run_dir, tmp_path / "out", log=lambda *_: None) / "README.md").read_text()
    finally:
        (run_dir / "results.json").unlink()
    m = res["tuned"]["metrics"]
    assert f"| tuned | 8 | {m['accuracy']:.3f} [{m['ci95'][0]:.3f}, {m['ci95'][1]:.3f}] |" in card
    assert f"{m['letters']['majority_baseline']:.3f}" in card
    assert f"McNemar exact p = {results['comparison']['raw']['mcnemar_p']:.4g}" in card
    assert "Not evaluated" not in card


def test_unmerged_export_is_a_loadable_adapter(run_dir, tiny_model_dir, tmp_path):
    out = export(run_dir, tmp_path / "adapter-export", merge=False, log=lambda *_: None)
    assert (out / "adapter_config.json").is_file() and (out / "adapter_model.safetensors").is_file()
    front = yaml.safe_load((out / "README.md").read_text().split("---\n")[1])
    assert front["library_name"] == "peft"
    meta = json.loads((out / "medtune.json").read_text())
    assert meta["export"]["merged"] is False and meta["prompt_style"] == "harness"
    model, tok, _ = load_model(tiny_model_dir, adapter=str(out), log=lambda *_: None)
    ref, ref_tok, _ = load_model(tiny_model_dir, adapter=str(run_dir / "adapter"), log=lambda *_: None)
    its = items(3, seed=3)
    assert _scores(model, tok, its) == _scores(ref, ref_tok, its)


def test_missing_adapter_and_unsafe_targets_are_refused(run_dir, tmp_path):
    with pytest.raises(MedtuneError, match="no trained adapter"):
        export(tmp_path / "empty-run", log=lambda *_: None)
    with pytest.raises(MedtuneError, match="would overwrite"):
        export(run_dir, run_dir / "adapter", merge=False, log=lambda *_: None)
    stranger = tmp_path / "mine"
    stranger.mkdir()
    (stranger / "notes.txt").write_text("keep me")
    with pytest.raises(MedtuneError, match="already exists and is not empty"):
        export(run_dir, stranger, merge=False, log=lambda *_: None)
    assert (stranger / "notes.txt").read_text() == "keep me"


def test_export_carries_no_training_text_and_no_local_paths(run_dir, tiny_model_dir, tmp_path):
    """Grep every file of both export kinds for the training texts and for this machine's directories."""
    texts = [t for it in items(12) for t in (it.question, it.explanation)]
    local = [str(run_dir.resolve()), str(Path(tiny_model_dir).resolve()), str(Path.home()), str(tmp_path.parent)]
    for merge in (True, False):
        out = export(run_dir, tmp_path / f"export-{merge}", merge=merge, log=lambda *_: None)
        for f in out.rglob("*"):
            data = f.read_bytes()
            assert not [t for t in texts if t.encode() in data], f
            assert not [p for p in local if p.encode() in data], f
        card = (out / "README.md").read_text()
        assert f'from_pretrained("{Path(tiny_model_dir).name}")' in card or merge  # the base by name, not by path
        peft_cfg = out / "adapter_config.json"
        if peft_cfg.is_file():
            assert json.loads(peft_cfg.read_text())["base_model_name_or_path"] == Path(tiny_model_dir).name


def test_contamination_check_works_from_hashes_on_adapter_and_export(run_dir, tmp_path):
    from dataclasses import replace

    from medtune.data.split import overlap
    from medtune.evaluate import contamination_check

    train = items(12)
    near = replace(train[1], id="near", question=train[1].question + " Think.", options=("a", "b", "c", "d"))
    fresh = items(3, seed=7)
    probe = [train[0], near, *[replace(f, id=f"new{k}", question=f"Name a shade for case {k}.")
                               for k, f in enumerate(fresh)]]
    out = export(run_dir, tmp_path / "exp", merge=False, log=lambda *_: None)
    for where in (run_dir / "adapter", out):
        found = contamination_check(probe, str(where), lambda *_: None)
        assert [x["eval_id"] for x in found["exact"]] == [train[0].id] and found["exact"][0]["train_ids"] == ["x0-0"]
        assert found == overlap(train, probe)  # what the training texts themselves would give


def test_training_items_ship_only_on_request(run_dir, tmp_path):
    plain = export(run_dir, tmp_path / "plain", merge=False, log=lambda *_: None)
    assert not (plain / "train_items.jsonl").exists()
    shipped = export(run_dir, tmp_path / "shipped", merge=False, log=lambda *_: None, include_training_data=True)
    rows = [json.loads(x) for x in (shipped / "train_items.jsonl").read_text().splitlines()]
    assert [r["question"] for r in rows] == [i.question for i in items(12)]
    assert json.loads((shipped / "medtune.json").read_text())["export"]["train_items_file"] == "train_items.jsonl"


def test_merged_export_refused_on_a_full_disk(run_dir, tmp_path, monkeypatch):
    import shutil

    usage = shutil.disk_usage(tmp_path)
    monkeypatch.setattr(shutil, "disk_usage", lambda p: usage._replace(free=1 << 20))
    with pytest.raises(MedtuneError, match=r"not enough disk space for the merged model .*needs about .*1\.0 MiB free"):
        export(run_dir, tmp_path / "merged", log=lambda *_: None)
    assert not list(tmp_path.iterdir())  # nothing half-written
