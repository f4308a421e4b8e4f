"""Training examples and the seeded batch plan.

Each example is `prompt tokens + target tokens + EOS`; labels are -100 on the prompt and padding (loss on the target
only). Batches are built from a seeded plan: epoch order shuffled, then grouped by length (less padding); option order
is re-shuffled per example and per epoch, so the answer letter carries no information.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass

from medtune.config import Config
from medtune.data.items import MCQItem
from medtune.prompts import MAX_CHARS_PER_TOKEN, build_prompt, build_target, fit_prompt


@dataclass
class Example:
    input_ids: list[int]
    prompt_len: int  # labels start here
    cut: int = 0  # characters cut from the question's start to fit train.max_length


def batch_plan(items: list[MCQItem], cfg: Config, tokenizer, world: int = 1) -> list[list[list[Example]]]:
    """Every optimizer step's global micro-batches, fixed by the seed: [step][micro-batch][example].

    Per epoch: option order shuffled per example (seeded by seed, epoch and item), examples shuffled, then sorted by
    length inside windows of 64 batches and the batches shuffled again (length grouping without a length curriculum).
    """
    t = cfg.train
    per_batch = t.batch_size * world
    epochs = max(1, math.ceil(t.epochs))
    micro: list[list[Example]] = []
    for epoch in range(epochs):
        rng = random.Random(f"{t.seed}-order-{epoch}")
        examples = [tokenize_example(_shuffled(item, cfg, epoch, i), cfg, tokenizer) for i, item in enumerate(items)]
        order = list(range(len(examples)))
        rng.shuffle(order)
        if t.group_by_length:
            window = per_batch * 64
            order = [i for s in range(0, len(order), window)
                     for i in sorted(order[s: s + window], key=lambda i: -len(examples[i].input_ids))]
        batches = [[examples[i] for i in order[s: s + per_batch]] for s in range(0, len(order), per_batch)]
        if t.group_by_length:
            rng.shuffle(batches)
        batches = [b for b in batches if len(b) >= world]  # every rank needs an example; uneven shares are exact
        if epoch == epochs - 1 and t.epochs < epochs:  # fractional last epoch
            batches = batches[: math.ceil(len(batches) * (t.epochs - epoch))]
        micro.extend(batches)
    return [micro[s: s + t.grad_accum] for s in range(0, len(micro), t.grad_accum)]


def _shuffled(item: MCQItem, cfg: Config, epoch: int, index: int) -> MCQItem:
    if not cfg.data.shuffle_options:
        return item
    order = list(range(len(item.options)))
    random.Random(f"{cfg.train.seed}-options-{epoch}-{index}-{item.id}").shuffle(order)
    return item.permuted(order)


def tokenize_example(item: MCQItem, cfg: Config, tokenizer) -> Example:
    """prompt + target + EOS in at most train.max_length tokens. Overlong: the explanation is trimmed from its end
    first (never the answer line), then the question is cut from the left (prompts.fit_prompt, the rule evaluation
    uses too); the prompt's header, the options, the answer and EOS are never cut."""
    style = cfg.prompt_style
    prompt_text = build_prompt(item, style, tokenizer)
    target = tokenizer(build_target(item, style, cfg.train.target), add_special_tokens=False).input_ids
    eos = [tokenizer.eos_token_id] if cfg.train.add_eos else []
    room = cfg.train.max_length - len(eos)
    # pre-cut before tokenizing: no 5 MB pass
    prompt = tokenizer(prompt_text[: room * MAX_CHARS_PER_TOKEN], add_special_tokens=False).input_ids
    cut = 0
    if len(prompt) + len(target) > room or len(prompt_text) > room * MAX_CHARS_PER_TOKEN:
        answer = tokenizer(build_target(item, style, "answer"), add_special_tokens=False).input_ids
        target = target[: max(room - len(prompt), len(answer))]
        _, prompt_text, cut = fit_prompt(item, style, tokenizer, room - len(target))
        prompt = tokenizer(prompt_text, add_special_tokens=False).input_ids
    return Example(prompt + target + eos, 0 if cfg.train.loss_on == "all" else len(prompt), cut)


def collate(batch: list[Example], pad_id: int, device):
    """Right-padded ids, attention mask, labels (-100 on prompt and padding)."""
    import torch

    width = max(len(ex.input_ids) for ex in batch)
    ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(batch), width), dtype=torch.long)
    labels = torch.full((len(batch), width), -100, dtype=torch.long)
    for row, ex in enumerate(batch):
        n = len(ex.input_ids)
        ids[row, :n] = torch.tensor(ex.input_ids)
        mask[row, :n] = 1
        labels[row, ex.prompt_len: n] = ids[row, ex.prompt_len: n]
    return ids.to(device), mask.to(device), labels.to(device)


def first_target(batch: list[Example]) -> int:
    return min(ex.prompt_len for ex in batch)
