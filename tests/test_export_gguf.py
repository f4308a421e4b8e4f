"""GGUF export: each supported architecture round-trips through transformers' own GGUF reader (an independent reader:
its dequantizer, its reverse Q/K permutation, its tokenizer builder) to the same logits; the embedded model's run
exports as Q8_0 and `medtune eval --model RUN/merged/model.q8_0.gguf` reproduces the merged model; an unsupported
architecture is refused with one line, exit 2, nothing written."""

import json
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from medtune.cli import app
from medtune.errors import MedtuneError
from medtune.export_gguf import TOLERANCE, WRITER_TOLERANCE, check_architecture, modelfile, write_gguf

QUIET = {"log": lambda *_: None}
ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def small_tokenizer(tmp_path_factory) -> Path:
    """A byte-level BPE tokenizer with 300 tokens (trained in milliseconds), so GGUF files parse fast."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    text = ["Question: Which vitamin deficiency causes scurvy?\nA. Vitamin C\nB. Vitamin D\nAnswer: A"] * 20
    tok.train_from_iterator(text, trainers.BpeTrainer(
        vocab_size=300, special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    out = tmp_path_factory.mktemp("tok")
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<|im_start|>", eos_token="<|im_end|>",
                                   unk_token="<|endoftext|>", pad_token="<|im_end|>")
    fast.save_pretrained(out)
    return out


def _tiny(model_type: str, tokenizer_dir: Path, out: Path) -> Path:
    """A tiny random model of the given architecture: grouped-query attention (4 query heads, 2 KV heads) so the
    llama Q/K permutation is exercised for both shapes; rows of 64 so Q8_0 blocks fit."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    torch.manual_seed(0)
    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    config = AutoConfig.for_model(model_type, vocab_size=len(tok), hidden_size=64, intermediate_size=128,
                                  num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                  # every Qwen3 has head_dim 128, the only value transformers' GGUF reader assumes
                                  head_dim=128 if model_type == "qwen3" else 16,
                                  max_position_embeddings=256, tie_word_embeddings=model_type != "qwen2",
                                  bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                                  pad_token_id=tok.pad_token_id, initializer_range=0.2)
    model = AutoModelForCausalLM.from_config(config)
    with torch.no_grad():  # norms away from 1 and nonzero biases, so a mislabelled tensor would show
        for name, p in model.named_parameters():
            if p.ndim == 1:
                p.add_(torch.randn_like(p) * 0.2)
    model.save_pretrained(out)
    tok.save_pretrained(out)
    return out


@pytest.mark.parametrize("model_type", ["llama", "qwen2", "qwen3"])
@pytest.mark.parametrize("gguf_type", ["f16", "q8_0"])
def test_architectures_round_trip_through_transformers_reader(model_type, gguf_type, small_tokenizer, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    src = _tiny(model_type, small_tokenizer, tmp_path / "model")
    out = tmp_path / f"model.{gguf_type}.gguf"
    info = write_gguf(src, out, gguf_type, **QUIET)
    assert out.is_file() and not list(tmp_path.glob(".*tmp")) and info["size_bytes"] == out.stat().st_size
    assert len(info["sha256"]) == 64

    text = "Question: Which vitamin deficiency causes scurvy?\nA. Vitamin C\nB. Vitamin D\nAnswer:"
    ref_tok, tok = AutoTokenizer.from_pretrained(src), AutoTokenizer.from_pretrained(tmp_path, gguf_file=out.name)
    assert tok(text).input_ids == ref_tok(text).input_ids
    assert tok.eos_token == "<|im_end|>"
    ids = ref_tok(text, return_tensors="pt").input_ids
    ref = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32)
    got = AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file=out.name, dtype=torch.float32)
    assert got.config.model_type == model_type
    with torch.no_grad():
        a, b = torch.log_softmax(ref(ids).logits, -1), torch.log_softmax(got(ids).logits, -1)
    err = (a - b).abs().max().item()
    assert err < {"f16": 0.05, "q8_0": 0.6}[gguf_type], err  # max over every vocab entry and position
    if gguf_type == "f16":  # a random model has near ties everywhere; Q8_0 may flip some of them
        assert (a.argmax(-1) == b.argmax(-1)).all()


def test_llama_needs_the_qk_permutation(small_tokenizer, tmp_path, monkeypatch):
    """The negative control: written without llama's Q/K row permutation, the reader's logits are far off."""
    from transformers import AutoModelForCausalLM

    from medtune import export_gguf

    src = _tiny("llama", small_tokenizer, tmp_path / "model")
    monkeypatch.setitem(export_gguf.ARCHITECTURES, "llama", ("llama", False))
    write_gguf(src, tmp_path / "model.f16.gguf", "f16", **QUIET)
    ids = torch.tensor([[5, 80, 120, 33, 250, 7, 19, 64, 101, 200]])
    ref = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32)
    got = AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file="model.f16.gguf", dtype=torch.float32)
    with torch.no_grad():
        err = (torch.log_softmax(ref(ids).logits, -1) - torch.log_softmax(got(ids).logits, -1)).abs().max().item()
    assert err > 0.5


def test_unsupported_architecture_is_refused_before_any_work(tmp_path, small_tokenizer):
    """One `error:` line listing what is supported, exit 2, and no export directory or temporary file."""
    from transformers import GPT2Config, GPT2LMHeadModel

    base = tmp_path / "gpt2"
    GPT2LMHeadModel(GPT2Config(vocab_size=300, n_embd=32, n_layer=1, n_head=2)).save_pretrained(base)
    with pytest.raises(MedtuneError, match="supports the architectures llama, qwen2, qwen3"):
        check_architecture(json.loads((base / "config.json").read_text()))
    run = tmp_path / "run"
    (run / "adapter").mkdir(parents=True)
    (run / "adapter" / "adapter_config.json").write_text("{}")
    (run / "adapter" / "medtune.json").write_text(json.dumps({"base_model": str(base), "prompt_style": "harness"}))
    before = sorted(p.name for p in run.rglob("*"))
    result = CliRunner().invoke(app, ["export", str(run), "--gguf", "f16"])
    assert result.exit_code == 2
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: GGUF export supports the architectures llama, qwen2, qwen3")
    assert "'gpt2'" in lines[0]
    assert sorted(p.name for p in run.rglob("*")) == before
    result = CliRunner().invoke(app, ["export", str(run), "--gguf", "q4_k"])
    assert result.exit_code == 2 and "choose one of: f16, q8_0" in result.output


def test_modelfile_templates(small_tokenizer, tmp_path):
    from medtune.report import DISCLAIMER

    harness = modelfile(small_tokenizer, "model.q8_0.gguf", "harness")
    assert harness.splitlines()[2] == "FROM ./model.q8_0.gguf"
    assert 'TEMPLATE """Question: {{ .Prompt }}\nAnswer:"""' in harness
    assert f'SYSTEM """{DISCLAIMER}"""' in harness and "PARAMETER temperature 0" in harness
    chat_dir = tmp_path / "chat"
    chat_dir.mkdir()
    (chat_dir / "chat_template.jinja").write_text("{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}"
                                                  "<|im_end|>\n{% endfor %}{% if enable_thinking %}{% endif %}")
    chat = modelfile(chat_dir, "model.f16.gguf", "chat")
    assert "{{- range .Messages }}<|im_start|>{{ .Role }}" in chat and "<think>\n\n</think>" in chat
    assert 'PARAMETER stop "<|im_end|>"' in chat
    (chat_dir / "chat_template.jinja").write_text("{{ messages }}")
    with pytest.raises(MedtuneError, match="no Ollama template"):
        modelfile(chat_dir, "model.f16.gguf", "chat")


@pytest.mark.slow
def test_demo_run_exports_gguf_that_reproduces_the_merged_model(tmp_path):
    """The acceptance path on `make demo`'s recipe: `medtune train --config recipes/demo.yaml` (the demo's adapter on
    the embedded model), `medtune export RUN --gguf q8_0` and `--gguf f16`, then `medtune eval --model
    RUN/merged/model.q8_0.gguf --data demo`. Read back by transformers, the GGUF's per-option log-probs on the demo
    evaluation set are within 0.15 nats (Q8_0) / 0.02 (F16) of the fp32 merged model's and its predictions agree on at
    least 98%; the file reproduces the same rounding applied in memory within the writer tolerance."""
    run = tmp_path / "run"
    result = CliRunner().invoke(app, ["train", "--config", str(ROOT / "recipes" / "demo.yaml"), "--out", str(run),
                                      "--quiet"])
    assert result.exit_code == 0, result.output

    checks = {}
    for gguf_type, merged in (("q8_0", run / "merged"), ("f16", run / "merged-f16")):
        result = CliRunner().invoke(app, ["export", str(run), "--gguf", gguf_type, "--out", str(merged)])
        assert result.exit_code == 0, result.output
        gguf_file = merged / f"model.{gguf_type}.gguf"
        assert gguf_file.is_file() and f"FROM ./model.{gguf_type}.gguf" in (merged / "Modelfile").read_text()
        info = json.loads((merged / "medtune.json").read_text())["gguf"]
        v = checks[gguf_type] = info["verification"]
        writer, effect = v["writer_check"], v["vs_fp32_merged"]
        assert v["passed"] and v["n"] == 64 and writer["max_abs_logprob_diff"] <= WRITER_TOLERANCE
        assert writer["agreement"] >= 0.98
        assert effect["max_abs_logprob_diff"] <= TOLERANCE[gguf_type] and effect["agreement"] >= 0.98, effect
        card = (merged / "README.md").read_text()
        assert f"sha256 `{info['sha256']}`" in card and f"type {gguf_type.upper()}" in card
        assert f"{effect['agreement']:.1%}" in card

    v = checks["q8_0"]
    out = tmp_path / "eval"
    result = CliRunner().invoke(app, ["eval", "--model", str(run / "merged" / "model.q8_0.gguf"), "--data", "demo",
                                      "--method", "letter", "--mode", "exact", "--permute", "none", "--out", str(out),
                                      "--json", "-q"])
    assert result.exit_code == 0, result.output
    accuracy = json.loads(result.stdout)["eval"]["metrics"]["accuracy"]
    assert accuracy == pytest.approx(v["accuracy_gguf"])  # the CLI scores the GGUF as the export's check did
    # Accuracy can move only through the questions whose prediction changed (at most 2% of them, checked above).
    assert abs(accuracy - v["accuracy_merged"]) <= 1 - v["vs_fp32_merged"]["agreement"] + 1e-9


def test_compare_and_card_section():
    """The comparison counts a shift common to every option once (normalized view) and the card states the verdict."""
    from medtune.export_gguf import card_section, compare_scores

    ref = [[-1.0, -2.0, -3.0, -4.0], [-2.0, -1.0, -3.0, -3.5]]
    got = [[-1.3, -2.3, -3.3, -4.3], [-1.0, -2.0, -3.0, -3.5]]  # item 1: common shift; item 2: the choice flips
    c = compare_scores(ref, got, 0.15)
    assert c["max_abs_logprob_diff"] == pytest.approx(1.0) and c["agreement"] == 0.5
    assert not c["within_tolerance"]
    assert c["max_abs_option_normalized_diff"] == pytest.approx(abs(-0.44018 - -1.44018), abs=1e-4)
    writer = compare_scores(ref, ref, 0.02)
    assert writer["within_tolerance"] and writer["max_abs_logprob_diff"] == 0
    info = {"file": "model.q8_0.gguf", "type": "q8_0", "size_bytes": 3 * 2**20, "sha256": "ab" * 32,
            "verification": {"reader": "transformers X", "n": 2, "prompt_style": "harness", "writer_check": writer,
                             "vs_fp32_merged": c, "accuracy_merged": 0.5, "accuracy_gguf": 0.0}}
    card = card_section(info)
    assert "type Q8_0, 3.0 MiB" in card and f"sha256 `{'ab' * 32}`" in card
    assert "at most 0.00000 nats" in card and "agree on 50.0%" in card and "): not met." in card


def test_quiet_hides_the_gguf_conversion_bars(small_tokenizer, tmp_path):
    """Probe 6: `-q` still showed transformers' own "Converting and de-quantizing GGUF tensors" bar (tqdm, imported
    before medtune could turn it off). The `medtune` command sets TQDM_DISABLE from its arguments first."""
    import os
    import shutil
    import subprocess
    import sys

    write_gguf(_tiny("llama", small_tokenizer, tmp_path / "model"), tmp_path / "model.f16.gguf", "f16", **QUIET)
    data = tmp_path / "d.jsonl"
    data.write_text(json.dumps({"id": "q1", "question": "Which vitamin deficiency causes scurvy?",
                                "options": ["Vitamin C", "Vitamin D"], "answer": 0}) + "\n")
    env = {**os.environ, "MEDTUNE_CACHE": str(tmp_path / "cache")}
    for quiet, bars in ((["-q"], False), ([], True)):
        out = tmp_path / f"out{len(quiet)}"
        done = subprocess.run([sys.executable, "-m", "medtune", "eval", "--model", str(tmp_path / "model.f16.gguf"),
                               "--data", str(data), "--out", str(out), *quiet], env=env, capture_output=True,
                              text=True, timeout=600, check=False)
        assert done.returncode == 0, done.stderr
        assert ("Converting and de-quantizing GGUF tensors" in done.stderr) is bars, done.stderr
        shutil.rmtree(tmp_path / "cache", ignore_errors=True)  # converted again by the next run
