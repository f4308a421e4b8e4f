"""llama.cpp reads medtune's GGUF: answers, log-probabilities, size and speed against transformers on the same CPU.

The second independent reader of `medtune export --gguf` (the first, transformers' GGUF loader, runs in the tests).
For a merged model directory (RUN/merged, or the embedded model's converted directory) this writes the GGUF files with
medtune's writer, then on the demo evaluation set (64 questions, --prompt-style):
  - medtune's letter method on the safetensors model (transformers, fp32): per-option log-probs and the letter, and a
    greedy answer (24 tokens) whose letter medtune's answer parser reads;
  - llama.cpp (llama-cpp-python) on each GGUF: whether it tokenizes the prompt identically, the option letters'
    log-probs at the first answer token for medtune's prompt tokens, and its greedy answer from the same tokens;
  - load time, and greedy generation tokens/s (batch 1, prompt + 64 new tokens) for both, alternated, 2 rounds.

llama-cpp-python is built from the registry's source package into its own venv (see docs/benchmarks.md for the exact
commands); pass that venv's site-packages with --llamacpp-site (appended to sys.path, so medtune's numpy/torch win).

  PYTHONPATH=src python benchmarks/llamacpp_check.py --model-dir ~/.cache/medtune/smollm2-135m-instruct \\
      --llamacpp-site /root/.cache/medtune/llamacpp-venv/lib/python3.11/site-packages --out /tmp/llamacpp.json
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import tempfile
import time
from pathlib import Path

GEN_TOKENS = 64
GREEDY_TOKENS = 24
SPEED_PROMPTS = 4


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model-dir", type=Path, required=True, help="a merged (save_pretrained) model directory")
    ap.add_argument("--types", nargs="+", default=["f16", "q8_0"])
    ap.add_argument("--prompt-style", default="chat", help="chat: the base instruct model answers in words; "
                    "harness: a model tuned on it answers with a letter")
    ap.add_argument("--limit", type=int, default=None)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--llamacpp-site", type=Path, default=None)
    ap.add_argument("--speed-prompts", type=int, default=SPEED_PROMPTS)
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()
    if args.llamacpp_site:
        sys.path.append(str(args.llamacpp_site))
    import llama_cpp
    import torch

    from medtune.data import sources
    from medtune.export_gguf import write_gguf
    from medtune.scoring import encode, score

    torch.set_num_threads(args.threads)
    items = sources.load(sources.DEMO, "eval")[: args.limit]
    t0 = time.perf_counter()
    model, tokenizer = _load_transformers(args.model_dir)
    hf_load = time.perf_counter() - t0
    args.tokenizer = tokenizer
    encoded = encode(items, args.prompt_style, tokenizer)
    ref = score(model, encoded, batch_size=16, mode="exact")[0]
    print(f"transformers: loaded in {hf_load:.1f} s, letter scores done", flush=True)
    greedy_ref = _greedy_transformers(model, tokenizer, items, encoded)
    print("transformers: greedy answers done", flush=True)
    report = {"model_dir": args.model_dir.name, "n": len(items), "prompt_style": args.prompt_style,
              "greedy_unparseable_transformers": None,
              "threads": args.threads, "llama_cpp_python": llama_cpp.__version__,
              "transformers_load_s": hf_load, "types": {}}
    report["greedy_unparseable_transformers"] = sum(letter is None for _, letter in greedy_ref)
    with tempfile.TemporaryDirectory() as tmp:
        for gguf_type in args.types:
            path = Path(tmp) / f"model.{gguf_type}.gguf"
            info = write_gguf(args.model_dir, path, gguf_type, log=lambda *_: None)
            row = {"size_bytes": info["size_bytes"], "sha256": info["sha256"]}
            row.update(_agreement(llama_cpp, path, items, encoded, ref, greedy_ref, args))
            row.update(_speed(llama_cpp, path, model, tokenizer, items, encoded, args))
            report["types"][gguf_type] = row
            print(json.dumps({gguf_type: row}, indent=1), flush=True)
    if args.out:
        args.out.write_text(json.dumps(report, indent=1))
    print(_markdown(report))


def _load_transformers(model_dir: Path):
    from medtune.models import load_model

    model, tokenizer, _ = load_model(str(model_dir), log=lambda *_: None)
    return model, tokenizer


def _agreement(llama_cpp, path: Path, items, encoded, ref, greedy_ref, args) -> dict:
    """Same prompt tokens through llama.cpp: the option letters' log-probs at the first answer token against medtune's
    letter method (raw, and normalized over the options), and greedy answers against transformers' greedy answers."""
    import numpy as np

    from medtune.parse import parse_answer

    t0 = time.perf_counter()
    llm = llama_cpp.Llama(str(path), n_ctx=1024, n_threads=args.threads, logits_all=True, verbose=False)
    load_s = time.perf_counter() - t0
    same_tokens, diffs, norm_diffs, letter_agree, same_text, greedy_agree, unparsed = 0, [], [], 0, 0, 0, 0
    vs_letter_method = 0  # llama.cpp's greedy answer letter == medtune's letter-method prediction (the issue's 95%)
    for item, enc, lps, (hf_text, hf_letter) in zip(items, encoded, ref, greedy_ref):
        prompt = _prompt(item, args)
        same_tokens += llm.tokenize(prompt.encode(), add_bos=False, special=True) == enc.context
        llm.reset()
        llm.eval(enc.context)  # medtune's tokens, so the log-probs compare the forward pass alone
        logits = np.asarray(llm.scores[llm.n_tokens - 1], dtype=np.float64)
        logprobs = logits - (logits.max() + math.log(np.exp(logits - logits.max()).sum()))
        cpp = [float(logprobs[o[0]]) for o in enc.options]
        diffs += [abs(a - b) for a, b in zip(cpp, lps)]
        norm_diffs += [abs(a - b) for a, b in zip(_normalize(cpp), _normalize(lps))]
        letter_agree += _argmax(cpp) == _argmax(lps)
        llm.reset()
        out = llm.create_completion(enc.context, max_tokens=GREEDY_TOKENS, temperature=0.0)["choices"][0]["text"]
        letter = parse_answer(out, options=list(item.options)).letter
        same_text += out.strip() == hf_text.strip()
        unparsed += letter is None
        greedy_agree += letter == hf_letter
        vs_letter_method += letter == "ABCDEFGHIJ"[_argmax(lps)]
    n = len(items)
    return {"llamacpp_load_s": load_s, "prompt_tokens_identical": same_tokens / n,
            "first_token_max_abs_logprob_diff": max(diffs), "first_token_mean_abs_logprob_diff": sum(diffs) / len(diffs),
            "first_token_max_abs_option_normalized_diff": max(norm_diffs),
            "letter_argmax_agreement": letter_agree / n, "greedy_text_identical": same_text / n,
            "greedy_letter_agreement": greedy_agree / n, "greedy_unparseable_llamacpp": unparsed,
            "greedy_letter_vs_medtune_letter_method": vs_letter_method / n}


def _greedy_transformers(model, tokenizer, items, encoded) -> list[tuple[str, str | None]]:
    import torch

    from medtune.parse import parse_answer

    out = []
    for item, enc in zip(items, encoded):
        with torch.inference_mode():
            ids = model.generate(torch.tensor([enc.context]), max_new_tokens=GREEDY_TOKENS, do_sample=False,
                                 pad_token_id=tokenizer.pad_token_id)
        text = tokenizer.decode(ids[0, len(enc.context):], skip_special_tokens=True)
        out.append((text, parse_answer(text, options=list(item.options)).letter))
    return out


def _prompt(item, args) -> str:
    from medtune.prompts import build_prompt

    return build_prompt(item, args.prompt_style, args.tokenizer)


def _argmax(values: list[float]) -> int:
    return max(range(len(values)), key=values.__getitem__)


def _normalize(lps: list[float]) -> list[float]:
    top = max(lps)
    log_z = top + math.log(sum(math.exp(v - top) for v in lps))
    return [v - log_z for v in lps]


def _speed(llama_cpp, path: Path, model, tokenizer, items, encoded, args) -> dict:
    """Greedy generation of GEN_TOKENS new tokens (EOS suppressed) per prompt, batch 1; rounds alternate the two."""
    import torch

    llm = llama_cpp.Llama(str(path), n_ctx=512, n_threads=args.threads, verbose=False)
    eos = llm.token_eos()
    prompts = [e.context for e in encoded[: args.speed_prompts]]
    rates = {"llamacpp": [], "transformers": []}
    for _ in range(2):
        t0, n = time.perf_counter(), 0
        for p in prompts:
            out = llm.create_completion(p, max_tokens=GEN_TOKENS, temperature=0.0, logit_bias={eos: -1e9})
            n += out["usage"]["completion_tokens"]
        rates["llamacpp"].append(n / (time.perf_counter() - t0))
        t0, n = time.perf_counter(), 0
        for p in prompts:
            with torch.inference_mode():
                ids = model.generate(torch.tensor([p]), max_new_tokens=GEN_TOKENS, min_new_tokens=GEN_TOKENS,
                                     do_sample=False, pad_token_id=tokenizer.pad_token_id)
            n += ids.shape[1] - len(p)
        rates["transformers"].append(n / (time.perf_counter() - t0))
    cpp, hf = statistics.median(rates["llamacpp"]), statistics.median(rates["transformers"])
    return {"gen_tokens_per_s_llamacpp": cpp, "gen_tokens_per_s_transformers_fp32": hf, "speedup": cpp / hf,
            "rounds": rates}


def _markdown(r: dict) -> str:
    lines = [("| GGUF | size (MiB) | llama.cpp load (s) | prompt tokens identical | first-token letter log-probs: max / "
              "mean abs Δ (option-normalized max) | letter argmax agreement | greedy text identical | greedy letter "
              "agreement (vs transformers greedy / vs medtune letter method) | tokens/s llama.cpp | tokens/s transformers fp32 | speed-up |"),
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for t, x in r["types"].items():
        lines.append(
            f"| {t.upper()} | {x['size_bytes'] / 2**20:.1f} | {x['llamacpp_load_s']:.2f} | "
            f"{x['prompt_tokens_identical']:.0%} | {x['first_token_max_abs_logprob_diff']:.4f} / "
            f"{x['first_token_mean_abs_logprob_diff']:.4f} ({x['first_token_max_abs_option_normalized_diff']:.4f}) | "
            f"{x['letter_argmax_agreement']:.1%} | {x['greedy_text_identical']:.1%} | "
            f"{x['greedy_letter_agreement']:.1%} / {x['greedy_letter_vs_medtune_letter_method']:.1%} | "
            f"{x['gen_tokens_per_s_llamacpp']:.1f} | "
            f"{x['gen_tokens_per_s_transformers_fp32']:.1f} | {x['speedup']:.2f}x |")
    lines.append(f"\ntransformers load (safetensors, fp32): {r['transformers_load_s']:.2f} s; n = {r['n']}, "
                 f"`{r['prompt_style']}` prompt, {r['threads']} threads, llama-cpp-python {r['llama_cpp_python']}; "
                 f"transformers' greedy answers without a parseable letter: {r['greedy_unparseable_transformers']}")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
