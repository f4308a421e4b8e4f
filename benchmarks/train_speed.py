"""Training speed: the seed project's `transformers.Trainer` loop against `medtune.train.train`, side by side.

Both variants train the same base model on the same 2,000 MedMCQA questions (medtune's standard split of the
published dev file, seed 42) with the same LoRA (r=8, alpha=16, dropout 0.05, q_proj+v_proj), the same sequence cap
(256 tokens) and the same batch geometry (4 x grad accumulation 4 = 16 examples per optimizer step), for a fixed number
of optimizer steps:

  baseline  the seed recipe re-implemented faithfully (see MEASURING.md, "The seed project's training recipe"): plain
            Trainer, seed text format, loss on every token, no EOS, pad = eos, right padding,
            DataCollatorForSeq2Seq(pad_to_multiple_of=8), gradient checkpointing, AdamW, fp32 on CPU.
  medtune   medtune.train.train with medtune's own choices otherwise (device dtype policy, completion-only loss with
            EOS, length-grouped batches, its prompt style), plus gradient checkpointing: without it medtune's peak
            RSS is ~1.5x the baseline's (measured: 3.6-3.7 GB vs 2.4 GB), with it ~2.0-2.2 GB, inside the baseline's.
  medtune-nogc  the same with medtune's shipped default, gradient_checkpointing=false (speed vs memory trade-off).
  medtune-fp32base  medtune-nogc with the frozen base weights kept in fp32 under bf16 autocast (before issue 10).
  medtune-4bit  medtune-nogc with lora.quantize=4bit (NF4 + double quantization, bitsandbytes' CPU backend).

Each variant runs in its own subprocess (clean peak RSS and threads); the parent alternates them over --repeats and
reports seconds per optimizer step, real (attention_mask == 1) tokens per second and peak RSS, plus the medtune /
baseline ratios (`ratios` for medtune, `ratios_by_variant` for each). With >= 3 steps the first step is warm-up and
is not measured.

    .venv/bin/python benchmarks/train_speed.py --steps 6 --repeats 2 --out runs/bench/train_speed.json
    .venv/bin/python benchmarks/train_speed.py --show-example      # one baseline example and its label mask
    .venv/bin/python benchmarks/train_speed.py --tiny --out /tmp/t.json   # tiny random Llama, 2 steps (the test)
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data" / "medmcqa" / "dev.jsonl"
MARK = "TRAIN_SPEED_RESULT "  # prefix of the child's result line on stdout (Trainer prints its own dicts there)
VARIANTS = ("baseline", "medtune", "medtune-nogc", "medtune-fp32base", "medtune-4bit")
GRADIENT_CHECKPOINTING = {"medtune": True, "medtune-nogc": False,  # medtune's own default is False
                          "medtune-fp32base": False, "medtune-4bit": False}
VARIANT_SETS = {"medtune-4bit": ["lora.quantize=4bit"]}  # QLoRA: NF4 base through bitsandbytes (medtune[qlora])
TRAIN_SIZE, SPLIT_SEED = 2000, 42
LORA = {"r": 8, "alpha": 16, "dropout": 0.05, "target_modules": ["q_proj", "v_proj"]}
MAX_LENGTH, BATCH, ACCUM, LR = 256, 4, 4, 2e-4


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.steps is None:
        args.steps = 2 if args.tiny else 6
    if args.variant:
        return child(args)
    if args.show_example:
        show_example(args)
        return 0
    return parent(args)


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--steps", type=int, default=None, help="optimizer steps per run (default 6; 2 with --tiny)")
    p.add_argument("--repeats", type=int, default=1, help="runs per variant, alternating the order (default 1)")
    p.add_argument("--out", type=Path, help="write the results JSON here")
    p.add_argument("--tiny", action="store_true", help="a tiny random Llama (hidden 32, 2 layers) instead of the "
                                                       "embedded model: checks the script, measures nothing")
    p.add_argument("--data", type=Path, default=DATA, help=f"MedMCQA published-format JSONL (default {DATA})")
    p.add_argument("--variants", default=",".join(VARIANTS[:3]),
                   help=f"comma-separated, baseline first, from {', '.join(VARIANTS)} (default {','.join(VARIANTS[:3])})")
    p.add_argument("--set", dest="sets", action="append", default=[], metavar="KEY=VALUE",
                   help="extra config override for the medtune variants (wins over theirs), e.g. prompt_style=seed")
    p.add_argument("--show-example", action="store_true", help="print one baseline example, its label mask and "
                                                               "medtune's version of the same item, then exit")
    p.add_argument("--variant", choices=VARIANTS, help="(internal) run one variant in this process")
    p.add_argument("--model", help="(internal) model dir for --variant (default: the embedded model)")
    p.add_argument("--json", action="store_true", help="(internal) with --variant: print the result as one JSON line")
    return p.parse_args(argv)


# ---------------------------------------------------------------- parent: alternate the variants, summarize


def parent(args) -> int:
    if not args.data.is_file():
        print(f"error: {args.data}: MedMCQA file not found; pass --data PATH", file=sys.stderr)
        return 2
    names = [v.strip() for v in args.variants.split(",") if v.strip()]
    if names[:1] != ["baseline"] or len(names) < 2 or not set(names) <= set(VARIANTS):
        print(f"error: --variants {args.variants!r}: baseline first, then one or more of {', '.join(VARIANTS[1:])}",
              file=sys.stderr)
        return 2
    with tempfile.TemporaryDirectory(prefix="train-speed-") as tmp:
        model = build_tiny(Path(tmp) / "tiny") if args.tiny else embedded_dir()
        runs: dict[str, list[dict]] = {v: [] for v in names}
        for r in range(args.repeats):
            order = names if r % 2 == 0 else names[::-1]  # alternate who runs first (machine drift)
            for variant in order:
                print(f"[repeat {r + 1}/{args.repeats}] {variant}: {args.steps} steps ...", file=sys.stderr, flush=True)
                runs[variant].append(run_child(args, variant, model))
    result = summarize(args, runs)
    print_table(result)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=1) + "\n")
        print(f"wrote {args.out}")
    return 0


def run_child(args, variant: str, model: str) -> dict:
    cmd = [sys.executable, str(Path(__file__).resolve()), "--variant", variant, "--steps", str(args.steps), "--json",
           "--model", model, "--data", str(args.data)] + [f"--set={s}" for s in args.sets]
    # stderr (progress, warnings) passes through; stdout holds the result line
    proc = subprocess.run(cmd, check=False, stdout=subprocess.PIPE, text=True, cwd=ROOT)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith(MARK)]
    if proc.returncode != 0 or not lines:
        sys.stderr.write(proc.stdout[-4000:])
        raise SystemExit(f"{variant} run failed (exit {proc.returncode})")
    return json.loads(lines[-1][len(MARK):])


def summarize(args, runs: dict[str, list[dict]]) -> dict:
    import torch
    import transformers

    variants = {}
    for v, rs in runs.items():
        variants[v] = {"runs": rs, **{k: statistics.median(r[k] for r in rs)
                                      for k in ("sec_per_step", "tokens_per_s", "peak_rss_mb", "real_tokens_per_step")}}
    by_variant = {v: ratios(runs["baseline"], rs) for v, rs in runs.items() if v != "baseline"}
    return {"benchmark": "train_speed", "note": "medtune / baseline ratios are medians of per-repeat ratios",
            "steps": args.steps, "repeats": args.repeats, "tiny": args.tiny, "data": str(args.data),
            "train_items": TRAIN_SIZE, "examples_per_step": BATCH * ACCUM, "medtune_sets": args.sets,
            "machine": {"cpu_count": os.cpu_count(), "platform": platform.platform(),
                        "python": platform.python_version(),
                        "torch": torch.__version__, "transformers": transformers.__version__},
            "variants": variants, "ratios": by_variant.get("medtune") or next(iter(by_variant.values())),
            "ratios_by_variant": by_variant}


def ratios(base: list[dict], other: list[dict]) -> dict:
    """Medians of per-repeat ratios: repeat i of each variant ran back to back, under roughly the same load."""
    pairs = list(zip(base, other))
    return {name: round(statistics.median(o[key] / b[key] for b, o in pairs), 3)
            for name, key in (("tokens_per_s", "tokens_per_s"), ("sec_per_step", "sec_per_step"),
                              ("peak_rss", "peak_rss_mb"))}


def print_table(result: dict) -> None:
    print(f"\n{result['steps']} optimizer steps of {result['examples_per_step']} examples, {result['repeats']} "
          f"repeat(s){' (tiny model)' if result['tiny'] else ''}; medians")
    print(f"{'variant':<14}{'steps':>6}{'measured':>10}{'s/step':>9}{'real tok/s':>12}{'tok/step':>10}"
          f"{'peak RSS MB':>13}")
    for v, s in result["variants"].items():
        r = s["runs"][0]
        print(f"{v:<14}{r['steps']:>6}{r['measured_steps']:>10}{s['sec_per_step']:>9.2f}{s['tokens_per_s']:>12.1f}"
              f"{s['real_tokens_per_step']:>10.0f}{s['peak_rss_mb']:>13.0f}")
    for v, q in result["ratios_by_variant"].items():
        print(f"{v} / baseline: throughput x{q['tokens_per_s']:.2f}, seconds per step x{q['sec_per_step']:.2f}, "
              f"peak RSS x{q['peak_rss']:.2f}")


def embedded_dir() -> str:
    from medtune.models import resolve

    return resolve("embedded", log=lambda m: print(m, file=sys.stderr))


def build_tiny(out: Path) -> str:
    """A tiny random Llama with the embedded model's tokenizer, built from config (as tests/conftest.py does)."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    tok = AutoTokenizer.from_pretrained(embedded_dir())
    config = LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024,
                         bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
                         tie_word_embeddings=True)
    LlamaForCausalLM(config).save_pretrained(out)
    tok.save_pretrained(out)
    return str(out)


# ---------------------------------------------------------------- child: one variant, one process


def child(args) -> int:
    items = train_items(args.data)
    model = args.model or embedded_dir()
    with tempfile.TemporaryDirectory(prefix=f"train-speed-{args.variant}-") as tmp:
        if args.variant == "baseline":
            result = run_baseline(model, items, args.steps, Path(tmp))
        else:
            result = run_medtune(args.variant, model, items, args.steps, Path(tmp), args.sets)
    result["peak_rss_mb"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)  # Linux: KiB
    if args.json:
        print(MARK + json.dumps(result), flush=True)
    else:
        print(json.dumps(result, indent=1))
    return 0


def train_items(path: Path):
    from medtune.data.formats import read_file
    from medtune.data.split import split

    train, _ = split(read_file(path), TRAIN_SIZE, seed=SPLIT_SEED)
    return train


def measure(variant: str, steps: int, begin: float, ends: list[float], tokens: list[int], extra: dict) -> dict:
    """Seconds per step and real tokens/s from per-step end times and cumulative real-token counts; from the end of
    step 1 when there are >= 3 steps (step 1 is warm-up: allocator, autograd graph, first-touch pages)."""
    if len(ends) != steps:
        raise RuntimeError(f"{variant}: expected {steps} optimizer steps, timed {len(ends)}")
    if steps >= 3:
        span, real, measured, first = ends[-1] - ends[0], tokens[-1] - tokens[0], steps - 1, 2
    else:
        span, real, measured, first = ends[-1] - begin, tokens[-1], steps, 1
    return {"variant": variant, "steps": steps, "measured_steps": measured, "measured_from_step": first,
            "seconds": round(span, 3), "sec_per_step": round(span / measured, 3), "real_tokens": real,
            "real_tokens_per_step": round(real / measured, 1), "tokens_per_s": round(real / span, 2), **extra}


def updated(lora_b: list) -> float:
    """Share of LoRA B matrices that left their zero init: a check that gradients reached the adapters (with a
    1-step warm-up the first step has lr 0, so this needs >= 2 steps)."""
    return round(sum(bool(t.abs().sum()) for t in lora_b) / max(len(lora_b), 1), 3)


# ---- baseline: the seed project's loop


def seed_text(item) -> str:
    """The seed's training text for one MedMCQA row (options in published order, gold letter from cop)."""
    letters = "ABCD"
    options = "\n".join(f"{letters[i]}) {text}" for i, text in enumerate(item.options))
    return (f"### Question:\n{item.question}\n\n### Options:\n{options}\n\n### Answer:\n"
            f"{letters[item.answer]}) {item.options[item.answer]}\n\n### Explanation:\n"
            f"{item.explanation or 'No explanation provided.'}")


def seed_tokenizer(model_dir: str):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    tok.pad_token = tok.eos_token  # the seed: pad = eos
    tok.padding_side = "right"
    return tok


def seed_encode(tok, item) -> dict:
    """Truncate at 256 tokens, labels = input ids (loss on everything), no EOS appended."""
    enc = tok(seed_text(item), truncation=True, max_length=MAX_LENGTH)
    return {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"], "labels": list(enc["input_ids"])}


def run_baseline(model_dir: str, items, steps: int, tmp: Path) -> dict:
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, DataCollatorForSeq2Seq, Trainer, TrainerCallback, TrainingArguments

    tok = seed_tokenizer(model_dir)
    dataset = [seed_encode(tok, item) for item in items]  # the first N train rows, in order; the sampler shuffles
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    model = get_peft_model(model, LoraConfig(r=LORA["r"], lora_alpha=LORA["alpha"], lora_dropout=LORA["dropout"],
                                             target_modules=LORA["target_modules"], bias="none", task_type="CAUSAL_LM"))
    seen = {"tokens": 0}

    def count(_module, _args, kwargs):  # every micro-batch's forward; checkpoint recomputes run below this module
        seen["tokens"] += int(kwargs["attention_mask"].sum())

    model.register_forward_pre_hook(count, with_kwargs=True)

    class Clock(TrainerCallback):
        begin, ends, tokens = 0.0, [], []

        def on_train_begin(self, *a, **k):
            Clock.begin = time.perf_counter()

        def on_step_end(self, *a, **k):
            Clock.ends.append(time.perf_counter())
            Clock.tokens.append(seen["tokens"])

    targs = TrainingArguments(
        output_dir=str(tmp), per_device_train_batch_size=BATCH, gradient_accumulation_steps=ACCUM, learning_rate=LR,
        # warmup_steps < 1 is a share of total steps (transformers 5 removed warmup_ratio), as the seed ran here
        lr_scheduler_type="cosine", warmup_steps=0.05,
        num_train_epochs=2, max_steps=steps, gradient_checkpointing=True, use_cpu=True, report_to=[],
        save_strategy="no", logging_steps=1, seed=42, disable_tqdm=True)
    trainer = Trainer(model=model, args=targs, train_dataset=dataset, callbacks=[Clock()],
                      data_collator=DataCollatorForSeq2Seq(tok, padding=True, pad_to_multiple_of=8))
    trainer.train()
    if not seen["tokens"]:
        raise RuntimeError("baseline: the token-counting hook never ran")
    losses = [round(h["loss"], 4) for h in trainer.state.log_history if "loss" in h]
    extra = {"losses": losses, "lora_b_updated": updated([p.detach() for n, p in model.named_parameters()
                                                          if "lora_B" in n]),
             "torch_threads": torch.get_num_threads(), "dtype": "float32",
             "attention": model.config._attn_implementation, "gradient_checkpointing": True,
             "loss_on": "all tokens", "optimizer": targs.optim if isinstance(targs.optim, str) else targs.optim.value}
    return measure("baseline", steps, Clock.begin, Clock.ends, Clock.tokens, extra)


# ---- medtune


def medtune_overrides(model: str, steps: int, sets: list[str], n_items: int = TRAIN_SIZE) -> list[str]:
    epochs = max(1, math.ceil(steps * BATCH * ACCUM / n_items))  # with max_steps, epochs only sets the plan's length
    return [f"model={model}", "device=cpu", f"train.max_steps={steps}", f"train.epochs={epochs}",
            f"lora.r={LORA['r']}", f"lora.alpha={LORA['alpha']}", f"lora.dropout={LORA['dropout']}",
            f"lora.target_modules=[{', '.join(LORA['target_modules'])}]", f"train.max_length={MAX_LENGTH}",
            f"train.batch_size={BATCH}", f"train.grad_accum={ACCUM}", f"train.lr={LR}", "train.scheduler=cosine",
            "train.warmup=0.05", *sets]


def run_medtune(variant: str, model_dir: str, items, steps: int, tmp: Path, sets: list[str]) -> dict:
    from unittest import mock

    import torch
    from safetensors.torch import load_file

    from medtune import train as train_mod
    from medtune.config import load_config
    from medtune.hardware import decide, detect
    from medtune.train import attention_kernel, mixed_precision_for, train

    sets = [f"train.gradient_checkpointing={str(GRADIENT_CHECKPOINTING[variant]).lower()}",
            *VARIANT_SETS.get(variant, []), *sets]  # --set wins
    cfg = load_config(None, medtune_overrides(model_dir, steps, sets, len(items)))
    fp32 = mock.patch.object(train_mod, "training_base_dtype", lambda accelerator: "float32")
    with fp32 if variant == "medtune-fp32base" else contextlib.nullcontext():
        train(cfg, items, tmp, quiet=True, log=lambda m: print(m, file=sys.stderr))
    rows = [json.loads(line) for line in (tmp / "metrics.jsonl").read_text().splitlines() if line.strip()]
    info = detect()
    policy = decide(info)
    mixed = mixed_precision_for(cfg.train.dtype, policy.train_dtype)
    adapter = load_file(str(tmp / "adapter" / "adapter_model.safetensors"))
    extra = {"losses": [round(r["loss"], 4) for r in rows],
             "lora_b_updated": updated([t for n, t in adapter.items() if "lora_B" in n]),
             "torch_threads": torch.get_num_threads(),
             "dtype": "float32" if mixed == "no" else f"{mixed} autocast, frozen base in " + (
                 "fp32" if variant == "medtune-fp32base" else cfg.lora.quantize if cfg.lora.quantize != "none"
                 else f"{mixed} (LoRA weights and AdamW state fp32)"),
             "attention": attention_kernel(cfg, info, policy), "gradient_checkpointing": cfg.train.gradient_checkpointing,
             "loss_on": f"target ({cfg.train.target}) + EOS", "prompt_style": cfg.prompt_style, "sets": sets}
    # elapsed_s and tokens are cumulative from train()'s t0 (just before step 1); begin = 0 on that clock
    return measure(variant, steps, 0.0, [r["elapsed_s"] for r in rows], [r["tokens"] for r in rows], extra)


# ---------------------------------------------------------------- --show-example


def show_example(args) -> None:
    from transformers import DataCollatorForSeq2Seq

    from medtune.batches import collate, tokenize_example
    from medtune.config import load_config
    from medtune.models import load_tokenizer
    from medtune.prompts import build_prompt, build_target

    items = train_items(args.data)
    model = embedded_dir()
    tok = seed_tokenizer(model)
    batch = DataCollatorForSeq2Seq(tok, padding=True, pad_to_multiple_of=8)([seed_encode(tok, i) for i in items[:4]])
    item = items[0]
    text = seed_text(item)
    assert text == build_prompt(item, "seed") + build_target(item, "seed"), "seed text differs from prompts.py 'seed'"
    ids, labels, mask = batch["input_ids"][0], batch["labels"][0], batch["attention_mask"][0]
    print("=== baseline (seed recipe): text ===")
    print(text)
    print(f"=== baseline: {int(mask.sum())} real tokens, batch padded to {ids.shape[0]} (multiple of 8); "
          f"loss on {int((labels != -100).sum())} tokens; "
          f"EOS appended: {int(ids[int(mask.sum()) - 1]) == tok.eos_token_id}")
    print("label mask (# = loss, . = -100), first row of the first 4-example batch:")
    print("".join("#" if x != -100 else "." for x in labels.tolist()))
    cfg = load_config(None, medtune_overrides(model, 1, args.sets))
    mtok = load_tokenizer(model, padding_side="right")
    ex = tokenize_example(item, cfg, mtok)
    _, _, mlabels = collate([ex], mtok.pad_token_id, "cpu")
    print(f"\n=== medtune ({cfg.prompt_style} style, option order as published; training shuffles it) ===")
    print(mtok.decode(ex.input_ids[:ex.prompt_len]) + "[[" + mtok.decode(ex.input_ids[ex.prompt_len:]) + "]]")
    print(f"=== medtune: {len(ex.input_ids)} tokens, loss on {int((mlabels != -100).sum())} ([[...]] = target + EOS)")
    print("".join("#" if x != -100 else "." for x in mlabels[0].tolist()))


if __name__ == "__main__":
    sys.exit(main())
