"""Probe 9's leftovers (docs/reliability.md §4j): a Hub model id while the Hub cannot be reached (E07), the cost of a
resumed training run (V12), and an API call with the wrong number of inputs to the web demo."""

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

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


def test_unreachable_hub_model_id_is_one_line_in_seconds(tmp_path):
    data = tmp_path / "d.jsonl"
    data.write_text(json.dumps(MEDQA) + "\n")
    rc, out, seconds = _medtune(["eval", "--model", "org/no-such-model", "--data", str(data), "--out",
                                 str(tmp_path / "o")], _hub_down_env(tmp_path))
    assert rc == 2 and len(out.splitlines()) == 1, out  # was ~22 lines of huggingface_hub retries over ~50 s
    assert out.startswith("error: org/no-such-model: not in the local Hugging Face cache, and the Hub cannot be "
                          "reached (127.0.0.1:"), out
    assert seconds < 30
    assert not (tmp_path / "o").exists()


def test_unreachable_hub_model_in_the_cache_loads_from_it_quietly(tmp_path, tiny_model_dir):
    """A Hub id already in HF_HOME's cache: loaded from there at once, with no retry lines, while the Hub is down."""
    repo = tmp_path / "hf" / "hub" / "models--org--tiny"
    revision = "0" * 40
    shutil.copytree(tiny_model_dir, repo / "snapshots" / revision)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(revision)
    data = tmp_path / "d.jsonl"
    data.write_text(json.dumps(MEDQA) + "\n")
    rc, out, seconds = _medtune(["eval", "-q", "--model", "org/tiny", "--data", str(data), "--out", str(tmp_path / "o")],
                                _hub_down_env(tmp_path))
    assert rc == 0, out
    assert "Retrying" not in out and "thrown while requesting" not in out, out
    assert json.loads((tmp_path / "o" / "results.json").read_text())["model"] == "org/tiny"
    assert seconds < 60


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
    # a --resume of the finished run: one more session, the run's steps, its time still counted
    train_mod.train(cfg, items(), tmp_path, resume=True, quiet=True, log=lambda *_: None)
    again = json.loads((tmp_path / "cost.json").read_text())
    assert again["sessions"] == 3 and again["steps"] == 4 and again["wall_s"] > resumed["wall_s"]
    # a cost entry edited into nonsense counts as unknown earlier cost, not a traceback
    last = checkpoint.latest(tmp_path) / "state.json"
    last.write_text(json.dumps({**json.loads(last.read_text()), "cost": {"wall_s": "x"}}))
    train_mod.train(cfg, items(), tmp_path, resume=True, quiet=True, log=lambda *_: None)
    unknown = json.loads((tmp_path / "cost.json").read_text())
    assert unknown["sessions"] == 1 and "not included" in unknown["earlier_sessions"]
