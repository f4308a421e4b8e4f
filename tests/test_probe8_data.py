"""Probe 8's data, statistics and model-message cases (docs/reliability.md §4i): each a message that was wrong or
missing, a statistic that claimed too much, or noise before the one error line. Driven through the CLI where a user
meets it; fast (no model, or the tiny one)."""

import json
import logging
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
from test_bounded import one_line  # exit 2, one `error:` line, no traceback
from typer.testing import CliRunner

from medtune.cli import app
from medtune.stats import paired_compare, paired_diff_ci

runner = CliRunner()
MEDQA = {"question": "Which drug treats it?", "options": {"A": "Gentamicin", "B": "Ciprofloxacin", "C": "Ceftriaxone",
                                                        "D": "Trimethoprim"}, "answer_idx": "C", "meta_info": "step1"}


def lines(path: Path, rows: list) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


# --- RUN01: the paired difference's CI keeps a width with no discordant items ----------------------------------------

# Newcombe RG, "Improved confidence intervals for the difference between binomial proportions based on paired data",
# Stat Med 1998;17:2635-50: the worked examples (e, f, g, h) and their method 10 limits, published to 4 decimals.
NEWCOMBE_METHOD_10 = [
    ((36, 12, 2, 0), (0.0569, 0.3404)), ((20, 12, 2, 16), (0.0562, 0.3292)), ((18, 12, 2, 18), (0.0562, 0.3290)),
    ((36, 14, 0, 0), (0.1528, 0.4167)), ((35, 14, 0, 1), (0.1461, 0.4175)), ((18, 14, 0, 18), (0.1441, 0.3963)),
    ((2, 97, 1, 0), (0.8721, 0.9854)), ((1, 97, 1, 1), (0.8736, 0.9850)), ((0, 29, 1, 0), (0.6666, 0.9882)),
    ((2, 98, 0, 0), (0.9178, 0.9945)), ((1, 98, 0, 1), (0.9171, 0.9916)), ((0, 30, 0, 0), (0.8395, 1.0)),
    ((54, 0, 0, 0), (-0.0664, 0.0664)), ((53, 0, 0, 1), (-0.0729, 0.0729)), ((30, 0, 0, 24), (-0.0358, 0.0358)),
    ((29, 0, 0, 25), (-0.0354, 0.0354)), ((28, 0, 0, 26), (-0.0352, 0.0352)), ((27, 0, 0, 27), (-0.0351, 0.0351)),
]


@pytest.mark.parametrize(("cells", "limits"), NEWCOMBE_METHOD_10)
def test_paired_diff_ci_reproduces_newcombe_method_10(cells, limits):
    low, high = paired_diff_ci(*cells)
    assert low == pytest.approx(limits[0], abs=1.1e-4) and high == pytest.approx(limits[1], abs=1.1e-4)


def test_paired_compare_uses_newcombe_cells_and_keeps_a_width_with_no_discordant_pairs():
    # A = base, B = tuned: e = right in both, f = right in B only (won), g = right in A only (lost), h = wrong in both
    a = [True] * 36 + [False] * 12 + [True] * 2
    b = [True] * 36 + [True] * 12 + [False] * 2
    r = paired_compare(a, b, [f"q{i}" for i in range(50)])
    assert (r["c"], r["b"]) == (12, 2) and r["diff_ci"] == pytest.approx((0.0569, 0.3404), abs=1e-4)
    r = paired_compare([True, False, False, False], [True, False, False, False], list("abcd"))  # RUN01: was [0, 0]
    assert r["diff"] == 0 and r["diff_ci"][0] < -0.4 and r["diff_ci"][1] > 0.4


def test_compare_prints_a_ci_with_width_when_no_item_is_discordant(tmp_path):
    for side in ("base", "tuned"):
        (tmp_path / side).mkdir()
        lines(tmp_path / side / "predictions.jsonl",
              [{"id": f"q{i}", "gold": "B", "pred": "B" if i == 0 else "A", "correct": i == 0} for i in range(4)])
    result = runner.invoke(app, ["compare", str(tmp_path / "base"), str(tmp_path / "tuned")])
    assert result.exit_code == 0, result.output
    assert "95% CI [-42.7, +42.7]" in result.output and "[+0.0, +0.0]" not in result.output


# --- M01: MedMCQA cop outside 0..4 without --cop-base ----------------------------------------------------------------

def medmcqa_rows(cops: list) -> list[dict]:
    return [{"id": f"m{k}", "question": f"Question number {k}?", "opa": "a", "opb": "b", "opc": "c", "opd": "d",
             "cop": cop, "exp": None, "subject_name": "Anatomy"} for k, cop in enumerate(cops)]


@pytest.mark.parametrize("cop", [5, -1, 10**30, "7"])
def test_medmcqa_cop_out_of_range_is_named_not_only_values_1_3(tmp_path, cop):
    path = lines(tmp_path / "m.jsonl", medmcqa_rows([cop, 2, 3, 1, 2]))
    line = one_line(runner.invoke(app, ["data", "validate", str(path)]), f"{path}:1: cop: {int(cop)} is out of range")
    assert "only values 1-3" not in line


def test_medmcqa_cop_base_neighbours_unchanged(tmp_path):
    only_1_3 = lines(tmp_path / "a.jsonl", medmcqa_rows([1, 2, 3]))
    one_line(runner.invoke(app, ["data", "validate", str(only_1_3)]), "only values 1-3 occur", "--cop-base")
    published = lines(tmp_path / "b.jsonl", medmcqa_rows([1, 2, 3, 4]))
    result = runner.invoke(app, ["data", "validate", str(published)])
    assert result.exit_code == 0 and "cop 1-based (published) detected" in result.output, result.output
    one_line(runner.invoke(app, ["data", "validate", str(lines(tmp_path / "c.jsonl", medmcqa_rows([1, 5, 4])))]),
             ":2: cop: 5 is out of range 1..4")  # decidable (4 occurs): the row's own range, as before


# --- D36: the answer's text under two letters ------------------------------------------------------------------------

def test_validate_warns_when_the_answer_text_appears_under_two_letters(tmp_path):
    twice = {**MEDQA, "options": {**MEDQA["options"], "A": "Ceftriaxone"}}
    path = lines(tmp_path / "d.jsonl", [twice, MEDQA])
    result = runner.invoke(app, ["data", "validate", str(path)])
    assert result.exit_code == 0, result.output
    assert f"warning: {path}:1: options: A and C have the same text as the answer (C)" in result.output.splitlines()
    assert f"{path}:2" not in result.output


def test_answer_twice_warning_stays_off_the_error_path_and_clean_files(tmp_path):
    clean = lines(tmp_path / "ok.jsonl", [MEDQA, MEDQA | {"answer_idx": "A"}])
    result = runner.invoke(app, ["data", "validate", str(clean)])
    assert result.exit_code == 0 and len(result.output.splitlines()) == 1 and "warning:" not in result.output
    twice = {**MEDQA, "options": {**MEDQA["options"], "A": "Ceftriaxone"}}
    bad = lines(tmp_path / "bad.jsonl", [twice, {**MEDQA, "answer_idx": "Z"}])
    line = one_line(runner.invoke(app, ["data", "validate", str(bad)]), f"{bad}:2: answer_idx")
    assert "warning:" not in runner.invoke(app, ["data", "validate", str(bad)]).output and "same text" not in line


# --- P09: a --map answer that is a letter and another option's text --------------------------------------------------

MAP = "question=q,options=o1|o2|o3|o4,answer=lab"


def test_map_answer_both_letter_and_other_options_text_is_refused(tmp_path):
    path = lines(tmp_path / "p.jsonl", [{"q": "Which letter?", "o1": "D", "o2": "C", "o3": "B", "o4": "A", "lab": "A"},
                                        {"q": "x?", "o1": "p", "o2": "q", "o3": "r", "o4": "s", "lab": "B"}])
    one_line(runner.invoke(app, ["data", "show", str(path), "--map", MAP, "--json"]),
             f"{path}:1: lab: 'A' is ambiguous", "letter A = option 1 (o1: 'D')", "the text of option 4 (o4)",
             "answer_base=1")


def test_map_answer_neighbours_still_read(tmp_path):
    rows = [{"q": "Which letter?", "o1": "D", "o2": "C", "o3": "B", "o4": "A", "lab": "3"},  # a number: option 4
            {"q": "x?", "o1": "p", "o2": "q", "o3": "r", "o4": "s", "lab": "B"},  # a letter
            {"q": "y?", "o1": "p", "o2": "q", "o3": "r", "o4": "s", "lab": "s"},  # a text
            {"q": "z?", "o1": "A", "o2": "q", "o3": "r", "o4": "s", "lab": "A"}]  # letter A and text A: one option
    path = lines(tmp_path / "p.jsonl", rows)
    result = runner.invoke(app, ["data", "show", str(path), "--map", MAP, "--json"])
    assert result.exit_code == 0, result.output
    assert json.loads(result.output)["answer_letters"] == {"A": 1, "B": 1, "C": 0, "D": 2}


# --- F23: an unreachable Hub: one line, at once ----------------------------------------------------------------------

def test_unreachable_hub_loads_offline_without_log_noise(monkeypatch):
    import datasets
    from huggingface_hub import constants

    seen = {}

    def fake_load(*args, **kwargs):
        seen["offline"] = constants.HF_HUB_OFFLINE and datasets.config.HF_HUB_OFFLINE
        seen["logs"] = logging.getLogger("huggingface_hub.utils._http").isEnabledFor(logging.WARNING)
        raise ConnectionError("Couldn't reach 'GBaker/MedQA-USMLE-4-options-hf' on the Hub (OfflineModeIsEnabled)")

    monkeypatch.setattr(datasets, "load_dataset", fake_load)
    monkeypatch.setattr(datasets.config, "HF_ENDPOINT", "http://127.0.0.1:9")  # nothing listens: refused at once
    for key in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy"):
        monkeypatch.delenv(key, raising=False)
    offline_before = constants.HF_HUB_OFFLINE
    one_line(runner.invoke(app, ["data", "validate", "medqa"]), "medqa: could not load", "presets need a network",
             "Cause: OSError: 127.0.0.1:")
    assert seen == {"offline": True, "logs": False}  # straight to the HF_HOME cache, quietly
    assert constants.HF_HUB_OFFLINE == offline_before  # restored after the load


def test_unreachable_hub_real_load_is_one_line_in_seconds(tmp_path):
    env = {**os.environ, "HF_ENDPOINT": "http://127.0.0.1:9", "HF_HOME": str(tmp_path / "hf"), "PYTHONPATH": "src"}
    for key in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE", "HTTPS_PROXY", "https_proxy",
                "ALL_PROXY", "all_proxy"):
        env.pop(key, None)
    start = time.monotonic()
    done = subprocess.run([sys.executable, "-m", "medtune", "data", "validate", "medqa"], env=env,
                          check=False, capture_output=True, text=True, timeout=120, cwd=Path(__file__).parents[1])
    out = (done.stdout + done.stderr).strip()
    assert done.returncode == 2 and len(out.splitlines()) == 1 and out.startswith("error: medqa: could not load"), out
    assert time.monotonic() - start < 20  # was ~30 s of five retries per request, each logged


# --- H16 and A08: model messages ------------------------------------------------------------------------------------

def test_truncated_embedded_cache_says_delete_the_cache_dir(tmp_path, tiny_model_dir, monkeypatch):
    from medtune.models import embedded_gguf

    gguf = embedded_gguf()
    if gguf is None:
        pytest.skip("the embedded model package is not installed")
    cached = tmp_path / "cache" / "smollm2-135m-instruct"
    shutil.copytree(tiny_model_dir, cached)
    (cached / "medtune-source.json").write_text(json.dumps({"gguf": gguf.name, "size": gguf.stat().st_size}))
    weights = cached / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    monkeypatch.setenv("MEDTUNE_CACHE", str(tmp_path / "cache"))
    data = lines(tmp_path / "d.jsonl", [MEDQA])
    line = one_line(runner.invoke(app, ["eval", "-q", "--data", str(data), "--out", str(tmp_path / "o")]),
                    f"{weights}: not a readable safetensors file",
                    f"delete medtune's cache directory {cached} and rerun")
    assert "copy it again" not in line
    user_copy = tmp_path / "mymodel"  # a model directory of the user's: the advice stays
    shutil.copytree(tiny_model_dir, user_copy)
    (user_copy / "model.safetensors").write_bytes(weights.read_bytes())
    one_line(runner.invoke(app, ["eval", "-q", "--model", str(user_copy), "--data", str(data), "--out",
                                 str(tmp_path / "o2")]), "copy it again or re-export it")


def _adapter(model_dir: str, out: Path, base_model: str) -> Path:
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from medtune.models import base_signature

    model = AutoModelForCausalLM.from_pretrained(model_dir)
    get_peft_model(model, LoraConfig(r=2, target_modules=["q_proj"], task_type="CAUSAL_LM")).save_pretrained(out)
    (out / "medtune.json").write_text(json.dumps({"base_model": base_model, "prompt_style": "harness",
                                                  "base_signature": base_signature(model.config)}))
    return out


def test_adapter_whose_two_files_disagree_on_the_base_says_so(tmp_path, tiny_model_dir):
    from transformers import AutoModelForCausalLM, LlamaConfig

    other = tmp_path / "other"
    AutoModelForCausalLM.from_config(LlamaConfig(vocab_size=128, hidden_size=16, intermediate_size=32,
                                                 num_hidden_layers=1, num_attention_heads=2,
                                                 num_key_value_heads=1)).save_pretrained(other)
    data = lines(tmp_path / "d.jsonl", [MEDQA])
    mixed = _adapter(str(other), tmp_path / "mixed", "Qwen/Qwen3-1.7B")  # medtune.json edited, adapter_config not
    line = one_line(runner.invoke(app, ["eval", "-q", "--model", tiny_model_dir, "--adapter", str(mixed), "--data",
                                        str(data), "--out", str(tmp_path / "o")]),
                    f"{mixed}: its own files disagree", "medtune.json says Qwen/Qwen3-1.7B",
                    f"adapter_config.json says {other}", "hidden_size 16 vs 32")
    assert "--model" not in line
    plain = _adapter(str(other), tmp_path / "plain", str(other))  # the neighbour: consistent files, advice kept
    one_line(runner.invoke(app, ["eval", "-q", "--model", tiny_model_dir, "--adapter", str(plain), "--data",
                                 str(data), "--out", str(tmp_path / "o2")]),
             "trained for base model", f"pass --model {other}")
