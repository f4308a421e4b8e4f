"""The training and eval items a run or a train uses, and their fingerprints, built from `data:` of the config.
Below run and html_report (which rebuilds a run's eval items for question text): data, not a job."""

from __future__ import annotations

import random
from typing import TYPE_CHECKING

from medtune.data import sources
from medtune.data.items import MCQItem
from medtune.data.split import overlap, split
from medtune.errors import MedtuneError

if TYPE_CHECKING:
    from medtune.config import Config


def prepare_data(cfg: Config, log=print) -> tuple[list[MCQItem], list[MCQItem], dict]:
    """Training and eval items and their fingerprints. Refuses to train on a test split."""
    d = cfg.data
    refuse_test(d.source)  # every spelling (medqa:eval, mmlu-anatomy, test.jsonl, ...), before any file or network
    if d.source == sources.DEMO:
        train_items, eval_items = sources.load(d.source, "train"), sources.load(d.source, "eval")
        names = ("demo:train", "demo:eval")
    elif d.source in sources.PRESETS:
        train_items, eval_items = sources.load(d.source, "train"), sources.load(d.source, "eval")
        names = (f"{d.source}:{sources.PRESETS[d.source].train_split}", f"{d.source}:{sources.PRESETS[d.source].eval_split}")
    else:
        items = sources.load(d.source, cop_base=d.cop_base)
        if d.eval_source:
            train_items, eval_items = items, sources.load(d.eval_source, "eval", cop_base=d.cop_base)
            names = (d.source, d.eval_source)
        else:
            train_items, eval_items = split(items, d.train_size or len(items) // 2, d.seed)
            names = (f"{d.source}:split-train", f"{d.source}:split-eval")
    if d.train_size and len(train_items) > d.train_size:
        train_items = train_items[: d.train_size] if d.select == "first" else \
            random.Random(d.seed).sample(train_items, d.train_size)
    if d.holdout:  # the seed project's 95/5 split of its own training rows
        shuffled = random.Random(d.seed).sample(train_items, len(train_items))
        n_eval = max(1, round(len(shuffled) * d.holdout))
        eval_items, train_items = shuffled[:n_eval], shuffled[n_eval:]
        names = (f"{names[0]}:holdout-train", f"{names[0]}:holdout-{d.holdout}")
    if d.eval_size and len(eval_items) > d.eval_size:
        eval_items = eval_items[: d.eval_size]
    if d.limit:
        eval_items = eval_items[: d.limit]
    if not train_items or not eval_items:
        raise MedtuneError("no training or no eval items: check data.source, train_size and limit")
    found = overlap(train_items, eval_items)
    if found["exact"]:
        log(f"warning: {len(found['exact'])} eval items duplicate training items "
            f"({', '.join(x['eval_id'] for x in found['exact'][:5])}...)")
    data = {"train": sources.fingerprint(train_items, names[0], "train"),
            "eval": sources.fingerprint(eval_items, names[1], "eval"),
            "overlap": {"exact": len(found["exact"]), "near": len(found["near"])}}
    return train_items, eval_items, data


def refuse_test(source: str) -> None:
    """The rule is sources.trains_on_test; this turns its answer into the one-line error."""
    reason = sources.trains_on_test(source)
    if reason:
        raise MedtuneError(f"data.source: {reason}; medtune never trains on test data. Train on a train or dev "
                           "split or file (e.g. medqa, medqa:train) and pass the test data as data.eval_source")
