"""Predictions for any source medtune reads, streamed to predictions.jsonl (and CSV on request).

Items are scored in chunks by eval's scoring and each chunk's rows are appended and flushed, so memory stays bounded by
one chunk of scores and an interrupted run loses at most one chunk. A rerun with the same --out resumes: ids already
written are skipped, and a partly written last line (a kill mid-write) is cut off first. A sidecar
`predictions.meta.json` records what produced the rows; resuming with another model, adapter or scoring is refused,
because the file would mix two models' answers.
"""

from __future__ import annotations

import csv
import json
import os
from pathlib import Path

from medtune.data.items import LETTERS, MCQItem
from medtune.errors import MedtuneError
from medtune.io import out_dir_lock


def predict(loaded, items: list[MCQItem], out: Path, source: str, chunk: int = 64, write_csv: bool = False,
            quiet: bool = False, log=print) -> dict:
    """Score `items` with a loaded model (see ask.load) into out (a .jsonl path); return a summary."""
    out = Path(out)
    if out.suffix != ".jsonl":
        raise MedtuneError(f"{out}: the output must be a .jsonl file (e.g. predictions.jsonl)")
    if chunk < 1:
        raise MedtuneError("--chunk must be 1 or more")
    _check_unique(items)
    out.parent.mkdir(parents=True, exist_ok=True)
    with out_dir_lock(out, "--out"):  # a second predict on the same file is refused: both wrote every row (probe 9)
        return _predict(loaded, items, out, source, chunk, write_csv, quiet, log)


def _predict(loaded, items: list[MCQItem], out: Path, source: str, chunk: int, write_csv: bool, quiet: bool,
             log) -> dict:
    from tqdm.auto import tqdm

    from medtune.scoring import score_items

    meta = {"source": source, "model": loaded.model_name, "adapter": loaded.adapter, "prompt_style": loaded.style,
            "method": f"{loaded.method}-logprob", "mode": loaded.mode}
    done = _resume(out, meta)
    changed = next((it for it in items if it.id in done and done[it.id] != it.gold_letter), None)
    if changed is not None:  # the source was edited since: its rows would be kept as if still right
        raise MedtuneError(f"{out}: item {changed.id} was written with gold {done[changed.id]!r}, but {source} now "
                           f"gives {changed.gold_letter!r}: the source changed since; pass another --out or delete it")
    todo = [it for it in items if it.id not in done]
    if done:
        log(f"resuming: {len(items) - len(todo)} of {len(items)} items already in {out}")
    with open(out, "ab", buffering=0) as f, \
            tqdm(total=len(items), initial=len(items) - len(todo), desc="predict", unit="q", disable=quiet) as bar:
        for start in range(0, len(todo), chunk):
            part = todo[start: start + chunk]
            rows = score_items(loaded.model, loaded.tokenizer, part, loaded.style, loaded.method, loaded.mode,
                               batch_size=min(16, chunk), progress=bar)
            append_lines(f, "".join(json.dumps(r) + "\n" for r in rows).encode("utf-8"))
    summary = {"out": str(out), "items": len(items), "new": len(todo), "skipped": len(items) - len(todo), **meta}
    from medtune.models import placement

    summary["placement"] = placement(loaded.model)
    if write_csv:
        summary["csv"] = str(to_csv(out))
    return summary


def append_lines(f, data: bytes) -> None:
    """Append whole lines or nothing: a write that fails (a full disk) is cut back to where it started."""
    start = f.seek(0, os.SEEK_END)
    try:
        view = memoryview(data)
        while view:
            view = view[f.write(view):]
        os.fsync(f.fileno())
    except OSError:
        f.truncate(start)
        raise


def _check_unique(items: list[MCQItem]) -> None:
    seen: set[str] = set()
    dupes = [it.id for it in items if it.id in seen or seen.add(it.id)]
    if dupes:
        raise MedtuneError(f"{len(dupes)} duplicate item id(s) ({', '.join(dupes[:5])}); resuming needs unique ids")


def _resume(out: Path, meta: dict) -> dict[str, str | None]:
    """Ids already written, with the gold letter each row recorded. Cuts a partial last line; refuses a file written
    with other settings."""
    meta_path = out.with_name(out.stem + ".meta.json")
    if out.is_file() and out.stat().st_size:
        if meta_path.is_file():
            old = _read_meta(meta_path, out)
            diff = sorted(k for k in meta if old.get(k) != meta[k])
            if diff:
                changes = ", ".join(f"{k}: {old.get(k)!r} -> {meta[k]!r}" for k in diff)
                raise MedtuneError(f"{out} was written with other settings ({changes}); pass another --out or "
                                   "delete it")
        else:
            raise MedtuneError(f"{out} exists but has no {meta_path.name}: not written by medtune predict; "
                               "pass another --out")
        data = out.read_bytes()
        keep = data.rfind(b"\n") + 1
        if keep < len(data):  # a kill mid-write left a partial line: drop it, its item is scored again
            with open(out, "r+b") as f:
                f.truncate(keep)
        done = {}
        for n, line in enumerate(data[:keep].split(b"\n"), start=1):
            try:
                if line.strip():
                    row = json.loads(line)
                    done[_written_id(row)] = row.get("gold")
            except (ValueError, KeyError, TypeError) as e:  # ValueError: bad JSON or UTF-8
                raise MedtuneError(f"{out}:{n}: not a predictions line ({str(e)[:120]}); pass another --out") from None
        return done
    from medtune import io

    io.write_json(meta_path, meta)
    return {}


def _read_meta(meta_path: Path, out: Path) -> dict:
    """The sidecar of a predictions file; a broken one is named (not the predictions file beside it)."""
    from medtune.data.formats import load_json

    todo = f"it is corrupt: delete it and {out.name} to start again, or pass another --out"
    try:
        meta = load_json(meta_path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise MedtuneError(f"{meta_path}:{e.lineno}: not valid JSON ({e.msg} at column {e.colno}); {todo}") from None
    except (ValueError, RecursionError) as e:  # bad UTF-8, a duplicate key, nesting
        raise MedtuneError(f"{meta_path}: not readable ({str(e)[:120] or type(e).__name__}); {todo}") from None
    if not isinstance(meta, dict):
        raise MedtuneError(f"{meta_path}: expected a JSON object, got {type(meta).__name__}; {todo}")
    return meta


def _written_id(row) -> str:
    if not isinstance(row, dict) or not isinstance(row.get("id"), str):
        raise TypeError("expected a JSON object with a text id")
    return row["id"]


def to_csv(jsonl: Path) -> Path:
    """One row per prediction: id, pred, gold, correct, then p_A, p_B, ... (written under a temp name, renamed)."""
    def rows():  # streamed twice: once for the widest option count, once to write
        with open(jsonl, encoding="utf-8") as f:
            yield from (json.loads(line) for line in f if line.strip())

    width = max((len(r["probs"]) for r in rows()), default=0)
    path = jsonl.with_suffix(".csv")
    from io import StringIO

    from medtune import io

    with StringIO(newline="") as f:
        w = csv.writer(f)
        w.writerow(["id", "pred", "gold", "correct", "subject", *[f"p_{c}" for c in LETTERS[:width]]])
        for r in rows():
            w.writerow([r["id"], r["pred"], r["gold"], r["correct"], r.get("subject") or "",
                        *[f"{r['probs'][c]:.6f}" if c in r["probs"] else "" for c in LETTERS[:width]]])
        io.write_text(path, f.getvalue())
    return path
