"""Seeded, subject-stratified train/eval partition, and the train/eval overlap (contamination) check."""

from __future__ import annotations

import random
import re
from collections import defaultdict

from medtune.data.items import MCQItem
from medtune.errors import MedtuneError


def split(items: list[MCQItem], train_size: int, seed: int = 42) -> tuple[list[MCQItem], list[MCQItem]]:
    """Partition into `train_size` training items and the rest, each subject in proportion, deterministically.

    Each subject's items are shuffled with one seeded RNG (subjects in sorted order); the training quota per subject
    is its proportional share, rounded by largest remainder so the total is exact. Both parts keep input order.
    """
    if not 0 < train_size < len(items):
        raise MedtuneError(f"train size {train_size} must be between 1 and {len(items) - 1} for {len(items)} items")
    groups: dict[str, list[int]] = defaultdict(list)
    for i, item in enumerate(items):
        groups[item.subject or ""].append(i)
    rng = random.Random(seed)
    subjects = sorted(groups)
    for s in subjects:
        rng.shuffle(groups[s])
    exact = {s: train_size * len(groups[s]) / len(items) for s in subjects}
    quota = {s: int(exact[s]) for s in subjects}
    for s in sorted(subjects, key=lambda s: (-(exact[s] - quota[s]), s))[: train_size - sum(quota.values())]:
        quota[s] += 1
    train_idx = {i for s in subjects for i in groups[s][: quota[s]]}
    return ([it for i, it in enumerate(items) if i in train_idx], [it for i, it in enumerate(items) if i not in train_idx])


def normalize(text: str) -> str:
    return " ".join(re.sub(r"[^\w\s]", " ", text.lower()).split())


def item_key(item: MCQItem) -> str:
    """Question plus the set of options, normalized: the same question with options reordered is a duplicate."""
    return normalize(item.question) + " || " + " | ".join(sorted(normalize(o) for o in item.options))


def overlap(train: list[MCQItem], evals: list[MCQItem], n: int = 8, threshold: float = 0.5) -> dict:
    """Exact duplicates (same normalized question + options) and near duplicates (share of the eval question's word
    n-grams found in one training question >= threshold) between training and eval items."""
    keys = defaultdict(list)
    for t in train:
        keys[item_key(t)].append(t.id)
    exact = [{"eval_id": e.id, "train_ids": keys[item_key(e)]} for e in evals if item_key(e) in keys]
    exact_ids = {x["eval_id"] for x in exact}
    index: dict[tuple, set[int]] = defaultdict(set)
    for j, t in enumerate(train):
        for g in _ngrams(t.question, n):
            index[g].add(j)
    near = []
    for e in evals:
        grams = _ngrams(e.question, n)
        if e.id in exact_ids or not grams:
            continue
        hits: dict[int, int] = defaultdict(int)
        for g in grams:
            for j in index.get(g, ()):
                hits[j] += 1
        if hits:
            j, count = max(hits.items(), key=lambda kv: (kv[1], -kv[0]))
            if count / len(grams) >= threshold:
                near.append({"eval_id": e.id, "train_id": train[j].id, "overlap": round(count / len(grams), 3)})
    return {"exact": exact, "near": near, "n_eval": len(evals), "n_train": len(train), "ngram": n,
            "threshold": threshold}


def _ngrams(text: str, n: int) -> set[tuple[str, ...]]:
    words = normalize(text).split()
    if len(words) < n:
        return {tuple(words)} if words else set()
    return {tuple(words[i: i + n]) for i in range(len(words) - n + 1)}
