"""Hostile models, adapters and settings (probe 5): a broken tokenizer.json, NaN config values or weights, adapter
metadata and hashes of the wrong shape, adapter_config.json fields of the wrong type or rank, FlashAttention 2 where
it cannot run, a model with fewer positions than train.max_length, a GGUF with an unknown tokenizer, an adapter
attached to the merged export that already holds it, a cache path that is a file. Each ends in one `error:` line
naming the file (and field), exit 2, nothing written; the valid neighbour works. Driven through the CLI."""

import json
import math
import shutil
from pathlib import Path

import pytest
from test_bounded import one_line  # exit 2, one `error:` line, no traceback
from typer.testing import CliRunner

from medtune.cli import app
from medtune.errors import MedtuneError

runner = CliRunner()
DEMO = {"id": "q1", "question": "Which organ pumps blood?", "options": ["Heart", "Lung", "Liver", "Skin"], "answer": 0}




def ok(result):
    assert result.exit_code == 0, result.output
    assert "Traceback" not in result.output


@pytest.fixture
def good(tmp_path) -> str:
    path = tmp_path / "good.jsonl"
    path.write_text(json.dumps(DEMO) + "\n")
    return str(path)


def evaluate(model, out: Path, *extra, data: str | None = None):
    args = ["eval", "--model", str(model), "--out", str(out), "-q", *extra]
    return runner.invoke(app, args + (["--data", data] if data else ["--limit", "2"]))


@pytest.fixture(scope="module")
def adapter(tmp_path_factory, tiny_model_dir) -> Path:
    """A LoRA adapter on the tiny model with medtune.json and train-hashes.safetensors as training writes them."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from medtune.data.items import MCQItem
    from medtune.data.split import save_item_hashes

    out = tmp_path_factory.mktemp("adapter") / "adapter"
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    get_peft_model(model, LoraConfig(r=2, target_modules=["q_proj"], task_type="CAUSAL_LM")).save_pretrained(out)
    items = [MCQItem(f"t{i}", f"Which drug treats condition number {i} in adults?", ("a", "b"), 0) for i in range(2)]
    save_item_hashes(items, out)
    (out / "medtune.json").write_text(json.dumps({"prompt_style": "harness", "base_model": tiny_model_dir,
                                                  "train_ids": ["t0", "t1"], "summary": {"steps": 1}}))
    return out


def copy(src, tmp_path: Path, name: str) -> Path:
    dst = tmp_path / name
    shutil.copytree(src, dst)
    return dst


def edit_json(path: Path, **changes) -> None:
    data = json.loads(path.read_text())
    data.update(changes)
    path.write_text(json.dumps(data))


# --- MD1, G02: tokenizers that cannot be built -------------------------------------------------------------------

def test_tokenizer_json_of_unknown_model_type_is_one_line_naming_it(tiny_model_dir, tmp_path):  # MD1
    model = copy(tiny_model_dir, tmp_path, "tokbad")
    (model / "tokenizer.json").write_text('{"version": "1.0", "model": {"type": "Bogus"}}')
    one_line(evaluate(model, tmp_path / "out"), f"{model / 'tokenizer.json'}:", "cannot load its tokenizer")
    assert not (tmp_path / "out").exists()


def test_gguf_with_unknown_tokenizer_names_the_gguf_file(tmp_path):  # G02
    from medtune.models import embedded_gguf, load_tokenizer

    source = embedded_gguf()
    if source is None:
        pytest.skip("the embedded model package is not installed")
    data = bytearray(source.read_bytes()[: 64 << 20])  # the header and metadata: the tokenizer is read from there
    key = b"tokenizer.ggml.model"
    at = data.index(key) + len(key) + 4 + 8  # value type (uint32), string length (uint64), then the text
    assert data[at: at + 4] == b"gpt2"
    data[at: at + 4] = b"zzzz"
    gguf = tmp_path / "tokmodel.gguf"
    gguf.write_bytes(bytes(data))
    with pytest.raises(MedtuneError) as e:
        load_tokenizer(str(gguf))
    assert str(e.value).startswith(f"{gguf}: cannot load its tokenizer"), e.value
    assert "\n" not in str(e.value)


# --- MD14, AD7, PR11, AS14: NaN configs, weights and adapters ----------------------------------------------------

def test_nan_in_config_json_is_refused_naming_the_field(tiny_model_dir, tmp_path):  # MD14
    model = copy(tiny_model_dir, tmp_path, "cfgnan")
    text = (model / "config.json").read_text()
    (model / "config.json").write_text(text.replace('"rms_norm_eps": 1e-06', '"rms_norm_eps": NaN'))
    assert "NaN" in (model / "config.json").read_text()
    one_line(evaluate(model, tmp_path / "out"), "config.json: rms_norm_eps:", "NaN")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("layers, expected", [(0, "stored that the config has no place for"),
                                             (3, "the config needs that are not stored")])
def test_config_with_other_layer_count_than_the_weights_is_refused(tiny_model_dir, tmp_path, layers, expected):
    """Probe 6: num_hidden_layers 0 loaded the embeddings alone and scored (transformers only warns); 3 starts one
    layer random. Both are one line naming config.json and a weight."""
    model = copy(tiny_model_dir, tmp_path, f"layers{layers}")
    config = json.loads((model / "config.json").read_text())
    (model / "config.json").write_text(json.dumps({**config, "num_hidden_layers": layers}))
    one_line(evaluate(model, tmp_path / "out"), "config.json does not fit these weights", expected, "model.layers.")
    assert not (tmp_path / "out").exists()


@pytest.fixture(scope="module")
def nan_model(tiny_model_dir, tmp_path_factory) -> Path:
    """The tiny model with one NaN in its weights: config and headers are fine, every score is NaN."""
    from safetensors.torch import load_file, save_file

    model = tmp_path_factory.mktemp("nan") / "nanmodel"
    shutil.copytree(tiny_model_dir, model)
    weights = load_file(model / "model.safetensors")
    key = next(k for k in weights if "q_proj" in k)
    weights[key][0, 0] = math.nan
    save_file(weights, model / "model.safetensors", metadata={"format": "pt"})
    return model


def test_nan_scores_are_one_line_naming_the_model_in_eval_and_predict(nan_model, tmp_path):  # MD14, PR11
    line = one_line(evaluate(nan_model, tmp_path / "out"), str(nan_model), "non-finite log-probabilities")
    assert "item demo-" in line
    assert not (tmp_path / "out").exists()
    out = tmp_path / "pred.jsonl"
    one_line(runner.invoke(app, ["predict", "demo", "--model", str(nan_model), "--limit", "2", "--out", str(out),
                                 "-q"]), "non-finite log-probabilities")
    assert not out.exists() or "NaN" not in out.read_text()
    one_line(runner.invoke(app, ["ask", "--model", str(nan_model), "--question", "Q?", "--option", "a", "--option",
                                 "b", "--max-new-tokens", "2"]), str(nan_model), "non-finite")  # AS14


def test_generation_refuses_nan_scores(nan_model):  # the generate method and ask's explanation
    from medtune.data import sources
    from medtune.generate import generate_rows
    from medtune.models import load_model

    model, tokenizer, _ = load_model(str(nan_model), dtype="float32", log=lambda *_: None)
    with pytest.raises(MedtuneError, match="non-finite scores while generating"):
        generate_rows(model, tokenizer, sources.load("demo", "eval")[:1], "harness", max_new_tokens=2)


def test_adapter_with_nan_weights_is_refused_naming_its_file(adapter, tiny_model_dir, tmp_path):  # AD7, PR11, AS14
    import numpy as np
    from safetensors.numpy import load_file, save_file

    bad = copy(adapter, tmp_path, "nanw")
    weights = {k: np.full_like(v, np.nan) for k, v in load_file(bad / "adapter_model.safetensors").items()}
    save_file(weights, bad / "adapter_model.safetensors")
    one_line(evaluate(tiny_model_dir, tmp_path / "out", "--adapter", str(bad)),
             f"{bad / 'adapter_model.safetensors'}:", "NaN")
    assert not (tmp_path / "out").exists()
    out = tmp_path / "pred.jsonl"
    one_line(runner.invoke(app, ["predict", "demo", "--model", tiny_model_dir, "--adapter", str(bad), "--limit", "2",
                                 "--out", str(out), "-q"]), "adapter_model.safetensors")
    assert not out.exists()
    ok(evaluate(tiny_model_dir, tmp_path / "fine", "--adapter", str(adapter)))


# --- AD1-AD4: adapter metadata and training-item hashes ---------------------------------------------------------

def _hashes(path: Path, ngram: str = "8", drop: bool = False) -> None:
    import numpy as np
    from safetensors.numpy import load_file, save_file

    tensors = {"other": np.zeros(3, dtype=np.int64)} if drop else load_file(path)
    save_file(tensors, path, metadata={"ngram": ngram})


@pytest.mark.parametrize("case,fix,expected", [
    ("AD1", lambda a: edit_json(a / "medtune.json", train_items=[{"foo": 1}]), "medtune.json: train_items"),
    ("AD2", lambda a: _hashes(a / "train-hashes.safetensors", drop=True), "train-hashes.safetensors: keys: missing"),
    ("AD3", lambda a: _hashes(a / "train-hashes.safetensors", ngram="eight"), "train-hashes.safetensors: metadata ngram"),
    ("AD4", lambda a: (edit_json(a / "medtune.json", base_model="someorg/othermodel", base_signature=[1, 2]),
                       edit_json(a / "adapter_config.json", base_model_name_or_path="someorg/othermodel")),
     "medtune.json: base_signature"),
])
def test_adapter_metadata_of_the_wrong_shape_is_one_line(adapter, tiny_model_dir, tmp_path, case, fix, expected):
    bad = copy(adapter, tmp_path, case)
    fix(bad)
    one_line(evaluate(tiny_model_dir, tmp_path / "out", "--adapter", str(bad)), expected)
    assert not (tmp_path / "out").exists()


def test_adapter_with_valid_train_items_and_hashes_gets_its_contamination_check(adapter, tiny_model_dir, tmp_path):
    good = copy(adapter, tmp_path, "items")
    edit_json(good / "medtune.json", train_items=[DEMO])
    ok(evaluate(tiny_model_dir, tmp_path / "a", "--adapter", str(good)))
    ok(evaluate(tiny_model_dir, tmp_path / "b", "--adapter", str(adapter)))
    assert json.loads((tmp_path / "b" / "results.json").read_text())["contamination"]["n_train"] == 2


# --- AD11, AD12: adapter_config.json field types and ranks --------------------------------------------------------

@pytest.mark.parametrize("field,value", [
    ("use_dora", "yes"), ("layers_to_transform", "abc"), ("layers_to_transform", [0, "1"]), ("use_rslora", 1),
    ("fan_in_fan_out", "no"), ("bias", "some"), ("layers_pattern", 3), ("exclude_modules", [1]),
    ("rank_pattern", {"q_proj": 200000}), ("rank_pattern", {"q_proj": 0}), ("rank_pattern", ["q_proj"]),
    ("alpha_pattern", {"q_proj": -1}), ("alpha_pattern", {"q_proj": "x"}), ("layer_replication", [[0, 100000]]),
])
def test_adapter_config_field_of_wrong_type_or_rank_is_one_line(adapter, tiny_model_dir, tmp_path, field, value):
    bad = copy(adapter, tmp_path, "cfg")
    edit_json(bad / "adapter_config.json", **{field: value})
    one_line(evaluate(tiny_model_dir, tmp_path / "out", "--adapter", str(bad)), f"adapter_config.json: {field}:")
    assert not (tmp_path / "out").exists()


def test_adapter_missing_weights_its_config_implies_is_one_line(adapter, tiny_model_dir, tmp_path):  # AD11
    bad = copy(adapter, tmp_path, "dora")
    edit_json(bad / "adapter_config.json", use_dora=True)  # a valid value, but no DoRA magnitudes are stored
    result = evaluate(tiny_model_dir, tmp_path / "out", "--adapter", str(bad))
    one_line(result, "adapter_model.safetensors: lacks", "lora_magnitude_vector")
    assert "UserWarning" not in result.output
    fine = copy(adapter, tmp_path, "pattern")
    edit_json(fine / "adapter_config.json", rank_pattern={"q_proj": 2}, alpha_pattern={"q_proj": 8})
    ok(evaluate(tiny_model_dir, tmp_path / "fine", "--adapter", str(fine)))


# --- O3, PE2: training settings the model cannot take ---------------------------------------------------------------

def train(model, out: Path, *settings):
    args = ["train", "--set", f"model={model}", "--set", "device=cpu", "--set", "train.max_steps=1", "--set",
            "data.train_size=8", "--out", str(out), "-q"]
    for s in settings:
        args += ["--set", s]
    return runner.invoke(app, args)


def test_flash_attention_where_it_cannot_run_is_one_line(tiny_model_dir, tmp_path):  # O3
    result = train(tiny_model_dir, tmp_path / "run", "train.max_length=64",
                   "train.attn_implementation=flash_attention_2")
    one_line(result, "train.attn_implementation=flash_attention_2", "sdpa")
    assert not (tmp_path / "run" / "adapter").exists()


@pytest.fixture(scope="module")
def gpt2_dir(tmp_path_factory, tokenizer_dir) -> str:
    """A tiny GPT-2 with 64 learned positions: a longer input is an index error inside its position table."""
    import torch
    from transformers import AutoTokenizer, GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    out = tmp_path_factory.mktemp("gpt2")
    GPT2LMHeadModel(GPT2Config(vocab_size=len(tok), n_positions=64, n_embd=32, n_layer=1, n_head=2,
                               bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id)).save_pretrained(out)
    tok.save_pretrained(out)
    return str(out)


def test_max_length_above_the_models_positions_is_one_line_and_scoring_fits_them(gpt2_dir, tmp_path):  # PE2
    one_line(train(gpt2_dir, tmp_path / "run", "train.max_length=512"), "train.max_length=512", "64", "n_positions")
    assert not (tmp_path / "run" / "adapter").exists()
    long = tmp_path / "long.jsonl"  # a prompt of ~150 tokens: scored whole it would index past position 64
    long.write_text(json.dumps({**DEMO, "question": "A patient presents with chest pain. " * 20 + DEMO["question"]}))
    ok(evaluate(gpt2_dir, tmp_path / "eval", data=str(long)))
    rows = [json.loads(line) for line in (tmp_path / "eval" / "predictions.jsonl").read_text().splitlines()]
    assert rows[0]["question_cut_chars"] > 0
    ok(evaluate(gpt2_dir, tmp_path / "gen", "--method", "generate", "--set", "eval.max_new_tokens=4"))
    one_line(evaluate(gpt2_dir, tmp_path / "gen2", "--method", "generate"), "max_new_tokens=256", "64 positions")


# --- E07: an adapter attached to the merged export that holds it -----------------------------------------------

def test_adapter_already_merged_into_the_export_is_refused(adapter, tiny_model_dir, tmp_path):  # E07
    from medtune.export import public_meta
    from medtune.models import adapter_sha256, read_meta

    run = tmp_path / "run"
    shutil.copytree(adapter, run / "adapter")
    public = public_meta(read_meta(run / "adapter"), run, merged=True)
    assert public["export"]["adapter_sha256"] == adapter_sha256(adapter)
    merged = copy(tiny_model_dir, tmp_path, "merged")  # stands in for the merged weights
    (merged / "medtune.json").write_text(json.dumps(public))
    one_line(evaluate(merged, tmp_path / "out", "--adapter", str(adapter)), "--adapter", "already contains this adapter")
    assert not (tmp_path / "out").exists()
    # an export written before the fingerprint: the same training record (train_ids, summary) identifies it
    del public["export"]["adapter_sha256"]
    (merged / "medtune.json").write_text(json.dumps(public))
    one_line(evaluate(merged, tmp_path / "out", "--adapter", str(adapter)), "already contains this adapter")
    ok(evaluate(merged, tmp_path / "alone"))
    other = copy(adapter, tmp_path, "other")
    edit_json(other / "medtune.json", train_ids=["x0", "x1"])
    (other / "train-hashes.safetensors").unlink()
    ok(evaluate(merged, tmp_path / "other_out", "--adapter", str(other)))


# --- EV1: MEDTUNE_CACHE that is a file --------------------------------------------------------------------------------

def test_cache_path_that_is_a_file_is_one_line_naming_medtune_cache(tmp_path):  # EV1
    from medtune.models import embedded_gguf

    if embedded_gguf() is None:
        pytest.skip("the embedded model package is not installed")
    afile = tmp_path / "afile"
    afile.write_text("x\n")
    result = runner.invoke(app, ["eval", "--model", "embedded", "--limit", "2", "-q", "--out", str(tmp_path / "out")],
                           env={"MEDTUNE_CACHE": str(afile)})
    one_line(result, f"MEDTUNE_CACHE={afile}", "not a directory")
    assert afile.read_text() == "x\n" and not (tmp_path / "out").exists()
