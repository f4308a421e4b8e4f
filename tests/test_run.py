"""The main job end to end on a tiny model: base eval -> train -> tuned eval -> paired comparison, and the files."""

import json
from pathlib import Path

from typer.testing import CliRunner

from medtune.cli import app

ROOT = Path(__file__).resolve().parents[1]


def test_run_demo_recipe_end_to_end(tiny_model_dir, tmp_path, monkeypatch):
    import transformers

    loads = []
    real = transformers.AutoModelForCausalLM.from_pretrained
    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained",
                        lambda *a, **k: loads.append(a) or real(*a, **k))
    out = tmp_path / "run"
    result = CliRunner().invoke(app, [
        "run", "--config", str(ROOT / "recipes" / "demo.yaml"), "--model", tiny_model_dir, "--out", str(out),
        "--set", "train.max_steps=2", "--set", "train.dtype=float32", "--set", "eval.extra_methods=[letter]",
        "--set", "data.limit=12", "--quiet"])
    assert result.exit_code == 0, result.output
    assert len(loads) == 1  # base weights read once: base evals (2 methods), training and tuned evals share them
    res = json.loads((out / "results.json").read_text())
    assert res["base"]["metrics"]["n"] == res["tuned"]["metrics"]["n"] == 12
    assert res["base"]["method"] == "answer-logprob" and "letter" in res["extra_methods"]
    comp = res["comparison"]["raw"]
    tuned_right = sum(json.loads(x)["correct"] for x in (out / "tuned" / "predictions.jsonl").read_text().splitlines())
    assert comp["acc_b"] == tuned_right / 12 and 0 <= comp["mcnemar_p"] <= 1
    assert "debiased" in res["comparison"] and res["tuned"]["contamination"]["exact"] == []
    # the demo recipe holds 16 of its 128 training items out for validation (data.validation)
    assert res["data"]["train"]["n"] == 112 and res["data"]["validation"]["n"] == 16 and res["train"]["steps"] == 2
    for name in ("config.yaml", "metrics.jsonl", "adapter/adapter_model.safetensors", "adapter/medtune.json",
                 "base/predictions.jsonl", "tuned/results.json", "base-letter/results.json"):
        assert (out / name).is_file(), name
    assert "before / after" in result.output and "McNemar exact p" in result.output
    assert "Research and education only" in result.output
