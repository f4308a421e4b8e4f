"""The frozen base's storage, side by side in one process (fair on a busy machine): both models loaded, the same
MedMCQA micro-batches of 4 (LoRA r=8 on q_proj+v_proj, 256-token cap, eager attention, bf16 autocast), one
forward+backward per micro-batch and an AdamW step, alternating which goes first. Prints seconds per repeat.

    PYTHONPATH=src python benchmarks/base_dtype_ab.py                 # fp32 vs bf16 base, 4 micro-batches, 3 repeats
    PYTHONPATH=src python benchmarks/base_dtype_ab.py --quantized     # bf16 vs 4-bit NF4 base, 1 micro-batch, 2 repeats
"""
import json
import sys
import time
from pathlib import Path
from unittest import mock

import torch
from accelerate import Accelerator

from medtune import train as T
from medtune.batches import batch_plan, collate, first_target
from medtune.config import load_config
from medtune.data.formats import read_file
from medtune.data.split import split

DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "medmcqa" / "dev.jsonl"
quantized = "--quantized" in sys.argv
names, n_batches, repeats = (("bf16", "4bit"), 1, 2) if quantized else (("fp32", "bf16"), 4, 3)
items, _ = split(read_file(str(DATA)), 2000, seed=42)
base = ["train.dtype=bfloat16", "lora.r=8", "lora.alpha=16", "lora.target_modules=[q_proj, v_proj]",
        "train.max_length=256", "train.batch_size=4", "train.group_by_length=false"]
acc = Accelerator(cpu=True, mixed_precision="bf16")
models = {}
for name in names:
    cfg = load_config(None, [*base, f"lora.quantize={'4bit' if name == '4bit' else 'none'}"])
    with mock.patch.object(T, "training_base_dtype", lambda a, n=name: "float32" if n == "fp32" else "bfloat16"):
        m, tok = T.lora_model(cfg, acc, print, "eager")
    m.train()
    print(name, "weights MB", round(m.get_memory_footprint() / 2**20), flush=True)
    models[name] = (m, torch.optim.AdamW([p for p in m.parameters() if p.requires_grad], lr=1e-4))
plan = batch_plan(items[:64], cfg, tok)
batches = [b for step in plan for b in step][:n_batches]
times: dict[str, list[float]] = {n: [] for n in names}
for rep in range(repeats):
    for name in names if rep % 2 == 0 else names[::-1]:
        m, opt = models[name]
        t0 = time.perf_counter()
        for b in batches:
            ids, mask, labels = collate(b, tok.pad_token_id, "cpu")
            with acc.autocast():
                loss = T.completion_loss_sum(m, ids, mask, labels, first_target(b))
            loss.backward()
        opt.step()
        opt.zero_grad()
        times[name].append(time.perf_counter() - t0)
        print(name, rep, round(times[name][-1], 2), flush=True)
a, b = names
print(json.dumps({"real_tokens_per_repeat": sum(len(ex.input_ids) for x in batches for ex in x), "seconds": times,
                  f"time_ratio_{b}_over_{a}": [round(y / x, 3) for x, y in zip(times[a], times[b])]}))
