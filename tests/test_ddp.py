"""DDP on the CPU: `accelerate launch` with recipes/accelerate/cpu-ddp.yaml runs `medtune train` in two gloo processes.

Both ranks must finish, only rank 0 may write, and the run must equal a single process with the same global batch
(per-device batch 2 x 2 processes against batch 4): train.batch_plan builds global micro-batches of batch_size x world,
rank r trains on examples r, r + world, ... of each, and the loss is normalized by the step's global target tokens, so
the averaged DDP gradient is the single-process gradient.

Resume under DDP: every rank's own RNG state is saved and restored (a run killed after a checkpoint resumes to the
bit-identical adapter, with dropout on), a 1-process resume of a 2-process run is refused in one line, and a SIGTERM
that reaches one rank stops both after the same step with exactly one checkpoint.
"""

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import write_jsonl
from safetensors.torch import load_file

from medtune.batches import batch_plan
from medtune.config import load_config
from medtune.data.prepare import prepare_data
from medtune.models import load_tokenizer

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


# --- resume under DDP: every rank's own RNG state, agreement on signals, refusal of another world size ----------------

def train_args(model_dir: str, data: Path, out: Path, steps: int, *extra: str) -> list[str]:
    """`medtune train` with dropout (under DDP each rank draws its own masks: its own RNG state must come back)."""
    return [*sets(model_dir, data, 2, n_train=16), "--set", f"train.max_steps={steps}", "--set", "lora.dropout=0.1",
            "--out", str(out), "--quiet", *extra]


def launch_cmd(*args) -> list[str]:
    """train_args under a 2-process CPU DDP launch."""
    return [sys.executable, "-m", "accelerate.commands.accelerate_cli", "launch", "--config_file",
            str(ROOT / "recipes" / "accelerate" / "cpu-ddp.yaml"), "--main_process_port", str(free_port()),
            "-m", "medtune", "train", *train_args(*args)]


def popen(cmd: list[str]) -> subprocess.Popen:
    env = {**os.environ, "ACCELERATE_USE_CPU": "1", "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    return subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)  # its own process group: the launcher and both ranks


def wait_for(proc: subprocess.Popen, done, what: str, timeout: float = 300) -> None:
    deadline = time.time() + timeout
    while not done():
        assert proc.poll() is None, f"exited before {what}: {proc.communicate()[1][-3000:]}"
        assert time.time() < deadline, f"{what}: not reached"
        time.sleep(0.01)


def adapter_of(out: Path) -> dict:
    return load_file(str(out / "adapter" / "adapter_model.safetensors"))


@pytest.mark.slow  # three 2-process launches (full, killed, resumed) and a refused 1-process resume: ~2 min on 2 cores
def test_ddp_sigkill_after_a_checkpoint_then_resume_is_bit_identical(tiny_model_dir, tmp_path):
    data = write_jsonl(tmp_path / "train.jsonl", demo_rows(32))
    steps = 8
    full, cut = tmp_path / "full", tmp_path / "cut"
    ref = run(launch_cmd(tiny_model_dir, data, full, steps, "--set", "train.save_every=2"))
    assert ref.returncode == 0, ref.stderr[-5000:]
    ckpt = full / "checkpoints" / f"step-{steps:07d}"
    assert sorted(p.name for p in ckpt.glob("rng*")) == ["rng-rank0.json", "rng-rank0.safetensors",
                                                         "rng-rank1.json", "rng-rank1.safetensors"]
    rank0, rank1 = (load_file(str(ckpt / f"rng-rank{r}.safetensors"))["torch_cpu"] for r in (0, 1))
    assert not torch.equal(rank0, rank1)  # the ranks drew different dropout masks: one shared state would be wrong

    proc = popen(launch_cmd(tiny_model_dir, data, cut, steps, "--set", "train.save_every=2"))
    wait_for(proc, lambda: (cut / "checkpoints" / "step-0000002" / "state.json").is_file(), "the first checkpoint")
    os.killpg(proc.pid, signal.SIGKILL)  # the launcher and both ranks, at once
    proc.wait()
    assert not (cut / "adapter").exists(), "the run finished before the kill; the test proves nothing"

    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}  # one process: another world size
    one = subprocess.run([sys.executable, "-m", "medtune", "train", *train_args(tiny_model_dir, data, cut, steps, "--set",
                          "train.save_every=2", "--resume")], check=False, capture_output=True, text=True, env=env,
                         cwd=ROOT, timeout=300)
    errors = [line for line in one.stderr.splitlines() if line.startswith("error:")]
    assert one.returncode == 2 and len(errors) == 1, one.stderr[-3000:]
    assert "written by 2 process(es), this launch has 1" in errors[0] and "Traceback" not in one.stderr

    resumed = run(launch_cmd(tiny_model_dir, data, cut, steps, "--set", "train.save_every=2", "--resume"))
    assert resumed.returncode == 0, resumed.stderr[-5000:]
    a, b = adapter_of(full), adapter_of(cut)
    assert a.keys() == b.keys() and a
    for k in a:
        assert torch.equal(a[k], b[k]), (k, (a[k] - b[k]).abs().max())
    assert [r["step"] for r in metrics(cut)] == list(range(1, steps + 1))
    assert [r["loss"] for r in metrics(cut)] == [r["loss"] for r in metrics(full)]


@pytest.mark.slow  # one 2-process launch: ~40 s on 2 cores
def test_ddp_sigterm_to_one_rank_stops_both_at_one_step_with_one_checkpoint(tiny_model_dir, tmp_path):
    import psutil

    data = write_jsonl(tmp_path / "train.jsonl", demo_rows(32))
    out = tmp_path / "run"
    proc = popen(launch_cmd(tiny_model_dir, data, out, 400, "--set", "train.save_every=1000", "--set",
                            "train.epochs=100"))
    wait_for(proc, lambda: (out / "metrics.jsonl").is_file() and len((out / "metrics.jsonl").read_text().split()) >= 2,
             "step 2")
    ranks = {p.environ().get("RANK"): p for p in psutil.Process(proc.pid).children(recursive=True)
             if p.environ().get("RANK") is not None}
    ranks["1"].send_signal(signal.SIGTERM)  # only rank 1: rank 0 hears of it through the per-step all-reduce
    _, err = proc.communicate(timeout=300)
    assert proc.returncode != 0
    lines = [line for line in err.splitlines() if line.startswith("error: SIGTERM at step")]
    assert len(lines) == 2, err[-5000:]  # one per rank, and the same step on both
    step = int(lines[0].split("at step ")[1].split()[0])
    assert lines[0] == lines[1] and "checkpoint written to" in lines[0] and "--resume" in lines[0]
    assert [p.name for p in (out / "checkpoints").iterdir()] == [f"step-{step:07d}"]  # exactly one
    assert len(metrics(out)) == step
    state = json.loads((out / "checkpoints" / f"step-{step:07d}" / "state.json").read_text())
    assert state["world"] == 2 and state["step"] == step and state["data"]["train"]["n"] == 16
