"""LoRA supervised fine-tuning: one readable loop on PEFT + accelerate.

Why a loop and not `transformers.Trainer`/`trl.SFTTrainer`: medtune needs, and tests, things those make hard to
guarantee together: option order re-shuffled per example *and per epoch* (the answer letter carries no information),
loss normalized over the target tokens of the whole optimizer step (so gradient accumulation equals the larger batch),
atomic checkpoints, and a resume that reproduces the uninterrupted run bit for bit. accelerate still does device
placement, mixed precision and DDP/FSDP/DeepSpeed under `accelerate launch`.

Each example is `prompt tokens + target tokens + EOS`; labels are -100 on the prompt and padding (loss on the target
only). Batches are built from a seeded plan: epoch order shuffled, then grouped by length (less padding).
"""

from __future__ import annotations

import json
import math
import random
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

from medtune.config import Config, save_config
from medtune.data.items import MCQItem
from medtune.prompts import build_prompt, build_target


@dataclass
class Example:
    input_ids: list[int]
    prompt_len: int  # labels start here


def train(cfg: Config, items: list[MCQItem], out_dir: Path, resume: bool = False, quiet: bool = False,
          log=print, extra_meta: dict | None = None, base_model=None) -> dict:
    """Train a LoRA adapter on `items`; write it to out_dir/adapter with everything needed to trace it.
    `base_model`: the fp32 base already in memory (run.py), trained in place instead of loading it again."""
    import torch
    from accelerate import Accelerator
    from accelerate.utils import set_seed
    from transformers import get_scheduler

    t = cfg.train
    out_dir = Path(out_dir)
    from medtune.hardware import decide, detect, device_string, prepare_env

    prepare_env()  # before anything initializes the GPU runtime (ROCm reads HSA_OVERRIDE_GFX_VERSION once)
    info = detect()
    policy = decide(info)
    accelerator = Accelerator(mixed_precision=_mixed_precision(t.dtype, policy.train_dtype),
                              cpu=cfg.device == "cpu" or device_string(info) == "cpu",
                              log_with=t.report_to or None, project_dir=str(out_dir))
    set_seed(t.seed, deterministic=False)
    model, tokenizer = _lora_model(cfg, accelerator, log, _attention(cfg, info, policy), base_model)
    world, rank = accelerator.num_processes, accelerator.process_index
    plan = batch_plan(items, cfg, tokenizer, world)
    steps = len(plan) if t.max_steps is None else min(t.max_steps, len(plan))
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=t.lr, weight_decay=t.weight_decay)
    scheduler = get_scheduler(t.scheduler, optimizer, num_warmup_steps=math.ceil(t.warmup * steps),
                              num_training_steps=steps)
    model, optimizer = accelerator.prepare(model, optimizer)
    accelerator.register_for_checkpointing(scheduler)
    if t.report_to:
        accelerator.init_trackers("medtune", config=_flat(cfg.to_dict()))

    start = _resume(accelerator, out_dir) if resume else 0
    metrics_path = out_dir / "metrics.jsonl"
    if accelerator.is_main_process:
        out_dir.mkdir(parents=True, exist_ok=True)
        if not resume:
            metrics_path.write_text("")
    progress = _progress(steps, start, quiet or not accelerator.is_main_process)
    model.train()
    t0, tokens_seen, loss = time.time(), 0, float("nan")
    for step in range(start, steps):
        micro = [b[rank::world] for b in plan[step]]  # each rank takes its share of every global micro-batch
        total = sum(len(ex.input_ids) - max(ex.prompt_len, 1) for b in plan[step] for ex in b)  # global targets
        loss_sum, real = torch.zeros((), device=accelerator.device), 0
        for k, batch in enumerate(micro):
            ids, mask, labels = collate(batch, tokenizer.pad_token_id, accelerator.device)
            with accelerator.autocast():
                part = _loss_sum(model, ids, mask, labels, _first_target(batch)) * world / total
            if k < len(micro) - 1:
                with accelerator.no_sync(model):
                    accelerator.backward(part)
            else:
                accelerator.backward(part)
            loss_sum += part.detach() / world  # stays on the device: one sync per step, not per micro-batch
            real += sum(len(ex.input_ids) for ex in batch)
        lr = scheduler.get_last_lr()[0]  # the rate this step ran at
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        loss = accelerator.reduce(loss_sum, "sum").item()
        tokens_seen += int(accelerator.reduce(torch.tensor(real, device=accelerator.device), "sum").item())
        elapsed = time.time() - t0
        row = {"step": step + 1, "epoch": round((step + 1) / steps * t.epochs, 4) if t.max_steps is None else None,
               "loss": loss, "lr": lr, "tokens": tokens_seen,
               "tokens_per_s": tokens_seen / elapsed if elapsed else 0.0, "elapsed_s": round(elapsed, 3)}
        if accelerator.is_main_process:
            with metrics_path.open("a") as f:
                f.write(json.dumps(row) + "\n")
            progress.set_postfix(loss=f"{loss:.4f}", tok_s=f"{row['tokens_per_s']:.0f}")
            progress.update(1)
        if t.report_to:
            accelerator.log({"loss": loss, "lr": row["lr"]}, step=step + 1)
        if t.save_every and (step + 1) % t.save_every == 0 and step + 1 < steps:
            save_checkpoint(accelerator, out_dir, step + 1)
    progress.close()
    summary = {"steps": steps, "final_loss": loss, "wall_s": round(time.time() - t0, 2), "real_tokens": tokens_seen,
               "tokens_per_s": round(tokens_seen / max(time.time() - t0, 1e-9), 1), "resumed_from_step": start}
    if accelerator.is_main_process:
        _save_adapter(accelerator.unwrap_model(model), tokenizer, cfg, items, out_dir, summary, extra_meta)
        log(f"trained {steps} steps in {summary['wall_s']} s, {summary['tokens_per_s']} real tokens/s, "
            f"final loss {loss:.4f}")
    accelerator.wait_for_everyone()
    if t.report_to:
        accelerator.end_training()
    return summary


def _mixed_precision(requested: str, policy_dtype: str) -> str:
    """bf16/fp16 autocast over fp32 weights (fp16 gets loss scaling from accelerate); `auto` follows hardware.py."""
    dtype = policy_dtype if requested == "auto" else requested
    choices = {"bfloat16": "bf16", "float16": "fp16", "float32": "no"}
    if dtype not in choices:
        from medtune.errors import MedtuneError

        raise MedtuneError(f"train.dtype {requested!r}: choose auto, {', '.join(choices)}")
    return choices[dtype]


def _attention(cfg: Config, info, policy) -> str:
    """The policy's attention, except eager for CPU training: at exam-question lengths (~100-300 tokens) it measured
    faster than SDPA's CPU kernels here (310 vs 253 real tokens/s, embedded model, bf16 autocast)."""
    if cfg.train.attn_implementation != "auto":
        return cfg.train.attn_implementation
    return "eager" if info.kind == "cpu" or cfg.device == "cpu" else policy.attn_implementation


def _lora_model(cfg: Config, accelerator, log, attn_implementation: str | None = None, base=None):
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from medtune.models import load_tokenizer, resolve

    path = resolve(cfg.model, log=log if accelerator.is_main_process else (lambda *_: None))
    tokenizer = load_tokenizer(path, padding_side="right")
    if base is not None:
        model = base
        model.set_attn_implementation(attn_implementation or "sdpa")
    else:
        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, attn_implementation=attn_implementation)
    if cfg.train.gradient_checkpointing:
        enable = getattr(model, "activation_checkpointing_enable", None)  # transformers >= 5.x name
        if enable is not None:
            enable(activation_checkpointing_kwargs={"use_reentrant": False})
        else:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.enable_input_require_grads()
    targets = cfg.lora.target_modules
    lora = LoraConfig(r=cfg.lora.r, lora_alpha=cfg.lora.alpha, lora_dropout=cfg.lora.dropout, task_type="CAUSAL_LM",
                      target_modules="all-linear" if targets == ["all-linear"] else targets)
    model = get_peft_model(model, lora)
    model.config.use_cache = False
    return model, tokenizer


def batch_plan(items: list[MCQItem], cfg: Config, tokenizer, world: int = 1) -> list[list[list[Example]]]:
    """Every optimizer step's global micro-batches, fixed by the seed: [step][micro-batch][example].

    Per epoch: option order shuffled per example (seeded by seed, epoch and item), examples shuffled, then sorted by
    length inside windows of 64 batches and the batches shuffled again (length grouping without a length curriculum).
    """
    t = cfg.train
    per_batch = t.batch_size * world
    epochs = max(1, math.ceil(t.epochs))
    micro: list[list[Example]] = []
    for epoch in range(epochs):
        rng = random.Random(f"{t.seed}-order-{epoch}")
        examples = [tokenize_example(_shuffled(item, cfg, epoch, i), cfg, tokenizer) for i, item in enumerate(items)]
        order = list(range(len(examples)))
        rng.shuffle(order)
        if t.group_by_length:
            window = per_batch * 64
            order = [i for s in range(0, len(order), window)
                     for i in sorted(order[s: s + window], key=lambda i: -len(examples[i].input_ids))]
        batches = [[examples[i] for i in order[s: s + per_batch]] for s in range(0, len(order), per_batch)]
        if t.group_by_length:
            rng.shuffle(batches)
        batches = [b for b in batches if len(b) >= world]  # every rank needs an example; uneven shares are exact
        if epoch == epochs - 1 and t.epochs < epochs:  # fractional last epoch
            batches = batches[: math.ceil(len(batches) * (t.epochs - epoch))]
        micro.extend(batches)
    return [micro[s: s + t.grad_accum] for s in range(0, len(micro), t.grad_accum)]


def _shuffled(item: MCQItem, cfg: Config, epoch: int, index: int) -> MCQItem:
    if not cfg.data.shuffle_options:
        return item
    order = list(range(len(item.options)))
    random.Random(f"{cfg.train.seed}-options-{epoch}-{index}-{item.id}").shuffle(order)
    return item.permuted(order)


def tokenize_example(item: MCQItem, cfg: Config, tokenizer) -> Example:
    """prompt + target + EOS, cut to max_length by trimming the target's end first (EOS always kept)."""
    prompt = tokenizer(build_prompt(item, cfg.prompt_style, tokenizer), add_special_tokens=False).input_ids
    target = tokenizer(build_target(item, cfg.prompt_style, cfg.train.target), add_special_tokens=False).input_ids
    eos = [tokenizer.eos_token_id] if cfg.train.add_eos else []
    room = cfg.train.max_length - len(eos)
    if len(prompt) + len(target) > room:
        target = target[: max(room - len(prompt), min(len(target), 8))]
        prompt = prompt[len(prompt) + len(target) - room:] if len(prompt) + len(target) > room else prompt
    return Example(prompt + target + eos, 0 if cfg.train.loss_on == "all" else len(prompt))


def collate(batch: list[Example], pad_id: int, device):
    """Right-padded ids, attention mask, labels (-100 on prompt and padding)."""
    import torch

    width = max(len(ex.input_ids) for ex in batch)
    ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(batch), width), dtype=torch.long)
    labels = torch.full((len(batch), width), -100, dtype=torch.long)
    for row, ex in enumerate(batch):
        n = len(ex.input_ids)
        ids[row, :n] = torch.tensor(ex.input_ids)
        mask[row, :n] = 1
        labels[row, ex.prompt_len: n] = ids[row, ex.prompt_len: n]
    return ids.to(device), mask.to(device), labels.to(device)


def _first_target(batch: list[Example]) -> int:
    return min(ex.prompt_len for ex in batch)


def _loss_sum(model, ids, mask, labels, first: int):
    """Summed next-token cross-entropy over target tokens; logits only from `first` (the earliest target position in
    the batch) on: the vocabulary projection on prompt positions is wasted work."""
    import torch.nn.functional as F

    keep = ids.shape[1] - max(first - 1, 0)
    logits = model(input_ids=ids, attention_mask=mask, logits_to_keep=keep).logits  # positions T-keep .. T-1
    shifted = labels[:, ids.shape[1] - keep + 1:]
    return F.cross_entropy(logits[:, :-1].float().reshape(-1, logits.shape[-1]), shifted.reshape(-1),
                           ignore_index=-100, reduction="sum")


def save_checkpoint(accelerator, out_dir: Path, step: int) -> None:
    """Written to a temporary dir and renamed into place, so a crash never leaves a half-written checkpoint."""
    root = out_dir / "checkpoints"
    final, tmp = root / f"step-{step:07d}", root / f".tmp-step-{step:07d}"
    if accelerator.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(tmp), safe_serialization=True)
    if accelerator.is_main_process:
        (tmp / "medtune-step.json").write_text(json.dumps({"step": step}))
        tmp.rename(final)
        for old in sorted(root.glob("step-*"))[:-2]:  # keep the last two
            shutil.rmtree(old)
    accelerator.wait_for_everyone()


def _resume(accelerator, out_dir: Path) -> int:
    done = sorted(p for p in (out_dir / "checkpoints").glob("step-*") if (p / "medtune-step.json").is_file())
    if not done:
        from medtune.errors import MedtuneError

        raise MedtuneError(f"--resume: no complete checkpoint under {out_dir / 'checkpoints'}")
    accelerator.load_state(str(done[-1]))
    return json.loads((done[-1] / "medtune-step.json").read_text())["step"]


def _save_adapter(model, tokenizer, cfg: Config, items: list[MCQItem], out_dir: Path, summary: dict,
                  extra_meta: dict | None) -> None:
    from medtune.report import environment

    adapter = out_dir / "adapter"
    tmp = out_dir / ".adapter.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    save_config(cfg, tmp / "medtune-config.yaml")
    meta = {"prompt_style": cfg.prompt_style, "target": cfg.train.target, "base_model": cfg.model,
            "train_ids": [i.id for i in items], "train_items": [i.to_dict() for i in items], "summary": summary,
            "environment": environment(), **(extra_meta or {})}
    (tmp / "medtune.json").write_text(json.dumps(meta, indent=1))
    shutil.rmtree(adapter, ignore_errors=True)
    tmp.rename(adapter)


def _progress(total: int, initial: int, disable: bool):
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=initial, disable=disable, desc="train", unit="step")


def _flat(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flat(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v if isinstance(v, (int, float, str, bool)) else str(v)
    return out
