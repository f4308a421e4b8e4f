"""`medtune data validate | show | split`: what a user wants to know about a data file before using it."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

from medtune.data import sources
from medtune.data.formats import decide_cop_base, detect_format, parse_mapping, read_rows
from medtune.data.items import LETTERS, MCQItem
from medtune.data.split import overlap, split
from medtune.errors import MedtuneError


def _load(source: str, cop_base: int | None, mapping: str | None) -> list[MCQItem]:
    return sources.load(source, None if source == sources.DEMO else "eval", cop_base=cop_base,
                        mapping=parse_mapping(mapping) if mapping else None)


def validate(source: str, cop_base: int | None = None, mapping: str | None = None) -> tuple[str, list[MCQItem]]:
    """The lines a user reads (how many valid items, which format, then any warnings) and the items; a bad row raises
    with file:line. The overlong-item check needs prompts (and a tokenizer), layers above data:
    prompts.overlong_warnings."""
    items = _load(source, cop_base, mapping)
    path = Path(source)
    medmcqa = items[0].benchmark == "medmcqa" and cop_base is None and not mapping
    twice = answer_twice(items)
    # the file is read again only for what the items do not keep: MedMCQA's cop values, the lines of the warnings
    rows = list(read_rows(path, header=mapping is not None)) if path.is_file() and (medmcqa or twice) else []
    note = ""
    if rows and medmcqa and detect_format(path, rows[0][1]) == "medmcqa":  # not medtune's own layout (no cop)
        base = decide_cop_base(path, rows, None)
        note = f", cop {'1-based (published)' if base else '0-based (Hub)'} detected"
    where = (lambda k: rows[k][0]) if len(rows) == len(items) else (lambda k: f"{source}: item {items[k].id}")
    warnings = [f"warning: {where(k)}: options: {', '.join(twins[:-1])} and {twins[-1]} have the same text as the "
                f"answer ({items[k].gold_letter})" for k, twins in twice[:WARNINGS]]
    more = [f"warning: ... and {len(twice) - WARNINGS} more items with the answer's text twice"] \
        if len(twice) > WARNINGS else []
    return "\n".join([f"{source}: {len(items)} valid items ({items[0].benchmark} format{note})", *warnings, *more]), \
        items


WARNINGS = 20  # answer-twice warnings printed at most; the rest are counted


def answer_twice(items: list[MCQItem]) -> list[tuple[int, list[str]]]:
    """(index, letters) per item whose answer's text is also another option's: a model that picks the other letter is
    scored wrong for the right text. Not refused: real MedMCQA dev has such items, and they are kept as published."""
    def same(text: str) -> str:
        return " ".join(text.split()).casefold()

    found = [(k, [LETTERS[o] for o, text in enumerate(it.options) if same(text) == same(it.options[it.answer])])
             for k, it in enumerate(items)]
    return [(k, twins) for k, twins in found if len(twins) > 1]


def summarize(items: list[MCQItem]) -> dict:
    n_opts = Counter(len(i.options) for i in items)
    golds = Counter(i.gold_letter for i in items)
    return {"n": len(items), "option_counts": dict(sorted(n_opts.items())),
            "answer_letters": {ch: golds.get(ch, 0) for ch in LETTERS[: max(n_opts)]},
            "with_explanation": sum(1 for i in items if i.explanation),
            "subjects": dict(Counter(i.subject or "(none)" for i in items).most_common())}


def show(source: str, cop_base: int | None = None, mapping: str | None = None, as_json: bool = False) -> str:
    s = summarize(_load(source, cop_base, mapping))
    if as_json:
        return json.dumps(s, indent=1)
    n = s["n"]
    lines = [f"{source}: {n} items, {s['with_explanation']} with an explanation",
             "options per question: " + ", ".join(f"{k}: {v}" for k, v in s["option_counts"].items()),
             "answer letters: " + ", ".join(f"{k} {v} ({v / n:.1%})" for k, v in s["answer_letters"].items()),
             f"subjects ({len(s['subjects'])}):"]
    lines += [f"  {name}: {count}" for name, count in list(s["subjects"].items())[:40]]
    return "\n".join(lines)


def split_to_files(source: str, train_size: int, out: Path, seed: int = 42, cop_base: int | None = None,
                   overwrite: bool = False) -> str:
    """Write OUT/train.jsonl and OUT/eval.jsonl (medtune layout, all fields kept) and report duplicates."""
    from medtune import io

    io.check_out_dir(out, overwrite)
    items = _load(source, cop_base, None)
    if not 0 < train_size < len(items):  # the rest is the eval part: neither part may be empty
        raise MedtuneError(f"--train-size {train_size}: {source} has {len(items)} item(s), and the rest after the "
                           "training part is the eval part; " + (f"give 1 to {len(items) - 1}" if len(items) > 1
                                                                 else "a split needs at least 2 items"))
    train, evals = split(items, train_size, seed)
    found = overlap(train, evals)
    with io.claim_out_dir(out, overwrite, inputs=(source,)) as dest:  # dest: a fresh dir beside an old one, swapped in at the end
        for name, part in (("train", train), ("eval", evals)):
            io.write_jsonl(dest / f"{name}.jsonl", [i.to_dict() for i in part])
    lines = [f"{len(train)} train / {len(evals)} eval items (seed {seed}, stratified by subject) -> {out}",
             f"exact duplicates between train and eval: {len(found['exact'])}",
             f"near duplicates (>= {found['threshold']:.0%} of {found['ngram']}-grams shared): {len(found['near'])}"]
    lines += [f"  {x['eval_id']} = {', '.join(x['train_ids'])}" for x in found["exact"][:20]]
    return "\n".join(lines)
