"""DDP on the CPU: `accelerate launch` with recipes/accelerate/cpu-ddp.yaml runs `medtune train` in two gloo processes.

Both ranks must finish, only rank 0 may write, and the run must equal a single process with the same global batch
(per-device batch 2 x 2 processes against batch 4): train.batch_plan builds global micro-batches of batch_size x world,
rank r trains on examples r, r + world, ... of each, and the loss is normalized by the step's global target tokens, so
the averaged DDP gradient is the single-process gradient.
"""

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import write_jsonl
from safetensors.torch import load_file

from medtune.config import load_config
from medtune.models import load_tokenizer
from medtune.run import prepare_data
from medtune.train import batch_plan

ROOT = Path(__file__).resolve().parents[1]
STEPS = 5  # with 19 training items the first epoch is 5 global batches of 4, the last one partial (3)


def demo_rows(n: int) -> list[dict]:
    """medtune's demo layout; varied lengths so that the ranks' halves of a batch pad differently."""
    colours = ["red", "green", "blue", "cyan", "pink", "gray", "gold", "teal"]
    return [{"id": f"d{k}", "question": f"Which colour is item {k}?" + " Think carefully." * (k % 4),
             "options": [f"option {colours[(k + j) % 8]}" for j in range(4)], "answer": k % 4,
             "explanation": f"Item {k} has that colour." + " It is well known." * (k % 3), "subject": "s"}
            for k in range(n)]


def sets(model_dir: str, data: Path, batch_size: int, n_train: int = 16, grad_accum: int = 1) -> list[str]:
    values = {"model": model_dir, "device": "cpu", "data.source": str(data), "data.train_size": n_train,
              "train.batch_size": batch_size, "train.grad_accum": grad_accum, "train.max_steps": STEPS,
              "train.dtype": "float32", "train.lr": 1e-3, "train.max_length": 128, "train.seed": 7,
              "lora.r": 4, "lora.alpha": 8, "lora.dropout": 0.0}
    return [arg for k, v in values.items() for arg in ("--set", f"{k}={v}")]


@pytest.mark.parametrize("n_train", [16, 18, 19])  # 18, 19: the last global batch of 4 has 2 or 3 examples
def test_ddp_plan_is_the_single_process_plan_split_across_ranks(tiny_model_dir, tmp_path, n_train):
    """What each step trains on under DDP (batch 2 x 2 ranks) equals the single-process step (batch 4), also when the
    training set doesn't divide into global batches."""
    data = write_jsonl(tmp_path / "train.jsonl", demo_rows(2 * n_train))
    tok = load_tokenizer(tiny_model_dir, padding_side="right")

    def plan(batch_size: int, world: int):
        cfg = load_config(None, [*sets(tiny_model_dir, data, batch_size, n_train)[1::2], "train.max_steps=null",
                                 "train.epochs=2", "train.grad_accum=2"])
        return batch_plan(prepare_data(cfg, log=lambda *_: None)[0], cfg, tok, world)

    def ids(micro):
        return [tuple(ex.input_ids) for ex in micro]

    single, ddp = plan(4, 1), plan(2, 2)
    assert [[ids(b) for b in step] for step in ddp] == [[ids(b) for b in step] for step in single]
    for step in ddp:
        for b in step:  # train.train: rank r takes b[r::world]; the shares partition the global batch
            shares = [b[r::2] for r in range(2)]
            assert all(shares) and sorted(ids(shares[0]) + ids(shares[1])) == sorted(ids(b))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run(cmd: list[str]) -> subprocess.CompletedProcess:
    # ACCELERATE_USE_CPU=1: the yaml's MULTI_GPU starts torchrun workers, this makes them pick the CPU and gloo
    env = {**os.environ, "ACCELERATE_USE_CPU": "1", "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    return subprocess.run(cmd, check=False, capture_output=True, text=True, timeout=900, cwd=ROOT, env=env)


def metrics(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.slow  # two torch processes start and talk over gloo, plus a single-process reference run: ~30 s each
# 19: a partial last global batch, split 2 + 1 between the ranks; with accumulation 2 (through accelerate's
# accumulate(): gradients synced on a step's last micro-batch only) every third step has a single micro-batch
@pytest.mark.parametrize("n_train,grad_accum", [(16, 1), (19, 2)])
def test_cpu_ddp_matches_single_process_with_same_global_batch(tiny_model_dir, tmp_path, n_train, grad_accum):
    data = write_jsonl(tmp_path / "train.jsonl", demo_rows(2 * n_train))  # split into train + eval halves
    single, ddp = tmp_path / "single", tmp_path / "ddp"

    ref = run([sys.executable, "-m", "medtune", "train", *sets(tiny_model_dir, data, 4, n_train, grad_accum),
               "--out", str(single), "--quiet"])
    assert ref.returncode == 0, ref.stderr[-3000:]
    launched = run([sys.executable, "-m", "accelerate.commands.accelerate_cli", "launch",
                    "--config_file", str(ROOT / "recipes" / "accelerate" / "cpu-ddp.yaml"),
                    "--main_process_port", str(free_port()),  # the file's fixed 29500 may be taken
                    "-m", "medtune", "train", *sets(tiny_model_dir, data, 2, n_train, grad_accum), "--out", str(ddp),
                    "--quiet"])
    assert launched.returncode == 0, launched.stderr[-5000:]  # accelerate launch fails if either rank fails

    # only rank 0 writes: one metrics file with one line per step, one adapter, no leftovers
    assert sorted(p.name for p in ddp.iterdir()) == sorted(p.name for p in single.iterdir())
    rows, ref_rows = metrics(ddp), metrics(single)
    assert [r["step"] for r in rows] == [r["step"] for r in ref_rows] == list(range(1, STEPS + 1))
    assert len(list(ddp.rglob("adapter_model.safetensors"))) == 1 and not list(ddp.rglob("*.tmp"))

    # same global batch, same seed: the same examples, tokens, losses and learning rates at every step
    for r, ref_r in zip(rows, ref_rows):
        assert r["tokens"] == ref_r["tokens"], (r, ref_r)  # both ranks' real tokens, summed
        assert r["lr"] == pytest.approx(ref_r["lr"], rel=1e-9)
        assert r["loss"] == pytest.approx(ref_r["loss"], rel=1e-3), (r, ref_r)
    a, b = load_file(str(ddp / "adapter" / "adapter_model.safetensors")), load_file(
        str(single / "adapter" / "adapter_model.safetensors"))
    assert a.keys() == b.keys()
    for k in a:  # DDP averaged the ranks' gradients into the single-process gradient
        assert torch.allclose(a[k], b[k], rtol=1e-3, atol=1e-5), k
    meta = json.loads((ddp / "adapter" / "medtune.json").read_text())
    assert meta["summary"]["steps"] == STEPS and len(meta["train_ids"]) == n_train
