"""Frozen base fp32 vs bf16 under bf16 autocast, side by side in one process on a busy machine: both models loaded,
the same 4 micro-batches of 4 MedMCQA examples (LoRA r=8 on q_proj+v_proj, 256-token cap, eager attention), one
forward+backward per micro-batch and an AdamW step, alternating which goes first. Prints seconds per repeat.

    PYTHONPATH=src python benchmarks/base_dtype_ab.py
"""
import json
import time
from pathlib import Path
from unittest import mock

import torch
from accelerate import Accelerator

from medtune import train as T
from medtune.config import load_config
from medtune.data.formats import read_file
from medtune.data.split import split

DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "medmcqa" / "dev.jsonl"
items, _ = split(read_file(str(DATA)), 2000, seed=42)
cfg = load_config(None, ["train.dtype=bfloat16", "lora.r=8", "lora.alpha=16", "lora.target_modules=[q_proj, v_proj]",
                         "train.max_length=256", "train.batch_size=4", "train.group_by_length=false"])
acc = Accelerator(cpu=True, mixed_precision="bf16")
models = {}
for name in ("fp32", "bf16"):
    with mock.patch.object(T, "_base_dtype", lambda a, n=name: "float32" if n == "fp32" else "bfloat16"):
        m, tok = T._lora_model(cfg, acc, print, "eager")
    m.train()
    models[name] = (m, torch.optim.AdamW([p for p in m.parameters() if p.requires_grad], lr=1e-4))
plan = T.batch_plan(items[:64], cfg, tok)
batches = [b for step in plan for b in step][:4]
times = {"fp32": [], "bf16": []}
for rep in range(3):
    for name in (("fp32", "bf16") if rep % 2 == 0 else ("bf16", "fp32")):
        m, opt = models[name]
        t0 = time.perf_counter()
        for b in batches:
            ids, mask, labels = T.collate(b, tok.pad_token_id, "cpu")
            with acc.autocast():
                loss = T._loss_sum(m, ids, mask, labels, T._first_target(b))
            loss.backward()
        opt.step(); opt.zero_grad()
        times[name].append(time.perf_counter() - t0)
        print(name, rep, round(times[name][-1], 2), flush=True)
tokens = sum(len(ex.input_ids) for b in batches for ex in b)
print(json.dumps({"tokens_per_rep": tokens, "times": times,
                  "ratio_bf16_over_fp32_time": [round(b / f, 3) for b, f in zip(times["bf16"], times["fp32"])]}))
