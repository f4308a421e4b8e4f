"""QLoRA for real: lora.quantize=4bit loads the embedded model in NF4 with double quantization through bitsandbytes
(CPU backend here, x86-64 with AVX2), trains LoRA on it, saves the adapter, and base + adapter evaluates."""

import importlib.util
import math

import pytest
import torch
from safetensors.torch import load_file
from test_train import cfg_for, items

from medtune import models
from medtune.errors import MedtuneError
from medtune.models import load_model, quantization_config
from medtune.scoring import encode, score


def test_quantize_config():
    assert quantization_config("none", "bfloat16") is None
    with pytest.raises(MedtuneError, match="choose none, 8bit, 4bit"):
        quantization_config("2bit", "bfloat16")
    if importlib.util.find_spec("bitsandbytes") is None:
        with pytest.raises(MedtuneError, match=r"medtune\[qlora\]"):
            quantization_config("4bit", "bfloat16")
        return
    q = quantization_config("4bit", "bfloat16")
    assert q.load_in_4bit and q.bnb_4bit_quant_type == "nf4" and q.bnb_4bit_use_double_quant
    assert q.bnb_4bit_compute_dtype == torch.bfloat16  # the device policy's training dtype
    assert quantization_config("8bit", "float32").load_in_8bit


def test_quantize_without_bitsandbytes_is_a_user_error(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(models.importlib.util, "find_spec", lambda name: None if name == "bitsandbytes" else real(name))
    with pytest.raises(MedtuneError, match=r"pip install 'medtune\[qlora\]'"):
        quantization_config("4bit", "bfloat16")


@pytest.fixture
def fresh_accelerator_state():
    """accelerate keeps one AcceleratorState per process; earlier in-process tests trained in float32, this one in the
    device policy's bf16, which accelerate refuses to switch to. Each `medtune train` process starts fresh."""
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state()
    yield
    AcceleratorState._reset_state()


@pytest.mark.slow  # NF4 quantization of the 135M model and 4-bit matmuls on 2 CPU cores: ~60 s
def test_4bit_training_on_cpu_saves_an_adapter_that_evaluates(tmp_path, monkeypatch, fresh_accelerator_state):
    pytest.importorskip("bitsandbytes")
    from medtune import train as train_mod

    seen = {}
    real = train_mod.lora_model

    def spy(*args, **kwargs):
        seen["model"], tok = real(*args, **kwargs)
        return seen["model"], tok

    monkeypatch.setattr(train_mod, "lora_model", spy)
    out = tmp_path / "q"
    cfg = cfg_for("embedded", out, **{"lora.quantize": "4bit", "train.dtype": "bfloat16", "train.max_steps": 2,
                                     "train.batch_size": 2, "train.max_length": 64, "train.target": "answer",
                                     "lora.target_modules": "[q_proj, v_proj]", "train.attn_implementation": "sdpa"})
    summary = train_mod.train(cfg, items(4), out, quiet=True)
    quantized = [m for m in seen.pop("model").modules() if type(m).__name__ == "Linear4bit"]
    assert quantized and all(m.weight.quant_type == "nf4" for m in quantized)
    assert quantized[0].weight.quant_state.nested  # double quantization: the absmax constants are quantized too
    assert summary["steps"] == 2 and math.isfinite(summary["final_loss"])
    tensors = load_file(str(out / "adapter" / "adapter_model.safetensors"))
    assert any("lora_B" in k and v.abs().sum() > 0 for k, v in tensors.items())  # the steps moved the adapter
    assert all(v.dtype == torch.float32 for v in tensors.values())
    base, tok, _ = load_model("embedded", adapter=str(out / "adapter"), log=lambda *_: None)  # base + adapter, fp32
    scores, _ = score(base, encode(items(4), "harness", tok), mode="exact")
    assert len(scores) == 4 and all(len(s) == 4 and all(map(math.isfinite, s)) for s in scores)
