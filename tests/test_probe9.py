"""Probe 9's leftovers (docs/reliability.md §4j): a Hub model id while the Hub cannot be reached (E07), the cost of a
resumed training run (V12), and an API call with the wrong number of inputs to the web demo."""

import json
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from typer.testing import CliRunner

from medtune.cli import app

ROOT = Path(__file__).parents[1]
MEDQA = {"question": "Which drug treats it?", "options": {"A": "Gentamicin", "B": "Ciprofloxacin", "C": "Ceftriaxone",
                                                        "D": "Trimethoprim"}, "answer_idx": "C", "meta_info": "step1"}


def _hub_down_env(tmp_path: Path) -> dict:
    """The Hub at an address where nothing listens (refused at once), an HF_HOME of our own, online by the flags."""
    env = {**os.environ, "HF_ENDPOINT": "http://127.0.0.1:9", "HF_HOME": str(tmp_path / "hf"),
           "PYTHONPATH": str(ROOT / "src")}
    for key in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE", "HTTPS_PROXY", "https_proxy",
                "ALL_PROXY", "all_proxy"):
        env.pop(key, None)
    return env


def _medtune(args: list[str], env: dict) -> tuple[int, str, float]:
    start = time.monotonic()
    done = subprocess.run([sys.executable, "-m", "medtune", *args], env=env, check=False, capture_output=True,
                          text=True, timeout=300, cwd=ROOT)
    return done.returncode, (done.stdout + done.stderr).strip(), time.monotonic() - start


@pytest.fixture(scope="module")
def tarpit():
    """A server that accepts connections and never answers."""
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(16)
    yield f"http://127.0.0.1:{server.getsockname()[1]}"
    server.close()


def _unreachable(kind: str, env: dict, tarpit: str) -> str:
    """The Hub made unreachable three ways; the address the error line names."""
    if kind == "tarpit":  # connects, never answers: huggingface_hub waited on it for minutes
        env["HF_ENDPOINT"] = tarpit
        return "127.0.0.1: timed out"
    if kind == "dead proxy":  # a proxy that refuses: the retries came back (a connection test skipped proxies)
        env["HF_ENDPOINT"], env["HTTPS_PROXY"], env["HTTP_PROXY"] = "https://huggingface.co", "http://127.0.0.1:9", \
            "http://127.0.0.1:9"
        return "huggingface.co:"
    return "127.0.0.1: Connection refused"


@pytest.mark.parametrize("verb,kind", [("eval", "refused"), ("train", "refused"), ("eval", "tarpit"),
                                       ("eval", "dead proxy")])
def test_unreachable_hub_model_id_is_one_line_in_seconds(tmp_path, verb, kind, tarpit):
    data = tmp_path / "d.jsonl"
    data.write_text(json.dumps(MEDQA) + "\n" + json.dumps({**MEDQA, "question": "And which one here?"}) + "\n")
    env = _hub_down_env(tmp_path)
    cause = _unreachable(kind, env, tarpit)
    args = ["--model", "org/no-such-model", "--data", str(data)] if verb == "eval" else \
        ["--set", "model=org/no-such-model", "--set", f"data.source={data}"]
    rc, out, seconds = _medtune([verb, *args, "--out", str(tmp_path / "o")], env)
    assert rc == 2 and len(out.splitlines()) == 1, out  # was ~22 lines of huggingface_hub retries over ~50 s
    assert out.startswith("error: org/no-such-model: not in the local Hugging Face cache, and the Hub cannot be "
                          f"reached ({cause}"), out  # train said "cannot load its tokenizer ... save it beside"
    assert seconds < 40
    assert not (tmp_path / "o").exists()


def _cache_hub_model(tmp_path: Path, model_dir: str) -> None:
    """`model_dir` in tmp_path's HF_HOME cache as the Hub model org/tiny, laid out as huggingface_hub writes it."""
    repo = tmp_path / "hf" / "hub" / "models--org--tiny"
    revision = "0" * 40
    shutil.copytree(model_dir, repo / "snapshots" / revision)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(revision)


@pytest.mark.parametrize("kind", ["refused", "tarpit"])
def test_unreachable_hub_model_in_the_cache_loads_from_it_quietly(tmp_path, tiny_model_dir, kind, tarpit):
    """A Hub id already in HF_HOME's cache: loaded from there at once, with no retry lines, while the Hub is down."""
    _cache_hub_model(tmp_path, tiny_model_dir)
    data = tmp_path / "d.jsonl"
    data.write_text(json.dumps(MEDQA) + "\n")
    env = _hub_down_env(tmp_path)
    _unreachable(kind, env, tarpit)
    rc, out, seconds = _medtune(["eval", "-q", "--model", "org/tiny", "--data", str(data), "--out", str(tmp_path / "o")],
                                env)
    assert rc == 0, out
    assert "Retrying" not in out and "thrown while requesting" not in out, out
    assert json.loads((tmp_path / "o" / "results.json").read_text())["model"] == "org/tiny"
    assert seconds < 60


def test_training_a_cached_hub_model_with_the_hub_down_prints_its_result_line_only(tmp_path, tiny_model_dir):
    """PEFT's adapter save asked the Hub for the base's config.json (to decide on saving embeddings): 2 warning lines."""
    _cache_hub_model(tmp_path, tiny_model_dir)
    data = tmp_path / "d.jsonl"
    data.write_text("".join(json.dumps({**MEDQA, "question": f"Question {k}?"}) + "\n" for k in range(8)))
    rc, out, _ = _medtune(["train", "-q", "--out", str(tmp_path / "o"), "--set", "model=org/tiny", "--set",
                           f"data.source={data}", "--set", "train.max_steps=1", "--set", "train.dtype=float32",
                           "--set", "device=cpu"], _hub_down_env(tmp_path))
    assert rc == 0 and len(out.splitlines()) == 1 and out.startswith("trained 1 steps"), out


# --- V12: the cost of a resumed training run is the whole run's -------------------------------------------------------

def test_resumed_training_cost_counts_every_session(tiny_model_dir, tmp_path):
    from test_resume import cfg_for, items

    from medtune import checkpoint
    from medtune import train as train_mod

    cfg = cfg_for(tiny_model_dir, tmp_path, **{"train.max_steps": 4, "train.save_every": 2})
    train_mod.train(cfg, items(), tmp_path, quiet=True, log=lambda *_: None)
    whole = json.loads((tmp_path / "cost.json").read_text())
    assert whole["sessions"] == 1 and whole["steps"] == 4 and whole["resumed_from_step"] == 0
    # as if the run had been killed after its step-2 checkpoint, having spent 100 s before it
    shutil.rmtree(tmp_path / "checkpoints" / "step-0000004")
    shutil.rmtree(tmp_path / "adapter")
    state_file = tmp_path / "checkpoints" / "step-0000002" / "state.json"
    state = json.loads(state_file.read_text())
    assert state["cost"]["sessions"] == 1 and 0 < state["cost"]["wall_s"] <= whole["wall_s"]
    state["cost"]["wall_s"] = 100.0
    state_file.write_text(json.dumps(state))
    train_mod.train(cfg, items(), tmp_path, resume=True, quiet=True, log=lambda *_: None)
    resumed = json.loads((tmp_path / "cost.json").read_text())
    assert resumed["sessions"] == 2 and resumed["steps"] == 4 and resumed["resumed_from_step"] == 2
    assert resumed["wall_s"] > 100.0  # was this session's seconds only
    assert resumed["train_tokens"] == whole["train_tokens"]
    # a --resume of the finished run trains nothing and leaves the run's cost as it is (it added a session and ~4 s)
    said = []
    train_mod.train(cfg, items(), tmp_path, resume=True, quiet=True, log=said.append)
    assert json.loads((tmp_path / "cost.json").read_text()) == resumed
    assert said[-1].startswith("nothing to train: the run had finished at step 4"), said
    # cost entries edited into nonsense, or beyond what cost.json may hold (the reader refused 1e300 s that train
    # wrote), count as unknown: said in cost.json, in `medtune cost` and in the report, never a guess or a traceback
    (tmp_path / "cost.json").unlink()
    last = checkpoint.latest(tmp_path) / "state.json"
    kept = json.loads(last.read_text())
    for bad in ({"wall_s": "x"}, {**kept["cost"], "wall_s": 1e300}, {**kept["cost"], "sessions": 1e308}, [1], None):
        last.write_text(json.dumps({**kept, "cost": bad}))
        train_mod.train(cfg, items(), tmp_path, resume=True, quiet=True, log=lambda *_: None)
        unknown = json.loads((tmp_path / "cost.json").read_text())
        assert unknown["sessions"] is None and "not included" in unknown["earlier_sessions"], bad
        assert unknown["wall_s"] < 100 and unknown["started"] != kept["cost"]["started"]
        (tmp_path / "cost.json").unlink()
    last.write_text(json.dumps({**kept, "cost": {**kept["cost"], "sessions": 1}}))
    train_mod.train(cfg, items(), tmp_path, resume=True, quiet=True, log=lambda *_: None)
    kept_start = json.loads((tmp_path / "cost.json").read_text())
    assert kept_start["started"] == kept["cost"]["started"] == whole["started"] and kept_start["sessions"] == 2
    last.write_text(json.dumps({**kept, "cost": None}))
    (tmp_path / "cost.json").unlink()
    train_mod.train(cfg, items(), tmp_path, resume=True, quiet=True, log=lambda *_: None)
    result = CliRunner().invoke(app, ["cost", str(tmp_path), "--price-per-hour", "2"])
    assert result.exit_code == 0 and "earlier sessions is not medtune's: their cost is not included" in result.output, \
        result.output


def test_resumed_cost_sums_energy_and_says_when_an_earlier_session_had_no_counter():
    from types import SimpleNamespace

    from medtune.cost import Recorder

    counted = {"energy_source": "rapl", "energy_j": 5.0, "energy_note": "whole-device counters"}
    recorder = Recorder("train")
    recorder.meter = SimpleNamespace(stop=lambda: counted)
    recorder.resumed({"wall_s": 10.0, "energy_j": 7.5, "sessions": 2, "started": "2026-12-01T00:00:00Z"})
    both = recorder.so_far()
    assert both["energy_j"] == 12.5 and both["sessions"] == 3 and both["wall_s"] >= 10.0
    assert both["started"] == "2026-12-01T00:00:00Z" and both["energy_note"] == "whole-device counters"
    recorder.resumed({"wall_s": 10.0, "energy_j": None, "sessions": 1})
    gap = recorder.so_far()
    assert gap["energy_j"] is None and "earlier session of this run had no energy counter" in gap["energy_note"]
