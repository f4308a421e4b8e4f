"""LoRA supervised fine-tuning: one readable loop on PEFT + accelerate.

Why a loop and not `transformers.Trainer`/`trl.SFTTrainer`: medtune needs, and tests, things those make hard to
guarantee together: option order re-shuffled per example *and per epoch* (the answer letter carries no information),
loss normalized over the target tokens of the whole optimizer step (so gradient accumulation equals the larger batch),
atomic checkpoints, and a resume that reproduces the uninterrupted run bit for bit. accelerate still does device
placement, mixed precision and DDP/FSDP/DeepSpeed under `accelerate launch`.

Examples and the seeded batch plan are built in batches.py.
"""

from __future__ import annotations

import contextlib
import dataclasses
import importlib.util
import json
import math
import shutil
import time
import warnings
from pathlib import Path

from medtune import io
from medtune.batches import batch_plan, collate, first_target
from medtune.config import Config, save_config
from medtune.data.items import MCQItem
from medtune.errors import MedtuneError, TrainingInterrupted


def train(cfg: Config, items: list[MCQItem], out_dir: Path, resume: bool = False, quiet: bool = False,
          log=print, extra_meta: dict | None = None, base_model=None, val_items: list[MCQItem] | None = None,
          done=None) -> dict:
    """Train a LoRA adapter on `items`; write it to out_dir/adapter with everything needed to trace it.
    `base_model`: the base already in memory (run.py), trained in place instead of loading it again; the LoRA
    layers are taken out of it again before this returns, so the caller holds the plain base (one copy throughout).

    Checkpoints (checkpoint.py) every `save_every` steps, or every DEFAULT_SAVE_MINUTES when it is 0, and at the end;
    SIGTERM/SIGINT write one and exit (TrainingInterrupted). Without `resume` an earlier run's checkpoints and metrics
    in out_dir are replaced (the CLI refuses a non-empty out_dir unless --overwrite).

    `val_items` (data.prepare.validation_split): validated every train.eval_every steps (validation.py); the row of
    that step in metrics.jsonl gets val_accuracy, val_correct, val_n, val_ci95 and val_best_step. `done` prints the
    final "trained N steps" line (default `log`; `train -q` still prints it, as `eval -q` prints its results)."""
    out_dir = Path(out_dir)
    if cfg.train.eval_every and not val_items:
        raise MedtuneError(f"train.eval_every={cfg.train.eval_every}: no validation items were held out; set "
                           "data.validation (train() takes them as val_items, from data.prepare.validation_split)")
    launch = _launch(cfg, out_dir, items, resume, log)
    run, tokenizer, plan = _prepare(cfg, launch, items, out_dir, log, base_model, val_items)
    loss = _loop(run, plan, tokenizer, len(items), quiet)
    summary = _finish(run, launch, plan, tokenizer, loss, cfg, items, out_dir, extra_meta, val_items, done or log)
    if base_model is not None:
        _release_base(launch.accelerator.unwrap_model(run.model), base_model)
    return summary


@dataclasses.dataclass
class Launch:
    """What train() decides before the model loads: the accelerator, the hardware policy, the checkpoint to resume."""
    accelerator: object
    info: object
    policy: object
    recorder: object
    ckpt: Path | None


def _launch(cfg: Config, out_dir: Path, items: list[MCQItem], resume: bool, log) -> Launch:
    """Device, policy and accelerator, with every refusal that needs no weights (a missing device, a checkpoint that
    does not match, another world size) made before the model loads."""
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState
    from accelerate.utils import set_seed

    from medtune import checkpoint
    from medtune.cost import Recorder
    from medtune.doctor import preflight
    from medtune.hardware import decide, detect, prepare_env

    t = cfg.train
    prepare_env()  # before anything initializes the GPU runtime (ROCm reads HSA_OVERRIDE_GFX_VERSION once)
    device = _select_device(cfg.device)  # a device that is not there: one line, before anything loads
    info = detect()
    recorder = Recorder("train")  # wall time, device, energy -> out_dir/cost.json
    policy = decide(info)
    ckpt = _checkpoint_to_resume(out_dir, cfg, log, items) if resume else None  # refused before the model loads
    # A second train() in one process (a notebook, a test session) may ask for another precision; accelerate keeps
    # the first one's state and refuses. Reset it (the process-group state, PartialState, is kept).
    AcceleratorState._reset_state()
    accelerator = Accelerator(mixed_precision=mixed_precision_for(t.dtype, policy.train_dtype),
                              gradient_accumulation_steps=t.grad_accum,
                              cpu=device == "cpu",
                              log_with=t.report_to or None, project_dir=str(out_dir))
    checkpoint.check_launch(accelerator, ckpt, resume)  # world size, backend: known only now; before weights load
    if t.eval_every and checkpoint.sharded(accelerator):
        raise MedtuneError("train.eval_every: validation during training is not supported under FSDP/DeepSpeed "
                           "(sharded weights); train under DDP or set train.eval_every=0")
    set_seed(t.seed, deterministic=False)
    preflight(cfg, log if accelerator.is_main_process else (lambda *_: None), info)  # warnings before weights load
    return Launch(accelerator, info, policy, recorder, ckpt)


def _prepare(cfg: Config, launch: Launch, items: list[MCQItem], out_dir: Path, log, base_model,
             val_items: list[MCQItem] | None):
    """The LoRA model, its batches, optimizer and schedule, prepared by accelerate, in a TrainRun at its start step
    (0, or the resumed checkpoint's)."""
    import torch
    from transformers import get_scheduler

    t, accelerator = cfg.train, launch.accelerator
    model, tokenizer = lora_model(cfg, accelerator, log, attention_kernel(cfg, launch.info, launch.policy), base_model)
    plan = batch_plan(items, cfg, tokenizer, accelerator.num_processes)
    steps = len(plan) if t.max_steps is None else min(t.max_steps, len(plan))
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=t.lr, weight_decay=t.weight_decay)
    # Warmup starts at lr 0, so it leaves at least one step after it: a 1-step run (max_steps 1, a huge grad_accum)
    # had warmup take its only step and saved an adapter equal to the base (probe 8).
    warmup = min(math.ceil(t.warmup * steps), steps - 1)
    scheduler = get_scheduler(t.scheduler, optimizer, num_warmup_steps=warmup, num_training_steps=steps)
    fill_deepspeed(accelerator, t.batch_size)
    model, optimizer = accelerator.prepare(model, optimizer)
    if t.report_to:
        accelerator.init_trackers("medtune", config=_tracker_config(cfg.to_dict()))
    run = TrainRun(accelerator, model, optimizer, scheduler, cfg, out_dir, steps, log)
    run.recorder = launch.recorder
    if t.eval_every:
        from medtune.validation import Validation

        run.validation = Validation(cfg, val_items, tokenizer, accelerator)
    run.begin(launch.ckpt, items, plan)
    return run, tokenizer, plan


def _loop(run: TrainRun, plan: list, tokenizer, n_items: int, quiet: bool) -> float:
    """The steps from run.step to the end (or early stop); a signal checkpoints and stops. Returns the last loss."""
    from medtune import checkpoint

    accelerator = run.acc
    progress = _progress(run.steps, run.step, quiet or not accelerator.is_main_process)
    run.model.train()
    loss = run.loss  # the checkpoint's, when a finished run is resumed
    with checkpoint.Signals() as signals:
        for step in range(run.step, run.step if run.stopped() else run.steps):  # an early-stopped run stays stopped
            loss, real = _guarded_step(run, plan[step], tokenizer, step, n_items)
            run.finish_step(step + 1, loss, real, progress)  # validates when due, before any checkpoint of this step
            stop = signals.agreed(accelerator)  # the same on every rank: all stop after this same step
            if stop:
                run.interrupt(stop)
            if run.stopped():  # train.patience: the same on every rank (validation sums every rank's counts)
                break
            if run.due(step + 1):
                run.save(step + 1)
    progress.close()
    if run.last_saved != run.step and run.step > run.start:
        run.save(run.step)  # the end of training is a checkpoint too: `--resume` of a finished run is a no-op
    return loss


def _finish(run: TrainRun, launch: Launch, plan: list, tokenizer, loss: float, cfg: Config, items: list[MCQItem],
            out_dir: Path, extra_meta: dict | None, val_items: list[MCQItem] | None, log) -> dict:
    """The summary, the kept weights (train.keep) and the adapter with its record, written by the main process."""
    from medtune.models import placement

    accelerator, model = launch.accelerator, run.model
    wall = time.time() - run.t0
    summary = {"steps": run.step, "final_loss": loss, "wall_s": round(wall, 2), "real_tokens": run.tokens,
               "tokens_per_s": round(run.tokens / max(wall, 1e-9), 1), "resumed_from_step": run.start,
               "question_cut": sum(1 for b in plan[0] for ex in b if ex.cut) if plan else 0,
               "placement": placement(accelerator.unwrap_model(model))}
    if run.validation is not None:
        summary["validation"] = run.validation.summary(run.step)
        run.validation.keep_best(model)  # keep=best: the best step's LoRA weights into the model, on every rank
        extra_meta = {**(extra_meta or {}), **{k: summary["validation"][k] for k in ("kept", "best_step",
                                                                                    "best_val_accuracy")},
                      "validation_ids": [i.id for i in val_items]}
    state = accelerator.get_state_dict(model)  # every rank: FSDP / ZeRO-3 gather the sharded weights whole
    if accelerator.is_main_process:
        save_adapter(accelerator.unwrap_model(model), state, tokenizer, cfg, items, out_dir, summary, extra_meta)
        finished = run.step == run.start and (out_dir / "cost.json").is_file()  # a --resume of a finished run
        if not finished:  # (its cost.json is the training's; a resume that trains nothing leaves it as it is)
            launch.recorder.stop(out_dir, train_tokens=run.tokens, steps=run.step, resumed_from_step=run.start,
                                 device_count=max(accelerator.num_processes, 1))
        log(f"nothing to train: the run had finished at step {run.step} (final loss {loss:.4f})" if finished else
            f"trained {run.step} steps in {summary['wall_s']} s, {summary['tokens_per_s']} real tokens/s, "
            f"final loss {loss:.4f}")
    accelerator.wait_for_everyone()
    if cfg.train.report_to:
        accelerator.end_training()
    return summary


def _select_device(requested: str) -> str:
    """The policy's device (hardware.resolve_device). An explicit index (cuda:1) is made the current device for a
    single process; under `accelerate launch` every rank takes its own local GPU, so an index is refused there."""
    import os

    from medtune.hardware import resolve_device

    device = resolve_device(requested)
    kind, _, index = device.partition(":")
    if index:
        if int(os.environ.get("WORLD_SIZE", "1")) > 1:
            raise MedtuneError(f"device {device}: under accelerate launch each rank uses its own local GPU; choose "
                               "the GPUs with CUDA_VISIBLE_DEVICES (or ZE_AFFINITY_MASK) and set device=auto")
        import torch

        getattr(torch, kind).set_device(int(index))
    return device


def _release_base(peft_model, base) -> None:
    """Undo what training did to run.py's in-memory base: the LoRA layers out (PEFT's unload puts the original
    modules back), the input-grad hook and checkpointing off, the KV cache on again, the policy's attention back."""
    peft_model.unload()
    if getattr(base, "is_activation_checkpointing", False):  # transformers 5's names
        base.activation_checkpointing_disable()
    base.disable_input_require_grads()
    base.config.use_cache = True
    base.set_attn_implementation(getattr(base, "medtune_attn", None) or "sdpa")


def fill_deepspeed(accelerator, batch_size: int) -> None:
    """Under DeepSpeed, accelerate fills an `auto` micro-batch size only from a DataLoader, which this loop doesn't
    use (prepare() raises without it), and an `auto` gradient_clipping with 1.0, where medtune clips nowhere else."""
    plugin = getattr(accelerator.state, "deepspeed_plugin", None)
    if plugin is None:
        return
    ds = plugin.deepspeed_config
    if ds.get("train_micro_batch_size_per_gpu", "auto") == "auto":
        ds["train_micro_batch_size_per_gpu"] = batch_size
    if ds.get("gradient_clipping", "auto") == "auto":
        ds["gradient_clipping"] = 0.0  # DeepSpeed's "off"


def _checkpoint_to_resume(out_dir: Path, cfg: Config, log, items: list[MCQItem]) -> Path | None:
    """The checkpoint to resume from, checked against the config and the training items; None (start at step 0, said
    so) when a run was stopped before its first checkpoint was complete."""
    from medtune import checkpoint

    ckpt = checkpoint.latest(out_dir)
    if ckpt is None:
        log(f"note: --resume: no complete checkpoint under {out_dir / 'checkpoints'}; starting from step 0")
        return None
    checkpoint.check(ckpt, cfg.to_dict(), checkpoint.data_fingerprint(items))
    return ckpt


class TrainRun:
    """The state a resume must continue: step, token counter, elapsed time, checkpoints and metrics.jsonl."""

    def __init__(self, accelerator, model, optimizer, scheduler, cfg: Config, out_dir: Path, steps: int, log):
        from medtune import checkpoint

        self.acc, self.model, self.optimizer, self.scheduler = accelerator, model, optimizer, scheduler
        self.cfg, self.out_dir, self.steps, self.log = cfg, out_dir, steps, log
        self.metrics = out_dir / "metrics.jsonl"
        self.step = self.start = self.tokens = 0
        self.loss = float("nan")
        self.t0 = self.last_time = time.time()
        self.last_saved: int | None = None
        self._step_lr = float("nan")  # the rate the last step ran at (set by _train_step before the update)
        self.sharded = checkpoint.sharded(accelerator)
        self.data: dict = {}  # the data fingerprint every checkpoint records (begin)
        self.validation = None  # validation.Validation when train.eval_every is on
        self.recorder = None  # cost.Recorder: every checkpoint keeps the run's cost so far, for a resume to go on from

    def stopped(self) -> bool:
        """Early stopping (train.patience) reached, in this run or in the checkpoint it resumed."""
        return self.validation is not None and self.validation.stopped

    def begin(self, ckpt: Path | None, items: list[MCQItem], plan) -> None:
        from medtune import checkpoint

        self.data = {"train": checkpoint.data_fingerprint(items), "plan": checkpoint.plan_fingerprint(plan)}
        if self.acc.is_main_process:
            checkpoint.remove_stale(self.out_dir)  # temp dirs of saves a kill interrupted
        if ckpt is not None:
            checkpoint.check_plan(checkpoint.read_state(ckpt), self.data["plan"])  # needs the tokenizer: checked here
            state = checkpoint.load(ckpt, self.acc.unwrap_model(self.model), self.optimizer, self.scheduler,
                                    self.acc.scaler, self.acc.process_index)  # each rank its own RNG state
            if self.validation is not None:
                self.validation.restore(state.get("validation"), checkpoint.load_best(ckpt))
            self.step = self.start = self.last_saved = state["step"]
            self.tokens, self.loss = state.get("tokens", 0), state.get("loss", float("nan"))
            self.t0 = time.time() - state.get("elapsed_s", 0.0)  # throughput continues across the interruption
            if self.recorder is not None:
                self.recorder.resumed(state.get("cost"))
            if self.acc.is_main_process:
                self.log(f"resumed from {ckpt} (step {self.step})")
        if self.acc.is_main_process:
            self.out_dir.mkdir(parents=True, exist_ok=True)
            if ckpt is not None:
                checkpoint.cut_metrics(self.metrics, self.step)  # no repeated steps after the resume
            else:  # a fresh run: an earlier run's checkpoints must never be resumed into this one
                shutil.rmtree(self.out_dir / "checkpoints", ignore_errors=True)
                io.write_text(self.metrics, "")
                # The training text stays here, in the run dir; the adapter and exports carry ids and hashes only.
                io.write_jsonl(self.out_dir / "train_items.jsonl", [i.to_dict() for i in items])

    def finish_step(self, step: int, loss: float, real: int, progress) -> None:
        t = self.cfg.train
        self.step, self.tokens, self.loss = step, self.tokens + real, loss
        val = self.validation.validate(self.model, step) if self.validation and self.validation.due(step, self.steps) \
            else {}
        elapsed = time.time() - self.t0
        row = {"step": step, "epoch": round(step / self.steps * t.epochs, 4) if t.max_steps is None else None,
               "loss": loss, "lr": self._step_lr, "tokens": self.tokens,
               "tokens_per_s": self.tokens / elapsed if elapsed else 0.0, "elapsed_s": round(elapsed, 3), **val}
        if self.acc.is_main_process:
            with self.metrics.open("a") as f:
                f.write(json.dumps(row) + "\n")
            progress.set_postfix(loss=f"{loss:.4f}", tok_s=f"{row['tokens_per_s']:.0f}")
            progress.update(1)
        if t.report_to:
            self.acc.log({"loss": loss, "lr": row["lr"], **({"val_accuracy": val["val_accuracy"]} if val else {})},
                         step=step)

    def due(self, step: int) -> bool:
        from medtune import checkpoint

        every = self.cfg.train.save_every
        if step >= self.steps:
            return False  # the end-of-training checkpoint is written after the loop
        if every:
            return step % every == 0
        due = time.time() - self.last_time >= checkpoint.DEFAULT_SAVE_MINUTES * 60
        if self.acc.num_processes > 1:  # every rank must agree on a time-based decision
            import torch

            due = bool(self.acc.reduce(torch.tensor(int(due), device=self.acc.device), "max").item())
        return due

    def save(self, step: int) -> Path | None:
        """Checkpoint `step` (every rank must call it: the RNG states are gathered); its dir, None under FSDP/DeepSpeed
        where no checkpoint is written."""
        from medtune import checkpoint

        if self.sharded:
            if self.last_saved is None and self.acc.is_main_process:
                self.log("note: checkpoints are not written under FSDP/DeepSpeed (sharded optimizer state); "
                         "an interrupted run starts again")
            self.last_saved = step
            return None
        rng = checkpoint.gather_rng(self.acc)  # every rank's own RNG state, to rank 0 (DDP ranks' dropout differs)
        path = checkpoint.checkpoint_dir(self.out_dir, step)
        if self.acc.is_main_process:
            state = {"tokens": self.tokens, "elapsed_s": time.time() - self.t0, "loss": self.loss,
                     "config": checkpoint.shaping_config(self.cfg.to_dict()), "data": self.data}
            if self.recorder is not None:
                state["cost"] = self.recorder.so_far()
            best = None
            if self.validation is not None:
                state["validation"], best = self.validation.state(), self.validation.best_weights
            path = checkpoint.save(self.out_dir, step, self.acc.unwrap_model(self.model), self.optimizer,
                                   self.scheduler, state, self.acc.scaler, rng, best)
        self.acc.wait_for_everyone()
        self.last_saved, self.last_time = step, time.time()
        return path

    def interrupt(self, signum: int) -> None:
        import signal

        from medtune import checkpoint

        name = signal.Signals(signum).name
        if self.sharded:
            said = "no checkpoint is written under FSDP/DeepSpeed, so the run must start again (without --resume)"
        else:
            path = self.save(self.step) if self.last_saved != self.step else \
                checkpoint.checkpoint_dir(self.out_dir, self.step)
            said = (f"checkpoint written to {path}. Resume with `medtune train --resume --out {self.out_dir}` and the "
                    "same --config/--set values (and, under accelerate launch, the same number of processes)")
        raise TrainingInterrupted(f"{name} at step {self.step} of {self.steps}: {said}", 128 + signum)


def _guarded_step(run: TrainRun, batches, tokenizer, step: int, n_items: int) -> tuple[float, int]:
    """One optimizer step; a non-finite loss stops training before the update, out-of-memory says what to lower."""
    import torch

    try:
        return _train_step(run, batches, tokenizer, step)
    except torch.OutOfMemoryError:
        raise MedtuneError(_oom_message(run, batches)) from None
    except RuntimeError as e:
        if "can't allocate memory" in str(e) or "out of memory" in str(e).lower():
            raise MedtuneError(_oom_message(run, batches)) from None
        raise


def _train_step(run: TrainRun, batches, tokenizer, step: int) -> tuple[float, int]:
    import torch

    acc, t = run.acc, run.cfg.train
    world, rank = acc.num_processes, acc.process_index
    micro = [b[rank::world] for b in batches]  # each rank takes its share of every global micro-batch
    total = sum(len(ex.input_ids) - max(ex.prompt_len, 1) for b in batches for ex in b)  # global targets
    loss_sum, real = torch.zeros((), device=acc.device), 0
    # accelerate syncs gradients (DDP/FSDP all-reduce, DeepSpeed's optimizer step) when its micro-batch counter
    # reaches grad_accum; starting the count here puts that on this step's last micro-batch, also when the
    # epoch's last step has fewer micro-batches than grad_accum.
    acc.step = t.grad_accum - len(micro)
    for k, batch in enumerate(micro):
        ids, mask, labels = collate(batch, tokenizer.pad_token_id, acc.device)
        with acc.accumulate(run.model):
            with acc.autocast():  # accelerate divides by grad_accum; x grad_accum keeps the step norm
                part = completion_loss_sum(run.model, ids, mask, labels, first_target(batch)) * world / total * t.grad_accum
            loss_sum += part.detach() / (world * t.grad_accum)  # on the device: one sync per step, not per batch
            if k == len(micro) - 1:  # every micro-batch's loss is in: check it before the backward that updates
                loss = _finite_loss(run, loss_sum, step)
            acc.backward(part)
        real += sum(len(ex.input_ids) for ex in batch)
    optimizer, scheduler = run.optimizer, run.scheduler
    run._step_lr = scheduler.get_last_lr()[0]
    optimizer.step()  # accelerate's wrapper: the last micro-batch set sync_gradients, so this steps
    scheduler.step()
    optimizer.zero_grad(set_to_none=True)
    return loss, int(acc.reduce(torch.tensor(real, device=acc.device), "sum").item())


def _finite_loss(run: TrainRun, loss_sum, step: int) -> float:
    """The step's global loss, all ranks agreeing; a non-finite one stops training before any weight changes. It runs
    before the step's last backward because under DeepSpeed that backward is the update (accelerate's backward()
    steps the engine at the accumulation boundary); under DDP/FSDP it also syncs the gradients. Every rank gets the
    same reduced value, so all raise together and none is left waiting in a collective."""
    loss = run.acc.reduce(loss_sum, "sum").item()
    if not math.isfinite(loss):  # the weights and the last checkpoint stay good
        t = run.cfg.train
        last = f"checkpoint step {run.last_saved} is kept" if run.last_saved else "no checkpoint was written yet"
        raise MedtuneError(
            f"loss is {loss} at step {step + 1}: training stopped before the update ({last}). Likely causes: fp16 "
            f"overflow (use train.dtype=bfloat16 or float32) or a learning rate too high (train.lr={t.lr}; try a "
            "tenth)")
    return loss


def _oom_message(run: TrainRun, batches) -> str:
    from medtune.doctor import estimate_memory

    t = run.cfg.train
    params = sum(p.numel() for p in run.acc.unwrap_model(run.model).parameters())
    batch_tokens = max(sum(len(ex.input_ids) for ex in b) for b in batches)
    dtype = autocast_dtype(run.acc)
    need = estimate_memory(params, batch_tokens, dtype, run.cfg.lora.quantize) / 2**30
    return (f"out of memory at step {run.step + 1} (estimated need {need:.1f} GiB for {params / 1e6:.0f}M parameters "
            f"and {batch_tokens} tokens per micro-batch). Lower train.batch_size (now {t.batch_size}; raise "
            f"train.grad_accum to keep the effective batch), train.max_length (now {t.max_length}), turn on "
            "train.gradient_checkpointing=true, or quantize the base (QLoRA: lora.quantize)")


def mixed_precision_for(requested: str, policy_dtype: str) -> str:
    """bf16/fp16 autocast over fp32 weights (fp16 gets loss scaling from accelerate); `auto` follows hardware.py."""
    dtype = policy_dtype if requested == "auto" else requested
    if dtype not in MIXED_PRECISION:
        raise MedtuneError(f"train.dtype {requested!r}: choose auto, {', '.join(MIXED_PRECISION)}")
    return MIXED_PRECISION[dtype]


MIXED_PRECISION = {"bfloat16": "bf16", "float16": "fp16", "float32": "no"}  # train.dtype -> accelerate's name


def autocast_dtype(accelerator) -> str:
    """The dtype the accelerator autocasts to: bfloat16, float16, or float32 (no mixed precision)."""
    return next((d for d, mp in MIXED_PRECISION.items() if mp == accelerator.mixed_precision), "float32")


def attention_kernel(cfg: Config, info, policy) -> str:
    """The policy's attention, except eager for CPU training: at exam-question lengths (~100-300 tokens) it measured
    faster than SDPA's CPU kernels here (310 vs 253 real tokens/s, embedded model, bf16 autocast)."""
    kernel = cfg.train.attn_implementation
    if kernel == "auto":
        kernel = "eager" if info.kind == "cpu" or cfg.device == "cpu" else policy.attn_implementation
    if kernel == "flash_attention_2":  # refused here, before the weights load, not by transformers after them
        from medtune.hardware import flash_ok

        why = ("runs on a GPU only" if info.kind == "cpu" or cfg.device == "cpu" else
               "needs the flash-attn package (pip install flash-attn)" if importlib.util.find_spec("flash_attn") is None
               else "flash-attn does not import or does not support this GPU" if not info.flash_attn or not flash_ok(info)
               else None)
        if why:
            raise MedtuneError(f"train.attn_implementation=flash_attention_2: FlashAttention 2 {why}; set "
                               "train.attn_implementation=auto (medtune picks what this device runs) or sdpa")
    return kernel


def training_base_dtype(accelerator) -> str:
    """bf16 frozen base weights when training autocasts to bf16: LoRA trains none of them, so an fp32 copy costs
    memory plus a bf16 cast of every weight in every forward. The LoRA weights and AdamW state stay fp32 (PEFT keeps
    adapters fp32). FSDP and DeepSpeed keep fp32: FSDP flattens one dtype per unit, DeepSpeed casts by its config."""
    from accelerate.utils import DistributedType

    sharded = accelerator.distributed_type in (DistributedType.FSDP, DistributedType.DEEPSPEED)
    return "bfloat16" if autocast_dtype(accelerator) == "bfloat16" and not sharded else "float32"


def _as_training_base(base, dtype: str):
    """run.py's base in the training dtype, in place. Weights evaluation held in bf16 with their fp32 values aside
    (models.hold_in_bf16) go back to exactly those fp32 values for fp32 training, never to widened bf16 ones."""
    import torch

    from medtune.models import hold_in_bf16, hold_in_fp32

    if dtype == "float32":
        hold_in_fp32(base)
    elif dtype == "bfloat16":
        hold_in_bf16(base, str(base.device))
    else:
        base.to(getattr(torch, dtype))
    return base


def lora_model(cfg: Config, accelerator, log, attn_implementation: str | None = None, base=None):
    import torch
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training

    from medtune.models import fit_context, load_tokenizer, load_weights, position_limit, quantization_config, resolve

    path = resolve(cfg.model, log=log if accelerator.is_main_process else (lambda *_: None))
    tokenizer = load_tokenizer(path, padding_side="right")
    compute = autocast_dtype(accelerator)
    quant = quantization_config(cfg.lora.quantize, compute)
    dtype = compute if quant else training_base_dtype(accelerator)
    if base is not None and not quant:  # run.py's base, already in memory: no second read from disk
        model = _as_training_base(base, dtype)
        model.medtune_attn = model.config._attn_implementation  # put back by _release_base
        model.set_attn_implementation(attn_implementation or "sdpa")
    else:
        model = load_weights(cfg.model, path, getattr(torch, dtype), attn_implementation=attn_implementation,
                             quantization_config=quant,  # a quantized base is placed at load; accelerate can't move it
                             device_map={"": accelerator.device} if quant else None)
    limit = position_limit(model.config)
    if limit and cfg.train.max_length > limit[0]:  # GPT-2's learned positions end there: an index error mid-step
        raise MedtuneError(f"train.max_length={cfg.train.max_length}: above the {limit[0]} positions {cfg.model} takes "
                           f"(config.json {limit[1]}); set train.max_length to at most {limit[0]}")
    fit_context(tokenizer, model.config)  # saved with the adapter: its evaluations fit the model too
    if quant:  # QLoRA: norms and embeddings to fp32, input grads on, checkpointing as configured
        with _peft_reads_deprecated_names():
            model = prepare_model_for_kbit_training(
                model, use_gradient_checkpointing=cfg.train.gradient_checkpointing,
                gradient_checkpointing_kwargs={"use_reentrant": False})
    elif cfg.train.gradient_checkpointing:
        enable = getattr(model, "activation_checkpointing_enable", None)  # transformers >= 5.x name
        if enable is not None:
            enable(activation_checkpointing_kwargs={"use_reentrant": False})
        else:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.enable_input_require_grads()
    targets = cfg.lora.target_modules
    lora = LoraConfig(r=cfg.lora.r, lora_alpha=cfg.lora.alpha, lora_dropout=cfg.lora.dropout, task_type="CAUSAL_LM",
                      target_modules="all-linear" if targets == ["all-linear"] else targets)
    with _peft_reads_deprecated_names():
        model = get_peft_model(model, lora)
    model.config.use_cache = False
    return model, tokenizer


@contextlib.contextmanager
def _peft_reads_deprecated_names():
    """peft 0.21 reads `is_gradient_checkpointing` and calls `gradient_checkpointing_enable`, both deprecated in
    transformers 5 (FutureWarning); medtune itself uses the new names. Silence exactly those two, nothing else."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*(is_gradient_checkpointing|gradient_checkpointing_enable).*",
                                category=FutureWarning)
        yield


def completion_loss_sum(model, ids, mask, labels, first: int):
    """Summed next-token cross-entropy over target tokens; logits only from `first` (the earliest target position in
    the batch) on: the vocabulary projection on prompt positions is wasted work."""
    import torch.nn.functional as F

    keep = ids.shape[1] - max(first - 1, 0)
    logits = model(input_ids=ids, attention_mask=mask, logits_to_keep=keep).logits  # positions T-keep .. T-1
    shifted = labels[:, ids.shape[1] - keep + 1:]
    return F.cross_entropy(logits[:, :-1].float().reshape(-1, logits.shape[-1]), shifted.reshape(-1),
                           ignore_index=-100, reduction="sum")


def save_adapter(model, state: dict, tokenizer, cfg: Config, items: list[MCQItem], out_dir: Path, summary: dict,
                  extra_meta: dict | None) -> None:
    """RUN/adapter: PEFT files, tokenizer, config, and medtune.json with the training ids and hashes (no texts)."""
    from medtune.data.split import save_item_hashes
    from medtune.models import EMBEDDED, EMBEDDED_HUB, base_signature
    from medtune.report import environment

    with io.atomic_dir(out_dir / "adapter") as tmp:
        # PEFT keeps the adapter's entries of the gathered state. medtune never resizes the vocabulary, so no base
        # embedding is saved; PEFT's "auto" asked the Hub for a Hub base's config.json to decide (a warning offline)
        model.save_pretrained(tmp, state_dict=state, save_embedding_layers=False)
        if cfg.model == EMBEDDED:  # name the base by its Hub id, not this machine's cache path
            peft_cfg = json.loads((tmp / "adapter_config.json").read_text())
            io.write_json(tmp / "adapter_config.json", {**peft_cfg, "base_model_name_or_path": EMBEDDED_HUB}, indent=2)
        tokenizer.save_pretrained(tmp)
        save_config(cfg, tmp / "medtune-config.yaml")
        save_item_hashes(items, tmp)  # contamination checks keep working without the texts
        meta = {"prompt_style": cfg.prompt_style, "target": cfg.train.target, "base_model": cfg.model,
                "base_signature": base_signature(model.config), "train_ids": [i.id for i in items],
                "train_count": len(items), "summary": summary, "environment": environment(), **(extra_meta or {})}
        io.write_json(tmp / "medtune.json", meta)


def _progress(total: int, initial: int, disable: bool):
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=initial, disable=disable, desc="train", unit="step")


def _tracker_config(d: dict) -> dict:
    """Flat config for trackers, which take scalars only."""
    from medtune.checkpoint import flat

    return {k: v if isinstance(v, (int, float, str, bool)) else str(v) for k, v in flat(d).items()}
