"""Training checkpoints that can't run code and can't be resumed into the wrong run.

A checkpoint is RUN/checkpoints/step-NNNNNNN/ holding only safetensors and JSON, written under a temp name and renamed
into place (medtune.io), the last two kept:

  adapter.safetensors    the trainable (LoRA) weights only, by parameter name: no frozen base weights
  optimizer.safetensors  the optimizer's per-parameter tensors (AdamW moments, step) ...
  optimizer.json         ... and its param groups (lr, betas, eps, weight decay)
  scheduler.json         the LR scheduler's state (its lambdas are rebuilt from the config, not stored)
  rng.safetensors        torch CPU (and CUDA) generator states ...
  rng.json               ... and Python's and NumPy's; under DDP one pair per rank, rng-rank{r}.safetensors/json,
                         gathered to rank 0 through the process group as safetensors bytes (no pickle anywhere)
  best.safetensors       with validation (train.eval_every): the best validated step's LoRA weights, by name
  state.json             step, tokens seen, elapsed seconds, grad-scaler state, the config keys that shape training,
                         the world size, and the data fingerprint: the training items (ids + content) and the batch
                         plan (the token ids of every step); with validation its best step, accuracy and patience
                         count

Nothing is unpickled on resume: a checkpoint dir holding any other file (a planted `custom_checkpoint_0.pkl`, a
`.bin`) is refused before anything is read. `--resume` with a different value of a training-shaping key, other
training items, another world size or another batch plan is refused and the error says what differs.
"""

from __future__ import annotations

import hashlib
import json
import random
import re
import shutil
from pathlib import Path

from medtune import io
from medtune.errors import MedtuneError, shown

FILES = ("adapter.safetensors", "optimizer.safetensors", "optimizer.json", "scheduler.json", "rng.json", "state.json",
         "best.safetensors")
KEEP = 2  # checkpoints kept; older ones are deleted once a newer one is complete
DEFAULT_SAVE_MINUTES = 10.0  # train.save_every = 0: a checkpoint every 10 minutes of training, and at the end

# Config keys that may change between a run and its resume: they don't change what is trained.
# data.eval_source is not free: without it the eval items are split off `source`, so it decides the training items.
FREE_KEYS = {"out_dir", "device", "eval", "data.limit", "data.eval_size", "train.save_every", "train.log_every",
             "train.report_to", "train.gradient_checkpointing"}
RNG_FILE = re.compile(r"rng(-rank\d+)?\.(safetensors|json)")


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


def save(out_dir: Path, step: int, model, optimizer, scheduler, state: dict, scaler=None,
         rng: list[bytes] | None = None, best: dict | None = None) -> Path:
    """Write checkpoint `step` (the main process; weights and optimizer are the same on every DDP rank). `rng`: every
    rank's RNG state (gather_rng), rank r's at index r; None: this process's own. `best`: the best validated step's
    trainable tensors (validation.Validation), written as best.safetensors. Returns the checkpoint's dir."""
    from safetensors.torch import save_file

    final = checkpoint_dir(out_dir, step)
    root = final.parent
    trainable = {n: p for n, p in model.named_parameters() if p.requires_grad}
    io.check_free_space(root, estimate_size(trainable.values()), f"checkpoint step-{step:07d}")
    with io.atomic_dir(final) as tmp:
        save_file({n: p.detach().contiguous().cpu() for n, p in trainable.items()}, str(tmp / "adapter.safetensors"))
        if best is not None:
            save_file(best, str(tmp / "best.safetensors"))
        tensors, groups = _optimizer_state(optimizer)
        save_file(tensors, str(tmp / "optimizer.safetensors"))
        io.write_json(tmp / "optimizer.json", groups)
        io.write_json(tmp / "scheduler.json", _jsonable(scheduler.state_dict()))
        rng = rng if rng is not None else [rng_state()]
        for rank, blob in enumerate(rng):
            _save_rng(tmp, f"-rank{rank}" if len(rng) > 1 else "", blob)
        io.write_json(tmp / "state.json", {**state, "step": step, "world": len(rng),
                                           "scaler": scaler.state_dict() if scaler is not None else None})
    for old in sorted(p for p in root.glob("step-*") if p.is_dir())[:-KEEP]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def checkpoint_dir(out_dir: Path, step: int) -> Path:
    return Path(out_dir) / "checkpoints" / f"step-{step:07d}"


def read_state(ckpt: Path) -> dict:
    """A checkpoint's state.json (step, world, data fingerprint, ...), its shape checked: anything else is one line."""
    state = _read_json(ckpt / "state.json")
    data = state.get("data") if isinstance(state, dict) else None
    if not isinstance(state, dict) or not isinstance(state.get("config") or {}, dict) \
            or not isinstance(data or {}, dict) or not isinstance((data or {}).get("train") or {}, dict) \
            or not isinstance(state.get("step"), int) or isinstance(state.get("step"), bool):
        raise MedtuneError(f"{ckpt / 'state.json'}: not a medtune checkpoint state; resume from an earlier checkpoint")
    return state


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


def check(ckpt: Path, cfg_dict: dict, data: dict | None = None) -> dict:
    """Refuse a checkpoint that holds anything but medtune's safetensors/JSON files, whose training-shaping config
    differs from `cfg_dict`, or whose training items differ from `data` (data_fingerprint); return its state.json."""
    unexpected = sorted(shown(p.name) for p in ckpt.iterdir() if p.name not in FILES and not RNG_FILE.fullmatch(p.name))
    if unexpected:
        raise MedtuneError(f"{ckpt}: holds {', '.join(unexpected)}, which medtune never writes (a pickle can run code "
                           "when loaded); refusing to resume from it. Delete that file or the checkpoint")
    state = read_state(ckpt)
    saved, now = state.get("config") or {}, shaping_config(cfg_dict)
    diff = [f"{shown(k)}: {saved.get(k, '(unset)')!r} -> {now.get(k, '(unset)')!r}" for k in sorted(set(saved) | set(now))
            if saved.get(k) != now.get(k)]
    if diff:
        raise MedtuneError(f"--resume: the config differs from the checkpoint's ({'; '.join(diff)}); resume with the "
                           "same values, or start a new run (--overwrite or another --out)")
    if data is not None:
        saved = (state.get("data") or {}).get("train")
        if saved != data:
            was = f"{saved.get('n')} items, sha256 {str(saved.get('sha256'))[:12]}" if saved \
                else "none recorded (an older medtune)"
            raise MedtuneError(f"--resume: the training data differs from the checkpoint's ({was}; now {data['n']} "
                               f"items, sha256 {data['sha256'][:12]}); resume with the same data files and data.* "
                               "values, or start a new run (--overwrite or another --out)")
    return state


def check_launch(accelerator, ckpt: Path | None, resume: bool) -> None:
    """What `--resume` can check only once accelerate has started (before any weights load): the backend, and the
    number of processes against the checkpoint's."""
    if resume and sharded(accelerator):
        raise MedtuneError("--resume: medtune writes no checkpoints under FSDP/DeepSpeed (their optimizer state is "
                           "sharded), so there is nothing to resume; start the run again without --resume, or train "
                           "under DDP (recipes/accelerate/multi-gpu-ddp.yaml) for resumable checkpoints")
    if ckpt is not None:
        check_world(read_state(ckpt), accelerator.num_processes)


def sharded(accelerator) -> bool:
    """FSDP, DeepSpeed (and Megatron) shard the optimizer state: medtune writes no checkpoints there."""
    return accelerator.distributed_type.name in ("FSDP", "DEEPSPEED", "MEGATRON_LM")


def check_world(state: dict, world: int) -> None:
    """Refuse to resume with another number of processes: the global batch (batch_size x world), the batch plan and
    the per-rank RNG states all depend on it."""
    saved = state.get("world", 1)
    if saved != world:
        raise MedtuneError(f"--resume: the checkpoint was written by {saved} process(es), this launch has {world}; "
                           f"resume with the same number (accelerate launch --num_processes {saved}), or start a new "
                           "run (--overwrite or another --out)")


def check_plan(state: dict, plan_sha256: str) -> None:
    """Refuse to resume into another batch plan (same items and config, but e.g. another tokenizer or medtune)."""
    saved = (state.get("data") or {}).get("plan")
    if saved != plan_sha256:
        raise MedtuneError(f"--resume: the batch plan (the token ids of every step) differs from the checkpoint's "
                           f"({(saved or 'none recorded')[:12]} -> {plan_sha256[:12]}: another tokenizer or medtune "
                           "version?); resume with the same model and medtune, or start a new run")


def data_fingerprint(items) -> dict:
    """The training items as resume must find them: how many, and a sha256 of every item's id and content in order."""
    digest = hashlib.sha256()
    for item in items:
        digest.update(json.dumps(item.to_dict(), sort_keys=True, ensure_ascii=False).encode() + b"\n")
    return {"n": len(items), "sha256": digest.hexdigest()}


def plan_fingerprint(plan) -> str:
    """sha256 of the batch plan: every step's micro-batches' token ids and target starts, in order."""
    digest = hashlib.sha256()
    for s, step in enumerate(plan):
        for m, micro in enumerate(step):
            for ex in micro:
                digest.update(f"{s}.{m}:{ex.prompt_len}:{','.join(map(str, ex.input_ids))}\n".encode())
    return digest.hexdigest()


def load(ckpt: Path, model, optimizer, scheduler, scaler=None, rank: int = 0) -> dict:
    """Restore weights, optimizer, scheduler, grad scaler and RNG states from `ckpt` (already `check`ed)."""
    import torch
    from safetensors.torch import load_file

    weights = load_file(str(ckpt / "adapter.safetensors"))
    bad = next((n for n, w in weights.items() if w.is_floating_point() and not bool(torch.isfinite(w).all())), None)
    if bad is not None:  # resuming would train on (or, at the last step, publish) NaN weights
        raise MedtuneError(f"{ckpt / 'adapter.safetensors'}: {bad} holds NaN or infinite values; delete this "
                           "checkpoint to resume from the one before")
    trainable = {n: p for n, p in model.named_parameters() if p.requires_grad}
    if set(weights) != set(trainable):
        raise MedtuneError(f"{ckpt}: its weights don't match this model's trainable parameters "
                           f"({len(weights)} vs {len(trainable)} tensors); was it written for another model?")
    shaped = next((n for n, p in trainable.items() if weights[n].shape != p.shape), None)
    if shaped is not None:  # copy_ would broadcast or raise a RuntimeError traceback
        raise MedtuneError(f"{ckpt / 'adapter.safetensors'}: {shaped} has shape {list(weights[shaped].shape)}, the "
                           f"model expects {list(trainable[shaped].shape)}; delete this checkpoint to resume from the "
                           "one before")
    with torch.no_grad():
        for n, p in trainable.items():
            p.copy_(weights[n].to(p.device))
    optimizer.load_state_dict(_optimizer_from(load_file(str(ckpt / "optimizer.safetensors")),
                                              _read_json(ckpt / "optimizer.json")))
    moments = ((p, m) for g in optimizer.param_groups for p in g["params"] for m in optimizer.state.get(p, {}).values())
    if any(torch.is_tensor(m) and m.dim() and m.shape != p.shape for p, m in moments):  # AdamW's exp_avg(_sq)
        raise MedtuneError(f"{ckpt / 'optimizer.safetensors'}: its moments do not have the shapes of the model's "
                           "trainable parameters; delete this checkpoint to resume from the one before")
    scheduler.load_state_dict(_read_json(ckpt / "scheduler.json"))
    state = _read_json(ckpt / "state.json")
    if scaler is not None and state.get("scaler"):
        scaler.load_state_dict(state["scaler"])
    _load_rng(ckpt, f"-rank{rank}" if state.get("world", 1) > 1 else "")
    return state


def load_best(ckpt: Path) -> dict | None:
    """The best validated weights a checkpoint holds (best.safetensors), on the CPU; None when it holds none."""
    from safetensors.torch import load_file

    path = ckpt / "best.safetensors"
    return load_file(str(path)) if path.is_file() else None


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


def rng_state() -> bytes:
    """This process's RNG states (torch CPU and CUDA, Python, NumPy) as one safetensors blob: bytes that can cross the
    process group (gather_rng) and be written as-is, with nothing pickled."""
    import numpy as np
    import torch
    from safetensors.torch import save

    tensors = {"torch_cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        for i, s in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"cuda_{i}"] = s
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    meta = json.dumps({"python": _jsonable(random.getstate()), "numpy": [kind, keys.tolist(), pos, has_gauss, gauss]})
    tensors["json"] = torch.frombuffer(bytearray(meta.encode()), dtype=torch.uint8)
    return save(tensors)


def gather_rng(accelerator) -> list[bytes]:
    """Every rank's rng_state(), rank r's at index r, on every rank (a collective: all ranks must call it). The blobs
    travel as uint8 tensors through accelerate's gather, padded to the longest."""
    import torch

    blob = rng_state()
    if accelerator.num_processes == 1:
        return [blob]
    data = torch.frombuffer(bytearray(blob), dtype=torch.uint8)
    sizes = accelerator.gather(torch.tensor([data.numel()], device=accelerator.device)).tolist()
    padded = torch.zeros(max(sizes), dtype=torch.uint8)
    padded[: data.numel()] = data
    rows = accelerator.gather(padded.to(accelerator.device)).cpu().view(len(sizes), -1)
    return [rows[r, :n].numpy().tobytes() for r, n in enumerate(sizes)]


def _save_rng(tmp: Path, suffix: str, blob: bytes) -> None:
    from safetensors.torch import load, save_file

    tensors = load(blob)
    meta = json.loads(tensors.pop("json").numpy().tobytes().decode())
    save_file(tensors, str(tmp / f"rng{suffix}.safetensors"))
    io.write_json(tmp / f"rng{suffix}.json", meta)


def _load_rng(ckpt: Path, suffix: str) -> None:
    import numpy as np
    import torch
    from safetensors.torch import load_file

    if not (ckpt / f"rng{suffix}.safetensors").is_file() or not (ckpt / f"rng{suffix}.json").is_file():
        raise MedtuneError(f"{ckpt}: rng{suffix}.safetensors/json missing (this process's RNG state); resume from an "
                           "earlier checkpoint or start a new run")
    tensors = load_file(str(ckpt / f"rng{suffix}.safetensors"))
    torch.set_rng_state(tensors["torch_cpu"])
    cuda = [tensors[k] for k in sorted((k for k in tensors if k.startswith("cuda_")), key=lambda k: int(k[5:]))]
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
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, RecursionError) as e:
        raise MedtuneError(f"{path}: unreadable checkpoint file ({type(e).__name__}); resume from an earlier "
                           "checkpoint") from None


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

    def agreed(self, accelerator) -> int | None:
        """The signal to stop on after this step, the same on every rank: one that reached any rank (one all-reduce
        per step under DDP; torchrun may forward a signal to one worker, or a user may signal one), so all ranks
        checkpoint at the same step boundary and none waits alone in a collective."""
        received = self.received
        if accelerator.num_processes > 1:
            import torch

            flag = torch.tensor(received or 0, device=accelerator.device)
            received = int(accelerator.reduce(flag, "max").item()) or None
        return received

    def _handle(self, signum, frame):
        if self.received is not None:
            raise KeyboardInterrupt(signum)  # the CLI says which signal, and exits 128 + its number
        self.received = signum

    def __exit__(self, *exc):
        import signal

        for sig, handler in self.previous.items():
            signal.signal(sig, handler)
        return False
