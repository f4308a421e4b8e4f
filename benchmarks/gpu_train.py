"""LoRA training throughput on a GPU: the seed project's recipe against medtune's defaults, on Qwen3-1.7B's shape.

Needs no network: the model is `Qwen3ForCausalLM` built from the published Qwen3-1.7B config with random weights
(throughput doesn't depend on the weights), the data 2,000 sequences of random token ids whose lengths follow MedMCQA
(each one prompt tokens, then target tokens). Both variants train 2 epochs on the same sequences:

  seed     the seed project's settings (MEASURING.md): bf16 weights, LoRA r=8/alpha 16/dropout 0.05 on q_proj+v_proj,
           batch 4 x accumulation 4 in an order shuffled per epoch, padded to a multiple of 8, loss on every
           token (full logits), gradient checkpointing, AdamW + cosine, gradient clipping at 1.0 (Trainer's default).
  medtune  `medtune.train.train` itself with `Config()` defaults (LoRA r/alpha on all linear layers, batch size,
           completion-only loss, length-grouped batches, the device policy's dtype and attention), with three seams
           swapped: the model comes from the config above instead of a download, the examples are already token ids
           (tokenization is the identity), and no adapter is saved.

Reports wall time for the epochs (after one untimed warm-up micro-batch), real (non-padding) tokens/s, peak GPU
memory and model FLOPs utilization = 4 x params x real tokens / wall / peak bf16 FLOP/s (LoRA skips most weight
gradients, so 4 rather than 6; MEASURING.md; both variants are credited the same FLOPs per real token, though medtune
skips the vocabulary projection on prompt positions, so the MFU ratio is the tokens/s ratio). Runs unchanged on CUDA
and ROCm (torch drives HIP through torch.cuda).

    python benchmarks/gpu_train.py --json gpu_train.json
    python benchmarks/gpu_train.py --variants seed,medtune,medtune-bf16     # + medtune with the base forced to bf16
                                                  # (medtune holds it in bf16 itself wherever it trains in bf16)
    python benchmarks/gpu_train.py --tiny --json /tmp/tiny.json             # seconds on a CPU: checks the script
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import os
import platform
import random
import sys
import tempfile
import time
from contextlib import ExitStack
from pathlib import Path
from types import SimpleNamespace
from unittest import mock

ROOT = Path(__file__).resolve().parents[1]
try:
    import medtune  # noqa: F401
except ImportError:  # a bare checkout on the GPU machine: use the source tree
    sys.path.insert(0, str(ROOT / "src"))

QWEN3_1_7B = {"hidden_size": 2048, "intermediate_size": 6144, "num_hidden_layers": 28, "num_attention_heads": 16,
              "num_key_value_heads": 8, "head_dim": 128, "vocab_size": 151936, "tie_word_embeddings": True,
              "rope_theta": 1e6, "max_position_embeddings": 40960}
TINY = {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4,
        "num_key_value_heads": 2, "head_dim": 16, "vocab_size": 1000, "tie_word_embeddings": True, "rope_theta": 1e6,
        "max_position_embeddings": 512}
# Dense bf16 peak FLOP/s by device name, most specific first (vendor datasheets; --peak-tflops overrides).
PEAK_BF16 = [("H100 PCIe", 756e12), ("H100 NVL", 835e12), ("H200", 989e12), ("H100", 989e12), ("GH200", 989e12),
             ("MI325X", 1307e12), ("MI300X", 1307e12), ("MI300A", 981e12), ("A100", 312e12)]
# MedMCQA dev through medtune's harness prompt + answer+explanation target + EOS, embedded tokenizer (4,183 items):
# log-length mean 4.68, sd 0.64 (median 99 tokens, 10% over 256), target share of a capped example 38% on average.
# The fallback when the data or the tokenizer isn't at hand.
LOGNORMAL_MU, LOGNORMAL_SIGMA, TARGET_SHARE, MIN_LEN = 4.68, 0.64, 0.38, 16
CAP = 256  # the seed's truncation; used for both variants so they train on the same tokens
SEED_RECIPE = {"r": 8, "alpha": 16, "dropout": 0.05, "targets": ["q_proj", "v_proj"], "batch_size": 4, "grad_accum": 4,
               "lr": 2e-4, "warmup": 0.05, "pad_multiple": 8, "max_grad_norm": 1.0}


def main(argv: list[str] | None = None) -> dict:
    args = _parse(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # nothing here needs the network; fail fast instead of hanging
    from medtune.hardware import prepare_env

    prepare_env()  # ROCm reads HSA_OVERRIDE_GFX_VERSION once, when HIP starts: before anything touches the GPU
    import torch
    import transformers

    device = args.device if args.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
    arch = TINY if args.tiny else QWEN3_1_7B
    n = args.sequences or (40 if args.tiny else 2000)
    epochs = args.epochs or (1 if args.tiny else 2)
    examples, lengths_from = synth_examples(n, arch["vocab_size"], args.seed, None if args.tiny else args.data)
    name, backend = _device_name(device)
    peak = args.peak_tflops * 1e12 if args.peak_tflops else _peak_flops(name) if device == "cuda" else None
    params = _count_params(arch)
    lengths = sorted(len(ex.input_ids) for ex in examples)
    targets = sum(len(ex.input_ids) - ex.prompt_len for ex in examples)
    result = {"device": name, "backend": backend, "torch": torch.__version__, "transformers": transformers.__version__,
              "model": "tiny-qwen3" if args.tiny else "qwen3-1.7b-shape (random weights)", "params": params,
              "sequences": n, "epochs": epochs, "lengths_from": lengths_from,
              "length_stats": {"tokens": sum(lengths), "mean": round(sum(lengths) / n, 1), "median": lengths[n // 2],
                               "max": lengths[-1], "target_share": round(targets / sum(lengths), 3)},
              "peak_flops": peak, "variants": {}}
    runners = {"seed": lambda: run_seed(arch, examples, epochs, device, args.seed),
               "medtune": lambda: run_medtune(arch, examples, epochs, device, args.seed, None),
               "medtune-bf16": lambda: run_medtune(arch, examples, epochs, device, args.seed, torch.bfloat16)}
    for variant in args.variants:
        _free(device)
        row = runners[variant]()
        row["mfu"] = 4 * params * row["real_tokens"] / row["wall_s"] / peak if peak and row["wall_s"] else None
        result["variants"][variant] = row
        _print_row(variant, row)
    v = result["variants"]
    if "seed" in v and "medtune" in v and v["seed"]["tokens_per_s"]:
        result["speedup_tokens_per_s"] = round(v["medtune"]["tokens_per_s"] / v["seed"]["tokens_per_s"], 3)
        print(f"medtune / seed real tokens/s: {result['speedup_tokens_per_s']}x")
    print(f"device: {name} ({backend}); {params:,} params; {n} sequences x {epochs} epochs; "
          f"lengths from {lengths_from}")
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1))
    return result


def _parse(argv):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--tiny", action="store_true", help="a tiny Qwen3, 40 sequences, 1 epoch: checks the script")
    p.add_argument("--variants", default="seed,medtune", help="comma-separated: seed, medtune, medtune-bf16")
    p.add_argument("--device", default="auto", choices=["auto", "cuda", "cpu"], help="cuda also means ROCm")
    p.add_argument("--sequences", type=int, help="default 2000 (tiny: 40)")
    p.add_argument("--epochs", type=int, help="default 2 (tiny: 1)")
    p.add_argument("--seed", type=int, default=42)
    p.add_argument("--data", type=Path, default=_default_data(), help="MedMCQA JSONL whose lengths to sample")
    p.add_argument("--peak-tflops", type=float, help="the device's dense bf16 peak, when the table doesn't know it")
    p.add_argument("--json", type=Path, help="write the results here")
    args = p.parse_args(argv)
    args.variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    unknown = sorted(set(args.variants) - {"seed", "medtune", "medtune-bf16"})
    if unknown or not args.variants:
        p.error(f"--variants: unknown {', '.join(unknown) or '(none given)'}; choose from seed, medtune, medtune-bf16")
    return args


def _default_data() -> Path:
    for base in (ROOT / "shared", ROOT.parent / "shared"):  # a shared/ inside the checkout, or beside it
        if (base / "data" / "medmcqa" / "dev.jsonl").is_file():
            return base / "data" / "medmcqa" / "dev.jsonl"
    return ROOT.parent / "shared" / "data" / "medmcqa" / "dev.jsonl"


# ---------------------------------------------------------------------------------------------------------- data

def synth_examples(n: int, vocab: int, seed: int, data: Path | None):
    """n sequences of random ids with (length, prompt length) pairs drawn from MedMCQA, or the fitted lognormal."""
    from medtune.batches import Example

    rng = random.Random(seed)
    pairs, source = _real_lengths(data) if data is not None else (None, "lognormal (tiny)")
    if pairs:
        drawn = [rng.choice(pairs) for _ in range(n)]
    else:
        lengths = [min(CAP, max(MIN_LEN, round(rng.lognormvariate(LOGNORMAL_MU, LOGNORMAL_SIGMA)))) for _ in range(n)]
        drawn = [(length, length - max(1, round(TARGET_SHARE * length))) for length in lengths]
    # ids avoid 0, the pad id of both variants, so padding is never mistaken for a token
    return [Example([rng.randrange(1, vocab) for _ in range(length)], prompt) for length, prompt in drawn], source


def _real_lengths(path: Path):
    """(length, prompt length) of every item in `path` as medtune tokenizes it, capped at CAP; None when unavailable."""
    from medtune import models
    from medtune.batches import tokenize_example
    from medtune.config import Config
    from medtune.data import sources
    from medtune.errors import MedtuneError

    if not path.is_file():
        return None, f"lognormal fitted to MedMCQA dev ({path} not found)"
    if models.embedded_gguf() is None:
        return None, "lognormal fitted to MedMCQA dev (embedded tokenizer not installed)"
    try:
        tok = models.load_tokenizer(models.resolve("embedded", log=lambda *_: None), padding_side="right")
        items = sources.load(str(path))
    except (MedtuneError, OSError, ImportError) as e:
        return None, f"lognormal fitted to MedMCQA dev ({type(e).__name__}: {e})"
    cfg = Config()
    cfg.train.max_length = CAP
    pairs = [(len(ex.input_ids), ex.prompt_len) for ex in (tokenize_example(i, cfg, tok) for i in items)]
    return pairs, f"{path.name} ({len(pairs)} items, embedded tokenizer as a proxy)"


# ---------------------------------------------------------------------------------------------------------- models

def build_model(arch: dict, dtype, attn: str | None, device):
    """Random-weight Qwen3 built directly on `device` (no 7 GB fp32 detour through host memory)."""
    import torch
    from transformers import AutoModelForCausalLM, Qwen3Config

    torch.manual_seed(0)
    with torch.device(device):
        kwargs = {"attn_implementation": attn} if attn else {}
        return AutoModelForCausalLM.from_config(Qwen3Config(**arch), dtype=dtype, **kwargs)


def _count_params(arch: dict) -> int:
    import torch

    with torch.device("meta"):
        return sum(p.numel() for p in build_model(arch, torch.bfloat16, None, "meta").parameters())


# ---------------------------------------------------------------------------------------------------------- seed

def run_seed(arch: dict, examples, epochs: int, device: str, seed: int) -> dict:
    """The seed's `transformers.Trainer` recipe as a plain loop (the same work per step, no Trainer overhead)."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import get_scheduler

    s = SEED_RECIPE
    dtype = torch.bfloat16 if device == "cuda" else torch.float32  # the seed ran fp16 on GPU, fp32 on CPU
    mem0 = _mem_start(device)
    model = build_model(arch, dtype, "sdpa", device)  # transformers' default attention
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.enable_input_require_grads()
    model = get_peft_model(model, LoraConfig(r=s["r"], lora_alpha=s["alpha"], lora_dropout=s["dropout"],
                                             target_modules=s["targets"], task_type="CAUSAL_LM"))
    model.config.use_cache = False
    params = [p for p in model.parameters() if p.requires_grad]
    gen = torch.Generator().manual_seed(seed)
    epoch_steps = []  # per epoch: optimizer steps of micro-batches; Trainer's RandomSampler reshuffles every epoch
    for _ in range(epochs):
        order = torch.randperm(len(examples), generator=gen).tolist()
        micro = [[examples[i] for i in order[k: k + s["batch_size"]]] for k in range(0, len(order), s["batch_size"])]
        epoch_steps += [micro[k: k + s["grad_accum"]] for k in range(0, len(micro), s["grad_accum"])]
    optimizer = torch.optim.AdamW(params, lr=s["lr"])
    scheduler = get_scheduler("cosine", optimizer, num_warmup_steps=math.ceil(s["warmup"] * len(epoch_steps)),
                              num_training_steps=len(epoch_steps))
    model.train()
    warm = _warmup(lambda ids, mask, labels: model(input_ids=ids, attention_mask=mask, labels=labels).loss,
                   [_seed_collate(epoch_steps[0][0], device)[:3]], model, device)
    real = padded = 0
    step_loss = None
    _sync(device)
    t0 = time.perf_counter()
    for step in epoch_steps:
        batches = [_seed_collate(b, device) for b in step]
        n_step = sum(n for *_, n in batches)
        step_loss = 0.0
        for ids, mask, labels, n in batches:  # HF's loss is a mean per micro-batch; weight it to the step's mean
            loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss * (n / n_step)
            loss.backward()
            step_loss = step_loss + loss.detach()  # stays on the device: no sync per micro-batch
        real += sum(len(ex.input_ids) for b in step for ex in b)
        padded += sum(ids.numel() for ids, *_ in batches)
        torch.nn.utils.clip_grad_norm_(params, s["max_grad_norm"])
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
    _sync(device)
    wall = time.perf_counter() - t0
    row = _row(wall, real, padded, len(epoch_steps), sum(p.numel() for p in params), device, mem0, warm,
               final_loss=float(step_loss))
    row["settings"] = {**s, "weights": str(dtype).removeprefix("torch."), "autocast": None, "attention": "sdpa",
                       "gradient_checkpointing": True, "loss": "all tokens, full logits", "order": "shuffled"}
    return row


def _seed_collate(batch, device):
    """DataCollatorForSeq2Seq(padding=True, pad_to_multiple_of=8): right padding, labels = ids, -100 on padding."""
    import torch

    multiple = SEED_RECIPE["pad_multiple"]
    width = math.ceil(max(len(ex.input_ids) for ex in batch) / multiple) * multiple
    ids = torch.zeros((len(batch), width), dtype=torch.long)
    mask = torch.zeros_like(ids)
    for row, ex in enumerate(batch):
        ids[row, : len(ex.input_ids)] = torch.tensor(ex.input_ids)
        mask[row, : len(ex.input_ids)] = 1
    labels = ids.masked_fill(mask == 0, -100)
    n_labels = int((labels[:, 1:] != -100).sum())  # counted on the host: no device sync
    return ids.to(device), mask.to(device), labels.to(device), n_labels


# ---------------------------------------------------------------------------------------------------------- medtune

def run_medtune(arch: dict, examples, epochs: int, device: str, seed: int, base_dtype=None) -> dict:
    """`medtune.train.train` as shipped, on `Config()` defaults. Only three seams change: `from_pretrained` builds the
    random model (with the dtype and attention medtune asks for, unless base_dtype forces the base weights' dtype),
    tokenization is the identity (the examples are ids already), and the adapter isn't saved."""
    import transformers

    from medtune import batches, models
    from medtune import train as T
    from medtune.config import Config

    cfg = Config()
    cfg.device = "cpu" if device == "cpu" else "auto"
    cfg.train.epochs = float(epochs)
    cfg.train.seed = seed
    cfg.data.shuffle_options = False  # option order only changes the text; the ids here are already random
    seen: dict = {}

    def from_pretrained(_path, dtype=None, attn_implementation=None, output_loading_info=False, **_):
        seen.update(weights=str(base_dtype or dtype).removeprefix("torch."), attention=attn_implementation)
        model = build_model(arch, base_dtype or dtype, attn_implementation, "cpu" if device == "cpu" else "cuda")
        return (model, {"missing_keys": [], "unexpected_keys": []}) if output_loading_info else model

    real_lora_model, real_plan = T.lora_model, T.batch_plan

    def lora_model(cfg, accelerator, log, attn_implementation=None, base=None):
        model, tok = real_lora_model(cfg, accelerator, log, attn_implementation, base)
        model.train()
        batch = batches.collate(examples[: cfg.train.batch_size], tok.pad_token_id, accelerator.device)

        def loss_fn(ids, mask, labels):
            with accelerator.autocast():
                return T.completion_loss_sum(model, ids, mask, labels, batches.first_target(examples[: cfg.train.batch_size]))

        seen.update(warmup_s=_warmup(loss_fn, [batch], model, device), autocast=accelerator.mixed_precision,
                    trainable=sum(p.numel() for p in model.parameters() if p.requires_grad))
        return model, tok

    def batch_plan(items, cfg, tokenizer, world=1):
        with mock.patch.object(batches, "tokenize_example", lambda item, cfg, tok: item):  # where batch_plan looks
            plan = real_plan(items, cfg, tokenizer, world)
        seen["plan"] = plan
        return plan

    tok = SimpleNamespace(pad_token_id=0, eos_token_id=1)
    mem0 = _mem_start(device)
    with tempfile.TemporaryDirectory() as tmp, ExitStack() as stack:
        stack.enter_context(mock.patch.object(transformers.AutoModelForCausalLM, "from_pretrained", from_pretrained))
        stack.enter_context(mock.patch.object(models, "resolve", lambda name, log=None: name))
        stack.enter_context(mock.patch.object(models, "load_tokenizer", lambda *a, **k: tok))
        stack.enter_context(mock.patch.object(T, "lora_model", lora_model))
        stack.enter_context(mock.patch.object(T, "batch_plan", batch_plan))
        stack.enter_context(mock.patch.object(T, "save_adapter", lambda *a, **k: None))
        real_begin = T.TrainRun.begin  # synthetic examples have no text to keep in the run dir
        stack.enter_context(mock.patch.object(T.TrainRun, "begin", lambda self, ckpt, _items, plan: real_begin(self, ckpt, [], plan)))
        summary = T.train(cfg, examples, Path(tmp), quiet=True, log=lambda *_: None)
        _sync(device)
    plan = seen["plan"]
    padded = sum(len(b) * max(len(ex.input_ids) for ex in b) for step in plan for b in step)
    row = _row(summary["wall_s"], summary["real_tokens"], padded, summary["steps"], seen["trainable"], device, mem0,
               seen["warmup_s"], final_loss=summary["final_loss"])
    row["settings"] = {"r": cfg.lora.r, "alpha": cfg.lora.alpha, "dropout": cfg.lora.dropout,
                       "targets": cfg.lora.target_modules, "batch_size": cfg.train.batch_size,
                       "grad_accum": cfg.train.grad_accum, "lr": cfg.train.lr, "warmup": cfg.train.warmup,
                       "weights": seen["weights"], "autocast": None if seen["autocast"] == "no" else seen["autocast"],
                       "attention": seen["attention"], "gradient_checkpointing": cfg.train.gradient_checkpointing,
                       "loss": "target tokens only (logits from the first target on)",
                       "order": "length-grouped" if cfg.train.group_by_length else "shuffled"}
    seen.clear()
    return row


# ---------------------------------------------------------------------------------------------------------- timing

def _warmup(loss_fn, batches, model, device) -> float:
    """One untimed forward+backward (kernel selection, allocator growth); gradients dropped, weights untouched."""
    _sync(device)
    t0 = time.perf_counter()
    for ids, mask, labels in batches:
        loss_fn(ids, mask, labels).backward()
    model.zero_grad(set_to_none=True)
    _sync(device)
    return round(time.perf_counter() - t0, 3)


def _row(wall, real, padded, steps, trainable, device, mem0, warmup_s, final_loss) -> dict:
    import torch

    peak = torch.cuda.max_memory_allocated() if device == "cuda" else None
    return {"wall_s": round(wall, 3), "steps": steps, "real_tokens": real, "padded_tokens": padded,
            "pad_share": round(1 - real / padded, 4) if padded else None,
            "tokens_per_s": round(real / wall, 1) if wall else 0.0, "peak_memory_bytes": peak,
            "peak_memory_gib": round(peak / 2**30, 2) if peak is not None else None, "memory_at_start_bytes": mem0,
            "trainable_params": trainable, "warmup_s": warmup_s, "final_loss": final_loss}


def _mem_start(device) -> int | None:
    import torch

    if device != "cuda":
        return None
    torch.cuda.reset_peak_memory_stats()
    return torch.cuda.memory_allocated()  # non-zero means the previous variant's model is still alive


def _free(device) -> None:
    gc.collect()
    if device == "cuda":
        import torch

        torch.cuda.empty_cache()


def _sync(device) -> None:
    if device == "cuda":
        import torch

        torch.cuda.synchronize()


def _device_name(device: str) -> tuple[str, str]:
    import torch

    if device != "cuda":
        return platform.processor() or platform.machine() or "cpu", "cpu"
    name = torch.cuda.get_device_name(0)
    if getattr(torch.version, "hip", None):
        arch = getattr(torch.cuda.get_device_properties(0), "gcnArchName", "")
        return f"{name} ({arch})" if arch else name, f"rocm {torch.version.hip}"
    return name, f"cuda {torch.version.cuda}"


def _peak_flops(name: str) -> float | None:
    return next((peak for key, peak in PEAK_BF16 if key.lower() in name.lower()), None)


def _print_row(variant: str, row: dict) -> None:
    mem = f"{row['peak_memory_gib']} GiB" if row["peak_memory_gib"] is not None else "n/a"
    mfu = f"{row['mfu']:.1%}" if row["mfu"] is not None else "n/a"
    print(f"{variant:>13}: {row['wall_s']:.2f} s, {row['steps']} steps, {row['real_tokens']} real tokens "
          f"({row['pad_share']:.1%} padding), {row['tokens_per_s']:.0f} tokens/s, peak memory {mem}, MFU {mfu}, "
          f"final loss {row['final_loss']:.3f}", flush=True)


if __name__ == "__main__":
    main()
