"""Named sources: the bundled demo set, Hub presets (network needed), and local files (never the network)."""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

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
    name, _, explicit = source.partition(":")
    if explicit in ("train", "eval") and (name == DEMO or name in PRESETS):
        source, split = name, explicit
    if source == DEMO:
        return demo_items(split)
    if source in PRESETS:
        return _hub(source, split or "eval")
    path = Path(source)
    if path.exists():
        return read_file(path, cop_base=cop_base, mapping=mapping)
    names = ", ".join([DEMO, *PRESETS, *SUITES])
    raise MedtuneError(f"{source}: not a file, and not a source name ({names})")


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
    try:
        import datasets  # heavy; only for Hub presets

        ds = datasets.load_dataset(preset.hub_id, preset.config, split=hub_split)
    except (ConnectionError, OSError, ValueError) as e:
        raise MedtuneError(
            f"{name}: could not load {preset.hub_id} ({hub_split}) from the Hugging Face Hub; presets need a network "
            f"(or a filled HF_HOME cache). Offline, pass a local file instead. Cause: {type(e).__name__}: {e}"
        ) from None
    from medtune.data.formats import _READERS, RowError, detect_format

    rows = list(ds)
    fmt = detect_format(Path(name), rows[0])
    cop_base = 0 if fmt == "medmcqa" else None  # the Hub copy of MedMCQA is 0-based
    items, problems = [], []
    for i, row in enumerate(rows):
        try:
            items.append(_READERS[fmt](row, where=f"{name}:{i}", path=Path(f"{name}-{hub_split}"),
                                       cop_base=cop_base, mapping=None, subject=preset.config))
        except RowError as e:
            problems.append(f"{preset.hub_id}:{hub_split}:{i}: {e}")
    if problems:
        from medtune.errors import DataError

        raise DataError(problems)
    return items


def fingerprint(items: list[MCQItem], source: str, split: str) -> dict:
    """What exactly was used: the source, the split, how many items and a sha256 of their ids in order."""
    digest = hashlib.sha256("\n".join(i.id for i in items).encode()).hexdigest()
    return {"source": source, "split": split, "n": len(items), "ids_sha256": digest}
