"""Checkpoints and resume as a contract: only safetensors/JSON (a planted pickle is refused and never runs), only the
trainable weights, the config that shapes training checked, metrics cut back, counters continued, SIGTERM and SIGKILL
survived, NaN stops at once, a full disk is refused with both numbers, another thread count resumes within tolerance."""

import json
import os
import pickle
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from medtune import checkpoint
from medtune import train as train_mod
from medtune.config import load_config
from medtune.data.items import MCQItem
from medtune.errors import MedtuneError

SRC = Path(__file__).resolve().parents[1] / "src"


class Payload:
    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def items(n=24):
    rng = random.Random(0)
    return [MCQItem(id=f"t{k}", question=f"Which colour is item {k}?", answer=k % 4, explanation=f"Item {k} is so.",
                    options=tuple(f"option {w}" for w in rng.sample(["red", "green", "blue", "cyan", "pink"], 4)))
            for k in range(n)]


SETS = {"device": "cpu", "train.dtype": "float32", "train.batch_size": 4, "train.max_length": 96, "train.lr": 1e-3,
        "lora.r": 4, "lora.alpha": 8, "lora.dropout": 0.1}


def cfg_for(model_dir, out, **sets):
    return load_config(None, [f"{k}={v}" for k, v in {"model": model_dir, "out_dir": str(out), **SETS,
                                                       **sets}.items()])


def adapter(out: Path) -> dict:
    return load_file(str(out / "adapter" / "adapter_model.safetensors"))


@pytest.fixture(scope="module")
def checkpointed(tiny_model_dir, tmp_path_factory):
    """A run with checkpoints at steps 2 and 4 (of 4)."""
    out = tmp_path_factory.mktemp("ckpt")
    cfg = cfg_for(tiny_model_dir, out, **{"train.max_steps": 4, "train.save_every": 2})
    train_mod.train(cfg, items(), out, quiet=True, log=lambda *_: None)
    return out, cfg


def test_checkpoint_holds_only_trainable_weights_in_safetensors_and_json(checkpointed):
    out, _ = checkpointed
    ckpts = sorted((out / "checkpoints").iterdir())
    assert [p.name for p in ckpts] == ["step-0000002", "step-0000004"]  # the end of training is one too
    for c in ckpts:
        assert {p.suffix for p in c.iterdir()} == {".safetensors", ".json"}
        weights = load_file(str(c / "adapter.safetensors"))
        assert weights and all("lora_" in k for k in weights)  # no frozen base weights
    final = load_file(str(ckpts[-1] / "adapter.safetensors"))
    saved = adapter(out)
    assert all(any(k.replace(".default", "") == s for s in saved) for k in final)
    assert not [p for p in out.rglob("*") if p.suffix in (".pkl", ".bin", ".pt")]
    meta = json.loads((out / "adapter" / "medtune.json").read_text())
    assert "train_items" not in meta and meta["train_ids"] == [i.id for i in items()]
    assert (out / "train_items.jsonl").is_file() and (out / "adapter" / "train-hashes.safetensors").is_file()


def test_planted_pickle_is_refused_and_never_runs(checkpointed, tiny_model_dir, tmp_path):
    out, _ = checkpointed
    run = tmp_path / "run"
    shutil.copytree(out, run)
    marker = tmp_path / "PWNED"
    latest = checkpoint.latest(run)
    for name in ("custom_checkpoint_0.pkl", "optimizer.bin"):
        (latest / name).write_bytes(pickle.dumps(Payload(marker)))
        with pytest.raises(MedtuneError, match=f"holds .*{name}.*pickle"):
            train_mod.train(cfg_for(tiny_model_dir, run, **{"train.max_steps": 4, "train.save_every": 2}), items(),
                            run, resume=True, quiet=True, log=lambda *_: None)
        (latest / name).unlink()
    assert not marker.exists()


def test_resume_with_another_config_lists_the_differences(checkpointed, tiny_model_dir):
    out, _ = checkpointed
    changed = cfg_for(tiny_model_dir, out, **{"train.max_steps": 4, "train.save_every": 3, "train.lr": 2e-3,
                                              "lora.r": 8})
    with pytest.raises(MedtuneError, match=r"differs.*lora\.r: 4 -> 8; train\.lr: 0\.001 -> 0\.002"):
        train_mod.train(changed, items(), out, resume=True, quiet=True, log=lambda *_: None)
    ckpt = checkpoint.latest(out)
    same = cfg_for(tiny_model_dir, out, **{"train.max_steps": 4, "train.save_every": 3, "eval.batch_size": 2})
    checkpoint.check(ckpt, same.to_dict())  # save_every and eval settings may change


def _no_model(*args, **kwargs):
    raise AssertionError("the model was loaded before the refusal")


def test_resume_with_other_training_data_is_refused_before_the_model_loads(checkpointed, tiny_model_dir,
                                                                          monkeypatch):
    out, _ = checkpointed
    monkeypatch.setattr(train_mod, "lora_model", _no_model)
    sets = {"train.max_steps": 4, "train.save_every": 2}
    edited = items()
    edited[5] = MCQItem(**{**edited[5].to_dict(), "explanation": "Another explanation."})  # same ids, new content
    for changed in (items(23), edited):
        with pytest.raises(MedtuneError, match=r"^--resume: the training data differs from the checkpoint's \(24 items, "
                                               r"sha256 \w{12}; now 2[34] items"):
            train_mod.train(cfg_for(tiny_model_dir, out, **sets), changed, out, resume=True, quiet=True,
                            log=lambda *_: None)
    # the eval source decides the split of `source`, so it is not free to change either
    with pytest.raises(MedtuneError, match=r"differs.*data\.eval_source: None -> 'other\.jsonl'"):
        train_mod.train(cfg_for(tiny_model_dir, out, **sets, **{"data.eval_source": "other.jsonl"}), items(), out,
                        resume=True, quiet=True, log=lambda *_: None)


def test_resume_with_another_world_size_or_batch_plan_is_refused(checkpointed, tiny_model_dir, tmp_path,
                                                                 monkeypatch):
    out, _ = checkpointed
    run = tmp_path / "run"
    shutil.copytree(out, run)
    sets = {"train.max_steps": 4, "train.save_every": 2}
    state_file = checkpoint.latest(run) / "state.json"
    state = json.loads(state_file.read_text())
    assert state["world"] == 1 and state["data"]["train"]["n"] == 24 and len(state["data"]["plan"]) == 64
    state_file.write_text(json.dumps({**state, "world": 2}))
    with monkeypatch.context() as m:
        m.setattr(train_mod, "lora_model", _no_model)  # refused as soon as accelerate knows the world size
        with pytest.raises(MedtuneError, match=r"written by 2 process\(es\), this launch has 1; resume with the same "
                                               r"number \(accelerate launch --num_processes 2\)"):
            train_mod.train(cfg_for(tiny_model_dir, run, **sets), items(), run, resume=True, quiet=True,
                            log=lambda *_: None)
    state_file.write_text(json.dumps(state))
    real_plan = train_mod.batch_plan  # same items and config, another plan (as another tokenizer would give)
    monkeypatch.setattr(train_mod, "batch_plan", lambda *a, **k: list(reversed(real_plan(*a, **k))))
    with pytest.raises(MedtuneError, match=r"^--resume: the batch plan .* differs from the checkpoint's"):
        train_mod.train(cfg_for(tiny_model_dir, run, **sets), items(), run, resume=True, quiet=True,
                        log=lambda *_: None)


def test_only_medtunes_rng_files_pass_the_check(checkpointed, tmp_path):
    out, cfg = checkpointed
    ckpt = tmp_path / "ckpt"
    shutil.copytree(checkpoint.latest(out), ckpt)
    for name in ("rng-rank0.json", "rng-rank1.safetensors"):
        (ckpt / name).write_text("{}")
        checkpoint.check(ckpt, cfg.to_dict())
    for name in ("rng.pkl", "rng-rank0.bin", "rngstate.pt"):  # `rng` at the start is not enough
        (ckpt / name).write_bytes(b"")
        with pytest.raises(MedtuneError, match=f"holds {name}"):
            checkpoint.check(ckpt, cfg.to_dict())
        (ckpt / name).unlink()


def test_nan_loss_stops_at_once_and_keeps_the_last_checkpoint(tiny_model_dir, tmp_path, monkeypatch):
    real, calls = train_mod.completion_loss_sum, []

    def poisoned(*args):
        calls.append(1)
        loss = real(*args)
        return loss * float("nan") if len(calls) >= 3 else loss  # step 3 (one micro-batch per step)

    monkeypatch.setattr(train_mod, "completion_loss_sum", poisoned)
    cfg = cfg_for(tiny_model_dir, tmp_path, **{"train.max_steps": 5, "train.save_every": 2})
    with pytest.raises(MedtuneError, match=r"loss is nan at step 3.*checkpoint step 2 is kept.*fp16 overflow.*train\.lr"):
        train_mod.train(cfg, items(), tmp_path, quiet=True, log=lambda *_: None)
    assert checkpoint.latest(tmp_path).name == "step-0000002" and not (tmp_path / "adapter").exists()
    assert [json.loads(x)["step"] for x in (tmp_path / "metrics.jsonl").read_text().splitlines()] == [1, 2]


def test_out_of_memory_says_what_to_lower_with_the_estimate(tiny_model_dir, tmp_path, monkeypatch):
    def oom(*args):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")

    monkeypatch.setattr(train_mod, "completion_loss_sum", oom)
    cfg = cfg_for(tiny_model_dir, tmp_path, **{"train.max_steps": 2})
    with pytest.raises(MedtuneError, match=r"out of memory at step 1 \(estimated need [\d.]+ GiB .*tokens per "
                                           r"micro-batch\)\. Lower train\.batch_size \(now 4.*max_length \(now 96\)"
                                           r".*gradient_checkpointing.*QLoRA"):
        train_mod.train(cfg, items(), tmp_path, quiet=True, log=lambda *_: None)


def test_full_disk_refuses_a_checkpoint_with_both_numbers(tiny_model_dir, tmp_path, monkeypatch):
    usage = shutil.disk_usage(tmp_path)
    monkeypatch.setattr(shutil, "disk_usage", lambda p: usage._replace(free=10 << 20))
    cfg = cfg_for(tiny_model_dir, tmp_path, **{"train.max_steps": 2, "train.save_every": 1})
    with pytest.raises(MedtuneError, match=r"not enough disk space for checkpoint step-0000001 .*needs about "
                                           r"[\d.]+ MiB.*10\.0 MiB free"):
        train_mod.train(cfg, items(), tmp_path, quiet=True, log=lambda *_: None)
    assert not (tmp_path / "checkpoints").exists() or not list((tmp_path / "checkpoints").iterdir())


def test_resume_with_another_thread_count_is_within_tolerance(tiny_model_dir, tmp_path, monkeypatch):
    """Same data order, RNG, optimizer and scheduler state; only float reduction order may differ."""
    threads = torch.get_num_threads()
    sets = {"train.max_steps": 4, "train.save_every": 2}
    full = tmp_path / "full"
    train_mod.train(cfg_for(tiny_model_dir, full, **sets), items(), full, quiet=True, log=lambda *_: None)
    cut = tmp_path / "cut"
    real_save = checkpoint.save

    def stop_after_step_2(out_dir, step, *args, **kwargs):
        real_save(out_dir, step, *args, **kwargs)
        raise KeyboardInterrupt

    monkeypatch.setattr(checkpoint, "save", stop_after_step_2)
    with pytest.raises(KeyboardInterrupt):
        train_mod.train(cfg_for(tiny_model_dir, cut, **sets), items(), cut, quiet=True, log=lambda *_: None)
    monkeypatch.setattr(checkpoint, "save", real_save)
    try:
        torch.set_num_threads(1 if threads > 1 else 2)
        train_mod.train(cfg_for(tiny_model_dir, cut, **sets), items(), cut, resume=True, quiet=True,
                        log=lambda *_: None)
    finally:
        torch.set_num_threads(threads)
    a, b = adapter(full), adapter(cut)
    assert all(torch.allclose(a[k], b[k], atol=1e-5, rtol=1e-4) for k in a)


# --- interrupted processes -------------------------------------------------------------------------------------------

def _cli(args: list[str]) -> list[str]:
    return [sys.executable, "-c", "from medtune.cli import app; app()", *args]


def _env() -> dict:
    return {**os.environ, "PYTHONPATH": str(SRC), "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
            "TOKENIZERS_PARALLELISM": "false", "OMP_NUM_THREADS": "1"}  # one thread: fast on a shared 2-core box


def _train_args(model_dir: str, data: Path, out: Path, steps: int) -> list[str]:
    sets = {**SETS, "model": model_dir, "data.source": str(data), "data.train_size": 24, "train.max_steps": steps,
            "train.save_every": 1}
    return ["train", "--out", str(out), "-q", *[x for k, v in sets.items() for x in ("--set", f"{k}={v}")]]


def _wait_for_step(proc, metrics: Path, step: int, timeout: float = 120) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if metrics.is_file() and len(metrics.read_text().splitlines()) >= step:
            return
        assert proc.poll() is None, proc.communicate()
        time.sleep(0.02)
    raise AssertionError(f"step {step} not reached")


@pytest.fixture(scope="module")
def data_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("data") / "colours.jsonl"
    path.write_text("".join(json.dumps(i.to_dict()) + "\n" for i in items(48)))
    return path


@pytest.mark.slow
def test_sigkill_at_three_random_points_then_resume_equals_uninterrupted(tiny_model_dir, data_file, tmp_path):
    steps = 6
    full = tmp_path / "full"
    subprocess.run(_cli(_train_args(tiny_model_dir, data_file, full, steps)), env=_env(), check=True,
                   capture_output=True)
    rng = random.Random(int(time.time()))
    for k in range(3):
        out = tmp_path / f"killed-{k}"
        proc = subprocess.Popen(_cli(_train_args(tiny_model_dir, data_file, out, steps)), env=_env(),
                                stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        _wait_for_step(proc, out / "metrics.jsonl", rng.randint(1, steps - 2))
        time.sleep(rng.uniform(0, 0.3))  # anywhere: mid-step, mid-checkpoint, mid-metrics line
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        resumed = subprocess.run(_cli([*_train_args(tiny_model_dir, data_file, out, steps), "--resume"]), env=_env(),
                                 capture_output=True, text=True, check=False)
        assert resumed.returncode == 0, resumed.stderr[-2000:]
        a, b = adapter(full), adapter(out)
        assert a.keys() == b.keys() and all(torch.equal(a[t], b[t]) for t in a), f"kill {k}"
        steps_logged = [json.loads(x)["step"] for x in (out / "metrics.jsonl").read_text().splitlines()]
        assert steps_logged == list(range(1, steps + 1))
        assert not list(out.rglob("*.tmp-*"))  # what the kill left half-written was cleaned up


@pytest.mark.slow
def test_sigterm_writes_a_checkpoint_says_how_to_resume_and_exits_nonzero(tiny_model_dir, data_file, tmp_path):
    out = tmp_path / "run"
    proc = subprocess.Popen(_cli(_train_args(tiny_model_dir, data_file, out, 400)), env=_env(),
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    _wait_for_step(proc, out / "metrics.jsonl", 2)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 128 + signal.SIGTERM, err[-2000:]
    line = [x for x in err.splitlines() if x.startswith("error:")][-1]
    assert "SIGTERM at step" in line and "--resume" in line and "Traceback" not in err
    step = int(line.split("at step ")[1].split()[0])
    assert checkpoint.latest(out).name == f"step-{step:07d}"
    assert len((out / "metrics.jsonl").read_text().splitlines()) == step
