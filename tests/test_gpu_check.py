"""benchmarks/gpu_check.sh --tiny: every step of the GPU check runs at toy sizes on this machine's device and writes
the summary and figures it promises."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow  # seven steps at toy sizes: hardware tests, training benchmark, eval, a 4-bit step, every verb,
# the memory comparison (medtune's side) and a parity certificate
def test_gpu_check_tiny(tmp_path, tiny_model_dir, shared_data):
    pytest.importorskip("bitsandbytes")
    env = {**os.environ, "OUT": str(tmp_path / "out"), "PY": sys.executable, "MODEL": tiny_model_dir,
           "DATA": str(shared_data), "OMP_NUM_THREADS": "2"}
    proc = subprocess.run(["bash", str(ROOT / "benchmarks" / "gpu_check.sh"), "--tiny"], check=False,
                          capture_output=True, text=True, timeout=1800, cwd=tmp_path, env=env)
    summary = json.loads((tmp_path / "out" / "gpu_check.json").read_text())
    assert proc.returncode == 0 and summary["passed"], (proc.stderr[-3000:], summary)
    assert [s["step"] for s in summary["steps"]] == ["tests", "train", "eval", "qlora", "verbs", "memory", "parity"]
    out = tmp_path / "out"
    train = json.loads((out / "gpu_train.json").read_text())
    assert set(train["variants"]) == {"seed", "medtune"} and train["variants"]["medtune"]["tokens_per_s"] > 0
    results = json.loads((out / "eval-medqa" / "results.json").read_text())
    assert results["metrics"]["n"] == 8 and results["wall_s"] > 0
    [row] = [json.loads(x) for x in (out / "qlora" / "metrics.jsonl").read_text().splitlines()]
    assert row["step"] == 1 and row["loss"] == pytest.approx(row["loss"])  # one finite 4-bit step
    assert (out / "qlora" / "adapter" / "adapter_model.safetensors").is_file()
    assert summary["device"]["kind"] and "qlora" in summary["device"]
    verbs = json.loads((out / "verbs" / "gpu_verbs.json").read_text())
    assert set(verbs["verbs"]) == {"eval", "ask", "predict", "serve", "train", "run", "export"} and verbs["passed"]
    assert all(v["placement"] for v in verbs["verbs"].values())  # each verb recorded where its weights sat
    memory = json.loads((out / "memory" / "memory_fit.json").read_text())
    assert set(memory["runs"]) == {"eval", "train", "run"} and memory["ratios"]["run_vs_train"] > 0
    certificate = json.loads((out / "parity" / "certificate.json").read_text())
    assert certificate["n"] == 8 and certificate["verdict"] in ("pass", "fail")
