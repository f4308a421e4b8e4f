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
    if d.source == sources.DEMO or d.source in sources.PRESETS:  # their own eval split, unless data.eval_source
        preset = sources.PRESETS.get(d.source)
        names = ("demo:train", "demo:eval") if preset is None else \
            (f"{d.source}:{preset.train_split}", f"{d.source}:{preset.eval_split}")
        train_items = sources.load(d.source, "train")
        if d.eval_source:  # was ignored here, silently (probe 9)
            eval_items, names = sources.load(d.eval_source, "eval", cop_base=d.cop_base), (names[0], d.eval_source)
        else:
            eval_items = sources.load(d.source, "eval")
    else:
        items = sources.load(d.source, cop_base=d.cop_base)
        if d.eval_source:
            train_items, eval_items = items, sources.load(d.eval_source, "eval", cop_base=d.cop_base)
            names = (d.source, d.eval_source)
        else:
            check_split_size(d.source, len(items), d.train_size)
            train_items, eval_items = split(items, d.train_size or len(items) // 2, d.seed)
            names = (f"{d.source}:split-train", f"{d.source}:split-eval")
    if d.train_size and len(train_items) < d.train_size:  # silently training on fewer items than asked is a wrong run
        raise MedtuneError(f"data.train_size={d.train_size}: {names[0]} has only {len(train_items)} items; lower "
                           "data.train_size (or leave it unset to train on all of them)")
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


def check_split_size(source: str, n: int, train_size: int | None) -> None:
    """A file without data.eval_source is split in two: the training part (data.train_size, else half) and the rest
    for eval; neither may be empty. Names the file and the numbers, and blames train_size only when it was given."""
    if n < 2:
        raise MedtuneError(f"data.source {source}: {n} item(s); splitting it into training and eval items needs at "
                           "least 2: add items, or give the eval items as data.eval_source")
    if train_size is not None and train_size >= n:
        raise MedtuneError(f"data.train_size={train_size}: {source} has {n} items and the rest after the training "
                           f"part is the eval part; give at most {n - 1}, or give the eval items as data.eval_source")


def refuse_test(source: str) -> None:
    """The rule is sources.trains_on_test; this turns its answer into the one-line error."""
    reason = sources.trains_on_test(source)
    if reason:
        raise MedtuneError(f"data.source: {reason}; medtune never trains on test data. Train on a train or dev "
                           "split or file (e.g. medqa, medqa:train) and pass the test data as data.eval_source")


def validation_split(cfg: Config, train_items: list[MCQItem], eval_items: list[MCQItem],
                     data: dict) -> tuple[list[MCQItem], list[MCQItem], dict]:
    """Hold `data.validation` (a share, or a count when >= 1) of the training pool out of training, seeded by
    data.seed, for train.eval_every. Items that duplicate or nearly duplicate an eval item are never chosen (they
    stay in training, where prepare_data already warned about them): validation never sees eval items. Returns the
    training items left, the validation items (in pool order) and `data` with the new training and validation
    fingerprints. Without data.validation: the items unchanged, no validation items, `data` unchanged."""
    share = cfg.data.validation
    if not share:
        return train_items, [], data
    found = overlap(train_items, eval_items)
    near_eval = {t for x in found["exact"] for t in x["train_ids"]} | {x["train_id"] for x in found["near"]}
    pool = [i for i, item in enumerate(train_items) if item.id not in near_eval]
    n_val = int(share) if share >= 1 else max(1, round(len(train_items) * share))
    if n_val >= len(pool):
        raise MedtuneError(f"data.validation={share:g} holds out {n_val} items but the training pool has "
                           f"{len(pool)} that are not eval duplicates; lower data.validation")
    # A string seed (hashed with sha512 by Python, the same in every process): apart from the draws data.seed makes
    # for train_size and holdout, so validation does not pick the items those picked first.
    chosen = set(random.Random(f"validation-{cfg.data.seed}").sample(pool, n_val))
    val = [item for i, item in enumerate(train_items) if i in chosen]
    train = [item for i, item in enumerate(train_items) if i not in chosen]
    source = data["train"]["source"]
    return train, val, {**data, "train": sources.fingerprint(train, source, "train"),
                        "validation": sources.fingerprint(val, source, f"validation-{share:g}")}

