"""benchmarks/gpu_train.py --tiny: the GPU throughput benchmark's own code path, on a tiny Qwen3 on the CPU."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from medtune.config import Config

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow  # ~10 s on an idle 2-core machine (two variants, two model builds), over 20 s when it is busy
def test_tiny_benchmark_runs_both_variants(tmp_path):
    out = tmp_path / "gpu_train.json"
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "gpu_train.py"), "--tiny", "--device", "cpu",
                           "--json", str(out)], check=False, capture_output=True, text=True, timeout=600,
                          cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(out.read_text())
    assert result["backend"] == "cpu"  # cpu-only: asked for with --device cpu above, so every host runs this path
    assert result["sequences"] == 40 and result["epochs"] == 1
    assert result["peak_flops"] is None  # no table entry for a CPU, and no --peak-tflops
    seed, mine = result["variants"]["seed"], result["variants"]["medtune"]
    for row in (seed, mine):
        assert row["tokens_per_s"] > 0 and row["wall_s"] > 0 and row["steps"] > 0
        assert "mfu" in row and (row["mfu"] is None or isinstance(row["mfu"], float))
        assert row["peak_memory_bytes"] is None  # CPU: no device allocator to read
        assert row["final_loss"] == pytest.approx(row["final_loss"])  # finite, not NaN
    # the same sequences go through both: every real token once per epoch
    assert seed["real_tokens"] == mine["real_tokens"] == result["length_stats"]["tokens"]
    assert mine["pad_share"] < seed["pad_share"]  # length-grouped batches pad less than shuffled ones
    assert seed["steps"] == 3 and mine["steps"] == 5  # 40 / (4 x 4) rounded up; 40 / 8
    defaults = Config()
    assert mine["settings"]["r"] == defaults.lora.r and mine["settings"]["targets"] == defaults.lora.target_modules
    assert mine["settings"]["batch_size"] == defaults.train.batch_size
    assert seed["settings"]["r"] == 8 and seed["settings"]["targets"] == ["q_proj", "v_proj"]
    assert mine["trainable_params"] > seed["trainable_params"]  # all-linear r=16 against q,v r=8
    assert result["speedup_tokens_per_s"] > 0
