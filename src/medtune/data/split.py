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
    n-grams found in one training question >= threshold) between training and eval items. One implementation: the
    training side is hashed first (`item_hashes`), exactly what adapters carry, so both paths give the same answer."""
    return overlap_hashed(item_hashes(train, n), evals, threshold)


def _ngrams(text: str, n: int) -> set[tuple[str, ...]]:
    words = normalize(text).split()
    if len(words) < n:
        return {tuple(words)} if words else set()
    return {tuple(words[i: i + n]) for i in range(len(words) - n + 1)}


# Contamination checking without the training text: adapters and exports carry, per training item, a hash of its
# normalized key (exact duplicates) and hashes of its question's word 8-grams (near duplicates). `overlap_hashed` on
# them finds what `overlap` finds on the items (up to 64-bit hash collisions), and no training text leaves the run dir.
def _h(text: str) -> int:
    import hashlib

    return int.from_bytes(hashlib.blake2b(text.encode("utf-8"), digest_size=8).digest(), "little", signed=True)


def item_hashes(items: list[MCQItem], n: int = 8) -> dict:
    """{"ids", "keys", "ngram_hashes", "ngram_items", "ngram"}: 64-bit hashes, no text."""
    grams, owners = [], []
    for j, it in enumerate(items):
        hs = sorted({_h(" ".join(g)) for g in _ngrams(it.question, n)})
        grams += hs
        owners += [j] * len(hs)
    return {"ids": [it.id for it in items], "keys": [_h(item_key(it)) for it in items], "ngram_hashes": grams,
            "ngram_items": owners, "ngram": n}


def overlap_hashed(train: dict, evals: list[MCQItem], threshold: float = 0.5) -> dict:
    """`overlap`, with the training side given as `item_hashes` output."""
    ids, n = train["ids"], train["ngram"]
    keys = defaultdict(list)
    for tid, k in zip(ids, train["keys"]):
        keys[k].append(tid)
    exact = [{"eval_id": e.id, "train_ids": keys[_h(item_key(e))]} for e in evals if _h(item_key(e)) in keys]
    exact_ids = {x["eval_id"] for x in exact}
    index: dict[int, set[int]] = defaultdict(set)
    for g, j in zip(train["ngram_hashes"], train["ngram_items"]):
        index[int(g)].add(int(j))
    near = []
    for e in evals:
        grams = {_h(" ".join(g)) for g in _ngrams(e.question, n)}
        if e.id in exact_ids or not grams:
            continue
        hits: dict[int, int] = defaultdict(int)
        for g in grams:
            for j in index.get(g, ()):
                hits[j] += 1
        if hits:
            j, count = max(hits.items(), key=lambda kv: (kv[1], -kv[0]))
            if count / len(grams) >= threshold:
                near.append({"eval_id": e.id, "train_id": ids[j], "overlap": round(count / len(grams), 3)})
    return {"exact": exact, "near": near, "n_eval": len(evals), "n_train": len(ids), "ngram": n,
            "threshold": threshold}


HASHES_FILE = "train-hashes.safetensors"


def save_item_hashes(items: list[MCQItem], directory) -> None:
    """Write `item_hashes(items)` (without the ids, which medtune.json lists) to DIR/train-hashes.safetensors."""
    from pathlib import Path

    import numpy as np
    from safetensors.numpy import save

    from medtune import io

    h = item_hashes(items)
    tensors = {"keys": np.array(h["keys"], dtype=np.int64), "ngram_hashes": np.array(h["ngram_hashes"], dtype=np.int64),
               "ngram_items": np.array(h["ngram_items"], dtype=np.int64)}
    io.write_bytes(Path(directory) / HASHES_FILE, save(tensors, metadata={"ngram": str(h["ngram"])}))


def load_item_hashes(directory, ids: list[str]) -> dict | None:
    """The hashes saved beside an adapter, or None when there are none (an adapter from before they existed)."""
    from pathlib import Path

    from safetensors import safe_open

    path = Path(directory) / HASHES_FILE
    if not path.is_file():
        return None
    with safe_open(str(path), framework="numpy") as f:
        n = int((f.metadata() or {}).get("ngram", 8))
        t = {k: f.get_tensor(k).tolist() for k in f.keys()}  # noqa: SIM118 (safe_open has no __iter__)
    if len(t["keys"]) != len(ids):
        raise MedtuneError(f"{path}: holds {len(t['keys'])} items but medtune.json lists {len(ids)} training ids")
    return {"ids": ids, "ngram": n, **t}
