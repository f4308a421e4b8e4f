"""Named sources: the bundled demo set, Hub presets (network needed), and local files (never the network)."""

from __future__ import annotations

import hashlib
import json
import logging
import re
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from urllib.parse import urlparse

from medtune.data.formats import read_file
from medtune.data.items import MCQItem
from medtune.errors import MedtuneError


@dataclass(frozen=True)
class Preset:
    hub_id: str
    config: str | None
    train_split: str | None
    eval_split: str
    note: str = ""


# Choose by name from a plain dict (DESIGN.md rule 3). Eval splits are the ones published scores use.
PRESETS: dict[str, Preset] = {
    "medqa": Preset("GBaker/MedQA-USMLE-4-options-hf", None, "train", "test"),
    "medmcqa": Preset("openlifescienceai/medmcqa", None, "train", "validation",
                      "the test split has no public labels, so eval uses validation"),
    "pubmedqa": Preset("qiaojin/PubMedQA", "pqa_labeled", None, "train",
                       "the 1,000 expert-labelled questions, scored as lm-eval's pubmedqa task (which uses the 500 of the test fold)"),
    **{f"mmlu-{s.replace('_', '-')}": Preset("cais/mmlu", s, None, "test") for s in (
        "anatomy", "clinical_knowledge", "college_biology", "college_medicine", "medical_genetics",
        "professional_medicine")},
}
SUITES: dict[str, list[str]] = {
    "multimedqa": ["medqa", "medmcqa", "pubmedqa", *[k for k in PRESETS if k.startswith("mmlu-")]],
}
DEMO = "demo"


def load(source: str, split: str | None = None, cop_base: int | None = None,
         mapping: dict[str, str] | None = None) -> list[MCQItem]:
    """Items of `source` (a preset name, `demo`, or a file path); `split` selects train/eval for presets and demo,
    and `demo:train` / `medqa:train` name a split explicitly."""
    if not source.strip():  # Path("") is `.`: "is a directory" would name a path the user never gave
        raise MedtuneError("the data source is empty: give a file, `demo` or a preset name")
    if cop_base not in (None, 0, 1):  # checked whatever the source, not only where a MedMCQA file reads it
        raise MedtuneError(f"--cop-base {cop_base}: must be 0 (Hub) or 1 (published)")
    source, split = resolve(source, split)
    if source == DEMO:
        return demo_items(split)
    if source in PRESETS:
        return _hub(source, split or "eval")
    path = Path(source)
    if path.exists():
        return read_file(path, cop_base=cop_base, mapping=mapping)
    names = ", ".join([DEMO, *PRESETS, *SUITES])
    raise MedtuneError(f"{source}: not a file, and not a source name ({names})")


def resolve(source: str, split: str | None = None) -> tuple[str, str | None]:
    """(source, split) with an explicit split read off the name: `demo:train`, `medqa:eval`, and a preset's own Hub
    split name (`medqa:test`, `medmcqa:validation`, `medqa:train`). Anything else is a path, returned as given."""
    name, _, explicit = source.partition(":")
    if name == DEMO or name in PRESETS:
        if explicit in ("train", "eval"):
            return name, explicit
        preset = PRESETS.get(name)
        if preset is not None and explicit and explicit in (preset.train_split, preset.eval_split):
            return name, "train" if explicit == preset.train_split else "eval"
    return source, split


def trains_on_test(source: str, split: str = "train") -> str | None:
    """Why training on `source` (its `split`, when it has several) would train on test data, or None when it would
    not. The one rule for every spelling, decided from the name alone: no file and no network is read.

    A preset's eval split is the split its published scores are measured on (MedQA's and MMLU's Hub `test`, MedMCQA's
    `validation`, PubMedQA's labelled set), so training on it is training on the benchmark's test, whatever it is
    called on the Hub. A file is a test split when `test` is a word of its name (test.jsonl, medqa_test.csv,
    x-test-4opt.jsonl; not latest_questions.jsonl)."""
    name, which = resolve(source, split)
    if name == DEMO:
        return f"{source!r} is the demo set's eval split" if which == "eval" else None
    preset = PRESETS.get(name)
    if preset is not None:
        if which == "eval" or preset.train_split is None or preset.train_split == "test":
            hub = preset.eval_split if which == "eval" or preset.train_split is None else preset.train_split
            why = f" ({preset.note})" if preset.note and preset.train_split is None else ""
            only = "whose only data on the Hub is " if preset.train_split is None else ""
            return f"{source!r} is a test split: {name} {only}{preset.hub_id} split {hub!r}, what its scores are " \
                   f"measured on{why}"
        return None
    if "test" in re.split(r"[^a-z0-9]+", Path(source).stem.lower()):  # a word of the name, not inside one (latest_)
        return f"{source!r} looks like a test split (`test` in its file name)"
    return None


def demo_items(split: str | None = None) -> list[MCQItem]:
    """The bundled demo set (see data/demo/README.md): a fixed train/eval split, not a benchmark."""
    path = resources.files("medtune.data.demo") / "demo.jsonl"
    rows = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    keep = [r for r in rows if split is None or r["split"] == split]
    return [MCQItem(id=r["id"], question=r["question"], options=tuple(r["options"]), answer=r["answer"],
                    explanation=r.get("explanation"), subject=r.get("subject"), benchmark="generic") for r in keep]


def _hub(name: str, split: str) -> list[MCQItem]:
    preset = PRESETS[name]
    hub_split = preset.train_split if split == "train" else preset.eval_split
    if hub_split is None:
        raise MedtuneError(f"{name}: has no training split on the Hub; train on another source")
    unreachable = None
    try:
        import datasets  # heavy; only for Hub presets

        unreachable = hub_unreachable(datasets.config.HF_ENDPOINT)
        with _quiet_hub(offline=unreachable is not None):
            ds = datasets.load_dataset(preset.hub_id, preset.config, split=hub_split)
    except (ConnectionError, OSError, ValueError) as e:
        cause = unreachable or e  # offline by our choice: the unreachable Hub is the cause, not "offline mode"
        raise MedtuneError(
            f"{name}: could not load {preset.hub_id} ({hub_split}) from the Hugging Face Hub; presets need a network "
            f"(or a filled HF_HOME cache). Offline, pass a local file instead. Cause: {type(cause).__name__}: {cause}"
        ) from None
    from medtune.data.formats import READERS, RowError, detect_format

    rows = list(ds)
    fmt = detect_format(Path(name), rows[0])
    cop_base = 0 if fmt == "medmcqa" else None  # the Hub copy of MedMCQA is 0-based
    items, problems = [], []
    for i, row in enumerate(rows):
        try:
            items.append(READERS[fmt](row, where=f"{name}:{i}", path=Path(f"{name}-{hub_split}"),
                                       cop_base=cop_base, mapping=None, subject=preset.config))
        except RowError as e:
            problems.append(f"{preset.hub_id}:{hub_split}:{i}: {e}")
    if problems:
        from medtune.errors import DataError

        raise DataError(problems)
    return items


def hub_unreachable(endpoint: str) -> OSError | None:
    """Why the Hub cannot be reached (one HTTP request, 5 s at most, through the proxy the environment names), or None.
    huggingface_hub retries each request 5 times with backoff (~30-50 s of log lines per file) before it falls back
    to the cache, and waits on a server that accepts and never answers; one failed request here sends the load
    straight to the cache. Any HTTP answer, an error status too, counts as reachable."""
    from urllib.error import HTTPError, URLError
    from urllib.request import Request, urlopen

    host = urlparse(endpoint).hostname
    if not host:
        return OSError(f"{endpoint!r} (HF_ENDPOINT) is not a URL")
    try:
        urlopen(Request(endpoint, method="HEAD"), timeout=5).close()
    except HTTPError:
        return None
    except (URLError, OSError, ValueError) as e:
        reason = getattr(e, "reason", e)
        return OSError(f"{host}: {getattr(reason, 'strerror', None) or reason}")
    return None


@contextmanager
def _quiet_hub(offline: bool) -> Iterator[None]:
    """While a preset loads: the Hub libraries' log lines (retries, "using the cached version") are not medtune's
    output, and `offline` switches both libraries to their cache (they read these flags at call time)."""
    import datasets
    from huggingface_hub import constants

    loggers = [logging.getLogger(name) for name in ("huggingface_hub", "datasets", "fsspec")]
    saved = [lg.level for lg in loggers], constants.HF_HUB_OFFLINE, datasets.config.HF_HUB_OFFLINE
    for lg in loggers:
        lg.setLevel(logging.ERROR)
    if offline:
        constants.HF_HUB_OFFLINE = datasets.config.HF_HUB_OFFLINE = True
    try:
        yield
    finally:
        for lg, level in zip(loggers, saved[0]):
            lg.setLevel(level)
        constants.HF_HUB_OFFLINE, datasets.config.HF_HUB_OFFLINE = saved[1], saved[2]


def fingerprint(items: list[MCQItem], source: str, split: str) -> dict:
    """What exactly was used: the source, the split, how many items and a sha256 of their ids in order."""
    digest = hashlib.sha256("\n".join(i.id for i in items).encode()).hexdigest()
    return {"source": source, "split": split, "n": len(items), "ids_sha256": digest}
