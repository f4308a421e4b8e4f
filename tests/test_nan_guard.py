"""No NaN reaches the weights on any backend.

Under DDP and FSDP the optimizer steps in `optimizer.step()`, after medtune's finite-loss check. Under DeepSpeed
accelerate's `backward()` is the update: at the accumulation boundary it calls the engine's backward and then its
step. DeepSpeed is not installed here (no GPU), so these tests give `Accelerator.backward` DeepSpeed's semantics (the
optimizer steps inside the boundary backward) and show that a NaN loss in any micro-batch of a step stops training
before that backward: the LoRA weights are exactly those before the step, and the CLI prints one `error:` line.
Under DDP a NaN on one rank stops both (the loss is all-reduced before the check) with step 1's weights kept. FSDP
updates in `optimizer.step()` as DDP does, after the check; accelerate cannot drive FSDP on a CPU (test_fsdp.py says
why), so that backend is covered by the DDP test and the order of the code, not by an FSDP run."""

import pytest
import torch
from accelerate import Accelerator
from conftest import write_jsonl
from test_resume import items
from typer.testing import CliRunner

from medtune import train as train_mod
from medtune.cli import app


@pytest.fixture
def deepspeed_like_backward(monkeypatch):
    """Accelerator.backward that steps the optimizer at the accumulation boundary, as accelerate's DeepSpeed path
    does (DeepSpeedEngineWrapper.backward: engine.backward(loss); engine.step()). Records the trainable weights as
    they were at the first backward, before any update, and the accelerator, to read its model afterwards."""
    real = Accelerator.backward
    seen = {}

    def backward(self, loss, **kwargs):
        model = self._models[0]
        seen.setdefault("before", {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad})
        seen["acc"], seen["backwards"] = self, seen.get("backwards", 0) + 1
        real(self, loss, **kwargs)
        if self.sync_gradients:
            for opt in self._optimizers:
                opt.optimizer.step()  # the engine's update, inside backward

    monkeypatch.setattr(Accelerator, "backward", backward)
    return seen


@pytest.mark.parametrize("poisoned_micro_batch", [1, 2])  # step 1 has two micro-batches (grad_accum 2)
def test_nan_loss_never_reaches_the_weights_when_backward_steps(tiny_model_dir, tmp_path, monkeypatch,
                                                                deepspeed_like_backward, poisoned_micro_batch):
    real, calls = train_mod.completion_loss_sum, []

    def poisoned(*args):
        calls.append(1)
        loss = real(*args)
        return loss * float("nan") if len(calls) == poisoned_micro_batch else loss

    monkeypatch.setattr(train_mod, "completion_loss_sum", poisoned)
    data = write_jsonl(tmp_path / "train.jsonl", [i.to_dict() for i in items(24)])
    sets = {"model": tiny_model_dir, "device": "cpu", "data.source": str(data), "data.train_size": 16,
            "train.dtype": "float32", "train.batch_size": 2, "train.grad_accum": 2, "train.max_steps": 3,
            "train.max_length": 96, "train.lr": 1e-2, "lora.r": 4, "lora.alpha": 8}
    result = CliRunner().invoke(app, ["train", "--out", str(tmp_path / "run"), "-q",
                                      *[x for k, v in sets.items() for x in ("--set", f"{k}={v}")]])
    assert result.exit_code == 2, result.output
    errors = [line for line in result.output.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "loss is nan at step 1" in errors[0] and "before the update" in errors[0], result.output
    seen = deepspeed_like_backward
    assert seen["backwards"] == 1  # the first micro-batch's backward ran; the boundary backward (the update) did not
    after = {n: p for n, p in seen["acc"]._models[0].named_parameters() if p.requires_grad}
    assert after.keys() == seen["before"].keys() and after
    for n, p in after.items():
        assert torch.equal(p.detach(), seen["before"][n]), n  # unchanged, and so finite
    assert not (tmp_path / "run" / "adapter").exists()


def test_a_finite_run_with_the_stepping_backward_still_trains(tiny_model_dir, tmp_path, deepspeed_like_backward):
    """The check itself moves no weights and skips no backward: with finite losses every micro-batch's backward runs
    and the adapter moves."""
    from medtune.config import load_config

    cfg = load_config(None, [f"model={tiny_model_dir}", "device=cpu", "train.dtype=float32", "train.batch_size=2",
                             "train.grad_accum=2", "train.max_steps=2", "train.max_length=96", "lora.r=4"])
    train_mod.train(cfg, items(16), tmp_path, quiet=True, log=lambda *_: None)
    seen = deepspeed_like_backward
    assert seen["backwards"] == 4
    after = {n: p for n, p in seen["acc"]._models[0].named_parameters() if p.requires_grad}
    assert any(not torch.equal(p.detach(), seen["before"][n]) for n, p in after.items())


DDP_WORKER = r'''
import json, os, sys
from pathlib import Path
import torch
from accelerate import Accelerator
from safetensors.torch import load_file
from medtune import train as T
from medtune.config import load_config
from medtune.errors import MedtuneError
from test_resume import items

model_dir, out = sys.argv[1], Path(sys.argv[2])
rank, calls, seen = int(os.environ["RANK"]), [], {}
real_loss, real_backward = T.completion_loss_sum, Accelerator.backward


def poisoned(*args):  # step 2 (one micro-batch per step), on rank 1 only
    calls.append(1)
    loss = real_loss(*args)
    return loss * float("nan") if rank == 1 and len(calls) == 2 else loss


def backward(self, loss, **kwargs):
    seen["acc"] = self
    real_backward(self, loss, **kwargs)


T.completion_loss_sum, Accelerator.backward = poisoned, backward
cfg = load_config(None, [f"model={model_dir}", "device=cpu", "train.dtype=float32", "train.batch_size=2",
                         "train.max_steps=4", "train.save_every=1", "train.max_length=96", "train.lr=1e-2",
                         "lora.r=4", "lora.alpha=8"])
try:
    T.train(cfg, items(16), out, quiet=True, log=lambda *_: None)
    error = None
except MedtuneError as e:
    error = str(e)
model = seen["acc"].unwrap_model(seen["acc"]._models[0])
step1 = load_file(str(out / "checkpoints" / "step-0000001" / "adapter.safetensors"))
now = {n: p.detach() for n, p in model.named_parameters() if p.requires_grad}
line = "RESULT " + json.dumps({"rank": rank, "error": error, "tensors": len(now), "same": now.keys() == step1.keys()
                              and all(torch.equal(now[n], step1[n]) for n in now)}) + "\n"
sys.stdout.flush()
os.write(1, line.encode())  # one write: the two ranks share the pipe, and print's text and newline could interleave
'''


@pytest.mark.slow  # two gloo processes on a tiny model: ~30 s
def test_nan_on_one_ddp_rank_stops_both_ranks_before_the_update(tiny_model_dir, tmp_path):
    """Under DDP the loss is all-reduced before the check, so a NaN on one rank stops every rank at the same step
    (none is left waiting in a collective), and the weights are those of the last good step."""
    import json
    import os
    import subprocess
    import sys
    from pathlib import Path

    from test_ddp import free_port

    root = Path(__file__).resolve().parents[1]
    script = tmp_path / "worker.py"
    script.write_text(DDP_WORKER)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "ACCELERATE_USE_CPU": "1",
           "PYTHONPATH": os.pathsep.join([str(root / "src"), str(root / "tests"), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
                           str(free_port()), str(script), tiny_model_dir, str(tmp_path / "run")], check=False,
                          capture_output=True, text=True, timeout=600, cwd=root, env=env)
    assert proc.returncode == 0, proc.stderr[-4000:]
    results = sorted((json.loads(line[7:]) for line in proc.stdout.splitlines() if line.startswith("RESULT ")),
                     key=lambda r: r["rank"])
    assert [r["rank"] for r in results] == [0, 1], proc.stdout[-2000:]
    for r in results:
        assert r["error"] and r["error"].startswith("loss is nan at step 2: training stopped before the update"), r
        assert r["same"] and r["tensors"] > 0, r  # every rank holds step 1's weights: the NaN never reached them
    assert not (tmp_path / "run" / "adapter").exists()
