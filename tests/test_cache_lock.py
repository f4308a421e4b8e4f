"""Several processes on an empty cache (the ranks of `accelerate launch`): one converts the embedded model, the others
wait on the file lock and load the finished directory."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from medtune.models import embedded_gguf

ROOT = Path(__file__).resolve().parents[1]
CHILD = """
import json, sys, time
from medtune.models import resolve
logs = []
start = time.time()
path = resolve("embedded", log=logs.append)
print(json.dumps({"path": path, "start": start, "end": time.time(), "converted": bool(logs)}))
"""


@pytest.mark.slow  # two processes, one GGUF dequantization of the 135M model: ~30 s
def test_two_processes_on_an_empty_cache_convert_once(tmp_path):
    if embedded_gguf() is None:
        pytest.skip("the embedded model package is not installed")
    cache = tmp_path / "cache"
    env = {**os.environ, "MEDTUNE_CACHE": str(cache), "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1",
           "PYTHONPATH": os.pathsep.join([str(ROOT / "src"), os.environ.get("PYTHONPATH", "")])}
    procs = [subprocess.Popen([sys.executable, "-c", CHILD], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True) for _ in range(2)]
    results = []
    for p in procs:
        out, err = p.communicate(timeout=600)
        assert p.returncode == 0, err[-3000:]
        results.append(json.loads(out.strip().splitlines()[-1]))
    assert [r["converted"] for r in results].count(True) == 1, results  # exactly one process converted
    converter, waiter = sorted(results, key=lambda r: not r["converted"])
    assert waiter["start"] < converter["end"] <= waiter["end"], results  # it really waited for the conversion
    assert converter["path"] == waiter["path"]
    out = Path(converter["path"])
    assert (out / "model.safetensors").is_file() and json.loads((out / "medtune-source.json").read_text())
    assert sorted(p.name for p in cache.iterdir()) == [out.name, out.name + ".lock"]  # no temp dir left behind
