"""One device policy for every command: `--device` resolved (or refused in one line) before any model loads, the
bf16 decision made in one place, and weights held once in the policy's dtype with fp32 scoring computed from them."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import write_jsonl
from test_hardware import cuda, fake_torch, rocm
from typer.testing import CliRunner

from medtune import hardware as hw
from medtune.cli import app
from medtune.errors import MedtuneError

NATIVE_BF16 = hw.native_bf16("cpu")
needs_bf16 = pytest.mark.skipif(not NATIVE_BF16, reason="needs a CPU with native bf16 (AVX512-BF16 or AMX): "
                                                        "elsewhere weights are held in fp32 and there is no bf16 path")


# --- resolve_device: the one place that knows which devices exist ---

@pytest.mark.parametrize("requested, torch_kw, expected", [
    ("auto", {}, "cpu"),
    (None, {}, "cpu"),
    ("cpu", cuda("NVIDIA H100", 80, (9, 0)), "cpu"),
    ("auto", cuda("NVIDIA H100", 80, (9, 0)), "cuda"),
    ("auto", rocm("AMD Instinct MI300X", 192, "gfx942"), "cuda"),  # ROCm is driven through torch's cuda device
    ("cuda:1", cuda("NVIDIA A100", 80, (8, 0), n=2), "cuda:1"),
    ("auto", {"xpu_bf16": True}, "xpu"),
    ("xpu:0", {"xpu_bf16": True}, "xpu:0"),
    ("auto", {"mps_bf16": True}, "mps"),
    ("CUDA", cuda("NVIDIA L4", 24, (8, 9)), "cuda"),
])
def test_resolve_device_honours_what_exists(requested, torch_kw, expected):
    assert hw.resolve_device(requested, fake_torch(**torch_kw)) == expected


@pytest.mark.parametrize("requested, torch_kw, message", [
    ("cuda", {}, "sees no CUDA or ROCm GPU (a CPU-only build)"),
    ("cuda:0", {}, "sees no CUDA or ROCm GPU"),
    ("cuda:2", cuda("NVIDIA A100", 80, (8, 0), n=2), "sees 2 cuda device(s), numbered 0-1"),
    ("xpu", {}, "sees no Intel GPU (XPU)"),
    ("mps", {}, "no Apple GPU"),
    ("tpu", {}, "is not a device"),
    ("cuda:x", cuda("NVIDIA A100", 80, (8, 0)), "is not a device"),
    ("cpu:0", {}, "is not a device"),
])
def test_resolve_device_refuses_in_one_line(requested, torch_kw, message):
    with pytest.raises(MedtuneError, match=message.replace("(", r"\(").replace(")", r"\)")) as e:
        hw.resolve_device(requested, fake_torch(**torch_kw))
    assert "\n" not in str(e.value)


@pytest.mark.parametrize("torch_kw, bf16", [
    (cuda("Tesla T4", 16, (7, 5)), False),  # torch.cuda.is_bf16_supported() is True here (emulated): not native
    (cuda("Tesla V100", 32, (7, 0)), False),
    (cuda("NVIDIA A100", 80, (8, 0)), True),
    (rocm("AMD Instinct MI300X", 192, "gfx942"), True),
    (rocm("AMD Instinct MI100", 32, "gfx908"), False),
    (rocm("AMD Radeon RX 6800 XT", 16, "gfx1030"), False),  # is_bf16_supported() is True on every ROCm GPU
])
def test_native_bf16_counts_emulation_as_none(torch_kw, bf16):
    fake = fake_torch(**torch_kw)
    fake.cuda.is_bf16_supported = lambda: True  # what torch says on all of these
    assert hw.native_bf16("cuda", fake) is bf16
    assert hw.weights_dtype("cuda:0", fake) == ("bfloat16" if bf16 else "float32")


# --- every verb: --device cuda is one line and exit 2 on this machine, before any model loads ---

def _no_model_load(monkeypatch):
    from medtune import models

    def refuse(*a, **k):
        raise AssertionError("a model was loaded before the device was checked")

    monkeypatch.setattr(models, "load_model", refuse)
    monkeypatch.setattr(models, "resolve", refuse)


VERBS = {
    "eval": ["eval", "--model", "embedded", "--data", "demo", "--limit", "2"],
    "ask": ["ask", "--question", "Which?", "-o", "a", "-o", "b"],
    "predict": ["predict", "demo", "--limit", "2"],
    "serve": ["serve"],
    "train": ["train", "--set", "train.max_steps=1"],
    "run": ["run", "--set", "train.max_steps=1"],
    "export": ["export", "some-run"],
    "audit": ["audit", "--model", "embedded", "--data", "demo", "--limit", "2"],
}


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a CUDA/ROCm GPU: --device cuda exists")
@pytest.mark.parametrize("verb", VERBS)
def test_missing_device_is_one_line_and_exit_2_for_every_verb(verb, monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)
    _no_model_load(monkeypatch)
    result = CliRunner().invoke(app, [*VERBS[verb], "--device", "cuda"])
    assert result.exit_code == 2, result.output
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: --device cuda: torch"), result.output
    assert not any(tmp_path.iterdir())  # nothing written


def test_config_device_is_checked_too(monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)
    _no_model_load(monkeypatch)
    result = CliRunner().invoke(app, ["eval", "--data", "demo", "--set", "device=cuda:7"])
    assert result.exit_code == 2 and "error: --device cuda:7" in result.output
    result = CliRunner().invoke(app, ["eval", "--data", "demo", "--set", "device=gpu"])
    assert result.exit_code == 2 and "device 'gpu' is not valid" in result.output


@pytest.mark.slow  # each verb on the tiny model, in process
def test_device_cpu_works_for_every_verb(tiny_model_dir, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    runner = CliRunner()
    m = ["--model", tiny_model_dir, "--device", "cpu"]
    ok = runner.invoke(app, ["eval", *m, "--data", "demo", "--limit", "3", "--out", "e", "--quiet"])
    assert ok.exit_code == 0, ok.output
    assert json.loads((tmp_path / "e" / "results.json").read_text())["metrics"]["n"] == 3
    ok = runner.invoke(app, ["ask", *m, "--question", "Which?", "-o", "a", "-o", "b", "--max-new-tokens", "2",
                             "--json"])
    assert ok.exit_code == 0, ok.output
    ok = runner.invoke(app, ["predict", "demo", *m, "--limit", "2", "--out", "p.jsonl", "--quiet"])
    assert ok.exit_code == 0 and len((tmp_path / "p.jsonl").read_text().splitlines()) == 2, ok.output
    sets = ["--set", f"model={tiny_model_dir}", "--set", "train.max_steps=1", "--set", "train.batch_size=2",
            "--set", "train.max_length=256", "--set", "train.target=answer", "--set", "data.limit=2",
            "--set", "eval.extra_methods=[]"]
    ok = runner.invoke(app, ["train", "--device", "cpu", "--out", "t", "--quiet", *sets])
    assert ok.exit_code == 0, ok.output
    ok = runner.invoke(app, ["export", "t", "--device", "cpu", "--out", "x"])
    assert ok.exit_code == 0 and (tmp_path / "x" / "config.json").is_file(), ok.output


def test_serve_loads_on_the_requested_device(monkeypatch, tiny_model_dir):
    """serve hands --device to the one loader (the page itself is tested in test_serve.py)."""
    import medtune.ask as ask_mod
    import medtune.serve as serve_mod

    seen = {}
    monkeypatch.setattr(ask_mod, "load", lambda *a, **k: seen.update(k) or object())
    monkeypatch.setattr(serve_mod, "serve", lambda *a, **k: None)
    result = CliRunner().invoke(app, ["serve", "--model", tiny_model_dir, "--device", "cpu"])
    assert result.exit_code == 0 and seen["device"] == "cpu", result.output


# --- weights once: fp32 scoring from bf16-held weights, layer by layer ---

def _inputs(tok):
    return tok(["Question: Which organ makes insulin?\nA. liver\nB. pancreas\nAnswer:"] * 2,
               return_tensors="pt").input_ids


def test_fp32_compute_from_bf16_held_weights_equals_the_fp32_model_bit_for_bit(tiny_model_dir):
    from medtune.models import held_in_bf16, hold_in_bf16, hold_in_fp32, load_model
    from medtune.scoring import fp32_compute

    ref, tok, _ = load_model(tiny_model_dir, dtype="float32")
    held, _, _ = load_model(tiny_model_dir, dtype="float32")
    hold_in_bf16(held)  # an fp32 checkpoint: its fp32 values stay aside, in host memory
    assert held_in_bf16(held) and all(p.dtype == torch.bfloat16 for p in held.parameters())
    ids = _inputs(tok)
    widest = max(sum(p.numel() for p in m.parameters(recurse=False)) for m in held.modules())
    seen = []

    def count(module, args):  # fp32 parameters alive while any module runs: one layer's at most
        seen.append(sum(p.numel() for p in held.parameters() if p.dtype == torch.float32))

    handles = [m.register_forward_pre_hook(count) for m in held.modules()]
    with torch.inference_mode():
        expected = ref(input_ids=ids).logits
        with fp32_compute(held):
            got = held(input_ids=ids).logits
        plain = held(input_ids=ids).logits  # outside the context: bf16 again
    for h in handles:
        h.remove()
    assert got.dtype == torch.float32 and torch.equal(got, expected)
    assert plain.dtype == torch.bfloat16 and not torch.equal(plain.float(), expected)
    assert max(seen) <= widest  # no full fp32 copy was ever made
    hold_in_fp32(held)  # the inverse restores the very fp32 values
    assert all(torch.equal(a, b) for a, b in zip(held.parameters(), ref.parameters()))


def test_bf16_checkpoint_is_held_in_bf16_without_widening(tiny_model_dir, tmp_path):
    """A bf16 checkpoint on a bf16 device: loaded in bf16 (no fp32 copy anywhere); fp32 scoring widens its values,
    which is exact, so it equals an fp32 load of the same checkpoint."""
    from transformers import AutoModelForCausalLM

    from medtune.models import load_model
    from medtune.scoring import fp32_compute

    AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.bfloat16).save_pretrained(tmp_path)
    (tmp_path / "tokenizer.json").write_bytes((__import__("pathlib").Path(tiny_model_dir) / "tokenizer.json")
                                              .read_bytes())
    for name in ("tokenizer_config.json", "special_tokens_map.json"):
        src = __import__("pathlib").Path(tiny_model_dir) / name
        if src.is_file():
            (tmp_path / name).write_bytes(src.read_bytes())
    held, tok, _ = load_model(str(tmp_path), dtype="bfloat16")
    assert all(getattr(p, "medtune_fp32", None) is None for p in held.parameters())
    ref, _, _ = load_model(str(tmp_path), dtype="float32")
    ids = _inputs(tok)
    with torch.inference_mode(), fp32_compute(held):
        assert torch.equal(held(input_ids=ids).logits, ref(input_ids=ids).logits)


@needs_bf16
def test_default_load_follows_the_policy_here(tiny_model_dir):
    from medtune.models import held_in_bf16, load_model

    assert held_in_bf16(load_model(tiny_model_dir)[0])


def test_fast_mode_rescores_some_but_not_all_and_equals_exact_on_those(tiny_model_dir):
    """The selective path: a margin between the questions' margins re-scores the close ones in fp32 (their log-probs
    equal exact mode's, to the rounding of another batch's padding) and keeps bf16 for the rest, whose decisions still equal exact mode's."""
    from medtune.data import sources
    from medtune.models import hold_in_bf16, load_model
    from medtune.scoring import PROBE, encode, margin_of, score

    model, tok, _ = load_model(tiny_model_dir, dtype="float32")
    hold_in_bf16(model)
    items = sources.load("demo", "eval")[:40]
    enc = encode(items, "harness", tok)
    exact, _ = score(model, enc, batch_size=8, mode="exact")
    margins = sorted(margin_of(s) for s in exact)
    margin = (margins[len(margins) // 4] + margins[len(margins) // 4 + 1]) / 2  # ~25% close: under MAX_CLOSE
    assert PROBE >= len(items)
    fast, rescored = score(model, enc, batch_size=8, mode="fast", margin=margin)
    assert 0 < sum(rescored) < len(items)
    for f, e, again in zip(fast, exact, rescored):
        if again:  # fp32, as exact mode (batch composition differs: float rounding only)
            assert f == pytest.approx(e, abs=1e-4)
        else:
            assert f != e and max(range(len(f)), key=f.__getitem__) == max(range(len(e)), key=e.__getitem__)


def test_run_trains_the_one_base_it_evaluated(tiny_model_dir, tmp_path, monkeypatch):
    """`run` holds one copy of the base: training gets the very model the base evaluation scored (no deepcopy), and
    gets it back with the LoRA layers taken out."""
    import medtune.train as train_mod
    from medtune import html_report, models
    from medtune.config import load_config
    from medtune.run import run

    loaded, trained = [], []
    real_load, real_train = models.load_model, train_mod.train

    def load(*a, **k):
        loaded.append(real_load(*a, **k))
        return loaded[-1]

    def train(*a, base_model=None, **k):
        trained.append(base_model)
        out = real_train(*a, base_model=base_model, **k)
        assert not any("lora" in n for n, _ in base_model.named_parameters())  # released
        return out

    monkeypatch.setattr(models, "load_model", load)
    monkeypatch.setattr(train_mod, "train", train)
    monkeypatch.setattr(html_report, "write_report", lambda out, **k: out / "report.html")  # tested elsewhere
    data = write_jsonl(tmp_path / "d.jsonl", [{"id": f"q{i}", "question": f"Which {i}?", "options": ["a", "b", "c"],
                                               "answer": i % 3} for i in range(12)])
    cfg = load_config(None, [f"model={tiny_model_dir}", f"data.source={data}", "data.train_size=8", "device=cpu",
                             "train.max_steps=1", "train.batch_size=4", "train.max_length=64", "train.target=answer",
                             f"out_dir={tmp_path / 'run'}"])
    run(cfg, quiet=True, log=lambda *_: None)
    assert len(loaded) == 1 and len(trained) == 1 and trained[0] is loaded[0][0]


def test_bf16_holding_keeps_fp32_values_only_where_bf16_would_lose_them():
    """`run` widens a bf16 checkpoint to fp32 for training, then holds it in bf16 again for the tuned evaluation: those
    values are bf16 values, so no fp32 copy is kept (a wasted copy of the base); values bf16 cannot
    hold (a GGUF's dequantized weights) keep theirs, and fp32 scoring still sees exactly the fp32 values."""
    import torch

    from medtune.models import hold_in_bf16, hold_in_fp32

    model = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.Linear(8, 8))
    with torch.no_grad():
        model[0].weight.copy_(model[0].weight.bfloat16().float())  # bf16-exact, widened
        model[0].bias.copy_(model[0].bias.bfloat16().float())
    exact = [p.detach().clone() for p in model.parameters()]
    hold_in_bf16(model)
    assert getattr(model[0].weight, "medtune_fp32", None) is None and getattr(model[0].bias, "medtune_fp32", None) \
        is None
    assert model[1].weight.medtune_fp32 is not None  # random fp32 values: kept
    assert all(p.dtype == torch.bfloat16 for p in model.parameters())
    hold_in_fp32(model)
    assert all(torch.equal(p, e) for p, e in zip(model.parameters(), exact))


def test_the_vocabulary_projection_gets_a_contiguous_input_whatever_slice_the_model_takes(tiny_model_dir):
    """transformers keeps the last position for the logits (`logits_to_keep=1`) as a strided slice of the hidden
    states; torch 2.13's CPU bf16 linear on such an input allocated ~6 GB for Qwen3-1.7B's head, which was `run`'s peak
    (the report's explanations). Every loaded model's head sees a contiguous input, also with an adapter attached."""
    import torch

    from medtune.models import load_model

    model, _, _ = load_model(tiny_model_dir, dtype="bfloat16")
    seen = []
    model.get_output_embeddings().register_forward_pre_hook(lambda m, a: seen.append(a[0].is_contiguous()))
    with torch.inference_mode():
        model(input_ids=torch.tensor([[5, 6, 7, 8], [9, 10, 11, 12]]), logits_to_keep=1)
        model.generate(input_ids=torch.tensor([[5, 6, 7]]), max_new_tokens=2, do_sample=False)
    assert seen and all(seen)
