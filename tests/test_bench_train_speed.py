"""benchmarks/train_speed.py runs end to end on a tiny random model and writes the JSON its README section promises;
its baseline text is the seed project's format."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "train_speed.py"


def load_script():
    import importlib.util

    spec = importlib.util.spec_from_file_location("train_speed", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_seed_text_format():
    from medtune.data.items import MCQItem
    from medtune.prompts import build_prompt, build_target

    bench = load_script()
    item = MCQItem(id="x", question="Q?", options=("a", "b", "c", "d"), answer=2, explanation=None)
    expected = ("### Question:\nQ?\n\n### Options:\nA) a\nB) b\nC) c\nD) d\n\n### Answer:\nC) c\n\n"
                "### Explanation:\nNo explanation provided.")
    assert bench.seed_text(item) == expected == build_prompt(item, "seed") + build_target(item, "seed")


def test_measure_skips_warmup_step():
    bench = load_script()
    r = bench.measure("v", 3, 0.0, [10.0, 12.0, 14.0], [100, 300, 500], {})
    assert r["measured_steps"] == 2 and r["sec_per_step"] == 2.0 and r["tokens_per_s"] == 100.0
    r = bench.measure("v", 2, 1.0, [5.0, 9.0], [100, 300], {})
    assert r["measured_steps"] == 2 and r["sec_per_step"] == 4.0 and r["tokens_per_s"] == 37.5


@pytest.mark.slow
def test_tiny_run_writes_both_variants(tmp_path, shared_data):
    data = shared_data / "medmcqa" / "dev.jsonl"
    if not data.is_file():
        pytest.skip(f"{data} is missing")
    out = tmp_path / "train_speed.json"
    cmd = [sys.executable, str(SCRIPT), "--tiny", "--steps", "2", "--data", str(data), "--out", str(out)]
    proc = subprocess.run(cmd, check=False, cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(out.read_text())
    assert set(result["variants"]) == {"baseline", "medtune", "medtune-nogc"}
    for v in result["variants"].values():
        run = v["runs"][0]
        assert run["steps"] == 2 and v["tokens_per_s"] > 0 and v["peak_rss_mb"] > 0 and v["sec_per_step"] > 0
        assert run["lora_b_updated"] == 1.0  # gradients reached every adapter (step 2 has lr > 0)
    assert result["variants"]["baseline"]["runs"][0]["loss_on"] == "all tokens"
    assert result["variants"]["medtune"]["runs"][0]["gradient_checkpointing"] is True
    assert result["variants"]["medtune-nogc"]["runs"][0]["gradient_checkpointing"] is False
    assert result["ratios"] == result["ratios_by_variant"]["medtune"]
    for q in result["ratios_by_variant"].values():
        assert q["tokens_per_s"] > 0 and q["sec_per_step"] > 0 and q["peak_rss"] > 0
