"""Letter scoring in one forward pass, predictions, metrics.

For each question the log-probability of each option's continuation (" A", " B", ...) after the prompt is computed the
way lm-evaluation-harness computes it: the continuation's tokens are those of `tokenize(prompt + continuation)` after
the prompt's own tokens, and its log-likelihood is the sum of their log-softmax. When every continuation is a single
token that leaves the prompt's tokens unchanged (the normal case), one forward pass over the prompt gives all options;
otherwise each option gets its own forward pass (the reference path, also used by the tests).

Modes: `exact` runs in float32. `fast` runs under bf16 autocast where the device supports it, then re-scores in
float32 every question whose top-two margin is below `margin`, so that only close calls can differ from exact mode.
"""

from __future__ import annotations

import copy
import json
import math
from dataclasses import dataclass
from pathlib import Path

from medtune.data.items import LETTERS, MCQItem
from medtune.prompts import build_prompt, continuations


@dataclass
class Encoded:
    context: list[int]
    options: list[list[int]]  # continuation tokens per option

    @property
    def single_token(self) -> bool:
        return all(len(o) == 1 for o in self.options)


def encode(items: list[MCQItem], style: str, tokenizer, method: str = "letter") -> list[Encoded]:
    """lm-evaluation-harness's split of context and continuation tokens (no special tokens added). `letter` scores
    " A"; `answer` scores the whole answer line the model is trained to write, " A. <option text>"."""
    out = []
    for item in items:
        prompt = build_prompt(item, style, tokenizer)
        context = tokenizer(prompt, add_special_tokens=False).input_ids
        conts = continuations(item, style)
        if method == "answer":
            conts = [f"{c}. {text}" for c, text in zip(conts, item.options)]
        whole = [tokenizer(prompt + c, add_special_tokens=False).input_ids for c in conts]
        out.append(Encoded(context, [w[len(context):] for w in whole]))
    return out


PROBE = 64  # questions scored in bf16 before deciding whether fast mode pays off
MAX_CLOSE = 0.4  # above this share of close calls, re-scoring would cost more than exact mode: go exact


def score(model, encoded: list[Encoded], batch_size: int = 16, mode: str = "fast", margin: float = 0.5,
          progress=None) -> tuple[list[list[float]], list[bool]]:
    """Log-likelihood of every option of every question, and whether each was re-scored in fp32 (fast mode).

    Fast mode scores a probe of questions in bf16 first: a model with near-uniform letter probabilities (typical
    right after fine-tuning) puts most questions within the margin, and then exact mode is cheaper, so it switches.
    Measured bf16 errors on the top-two margin (tuned embedded model, demo + MedQA): p99.9 0.18 nats for letters,
    0.91 for answer lines; the defaults (0.5 and 1.0) stay above them."""
    device = next(model.parameters()).device
    fast_dtype = _fast_dtype(device) if mode == "fast" else None
    if fast_dtype is None:
        return _score_batched(model, encoded, batch_size, None, progress), [False] * len(encoded)
    # The fast pass runs on a bf16 copy of the weights (no per-batch casts); the fp32 model stays for re-scoring.
    fast_model = copy.deepcopy(model).to(fast_dtype)
    scores = _score_batched(fast_model, encoded[:PROBE], batch_size, fast_dtype, None)
    if sum(_margin(s) < margin for s in scores) > MAX_CLOSE * len(scores):
        del fast_model
        return _score_batched(model, encoded, batch_size, None, progress), [True] * len(encoded)
    scores += _score_batched(fast_model, encoded[PROBE:], batch_size, fast_dtype, progress)
    if progress is not None:
        progress.update(min(PROBE, len(encoded)))
    del fast_model
    rescored = [False] * len(encoded)
    close = [i for i in range(len(encoded)) if _margin(scores[i]) < margin]
    for i, lp in zip(close, _score_batched(model, [encoded[i] for i in close], batch_size, None, None)):
        scores[i], rescored[i] = lp, True
    return scores, rescored


def _score_batched(model, encoded: list[Encoded], batch_size: int, autocast_dtype, progress) -> list[list[float]]:
    """Single-token continuations: one sequence per question. Otherwise one sequence per option (the answer line)."""
    single = [i for i, e in enumerate(encoded) if e.single_token]
    multi = [i for i, e in enumerate(encoded) if not e.single_token]
    out: list[list[float]] = [[] for _ in encoded]
    for i, lp in zip(single, _score_single(model, [encoded[i] for i in single], batch_size, autocast_dtype,
                                           progress)):
        out[i] = lp
    for i, lp in zip(multi, _score_multi(model, [encoded[i] for i in multi], batch_size, autocast_dtype)):
        out[i] = lp
        if progress is not None:
            progress.update(1)
    return out


def _fast_dtype(device):
    import torch

    if device.type == "cpu":
        return torch.bfloat16 if torch.backends.mkldnn.is_available() and _cpu_bf16() else None
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else None
    return None


def _cpu_bf16() -> bool:
    try:
        import torch

        return torch.ops.mkldnn._is_mkldnn_bf16_supported()
    except (AttributeError, RuntimeError):
        return False


def _margin(lps: list[float]) -> float:
    top = sorted(lps, reverse=True)
    return top[0] - top[1] if len(top) > 1 else math.inf


def _score_single(model, encoded: list[Encoded], batch_size: int, autocast_dtype, progress) -> list[list[float]]:
    """One forward pass per batch: left-padded prompts sorted by length, logits at the last position only."""
    import torch

    device = next(model.parameters()).device
    order = sorted(range(len(encoded)), key=lambda i: -len(encoded[i].context))
    out: list[list[float] | None] = [None] * len(encoded)
    for start in range(0, len(order), batch_size):
        idx = order[start: start + batch_size]
        ids, mask, positions = _left_pad([encoded[i].context for i in idx])
        with torch.inference_mode(), torch.autocast(device.type, dtype=autocast_dtype or torch.float32,
                                                    enabled=autocast_dtype is not None):
            logits = model(input_ids=ids.to(device), attention_mask=mask.to(device),
                           position_ids=positions.to(device), logits_to_keep=1).logits[:, -1, :]
        logprobs = torch.log_softmax(logits.float(), dim=-1).cpu()
        for row, i in enumerate(idx):
            out[i] = [logprobs[row, o[0]].item() for o in encoded[i].options]
        if progress is not None:
            progress.update(len(idx))
    return out


def _score_multi(model, encoded: list[Encoded], batch_size: int, autocast_dtype) -> list[list[float]]:
    """Multi-token continuations (the answer line): one forward pass over each prompt, its KV cache repeated for the
    options, then one short pass over all options' continuation tokens. The first continuation token is read from the
    prompt pass, the rest from the continuation pass; the sum is each option's log-likelihood."""
    import torch

    device = next(model.parameters()).device
    order = sorted(range(len(encoded)), key=lambda i: -len(encoded[i].context))
    out: list[list[float]] = [[] for _ in encoded]
    for start in range(0, len(order), batch_size):
        idx = order[start: start + batch_size]
        ids, mask, positions = _left_pad([encoded[i].context for i in idx])
        rows = [(b, cont) for b, i in enumerate(idx) for cont in encoded[i].options]
        width, tail = ids.shape[1], max(len(c) for _, c in rows) - 1
        with torch.inference_mode(), torch.autocast(device.type, dtype=autocast_dtype or torch.float32,
                                                    enabled=autocast_dtype is not None):
            first = model(input_ids=ids.to(device), attention_mask=mask.to(device), position_ids=positions.to(device),
                          use_cache=tail > 0, logits_to_keep=1)
            first_lp = torch.log_softmax(first.logits[:, -1].float(), dim=-1).cpu()
            if tail > 0:
                cache = first.past_key_values
                cache.reorder_cache(torch.tensor([b for b, _ in rows], device=device))
                cont_ids = torch.zeros(len(rows), tail, dtype=torch.long)
                cont_mask = torch.zeros(len(rows), tail, dtype=torch.long)
                for r, (_, cont) in enumerate(rows):
                    cont_ids[r, : len(cont) - 1] = torch.tensor(cont[:-1])
                    cont_mask[r, : len(cont) - 1] = 1
                row_b = torch.tensor([b for b, _ in rows])
                full_mask = torch.cat([mask[row_b], cont_mask], dim=1)
                cont_pos = mask[row_b].sum(-1, keepdim=True) + torch.arange(tail)
                rest = model(input_ids=cont_ids.to(device), attention_mask=full_mask.to(device),
                             position_ids=cont_pos.to(device), past_key_values=cache,
                             cache_position=torch.arange(width, width + tail, device=device)).logits
                rest_lp = torch.log_softmax(rest.float(), dim=-1).cpu()
        for r, (b, cont) in enumerate(rows):
            total = first_lp[b, cont[0]].item() + sum(rest_lp[r, k - 1, t].item() for k, t in enumerate(cont) if k)
            out[idx[b]].append(total)
    return out


def _left_pad(seqs: list[list[int]]):
    """Left-padded ids, attention mask and position ids (padding must not shift the real tokens' positions)."""
    import torch

    width = max(map(len, seqs))
    ids = torch.zeros(len(seqs), width, dtype=torch.long)
    mask = torch.zeros(len(seqs), width, dtype=torch.long)
    for row, seq in enumerate(seqs):
        ids[row, width - len(seq):] = torch.tensor(seq)
        mask[row, width - len(seq):] = 1
    return ids, mask, (mask.cumsum(-1) - 1).clamp(min=0)


def score_reference(model, e: Encoded) -> list[float]:
    """Token by token, one forward pass per option, as lm-evaluation-harness does: the slow reference."""
    import torch

    device = next(model.parameters()).device
    result = []
    for cont in e.options:
        ids = torch.tensor([e.context + cont[:-1] if cont else e.context], device=device)
        logprobs = torch.log_softmax(model(input_ids=ids).logits[0].float(), dim=-1)
        start = len(e.context) - 1
        result.append(sum(logprobs[start + k, tok].item() for k, tok in enumerate(cont)))
    return result


def predictions(items: list[MCQItem], scores: list[list[float]], rescored: list[bool] | None = None) -> list[dict]:
    """One row per item, in input order, with letters, raw log-probs and probs normalized over the options."""
    rows = []
    for k, (item, lps) in enumerate(zip(items, scores)):
        probs = _softmax(lps)
        pred = max(range(len(lps)), key=lambda j: lps[j])
        rows.append({
            "id": item.id, "gold": item.gold_letter, "pred": LETTERS[pred], "correct": pred == item.answer,
            "logprobs": {LETTERS[j]: lp for j, lp in enumerate(lps)},
            "probs": {LETTERS[j]: p for j, p in enumerate(probs)},
            "subject": item.subject, **({"rescored_fp32": rescored[k]} if rescored is not None else {}),
        })
    return rows


def _softmax(values: list[float]) -> list[float]:
    top = max(values)
    exps = [math.exp(v - top) for v in values]
    total = sum(exps)
    return [e / total for e in exps]


def rotations(item: MCQItem) -> list[list[int]]:
    """The n cyclic rotations of the option order: rotation r shows original option (i + r) % n at position i."""
    n = len(item.options)
    return [[(i + r) % n for i in range(n)] for r in range(n)]


def permuted_scores(items: list[MCQItem], score_fn) -> tuple[list[list[float]], list[dict]]:
    """Score every cyclic rotation of every item in one batched call; return the debiased per-option score (each
    option content's log-probability, normalized over the options, averaged across rotations: a pure letter prior
    cancels) and per-item rotation details."""
    expanded, owners = [], []
    for k, item in enumerate(items):
        for order in rotations(item):
            expanded.append(item.permuted(order))
            owners.append((k, order))
    flat = score_fn(expanded)
    debiased = [[0.0] * len(it.options) for it in items]
    details = [{"rotation_correct": [], "rotation_choice": []} for _ in items]
    for (k, order), lps in zip(owners, flat):
        norm = [math.log(p) for p in _softmax(lps)]
        for pos, original in enumerate(order):
            debiased[k][original] += norm[pos] / len(order)
        choice = order[max(range(len(lps)), key=lambda j: lps[j])]
        details[k]["rotation_choice"].append(choice)
        details[k]["rotation_correct"].append(choice == items[k].answer)
    return debiased, details


def run_eval(items: list[MCQItem], cfg, out_dir: Path | None, adapter: str | None = None, loaded=None,
             fingerprint: dict | None = None, quiet: bool = False, log=print, label: str = "") -> tuple[dict, list[dict]]:
    """Score `items`, write predictions.jsonl and results.json to out_dir (if given); return results and rows."""
    import time

    from medtune.models import load_model
    from medtune.report import environment, metrics

    started = time.time()
    style = adapter_style(adapter, cfg.prompt_style, log) if adapter else cfg.prompt_style
    model, tokenizer, path = loaded or load_model(cfg.model, adapter=adapter, device=_device(cfg), log=log,
                                                  merge=cfg.eval.merge_adapter)
    contamination = contamination_check(items, adapter, log) if adapter else None
    e = cfg.eval

    def score_all(its: list[MCQItem], desc: str) -> tuple[list[list[float]], list[bool]]:
        from tqdm.auto import tqdm

        with tqdm(total=len(its), desc=desc, unit="q", disable=quiet) as bar:
            margin = e.margin if e.margin is not None else (1.0 if e.method == "answer" else 0.5)
            return score(model, encode(its, style, tokenizer, e.method), e.batch_size, e.mode, margin, bar)

    if e.method == "generate":
        return _generate_eval(items, cfg, out_dir, model, tokenizer, style, path, adapter, fingerprint, contamination,
                              started, quiet, label)
    scores, rescored = score_all(items, f"eval {label}".strip())
    rows = predictions(items, scores, rescored if e.mode == "fast" else None)
    debiased = details = None
    if e.permute == "cyclic":
        debiased, details = permuted_scores(items, lambda its: score_all(its, "rotations")[0])
        for row, d, det in zip(rows, debiased, details):
            row["debiased_pred"] = LETTERS[max(range(len(d)), key=lambda j: d[j])]
            row["rotation_choices"] = [LETTERS[c] for c in det["rotation_choice"]]  # original option per rotation
    m = metrics(items, rows, debiased, details)
    results = {
        "metrics": m, "method": f"{e.method}-logprob", "mode": e.mode, "prompt_style": style, "permute": e.permute,
        "model": cfg.model, "model_path": str(path), "adapter": adapter, "data": fingerprint,
        "contamination": contamination, "rescored_fp32": sum(rescored) if e.mode == "fast" else None,
        "wall_s": round(time.time() - started, 2), "environment": environment(),
    }
    _write(out_dir, rows, results)
    return results, rows


def _write(out_dir, rows: list[dict], results: dict) -> None:
    from medtune.report import write_json, write_jsonl

    if out_dir is not None:
        out_dir = Path(out_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        write_jsonl(out_dir / "predictions.jsonl", rows)
        write_json(out_dir / "results.json", results)


def _generate_eval(items, cfg, out_dir, model, tokenizer, style, path, adapter, fingerprint, contamination, started,
                   quiet, label) -> tuple[dict, list[dict]]:
    import time

    from tqdm.auto import tqdm

    from medtune.generate import generate_rows, generation_metrics
    from medtune.report import environment, metrics

    with tqdm(total=len(items), desc=f"generate {label}".strip(), unit="q", disable=quiet) as bar:
        rows = generate_rows(model, tokenizer, items, style, cfg.eval.max_new_tokens, cfg.eval.batch_size, bar)
    m = metrics(items, rows)
    m["generation"] = generation_metrics(rows)
    results = {"metrics": m, "method": "generate-greedy", "mode": "exact", "prompt_style": style, "permute": "none",
               "model": cfg.model, "model_path": str(path), "adapter": adapter, "data": fingerprint,
               "contamination": contamination, "max_new_tokens": cfg.eval.max_new_tokens,
               "wall_s": round(time.time() - started, 2), "environment": environment()}
    _write(out_dir, rows, results)
    return results, rows


def _device(cfg) -> str:
    if cfg.device != "auto":
        return cfg.device
    from medtune.hardware import detect, device_string

    return device_string(detect())


def adapter_style(adapter: str, requested: str, log) -> str:
    """The prompt style saved with the adapter wins: scoring with another style measures a different thing."""
    meta = Path(adapter) / "medtune.json"
    if not meta.is_file():
        return requested
    saved = json.loads(meta.read_text()).get("prompt_style", requested)
    if saved != requested:
        log(f"note: the adapter was trained with prompt style {saved!r}; evaluating with it, not {requested!r}")
    return saved


def contamination_check(items: list[MCQItem], adapter: str, log) -> dict | None:
    """Compare eval items with the items the adapter was trained on (recorded in its medtune.json)."""
    from medtune.data.split import overlap

    meta = Path(adapter) / "medtune.json"
    if not meta.is_file():
        log(f"warning: {adapter} has no medtune.json, so its training items are unknown: no contamination check")
        return None
    record = json.loads(meta.read_text())
    if "train_items" in record:  # adapters from before the hashes (or exported with the items)
        found = overlap([MCQItem(**{**d, "options": tuple(d["options"])}) for d in record["train_items"]], items)
    else:  # the training text stays in the run dir; the adapter carries hashes of it (data/split.py)
        from medtune.data.split import load_item_hashes, overlap_hashed

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
