"""The `eval` job: load, score (scoring.py), write predictions.jsonl and results.json; benchmark suites; the
contamination check against an adapter's training items. Scoring itself lives in scoring.py, shared with every
surface that shows a model's answer."""

from __future__ import annotations

from pathlib import Path

from medtune.data.items import LETTERS, MCQItem
from medtune.errors import MedtuneError
from medtune.prompts import lettered
from medtune.scoring import argmax, default_margin, encode, permuted_scores, score, score_items


def run_eval(items: list[MCQItem], cfg, out_dir: Path | None, adapter: str | None = None, loaded=None,
             fingerprint: dict | None = None, quiet: bool = False, log=print, label: str = "") -> tuple[dict, list[dict]]:
    """Score `items`, write predictions.jsonl and results.json to out_dir (if given); return results and rows."""
    import time

    from medtune.cost import Recorder
    from medtune.hardware import resolve_device, weights_dtype
    from medtune.models import load_model, placement
    from medtune.report import environment, metrics

    started = time.time()
    recorder = Recorder("eval")  # wall time, device, energy -> out_dir/cost.json
    # an adapter's, or a merged export's (RUN/merged holds medtune.json), saved prompt style and training-item hashes
    saved = adapter or (cfg.model if (Path(cfg.model) / "medtune.json").is_file() else None)
    style = adapter_style(saved, cfg.prompt_style, log) if saved else cfg.prompt_style
    device = resolve_device(cfg.device)
    model, tokenizer, path = loaded or load_model(cfg.model, adapter=adapter, device=device, log=log,
                                                  dtype=weights_dtype(device, mode=cfg.eval.mode),
                                                  merge=cfg.eval.merge_adapter)
    contamination = contamination_check(items, saved, log) if saved else None
    e = cfg.eval

    if e.method == "generate":
        if e.permute != "none":  # said and recorded, as for options scored as words (_debias), never dropped silently
            log(f"note: --permute {e.permute} skipped: {GENERATE_PERMUTE}")
        return _generate_eval(items, cfg, out_dir, model, tokenizer, style, path, adapter, fingerprint, contamination,
                              started, quiet, label, recorder)
    from tqdm.auto import tqdm

    margin = e.margin if e.margin is not None else default_margin(e.method)
    with tqdm(total=len(items), desc=f"eval {label}".strip(), unit="q", disable=quiet) as bar:
        rows = score_items(model, tokenizer, items, style, e.method, e.mode, margin, e.batch_size, bar)
    debiased, details, permute = _debias(items, rows, model, tokenizer, style, e, margin, quiet, log)
    m = metrics(items, rows, debiased, details)
    results = {
        "metrics": m, "method": f"{e.method}-logprob", "mode": e.mode, "prompt_style": style, "permute": permute,
        "decides": "argmax of the summed log-likelihood (lm-eval's acc); accuracy_norm, where reported, is lm-eval's "
                   "acc_norm (log-likelihood / characters of the choice)",
        "model": cfg.model, "model_path": str(path), "adapter": adapter, "data": fingerprint,
        "contamination": contamination, "question_cut": sum(1 for r in rows if r.get("question_cut_chars")),
        "rescored_fp32": sum(r.get("rescored_fp32", False) for r in rows) if e.mode == "fast" else None,
        "precision": precision_record(rows, details), "placement": placement(model),
        "wall_s": round(time.time() - started, 2),
        "environment": environment(),
    }
    _write(out_dir, rows, results, recorder)
    return results, rows


def _debias(items: list[MCQItem], rows: list[dict], model, tokenizer, style: str, e, margin: float, quiet: bool,
            log) -> tuple[list | None, list | None, str]:
    """eval.permute=cyclic: score every rotation of the options, add the debiased prediction and the option chosen
    under each rotation to `rows`; returns (debiased scores, per-item details, what permute did)."""
    from tqdm.auto import tqdm

    debiased = details = None
    permute = e.permute
    if permute == "cyclic" and not all(lettered(it, style) for it in items):
        # Rotating options only moves them between letter positions; a prompt that shows no options (PubMedQA as
        # lm-eval scores it) has no positions, so every rotation is the same prompt and debiasing is the identity.
        permute = "not applicable: the options are scored as words (e.g. yes/no/maybe), not lettered positions"
        log(f"note: --permute cyclic skipped: {permute}")
    elif permute == "cyclic":
        def rotation_scores(its: list[MCQItem], mode: str) -> list[list[float]]:
            with tqdm(total=len(its), desc="rotations", unit="q", disable=quiet or mode == "exact") as bar:
                return score(model, encode(its, style, tokenizer, e.method), e.batch_size, mode, margin, bar)[0]

        # Fast mode that found mostly close calls and switched to fp32 (a freshly tuned model) would switch again on
        # the rotations after another bf16 probe: go straight to exact there.
        mode = "exact" if e.mode == "fast" and all(r.get("rescored_fp32") for r in rows) else e.mode
        debiased, details = permuted_scores(items, lambda its: rotation_scores(its, mode),
                                            exact_fn=(lambda its: rotation_scores(its, "exact"))
                                            if mode == "fast" else None, margin=margin)
        for row, d, det in zip(rows, debiased, details):
            row["debiased_pred"] = LETTERS[argmax(d)]
            row["rotation_choices"] = [LETTERS[c] for c in det["rotation_choice"]]  # original option per rotation
    return debiased, details, permute


def precision_record(rows: list[dict], details: list[dict] | None) -> dict:
    """What each reported figure was computed from. Decisions (pred, pred_norm, debiased_pred and with them every
    accuracy) equal fp32 exact mode's in both modes: fast mode re-scores every close call in fp32. The log-probs in
    predictions.jsonl and the figures derived from them (calibration, Brier, mean log p(gold), selective accuracy) are
    fp32 for fp32 rows and bf16 for the rest; docs/benchmarks.md measures how far that moves them (inside the limits
    for calibration, Brier and mean log p(gold)). Selective accuracy, which moved more, is reported from fp32 only."""
    bf16 = sum(r.get("precision") == "bf16" for r in rows)
    scores = "fp32" if not bf16 else f"bf16 ({bf16} items), fp32 ({len(rows) - bf16} items)"
    out = {"decisions": "fp32 (equal to exact mode)", "logprobs": scores, "calibration_brier_gold_logprob": scores,
           "selective": "fp32" if not bf16 else "omitted (bf16 scores; run --mode exact)", "bf16_items": bf16}
    if details is not None:
        out["debiased"] = "fp32 (equal to exact mode; close debiased calls re-scored)"
    return out


def _write(out_dir, rows: list[dict], results: dict, recorder=None) -> None:
    from medtune.report import write_json, write_jsonl

    if out_dir is not None:
        out_dir = Path(out_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        write_jsonl(out_dir / "predictions.jsonl", rows)
        write_json(out_dir / "results.json", results)
        if recorder is not None:
            recorder.stop(out_dir, items=len(rows))


GENERATE_PERMUTE = "not applicable: generate decodes an answer, it scores no options to rotate"


def _generate_eval(items, cfg, out_dir, model, tokenizer, style, path, adapter, fingerprint, contamination, started,
                   quiet, label, recorder=None) -> tuple[dict, list[dict]]:
    import time

    from tqdm.auto import tqdm

    from medtune.generate import generate_rows, generation_metrics
    from medtune.report import environment, metrics

    with tqdm(total=len(items), desc=f"generate {label}".strip(), unit="q", disable=quiet) as bar:
        rows = generate_rows(model, tokenizer, items, style, cfg.eval.max_new_tokens, cfg.eval.batch_size, bar)
    m = metrics(items, rows)
    m["generation"] = generation_metrics(rows)
    permute = "none" if cfg.eval.permute == "none" else GENERATE_PERMUTE
    results = {"metrics": m, "method": "generate-greedy", "mode": "exact", "prompt_style": style, "permute": permute,
               "model": cfg.model, "model_path": str(path), "adapter": adapter, "data": fingerprint,
               "contamination": contamination, "max_new_tokens": cfg.eval.max_new_tokens,
               "wall_s": round(time.time() - started, 2), "environment": environment()}
    _write(out_dir, rows, results, recorder)
    return results, rows


def adapter_style(adapter: str, requested: str, log) -> str:
    """The prompt style saved with the adapter wins: scoring with another style measures a different thing."""
    from medtune.models import read_meta

    saved = read_meta(adapter).get("prompt_style", requested)
    if saved != requested:
        log(f"note: the adapter was trained with prompt style {saved!r}; evaluating with it, not {requested!r}")
    return saved


def contamination_check(items: list[MCQItem], adapter: str, log) -> dict | None:
    """Compare eval items with the items the adapter was trained on (recorded in its medtune.json)."""
    from medtune.data.split import overlap
    from medtune.models import read_meta

    if not (Path(adapter) / "medtune.json").is_file():
        log(f"warning: {adapter} has no medtune.json, so its training items are unknown: no contamination check")
        return None
    record = read_meta(adapter)
    if "train_items" in record:  # adapters from before the hashes (or exported with the items)
        found = overlap([MCQItem(**{**d, "options": tuple(d["options"])}) for d in record["train_items"]], items)
    else:  # the training text stays in the run dir; the adapter carries hashes of it (data/split.py)
        from medtune.data.split import load_item_hashes, overlap_hashed

        check_item_hashes(adapter, len(record.get("train_ids") or []))
        hashes = load_item_hashes(adapter, record.get("train_ids") or [])
        if hashes is None:
            log(f"warning: {adapter} records no training-item hashes: no contamination check")
            return None
        found = overlap_hashed(hashes, items)
    bad = len(found["exact"]) + len(found["near"])
    if bad:
        ids = [x["eval_id"] for x in found["exact"] + found["near"]]
        log(f"warning: contamination: {len(found['exact'])} eval items duplicate training items and "
            f"{len(found['near'])} nearly do ({', '.join(ids[:10])}{' ...' if len(ids) > 10 else ''})")
    return found


def check_item_hashes(adapter: str, n_ids: int) -> None:
    """train-hashes.safetensors as data/split.save_item_hashes writes it: metadata ngram a small whole number; int64
    vectors keys (one per training id), ngram_hashes and ngram_items of one length, each item index a training item.
    Anything else is refused in one line naming the file and field, before the contamination check reads it."""
    from safetensors import safe_open

    from medtune.data.split import HASHES_FILE

    path = Path(adapter) / HASHES_FILE
    if not path.is_file():
        return
    fix = "re-export the adapter (medtune writes this file at training)"
    with safe_open(str(path), framework="numpy") as f:
        ngram = (f.metadata() or {}).get("ngram", "8")
        if not (ngram.isascii() and ngram.isdigit() and 1 <= int(ngram) <= 64):
            raise MedtuneError(f"{path}: metadata ngram: {ngram!r:.40} is not a word count in 1..64; {fix}")
        shapes = {k: (f.get_slice(k).get_dtype(), f.get_slice(k).get_shape()) for k in f.keys()}  # noqa: SIM118
        for key in ("keys", "ngram_hashes", "ngram_items"):
            if key not in shapes:
                raise MedtuneError(f"{path}: {key}: missing (it holds {', '.join(sorted(shapes))[:100] or 'nothing'}); "
                                   f"{fix}")
            if shapes[key][0] != "I64" or len(shapes[key][1]) != 1:
                raise MedtuneError(f"{path}: {key}: {shapes[key][0]} of shape {shapes[key][1]}, not a vector of int64; "
                                   f"{fix}")
        if shapes["keys"][1][0] != n_ids:
            raise MedtuneError(f"{path}: keys: holds {shapes['keys'][1][0]} items but medtune.json lists {n_ids} "
                               f"training ids; {fix}")
        if shapes["ngram_hashes"][1] != shapes["ngram_items"][1]:
            raise MedtuneError(f"{path}: ngram_items: {shapes['ngram_items'][1][0]} entries for "
                               f"{shapes['ngram_hashes'][1][0]} ngram_hashes; {fix}")
        owners = f.get_tensor("ngram_items")
        if owners.size and not (0 <= owners.min() and owners.max() < n_ids):
            raise MedtuneError(f"{path}: ngram_items: an item index outside 0..{n_ids - 1}; {fix}")


def run_suite(cfg, out_dir: Path, adapter: str | None, quiet: bool, log) -> dict:
    """Every benchmark of a suite (e.g. multimedqa), each written to out_dir/<name>, plus the size-weighted average
    (pooled correct / pooled n, with its Wilson CI)."""
    from dataclasses import replace

    from medtune import stats
    from medtune.data import sources
    from medtune.report import write_json

    parts = {}
    for name in sources.SUITES[cfg.data.source]:
        items = sources.load(name, "eval")
        items = items[: cfg.data.limit] if cfg.data.limit else items
        sub = replace(cfg, data=replace(cfg.data, source=name))
        results, _ = run_eval(items, sub, Path(out_dir) / name, adapter=adapter, quiet=quiet, log=log, label=name,
                              fingerprint=sources.fingerprint(items, name, "eval"))
        parts[name] = {"n": results["metrics"]["n"], "correct": results["metrics"]["correct"],
                       "accuracy": results["metrics"]["accuracy"], "ci95": results["metrics"]["ci95"]}
    k, n = sum(p["correct"] for p in parts.values()), sum(p["n"] for p in parts.values())
    summary = {"suite": cfg.data.source, "parts": parts, "weighted_accuracy": k / n, "n": n,
               "ci95": list(stats.wilson_ci(k, n)), "model": cfg.model, "adapter": adapter}
    write_json(Path(out_dir) / "suite.json", summary)
    return summary
