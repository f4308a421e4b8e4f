"""Training checkpoints that can't run code and can't be resumed into the wrong run.

A checkpoint is RUN/checkpoints/step-NNNNNNN/ holding only safetensors and JSON, written under a temp name and renamed
into place (medtune.io), the last two kept:

  adapter.safetensors    the trainable (LoRA) weights only, by parameter name: no frozen base weights
  optimizer.safetensors  the optimizer's per-parameter tensors (AdamW moments, step) ...
  optimizer.json         ... and its param groups (lr, betas, eps, weight decay)
  scheduler.json         the LR scheduler's state (its lambdas are rebuilt from the config, not stored)
  rng.safetensors        torch CPU (and CUDA) generator states, per process ...
  rng.json               ... and Python's and NumPy's
  state.json             step, tokens seen, elapsed seconds, grad-scaler state, and the config keys that shape training

Nothing is unpickled on resume: a checkpoint dir holding any other file (a planted `custom_checkpoint_0.pkl`, a
`.bin`) is refused before anything is read. `--resume` with a different value of a training-shaping key is refused
and the error lists the differences.
"""

from __future__ import annotations

import json
import random
import shutil
from pathlib import Path

from medtune import io
from medtune.errors import MedtuneError

FILES = ("adapter.safetensors", "optimizer.safetensors", "optimizer.json", "scheduler.json", "rng.json", "state.json")
KEEP = 2  # checkpoints kept; older ones are deleted once a newer one is complete
DEFAULT_SAVE_MINUTES = 10.0  # train.save_every = 0: a checkpoint every 10 minutes of training, and at the end

# Config keys that may change between a run and its resume: they don't change what is trained.
FREE_KEYS = {"out_dir", "device", "eval", "data.limit", "data.eval_size", "data.eval_source", "train.save_every",
             "train.log_every", "train.report_to", "train.gradient_checkpointing"}


def shaping_config(cfg_dict: dict) -> dict:
    """The flattened config minus the keys free to change on resume."""
    return {k: v for k, v in flat(cfg_dict).items() if k not in FREE_KEYS and k.split(".")[0] not in FREE_KEYS}


def flat(d: dict, prefix: str = "") -> dict:
    """{'a': {'b': 1}} -> {'a.b': 1}."""
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(flat(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def estimate_size(params) -> int:
    """Bytes of one checkpoint: the trainable weights and AdamW's two moments, in fp32, plus a little JSON."""
    return sum(p.numel() for p in params) * 4 * 3 + (1 << 20)


def save(out_dir: Path, step: int, model, optimizer, scheduler, state: dict, scaler=None, rank: int = 0,
         world: int = 1) -> Path:
    """Write checkpoint `step` (main process writes the shared files; every rank its RNG state). Returns its dir."""
    from safetensors.torch import save_file

    root = Path(out_dir) / "checkpoints"
    final = root / f"step-{step:07d}"
    trainable = {n: p for n, p in model.named_parameters() if p.requires_grad}
    io.check_free_space(root, estimate_size(trainable.values()), f"checkpoint step-{step:07d}")
    with io.atomic_dir(final) as tmp:
        save_file({n: p.detach().contiguous().cpu() for n, p in trainable.items()}, str(tmp / "adapter.safetensors"))
        tensors, groups = _optimizer_state(optimizer)
        save_file(tensors, str(tmp / "optimizer.safetensors"))
        io.write_json(tmp / "optimizer.json", groups)
        io.write_json(tmp / "scheduler.json", _jsonable(scheduler.state_dict()))
        _save_rng(tmp, rank, world)
        io.write_json(tmp / "state.json", {**state, "step": step, "world": world,
                                           "scaler": scaler.state_dict() if scaler is not None else None})
    for old in sorted(p for p in root.glob("step-*") if p.is_dir())[:-KEEP]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def remove_stale(out_dir: Path) -> None:
    """Delete the temp dirs (`.step-N.tmp-PID`, `.adapter.tmp-PID`) that a killed process left half-written."""
    out_dir = Path(out_dir)
    for tmp in [*(out_dir / "checkpoints").glob(".step-*.tmp-*"), *out_dir.glob(".adapter.tmp-*"),
                *out_dir.glob(".adapter.old-*")]:
        shutil.rmtree(tmp, ignore_errors=True)


def latest(out_dir: Path) -> Path | None:
    """The newest complete checkpoint (temp dirs of an interrupted save are ignored)."""
    done = sorted(p for p in (Path(out_dir) / "checkpoints").glob("step-*") if (p / "state.json").is_file())
    return done[-1] if done else None


def check(ckpt: Path, cfg_dict: dict) -> dict:
    """Refuse a checkpoint that holds anything but medtune's safetensors/JSON files, or whose training-shaping config
    differs from `cfg_dict`; return its state.json."""
    unexpected = sorted(p.name for p in ckpt.iterdir() if p.name not in FILES and not p.name.startswith("rng"))
    if unexpected:
        raise MedtuneError(f"{ckpt}: holds {', '.join(unexpected)}, which medtune never writes (a pickle can run code "
                           "when loaded); refusing to resume from it. Delete that file or the checkpoint")
    state = _read_json(ckpt / "state.json")
    saved, now = state.get("config") or {}, shaping_config(cfg_dict)
    diff = [f"{k}: {saved.get(k, '(unset)')!r} -> {now.get(k, '(unset)')!r}" for k in sorted(set(saved) | set(now))
            if saved.get(k) != now.get(k)]
    if diff:
        raise MedtuneError(f"--resume: the config differs from the checkpoint's ({'; '.join(diff)}); resume with the "
                           "same values, or start a new run (--overwrite or another --out)")
    return state


def load(ckpt: Path, model, optimizer, scheduler, scaler=None, rank: int = 0) -> dict:
    """Restore weights, optimizer, scheduler, grad scaler and RNG states from `ckpt` (already `check`ed)."""
    import torch
    from safetensors.torch import load_file

    weights = load_file(str(ckpt / "adapter.safetensors"))
    trainable = {n: p for n, p in model.named_parameters() if p.requires_grad}
    if set(weights) != set(trainable):
        raise MedtuneError(f"{ckpt}: its weights don't match this model's trainable parameters "
                           f"({len(weights)} vs {len(trainable)} tensors); was it written for another model?")
    with torch.no_grad():
        for n, p in trainable.items():
            p.copy_(weights[n].to(p.device))
    optimizer.load_state_dict(_optimizer_from(load_file(str(ckpt / "optimizer.safetensors")),
                                              _read_json(ckpt / "optimizer.json")))
    scheduler.load_state_dict(_read_json(ckpt / "scheduler.json"))
    state = _read_json(ckpt / "state.json")
    if scaler is not None and state.get("scaler"):
        scaler.load_state_dict(state["scaler"])
    _load_rng(ckpt, rank)
    return state


def _optimizer_state(optimizer) -> tuple[dict, dict]:
    sd = optimizer.state_dict()
    tensors, scalars = {}, {}
    for idx, st in sd["state"].items():
        for key, value in st.items():
            if hasattr(value, "shape"):
                tensors[f"{idx}.{key}"] = value.detach().contiguous().cpu()
            else:
                scalars[f"{idx}.{key}"] = value
    return tensors, {"param_groups": _jsonable(sd["param_groups"]), "scalars": scalars}


def _optimizer_from(tensors: dict, meta: dict) -> dict:
    state: dict[int, dict] = {}
    for name, value in [*tensors.items(), *meta.get("scalars", {}).items()]:
        idx, key = name.split(".", 1)
        state.setdefault(int(idx), {})[key] = value
    groups = meta["param_groups"]
    for g in groups:
        if isinstance(g.get("betas"), list):
            g["betas"] = tuple(g["betas"])
    return {"state": state, "param_groups": groups}


def _save_rng(tmp: Path, rank: int, world: int) -> None:
    import numpy as np
    import torch
    from safetensors.torch import save_file

    tensors = {"torch_cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        for i, s in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"cuda_{i}"] = s
    suffix = f"-rank{rank}" if world > 1 else ""
    save_file(tensors, str(tmp / f"rng{suffix}.safetensors"))
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    io.write_json(tmp / f"rng{suffix}.json", {"python": _jsonable(random.getstate()),
                                             "numpy": [kind, keys.tolist(), pos, has_gauss, gauss]})


def _load_rng(ckpt: Path, rank: int) -> None:
    import numpy as np
    import torch
    from safetensors.torch import load_file

    suffix = f"-rank{rank}" if (ckpt / f"rng-rank{rank}.json").is_file() else ""
    tensors = load_file(str(ckpt / f"rng{suffix}.safetensors"))
    torch.set_rng_state(tensors["torch_cpu"])
    cuda = [tensors[k] for k in sorted(tensors) if k.startswith("cuda_")]
    if cuda and torch.cuda.is_available() and len(cuda) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(cuda)
    states = _read_json(ckpt / f"rng{suffix}.json")
    version, internal, gauss = states["python"]
    random.setstate((version, tuple(internal), gauss))
    kind, keys, pos, has_gauss, g = states["numpy"]
    np.random.set_state((kind, np.array(keys, dtype=np.uint32), pos, has_gauss, g))


def _jsonable(value):
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if hasattr(value, "item") and getattr(value, "ndim", 1) == 0:
        return value.item()
    return value


def _read_json(path: Path):
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise MedtuneError(f"{path}: unreadable checkpoint file ({e}); resume from an earlier checkpoint") from None


def cut_metrics(path: Path, step: int) -> None:
    """Drop metrics.jsonl rows after the checkpoint's step, so a resumed run appends without repeating steps."""
    if not path.is_file():
        return
    rows = [line for line in path.read_text(encoding="utf-8").split("\n") if line.strip()]
    keep = []
    for line in rows:
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            break  # a line cut by a crash: it and everything after it go
        if row.get("step", 0) > step:
            break
        keep.append(line + "\n")
    io.write_text(path, "".join(keep))


class Signals:
    """While training: SIGTERM and SIGINT set `received` (the loop checkpoints and stops after the current step); a
    second signal interrupts at once (checkpoints are atomic, so nothing half-written is left)."""

    def __enter__(self):
        import signal
        import threading

        self.received, self.previous = None, {}
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGTERM, signal.SIGINT):
                self.previous[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, frame):
        if self.received is not None:
            raise KeyboardInterrupt
        self.received = signum

    def __exit__(self, *exc):
        import signal

        for sig, handler in self.previous.items():
            signal.signal(sig, handler)
        return False
