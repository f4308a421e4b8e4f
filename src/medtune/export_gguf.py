"""GGUF export for llama.cpp and Ollama: a merged model directory -> `model.<type>.gguf` + an Ollama `Modelfile`, then a
check of the file by a reader that is not ours (transformers' GGUF loader) against the merged model.

Written with the format's own package (`gguf`): tensor names come from its TensorNameMap, metadata keys from its
writer, the BPE merges, special tokens and chat template from its SpecialVocab, and Q8_0 blocks from its quantiser.
What is ours is the small amount of knowledge llama.cpp's converter adds per architecture: which hyperparameters to
record, and that the llama architecture wants the Q and K projection rows reordered for its rotary layout.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import numpy as np

from medtune import io
from medtune.errors import MedtuneError

TYPES = ("f16", "q8_0")
# Hugging Face model_type -> (GGUF architecture name, whether Q/K rows need llama's rotary permutation).
# Qwen2/Qwen3 use the "neox" rotary layout in llama.cpp, i.e. the Hugging Face layout as is.
ARCHITECTURES = {"llama": ("llama", True), "qwen2": ("qwen2", False), "qwen3": ("qwen3", False)}
ROPE_TYPES = ("default", "linear", "llama3")
# The pre-tokenizer split regexes llama.cpp knows by name (tokenizer.json `Split` patterns of Llama 3 and Qwen2).
_SPLITS = {
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+":
        "llama-bpe",
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+":
        "qwen2",
}
# The transformers-reader check, in max |per-option log-prob difference| (nats) and prediction agreement: the GGUF
# against the merged model rounded the same way in memory (the gate), and against the fp32 merged model (reported).
WRITER_TOLERANCE = 0.02
TOLERANCE = {"f16": 0.02, "q8_0": 0.15}
MIN_AGREEMENT = 0.98


def check_type(gguf_type: str) -> str:
    if gguf_type not in TYPES:
        raise MedtuneError(f"--gguf {gguf_type}: unknown GGUF type; choose one of: {', '.join(TYPES)}")
    return gguf_type


def check_architecture(config: dict) -> tuple[str, bool]:
    """(GGUF architecture, permute Q/K) for a config.json dict, or a one-line error listing what is supported."""
    model_type = config.get("model_type")
    if model_type not in ARCHITECTURES:
        raise MedtuneError(f"GGUF export supports the architectures {', '.join(ARCHITECTURES)} (SmolLM2, Llama, "
                           f"Qwen2, Qwen3); this model is {model_type!r}")
    rope_type = _rope(config).get("rope_type") or _rope(config).get("type") or "default"
    if rope_type not in ROPE_TYPES:
        raise MedtuneError(f"GGUF export supports the rope types {', '.join(ROPE_TYPES)}; this model uses {rope_type!r}")
    return ARCHITECTURES[model_type]


def write_gguf(model_dir: Path, out: Path, gguf_type: str, name: str = "medtune export", log=print) -> dict:
    """Write the merged model in `model_dir` (a save_pretrained dir) as one GGUF file; atomic. Returns the file's
    type, size and sha256."""
    import gguf

    check_type(gguf_type)
    config = json.loads((model_dir / "config.json").read_text())
    arch, permute = check_architecture(config)
    tmp = out.with_name(f".{out.name}.tmp")
    # use_temp_file: each tensor is converted and spooled to disk as it is added, so memory holds one tensor at a time.
    writer = gguf.GGUFWriter(tmp, arch, use_temp_file=True)
    try:
        writer.add_name(name)
        writer.add_type(gguf.GGUFType.MODEL)
        _add_hyperparameters(writer, config, arch, gguf_type)
        _add_tokenizer(writer, model_dir, config)
        _add_tensors(writer, model_dir, config, arch, permute, gguf_type, log)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
        os.replace(tmp, out)
    except BaseException:
        writer.close()
        tmp.unlink(missing_ok=True)
        raise
    info = {"file": out.name, "type": gguf_type, "size_bytes": out.stat().st_size, "sha256": io.sha256_file(out)}
    log(f"wrote {out} ({info['size_bytes'] / 2**20:.1f} MiB, {gguf_type})")
    return info


def _rope(config: dict) -> dict:
    """transformers 5 keeps rope settings in `rope_parameters`; older configs in `rope_theta` + `rope_scaling`."""
    return config.get("rope_parameters") or config.get("rope_scaling") or {}


def _head_dim(config: dict) -> int:
    return config.get("head_dim") or config["hidden_size"] // config["num_attention_heads"]


def _add_hyperparameters(writer, config: dict, arch: str, gguf_type: str) -> None:
    import gguf

    writer.add_context_length(config["max_position_embeddings"])
    writer.add_embedding_length(config["hidden_size"])
    writer.add_block_count(config["num_hidden_layers"])
    writer.add_feed_forward_length(config["intermediate_size"])
    writer.add_head_count(config["num_attention_heads"])
    writer.add_head_count_kv(config.get("num_key_value_heads") or config["num_attention_heads"])
    writer.add_layer_norm_rms_eps(config["rms_norm_eps"])
    writer.add_key_length(_head_dim(config))  # explicit: Qwen3's head_dim is not hidden_size / heads
    writer.add_value_length(_head_dim(config))
    writer.add_vocab_size(config["vocab_size"])
    rope = _rope(config)
    writer.add_rope_freq_base(rope.get("rope_theta", config.get("rope_theta", 10000.0)))
    if arch == "llama":
        writer.add_rope_dimension_count(_head_dim(config))
    if (rope.get("rope_type") or rope.get("type")) == "linear":
        writer.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        writer.add_rope_scaling_factor(rope["factor"])
    file_type = {"f16": gguf.LlamaFileType.MOSTLY_F16, "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0}[gguf_type]
    writer.add_file_type(file_type)
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)


def _add_tokenizer(writer, model_dir: Path, config: dict) -> None:
    """Byte-level BPE vocabulary (`gpt2` in GGUF terms) with token types, merges, special ids and chat template."""
    import gguf
    from transformers import AutoTokenizer

    tokenizer_json = json.loads((model_dir / "tokenizer.json").read_text())
    model = tokenizer_json.get("model", {})
    if model.get("type") != "BPE" or model.get("byte_fallback") or (tokenizer_json.get("decoder") or {}).get(
            "type") != "ByteLevel":
        raise MedtuneError(f"{model_dir}: GGUF export supports byte-level BPE tokenizers (SmolLM2, Llama 3, Qwen); "
                           "this one is not")
    tokenizer = AutoTokenizer.from_pretrained(model_dir, trust_remote_code=False)
    by_id = {i: t for t, i in tokenizer.get_vocab().items()}
    added = tokenizer.added_tokens_decoder
    n_vocab = max(config["vocab_size"], len(by_id))  # Qwen pads the embedding past the tokenizer's last id
    tokens, types = [], []
    for i in range(n_vocab):
        if i not in by_id:
            tokens.append(f"[PAD{i}]")
            types.append(gguf.TokenType.UNUSED)
        elif i in added:
            tokens.append(added[i].content)
            types.append(gguf.TokenType.CONTROL if added[i].special else gguf.TokenType.USER_DEFINED)
        else:
            tokens.append(by_id[i])
            types.append(gguf.TokenType.NORMAL)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(_pre_tokenizer(tokenizer_json))
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    special = gguf.SpecialVocab(model_dir, load_merges=True, n_vocab=n_vocab)
    if not special.merges:
        raise MedtuneError(f"{model_dir / 'tokenizer.json'}: no BPE merges found")
    # Whether llama.cpp prepends BOS: what the tokenizer itself does (llama.cpp's default differs by vocabulary).
    with_special = tokenizer("a").input_ids
    special.add_special_token["bos"] = tokenizer.bos_token_id is not None and with_special[0] == tokenizer.bos_token_id
    special.add_special_token["eos"] = tokenizer.eos_token_id is not None and with_special[-1] == tokenizer.eos_token_id
    special.add_to_gguf(writer, quiet=True)


def _pre_tokenizer(tokenizer_json: dict) -> str:
    """llama.cpp's name for how text is split before BPE, read off tokenizer.json (llama.cpp has no generic form)."""
    pre = tokenizer_json.get("pre_tokenizer") or {}
    parts = pre.get("pretokenizers", [pre])
    kinds = [p.get("type") for p in parts]
    if kinds == ["ByteLevel"] and pre.get("use_regex", True):
        return "gpt-2"
    if kinds == ["Digits", "ByteLevel"] and parts[0].get("individual_digits"):
        return "smollm"
    if kinds == ["Split", "ByteLevel"] and parts[0].get("pattern", {}).get("Regex") in _SPLITS:
        return _SPLITS[parts[0]["pattern"]["Regex"]]
    raise MedtuneError(f"tokenizer.json: pre-tokenizer {json.dumps(pre)[:200]} has no llama.cpp name that medtune "
                       "knows (supported: GPT-2 byte level, SmolLM, Llama 3, Qwen2)")


def _add_tensors(writer, model_dir: Path, config: dict, arch: str, permute: bool, gguf_type: str, log) -> None:
    import gguf
    from safetensors import safe_open

    model_arch = next(a for a, n in gguf.MODEL_ARCH_NAMES.items() if n == arch)
    names = gguf.get_tensor_name_map(model_arch, config["num_hidden_layers"])
    files = sorted(model_dir.glob("model*.safetensors"))
    if not files:
        raise MedtuneError(f"{model_dir}: no safetensors weights")
    n_head = config["num_attention_heads"]
    n_kv = config.get("num_key_value_heads") or n_head
    for file in files:
        with safe_open(str(file), framework="pt") as f:
            for key in f.keys():  # noqa: SIM118 (safe_open is not a dict)
                if key.endswith("rotary_emb.inv_freq"):
                    continue
                if key == "lm_head.weight" and config.get("tie_word_embeddings"):
                    continue  # llama.cpp reuses token_embd when there is no output tensor
                name = names.get_name(key, try_suffixes=(".weight", ".bias"))
                if name is None:
                    raise MedtuneError(f"{file.name}: tensor {key} has no GGUF name for {arch}")
                data = f.get_tensor(key).float().numpy()
                if permute and key.endswith("q_proj.weight"):
                    data = _permute(data, n_head, n_head)
                elif permute and key.endswith("k_proj.weight"):
                    data = _permute(data, n_head, n_kv)
                _add_tensor(writer, name, data, gguf_type)
    if (_rope(config).get("rope_type") or _rope(config).get("type")) == "llama3":
        writer.add_tensor(gguf.TENSOR_NAMES[gguf.MODEL_TENSOR.ROPE_FREQS] + ".weight", _llama3_rope_factors(model_dir))


def _add_tensor(writer, name: str, data: np.ndarray, gguf_type: str) -> None:
    """1-D tensors (norms, biases) stay F32, as llama.cpp expects; matrices become F16 or Q8_0 blocks of 32."""
    import gguf

    if data.ndim == 1:
        writer.add_tensor(name, data.astype(np.float32))
        return
    qtype = _qtype(gguf_type, data.shape[-1])
    writer.add_tensor(name, gguf.quants.quantize(data, qtype), raw_dtype=qtype)


def _qtype(gguf_type: str, row: int):
    """F16, or Q8_0 (blocks of 32 along each row; a row that does not divide into blocks stays F16)."""
    import gguf

    if gguf_type == "q8_0" and row % 32 == 0:
        return gguf.GGMLQuantizationType.Q8_0
    return gguf.GGMLQuantizationType.F16


def _permute(weights: np.ndarray, n_head: int, n_kv_head: int) -> np.ndarray:
    """Hugging Face stores each head's rotary pairs as two halves (x0..x63 | x64..x127); llama.cpp's llama rotary
    code wants them interleaved (x0, x64, x1, x65, ...). Reorder the output rows of Q and K accordingly."""
    heads = n_kv_head  # Q passes n_head twice; K is laid out per key-value head
    rows = weights.shape[0] // heads // 2
    return weights.reshape(heads, 2, rows, *weights.shape[1:]).swapaxes(1, 2).reshape(weights.shape)


def _llama3_rope_factors(model_dir: Path) -> np.ndarray:
    """Llama 3.1+ scales rotary frequencies per dimension; llama.cpp reads the divisors from a `rope_freqs` tensor.
    transformers computes the scaled frequencies; the factors are the plain frequencies over the scaled ones."""
    import torch
    from transformers import AutoConfig
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    config = AutoConfig.from_pretrained(model_dir, trust_remote_code=False)
    scaled, _ = ROPE_INIT_FUNCTIONS["llama3"](config, "cpu")
    dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    plain = 1.0 / (config.rope_parameters["rope_theta"] ** (torch.arange(0, dim, 2).float() / dim))
    return (plain / scaled).float().numpy()


def export_gguf(model_dir: Path, gguf_type: str, prompt_style: str, verify_items: int | None = None,
                log=print) -> dict:
    """Inside a merged export dir: write model.<type>.gguf and an Ollama Modelfile, then verify the GGUF with
    transformers' own GGUF reader. Returns the record that goes into medtune.json and the model card."""
    out = model_dir / f"model.{gguf_type}.gguf"
    info = write_gguf(model_dir, out, gguf_type, name=f"medtune {model_dir.name.strip('.').split('.')[0]}", log=log)
    (model_dir / "Modelfile").write_text(modelfile(model_dir, out.name, prompt_style))
    info["verification"] = verify(model_dir, out, gguf_type, prompt_style, limit=verify_items, log=log)
    return info


def verify(merged_dir: Path, gguf_path: Path, gguf_type: str, prompt_style: str, limit: int | None = None,
           log=print) -> dict:
    """Score the demo evaluation set three ways: the merged model (fp32), the merged model with the GGUF's rounding
    applied in memory (F16, or Q8_0 blocks through the gguf package), and the GGUF as transformers reads it (its own
    tokenizer, names, reverse Q/K permutation and dequantizer, not our writer).

    The gate is the writer check: the file must reproduce the rounded model (a wrong name, permutation, hyperparameter
    or tokenizer shows up as far more than WRITER_TOLERANCE). How far the rounding itself moves the answers from the
    fp32 model is a property of the model and the type; it is measured against TOLERANCE and reported, not gated."""
    import transformers

    from medtune.data import sources
    from medtune.models import load_model
    from medtune.scoring import argmax, encode, score

    items = sources.load(sources.DEMO, "eval")[:limit]
    scores = {}
    model, tokenizer, _ = load_model(str(merged_dir), dtype="float32", log=log)  # rounded in place: fp32
    encoded = encode(items, prompt_style, tokenizer)
    for label in ("merged", "rounded"):
        if label == "rounded":
            _round_like_gguf(model, gguf_type)
        log(f"verifying the GGUF: scoring the demo eval set with the {label} model")
        scores[label] = score(model, encoded, batch_size=16, mode="exact")[0]
    del model
    log("verifying the GGUF: scoring the demo eval set with the GGUF, read by transformers")
    model, tokenizer, _ = load_model(str(gguf_path), dtype="float32", log=log)
    scores["gguf"] = score(model, encode(items, prompt_style, tokenizer), batch_size=16, mode="exact")[0]
    del model
    writer = compare_scores(scores["rounded"], scores["gguf"], WRITER_TOLERANCE)
    effect = compare_scores(scores["merged"], scores["gguf"], TOLERANCE[gguf_type])
    accuracy = {k: sum(argmax(s) == it.answer for s, it in zip(scores[k], items)) / len(items) for k in scores}
    result = {"reader": f"transformers {transformers.__version__} from_pretrained(gguf_file=...)", "data": "demo eval",
              "n": len(items), "method": "letter", "mode": "exact", "prompt_style": prompt_style,
              "writer_check": writer, "vs_fp32_merged": effect, "accuracy_merged": accuracy["merged"],
              "accuracy_gguf": accuracy["gguf"], "passed": writer["within_tolerance"]}
    log(f"GGUF writer check: max |Δ log-prob| {writer['max_abs_logprob_diff']:.5f} nats vs the {gguf_type}-rounded "
        f"merged model; against the fp32 merged model: max {effect['max_abs_logprob_diff']:.4f}, agreement "
        f"{effect['agreement']:.1%}, accuracy {accuracy['merged']:.3f} merged vs {accuracy['gguf']:.3f} GGUF")
    if not result["passed"]:
        raise MedtuneError(f"the {gguf_type} GGUF, read back by transformers, does not reproduce the merged model "
                           f"rounded to {gguf_type} (max |Δ log-prob| {writer['max_abs_logprob_diff']:.3f} > "
                           f"{WRITER_TOLERANCE} or agreement {writer['agreement']:.1%} < {MIN_AGREEMENT:.0%}); "
                           "nothing was written")
    return result


def compare_scores(ref: list[list[float]], got: list[list[float]], tolerance: float) -> dict:
    from medtune.scoring import argmax, softmax

    diffs = [abs(a - b) for ra, rb in zip(ref, got) for a, b in zip(ra, rb)]
    agree = sum(argmax(a) == argmax(b) for a, b in zip(ref, got)) / len(ref)
    # The same, after normalizing over the options: a shift common to all letters (mass moving to or from a token
    # that is not an option) cancels, so this is what the choice between the options sees.
    norm = [abs(math.log(p) - math.log(q)) for ra, rb in zip(ref, got)
            for p, q in zip(softmax(ra), softmax(rb))]
    return {"max_abs_logprob_diff": max(diffs), "mean_abs_logprob_diff": sum(diffs) / len(diffs), "agreement": agree,
            "max_abs_option_normalized_diff": max(norm),
            "tolerance": tolerance, "min_agreement": MIN_AGREEMENT,
            "within_tolerance": max(diffs) <= tolerance and agree >= MIN_AGREEMENT}


def _round_like_gguf(model, gguf_type: str) -> None:
    """Every matrix through the same rounding the writer applies (1-D tensors stay fp32, as in the file)."""
    import gguf
    import torch

    with torch.no_grad():
        for p in model.parameters():
            if p.ndim != 2:
                continue
            qtype = _qtype(gguf_type, p.shape[-1])
            rounded = gguf.quants.dequantize(gguf.quants.quantize(p.float().cpu().numpy(), qtype), qtype)
            p.copy_(torch.from_numpy(rounded.reshape(p.shape)))


# Ollama's Go-template forms of the chat templates medtune's supported models ship. The system message (the
# disclaimer) arrives as the first of .Messages. Qwen3's template gets the empty thinking block that
# `enable_thinking=False` writes, which is how medtune prompts it.
_CHATML = ("{{- range .Messages }}<|im_start|>{{ .Role }}\n{{ .Content }}<|im_end|>\n{{ end }}<|im_start|>assistant\n")
_LLAMA3 = ("<|begin_of_text|>{{- range .Messages }}<|start_header_id|>{{ .Role }}<|end_header_id|>\n\n"
           "{{ .Content }}<|eot_id|>{{ end }}<|start_header_id|>assistant<|end_header_id|>\n\n")
_QWEN3_NO_THINKING = "<think>\n\n</think>\n\n"


def modelfile(model_dir: Path, gguf_name: str, prompt_style: str) -> str:
    """An Ollama Modelfile: the GGUF, the prompt the model was tuned with, greedy decoding, the disclaimer."""
    from medtune.report import DISCLAIMER

    lines = ["# Ollama: ollama create medtune-model -f Modelfile && ollama run medtune-model",
             f"# {DISCLAIMER}", f"FROM ./{gguf_name}"]
    if prompt_style == "chat":
        chat = _chat_template(model_dir)
        if "<|im_start|>" in chat:
            template = _CHATML + (_QWEN3_NO_THINKING if "enable_thinking" in chat else "")
            stops = ["<|im_end|>"]
        elif "<|start_header_id|>" in chat:
            template, stops = _LLAMA3, ["<|eot_id|>"]
        else:
            raise MedtuneError(f"{model_dir}: no Ollama template for this chat template (supported: ChatML as in "
                               "SmolLM2 and Qwen, Llama 3); export with the harness prompt style instead")
        lines += [f'TEMPLATE """{template}"""', f'SYSTEM """{DISCLAIMER}"""']
    else:
        # The run was tuned on raw lm-evaluation-harness text, without a chat template: the prompt is wrapped the
        # same way (type the question and its lettered options). The disclaimer stays the system message on record;
        # the template leaves it out of the text the model sees, because the model never saw one there.
        style = {"harness": ("Question: ", "\nAnswer:"), "seed": ("### Question:\n", "\n\n### Answer:\n")}
        head, tail = style.get(prompt_style, style["harness"])
        lines += [f'TEMPLATE """{head}{{{{ .Prompt }}}}{tail}"""', f'SYSTEM """{DISCLAIMER}"""']
        stops = ["\nQuestion:", "<|im_end|>", "<|endoftext|>"]
    lines += ["PARAMETER temperature 0", *[f"PARAMETER stop {json.dumps(s)}" for s in stops]]
    return "\n".join(lines) + "\n"


def _chat_template(model_dir: Path) -> str:
    jinja = model_dir / "chat_template.jinja"
    if jinja.is_file():
        return jinja.read_text()
    config = json.loads((model_dir / "tokenizer_config.json").read_text())
    return config.get("chat_template") or ""


def card_section(info: dict) -> str:
    """The model card's GGUF section: file, type, size, sha256, and the independent reader's verdict."""
    v = info["verification"]
    w, e = v["writer_check"], v["vs_fp32_merged"]
    met = "met" if e["within_tolerance"] else "not met"
    return "\n".join([
        "## GGUF (llama.cpp, Ollama)", "",
        (f"- File: `{info['file']}`, type {info['type'].upper()}, {info['size_bytes'] / 2**20:.1f} MiB "
         f"({info['size_bytes']} bytes), sha256 `{info['sha256']}`"),
        (f"- Read back by an independent reader, {v['reader']}, and scored on medtune's demo evaluation set "
         f"(n = {v['n']}, letter scoring, fp32, `{v['prompt_style']}` prompt)."),
        (f"- Writer check (the gate): against the merged model with the same {info['type'].upper()} rounding applied "
         f"in memory, per-option log-probabilities differ by at most {w['max_abs_logprob_diff']:.5f} nats "
         f"(tolerance {w['tolerance']}); predictions agree on {w['agreement']:.1%}."),
        (f"- Effect of the rounding, against the fp32 merged model: per-option log-probabilities differ by at most "
         f"{e['max_abs_logprob_diff']:.4f} nats (mean {e['mean_abs_logprob_diff']:.4f}; after normalizing over the "
         f"options {e['max_abs_option_normalized_diff']:.4f}); predictions agree on "
         f"{e['agreement']:.1%}; accuracy {v['accuracy_merged']:.3f} merged, {v['accuracy_gguf']:.3f} GGUF. Target "
         f"(at most {e['tolerance']} nats, at least {e['min_agreement']:.0%} agreement): {met}."),
        ("- llama.cpp: `python benchmarks/llamacpp_check.py` (in the medtune repository) compares llama.cpp's answers "
         "and log-probabilities with medtune's."),
        ("- Ollama: `ollama create NAME -f Modelfile`, then `ollama run NAME` (greedy decoding, the disclaimer as the "
         "system message)."),
        f"- medtune: `medtune eval --model PATH/{info['file']} --data demo`", ""])
