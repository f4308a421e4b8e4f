"""First-hour papercuts (issue 19): `eval --adapter RUN` takes a run dir as `ask` does; `eval --model EXPORT` uses the
export's saved prompt style and training-item record; no library chatter on the terminal."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from medtune.cli import app

ROOT = Path(__file__).resolve().parents[1]


def test_eval_adapter_takes_a_run_dir(tmp_path, monkeypatch, tiny_model_dir):
    from medtune import evaluate

    adapter = tmp_path / "run" / "adapter"
    adapter.mkdir(parents=True)
    (adapter / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA"}))
    (adapter / "adapter_model.safetensors").write_bytes(b"")
    seen = {}

    def fake_run_eval(items, cfg, out, adapter=None, **kw):
        seen["adapter"] = adapter
        return {"metrics": {"n": 0}}, []

    monkeypatch.setattr(evaluate, "run_eval", fake_run_eval)
    monkeypatch.setattr("medtune.cli._print_results", lambda *a, **k: None)
    result = CliRunner().invoke(app, ["eval", "--model", tiny_model_dir, "--data", "demo", "--limit", "1",
                                      "--adapter", str(tmp_path / "run"), "--out", str(tmp_path / "e")])
    assert result.exit_code == 0, result.output
    assert seen["adapter"] == str(adapter)


def test_eval_of_an_export_uses_its_saved_prompt_style(tmp_path, tiny_model_dir):
    from medtune.config import load_config
    from medtune.data import sources
    from medtune.evaluate import run_eval

    export = tmp_path / "merged"
    shutil.copytree(tiny_model_dir, export)
    (export / "medtune.json").write_text(json.dumps({"prompt_style": "seed", "train_ids": []}))
    cfg = load_config(None, [f"model={export}", "device=cpu"])
    notes = []
    results, _ = run_eval(sources.load("demo", "eval")[:2], cfg, None, log=notes.append)
    assert results["prompt_style"] == "seed"
    assert any("prompt style 'seed'" in n for n in notes)
    assert any("contamination" in n or "training-item" in n for n in notes)  # the export's record was read


@pytest.mark.slow  # three fresh processes
def test_no_library_chatter_on_the_terminal(tmp_path, tiny_model_dir):
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    medtune = [sys.executable, "-m", "medtune"]
    commands = [
        [*medtune, "ask", "--model", tiny_model_dir, "--question", "Which?", "-o", "a", "-o", "b", "--json",
         "--max-new-tokens", "2"],
        [*medtune, "eval", "--model", tiny_model_dir, "--data", "demo", "--limit", "2", "--quiet", "--json",
         "--out", str(tmp_path / "e")],
        [*medtune, "train", "--quiet", "--out", str(tmp_path / "t"), "--set", f"model={tiny_model_dir}",
         "--set", "train.max_steps=1", "--set", "train.batch_size=2", "--set", "train.max_length=256",
         "--set", "train.target=answer"],
    ]
    for cmd in commands:
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=tmp_path, timeout=600, check=False)
        assert proc.returncode == 0, proc.stderr[-2000:]
        assert proc.stderr.strip() == "", f"{cmd[3]} printed on stderr:\n{proc.stderr[-2000:]}"
