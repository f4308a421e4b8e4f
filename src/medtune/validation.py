"""Validation during training: letter accuracy on items held out of the training pool (data.validation, split off by
data.prepare.validation_split) every `train.eval_every` optimizer steps and at the last step; the best adapter kept
in memory for `train.keep: best`; early stopping after `train.patience` validations without improvement.

Scoring is medtune's one-forward letter scorer (train.eval_method=letter; `answer` scores the answer lines, for
models too small to bind letters, like the demo's) in exact (fp32) mode on the unwrapped PEFT model, in eval mode and
without gradients. It draws no random numbers, so validation leaves the training RNG stream, and with keep=last the
adapter, exactly as it would be without validation (tests/test_best_checkpoint.py). Under DDP every rank scores its
own share of the items and the correct counts are summed: every rank sees the same accuracy and so takes the same
best/stop decisions, with no broadcast.
"""

from __future__ import annotations

from medtune.config import Config
from medtune.data.items import MCQItem
from medtune.errors import MedtuneError


class Validation:
    """The validation state a resume must continue: the best step, its accuracy and weights, the patience count."""

    def __init__(self, cfg: Config, items: list[MCQItem], tokenizer, accelerator):
        world, rank = accelerator.num_processes, accelerator.process_index
        self.cfg, self.tokenizer, self.acc = cfg, tokenizer, accelerator
        self.n, self.share = len(items), items[rank::world]
        self.best_step: int | None = None
        self.best_accuracy: float | None = None
        self.since_best = 0  # validations since the best one
        self.stopped = False  # early stop reached (patience): a resume of this run trains no further
        self.best_weights: dict | None = None  # name -> CPU copy of the trainable tensors at best_step

    def due(self, step: int, steps: int) -> bool:
        every = self.cfg.train.eval_every
        return bool(every) and (step % every == 0 or step == steps)

    def validate(self, model, step: int) -> dict:
        """Score the validation items at `step`, update the best and the patience count; the metrics.jsonl fields."""
        import torch

        from medtune.scoring import score_items
        from medtune.stats import wilson_ci

        peft_model = self.acc.unwrap_model(model)
        peft_model.eval()  # no dropout; the scorer draws no random numbers
        try:
            with torch.no_grad():  # the training batch size: a shaping key, so a resume scores exactly alike
                rows = score_items(peft_model, self.tokenizer, self.share, self.cfg.prompt_style,
                                   self.cfg.train.eval_method, "exact", batch_size=self.cfg.train.batch_size) \
                    if self.share else []
        finally:
            peft_model.train()
        correct = sum(bool(r["correct"]) for r in rows)
        if self.acc.num_processes > 1:
            correct = int(self.acc.reduce(torch.tensor(correct, device=self.acc.device), "sum").item())
        accuracy = correct / self.n
        if self.best_accuracy is None or accuracy > self.best_accuracy:  # ties keep the earlier step
            self.best_step, self.best_accuracy, self.since_best = step, accuracy, 0
            self.best_weights = trainable_copy(peft_model)
        else:
            self.since_best += 1
        patience = self.cfg.train.patience
        self.stopped = bool(patience) and self.since_best >= patience
        lo, hi = wilson_ci(correct, self.n)
        return {"val_accuracy": accuracy, "val_correct": correct, "val_n": self.n, "val_ci95": [lo, hi],
                "val_best_step": self.best_step}

    def state(self) -> dict:
        """For the checkpoint's state.json (the weights go to best.safetensors)."""
        return {"best_step": self.best_step, "best_accuracy": self.best_accuracy, "since_best": self.since_best,
                "stopped": self.stopped}

    def restore(self, state: dict | None, weights: dict | None) -> None:
        """Continue from a checkpoint's state.json `validation` entry and its best.safetensors."""
        state = state or {}
        if state.get("best_step") is not None and weights is None:
            raise MedtuneError("--resume: the checkpoint records a best validation step but has no best.safetensors; "
                               "resume from an earlier checkpoint or start a new run")
        self.best_step, self.best_accuracy = state.get("best_step"), state.get("best_accuracy")
        self.since_best, self.stopped = int(state.get("since_best") or 0), bool(state.get("stopped"))
        self.best_weights = weights

    def keep_best(self, model) -> None:
        """Put the best step's LoRA weights into `model` (train.keep=best), before the adapter is saved."""
        import torch

        if self.cfg.train.keep != "best" or self.best_weights is None:
            return
        with torch.no_grad():
            for name, p in self.acc.unwrap_model(model).named_parameters():
                if p.requires_grad:
                    p.copy_(self.best_weights[name].to(p.device))

    def summary(self, last_step: int) -> dict:
        """What medtune.json and results.json record about validation."""
        t = self.cfg.train
        out = {"kept": t.keep, "best_step": self.best_step, "best_val_accuracy": self.best_accuracy, "val_n": self.n,
               "eval_every": t.eval_every, "method": t.eval_method}
        if self.stopped:
            out["stopped_early_at"] = last_step
        return out


def trainable_copy(model) -> dict:
    """A CPU copy of the trainable (LoRA) tensors, by parameter name."""
    return {n: p.detach().to("cpu", copy=True).contiguous() for n, p in model.named_parameters() if p.requires_grad}
