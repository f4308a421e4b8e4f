"""Scoring is one room: `eval`, `ask`, `predict` and `serve` all score multiple-choice items through these functions.

Public API:
  score_items(model, tokenizer, items, style, method, mode, ...) -> one row per item (what predictions.jsonl holds)
  encode / score / predictions                                    -> the three steps score_items runs
  permuted_scores / rotations                                     -> cyclic-permutation debiasing

For each question the log-likelihood of each option's continuation after the prompt is computed the way
lm-evaluation-harness computes it: the continuation's tokens are those of `tokenize(prompt + continuation)` after the
prompt's own tokens, and its log-likelihood is the sum of their log-softmax. The continuations are whatever the
benchmark defines (prompts.continuations): " A" ... " D" for lettered options, " yes" / " no" / " maybe" for PubMedQA.
When every continuation is a single token that leaves the prompt's tokens unchanged (the normal case), one forward pass
over the prompt gives all options; otherwise each option's tokens are scored after the prompt's KV cache.

Modes: `exact` computes in float32. `fast` computes in bf16 where the weights are held in bf16 (models.load_model does
that where bf16 is native), then re-scores in float32 every question whose top-two margin is below `margin`, so that no
decided answer can differ from exact mode. The weights are held once, in one dtype: float32 scoring of bf16-held
weights is a compute choice (`fp32_compute`: each layer's weights are widened while that layer runs, from the fp32
values kept in host memory for a higher-precision checkpoint, or from the bf16 values themselves), not a second copy.
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass

from medtune.data.items import LETTERS, MCQItem
from medtune.errors import MedtuneError
from medtune.prompts import choices, context_limit, continuations, fit_prompt

METHODS = ("letter", "answer", "generate")  # generate lives in generate.py: it writes text, it does not score options
MODES = ("fast", "exact")
PROBE = 64  # questions scored in bf16 before deciding whether fast mode pays off
MAX_CLOSE = 0.4  # above this share of close calls, re-scoring would cost more than exact mode: go exact


def default_margin(method: str) -> float:
    """Measured bf16 errors on the top-two margin (tuned embedded model, demo + MedQA): p99.9 0.18 nats for letters,
    0.91 for answer lines; the defaults stay above them."""
    return 1.0 if method == "answer" else 0.5


@dataclass
class Encoded:
    context: list[int]
    options: list[list[int]]  # continuation tokens per option
    choice_chars: list[int] | None = None  # characters of each choice (lm-eval's acc_norm divides by these)
    cut: int = 0  # characters cut from the question's start to fit the context (prompts.fit_prompt)
    id: str = ""  # the item's id: named when its scores are not finite

    @property
    def single_token(self) -> bool:
        return all(len(o) == 1 for o in self.options)


def score_items(model, tokenizer, items: list[MCQItem], style: str, method: str = "letter", mode: str = "fast",
                margin: float | None = None, batch_size: int = 16, progress=None) -> list[dict]:
    """Score `items` with a loaded model and tokenizer: one row per item, in input order, exactly as eval writes
    them to predictions.jsonl (pred, per-option log-probs and probs, method, mode, whether it was re-scored)."""
    encoded = encode(items, style, tokenizer, method)
    margin = default_margin(method) if margin is None else margin
    scores, rescored = score(model, encoded, batch_size, mode, margin, progress)
    rows = predictions(items, scores, rescored, encoded=encoded, method=method, mode=mode)
    from medtune.models import held_in_bf16

    bf16 = mode == "fast" and held_in_bf16(model)
    for row, again, enc in zip(rows, rescored, encoded):
        if enc.cut:
            row["question_cut_chars"] = enc.cut
        row["precision"] = "bf16" if bf16 and not again else "fp32"  # what this row's log-probs were computed in
    return rows


def encode(items: list[MCQItem], style: str, tokenizer, method: str = "letter") -> list[Encoded]:
    """lm-evaluation-harness's split of context and continuation tokens (no special tokens added). `letter` scores
    " A" (or the benchmark's own continuation, e.g. " yes"); `answer` scores the whole answer line the model is
    trained to write, " A. <option text>"."""
    out, limit = [], context_limit(tokenizer)
    for item in items:
        # overlong items: the rule training uses (prompts.fit_prompt), with room left for the longest continuation
        reserve = max(len(tokenizer(c, add_special_tokens=False).input_ids) for c in continuations(item, style, method))
        item, prompt, cut = fit_prompt(item, style, tokenizer, limit - reserve)
        context = tokenizer(prompt, add_special_tokens=False).input_ids
        whole = [tokenizer(prompt + c, add_special_tokens=False).input_ids for c in continuations(item, style, method)]
        out.append(Encoded(context, [w[len(context):] for w in whole], [len(c) for c in choices(item, style, method)],
                           cut, item.id))
    return out


def score(model, encoded: list[Encoded], batch_size: int = 16, mode: str = "fast", margin: float = 0.5,
          progress=None) -> tuple[list[list[float]], list[bool]]:
    """Log-likelihood of every option of every question, and whether each was re-scored in fp32 (fast mode).

    Fast mode scores a probe of questions in bf16 first: a model with near-uniform letter probabilities (typical
    right after fine-tuning) puts most questions within the margin, and then exact mode is cheaper, so it switches.
    Weights held in fp32 (no native bf16) are scored in fp32 in both modes."""
    scores, rescored = _score(model, encoded, batch_size, mode, margin, progress)
    check_finite(model, scores, encoded)
    return scores, rescored


def check_finite(model, scores: list[list[float]], encoded: list[Encoded] | None = None) -> None:
    """Every log-probability finite, or one line naming the model (and adapter): NaN or infinite weights, adapter or
    config values (e.g. rms_norm_eps NaN) make every score NaN, and a NaN row would decide an arbitrary letter and
    write invalid JSON. (-inf is a possible log-prob only under a hard mask, which scoring never applies.)"""
    bad = next((k for k, lps in enumerate(scores) if not all(math.isfinite(lp) for lp in lps)), None)
    if bad is None:
        return
    from medtune.models import describe_model

    raise MedtuneError(f"{describe_model(model)}: the model computed non-finite log-probabilities (item "
                       f"{encoded[bad].id if encoded and encoded[bad].id else bad}): its weights, adapter or config "
                       "(e.g. rms_norm_eps) hold NaN or infinite values; use the original checkpoint")


@contextlib.contextmanager
def _freed_memory_returned():
    """While fp32 is computed from bf16-held weights, a freed tensor of 1 MiB or more goes back to the OS at once, and
    the heap the bf16 pass left free is handed back first (malloc_trim). glibc's malloc otherwise raises its mmap
    threshold as large blocks are freed, and the per-layer fp32 weights and activations of the next batches then come
    from a heap it does not give back (benchmarks/memory_fit.py, Qwen3-1.7B shape: eval peaked at 7,315 MB before this
    and the batch token cap, 5,076 MB after; docs/benchmarks.md). Not around the bf16 pass, which needs neither (and
    whose every 1 MiB activation would then be fresh pages from the OS: benchmarks/profile_fast.py --mallopt).
    Afterwards the threshold is set to 32 MiB (glibc's own ceiling for its dynamic threshold). Elsewhere than glibc
    this does nothing."""
    from medtune.models import glibc

    libc = glibc()
    if libc is not None:
        libc.malloc_trim(0)
        libc.mallopt(M_MMAP_THRESHOLD, 1 << 20)
    try:
        yield
    finally:
        if libc is not None:
            libc.mallopt(M_MMAP_THRESHOLD, 32 << 20)
            libc.malloc_trim(0)


M_MMAP_THRESHOLD = -3  # glibc's mallopt parameter number


def _score(model, encoded: list[Encoded], batch_size: int, mode: str, margin: float, progress):
    from medtune.models import held_in_bf16

    exact = [False] * len(encoded)
    if mode != "fast" or not held_in_bf16(model):
        with fp32_compute(model):
            return score_batched(model, encoded, batch_size, progress), exact
    with fp32_head(model):
        scores = score_batched(model, encoded[:PROBE], batch_size, None)
    if sum(margin_of(s) < margin for s in scores) > MAX_CLOSE * len(scores):
        with fp32_compute(model):
            return score_batched(model, encoded, batch_size, progress), [True] * len(encoded)
    if progress is not None:
        progress.update(min(PROBE, len(encoded)))  # the probe counts: the bar's rate (and ETA) includes it
    with fp32_head(model):
        scores += score_batched(model, encoded[PROBE:], batch_size, progress)
    rescored = list(exact)
    close = [i for i in range(len(encoded)) if _decisions_close(scores[i], encoded[i], margin)]
    with fp32_compute(model):
        for i, lp in zip(close, score_batched(model, [encoded[i] for i in close], batch_size, None)):
            scores[i], rescored[i] = lp, True
    return scores, rescored


HEAD_CHUNK = 16384  # vocabulary rows widened to fp32 at a time: 16384 x 4096 x 4 B = 256 MiB at most


@contextlib.contextmanager
def fp32_head(model):
    """The vocabulary projection in fp32 (it runs at one position per question, so it costs nothing): that projection
    over ~50k-150k logits is where bf16 rounding moves log-probs most. Computed in row chunks from the fp32 values
    (or the widened bf16 ones), so no fp32 copy of the whole (often tied) embedding matrix is ever made."""
    import torch

    head = model.get_output_embeddings()
    if head.weight.dtype == torch.float32 and getattr(head.weight, "medtune_fp32", None) is None:
        yield  # already fp32
        return

    def forward(x):
        weight = getattr(head.weight, "medtune_fp32", None)
        weight = head.weight if weight is None else weight
        x = x.to(torch.float32)
        parts = [torch.nn.functional.linear(x, weight[i: i + HEAD_CHUNK].to(x.device, torch.float32))
                 for i in range(0, weight.shape[0], HEAD_CHUNK)]
        out = torch.cat(parts, dim=-1)
        return out if head.bias is None else out + head.bias.to(x.device, torch.float32)

    head.forward = forward  # an instance attribute: nn.Module.__call__ finds it before the class's forward
    try:
        yield
    finally:
        del head.forward


@contextlib.contextmanager
def fp32_compute(model):
    """Run `model` in fp32 from weights held in bf16, one layer at a time: while a module runs, its own parameters
    are swapped for their fp32 values (the host copy kept by models.hold_in_bf16, moved to the device, or the bf16
    value widened, which is exact), its floating inputs are widened, and the bf16 parameters are put back when it
    returns. Embedding lookups are widened after the lookup (exact, and no fp32 copy of the table); the vocabulary
    projection goes through fp32_head. Only one layer's fp32 weights exist at a time. A no-op for fp32 weights."""
    import torch

    from medtune.models import held_in_bf16

    if not held_in_bf16(model):
        yield
        return
    head = model.get_output_embeddings()
    handles = []

    def widen(value):
        return value.to(torch.float32) if torch.is_tensor(value) and value.is_floating_point() else value

    def before(module, args, kwargs):
        module.medtune_bf16 = dict(module._parameters)
        for name, param in module.medtune_bf16.items():
            if param is not None and param.is_floating_point():
                master = getattr(param, "medtune_fp32", None)
                module._parameters[name] = param.float() if master is None else master.to(param.device)
        return tuple(widen(a) for a in args), {k: widen(v) for k, v in kwargs.items()}

    def after(module, args, output):
        module._parameters.update(module.medtune_bf16)
        del module.medtune_bf16

    def lookup(module, args, output):
        master = getattr(module.weight, "medtune_fp32", None)
        if master is None:
            return output.to(torch.float32)
        return torch.nn.functional.embedding(args[0].to(master.device), master).to(output.device)

    for module in model.modules():
        if module is head or not any(p is not None for p in module._parameters.values()):
            continue
        if isinstance(module, torch.nn.Embedding):
            handles.append(module.register_forward_hook(lookup))
        else:
            handles += [module.register_forward_pre_hook(before, with_kwargs=True), module.register_forward_hook(after)]
    try:
        with fp32_head(model), _freed_memory_returned():
            yield
    finally:
        for h in handles:
            h.remove()


def margin_of(values: list[float]) -> float:
    """Top-two margin: how far the decided answer is from flipping."""
    top = sorted(values, reverse=True)
    return top[0] - top[1] if len(top) > 1 else math.inf


def _decisions_close(lps: list[float], e: Encoded, margin: float) -> bool:
    """Every argmax that decides an answer is margin-checked: the summed one and the length-normalised one."""
    if margin_of(lps) < margin:
        return True
    if e.choice_chars and len(set(e.choice_chars)) > 1:
        return margin_of([lp / n for lp, n in zip(lps, e.choice_chars)]) < margin / min(e.choice_chars)
    return False


def score_batched(model, encoded: list[Encoded], batch_size: int, progress) -> list[list[float]]:
    """Single-token continuations: one sequence per question. Otherwise the prompt's cache is reused per option."""
    single = [i for i, e in enumerate(encoded) if e.single_token]
    multi = [i for i, e in enumerate(encoded) if not e.single_token]
    out: list[list[float]] = [[] for _ in encoded]
    for i, lp in zip(single, _score_single(model, [encoded[i] for i in single], batch_size, progress)):
        out[i] = lp
    for i, lp in zip(multi, _score_multi(model, [encoded[i] for i in multi], batch_size)):
        out[i] = lp
        if progress is not None:
            progress.update(1)
    return out


MAX_BATCH_TOKENS = 4096  # padded prompt tokens per forward pass: bounds activation memory; a longer question goes
# alone


def _batches(order: list[int], encoded: list[Encoded], batch_size: int):
    """Consecutive runs of `order` (longest prompt first) of at most batch_size questions and MAX_BATCH_TOKENS padded
    tokens (rows x the batch's longest prompt)."""
    batch: list[int] = []
    for i in order:
        if batch and (len(batch) >= batch_size or (len(batch) + 1) * len(encoded[batch[0]].context) > MAX_BATCH_TOKENS):
            yield batch
            batch = []
        batch.append(i)
    if batch:
        yield batch


def _score_single(model, encoded: list[Encoded], batch_size: int, progress) -> list[list[float]]:
    """One forward pass per batch: left-padded prompts sorted by length, logits at the last position only."""
    import torch

    device = next(model.parameters()).device
    order = sorted(range(len(encoded)), key=lambda i: -len(encoded[i].context))
    out: list[list[float] | None] = [None] * len(encoded)
    for idx in _batches(order, encoded, batch_size):
        ids, mask, positions = _left_pad([encoded[i].context for i in idx])
        with torch.inference_mode():
            logits = model(input_ids=ids.to(device), attention_mask=mask.to(device),
                           position_ids=positions.to(device), logits_to_keep=1).logits[:, -1, :]
        logprobs = torch.log_softmax(logits.float(), dim=-1).cpu()
        for row, i in enumerate(idx):
            out[i] = [logprobs[row, o[0]].item() for o in encoded[i].options]
        if progress is not None:
            progress.update(len(idx))
    return out


def _score_multi(model, encoded: list[Encoded], batch_size: int) -> list[list[float]]:
    """Multi-token continuations (the answer line): one forward pass over each prompt, its KV cache repeated for the
    options (`Cache.reorder_cache`, passed back as `cache=`, transformers 5's argument), then one short pass over all
    options' continuation tokens. The first continuation token is read from the prompt pass, the rest from the
    continuation pass; the sum is each option's log-likelihood."""
    import torch

    device = next(model.parameters()).device
    order = sorted(range(len(encoded)), key=lambda i: -len(encoded[i].context))
    out: list[list[float]] = [[] for _ in encoded]
    for idx in _batches(order, encoded, batch_size):
        ids, mask, positions = _left_pad([encoded[i].context for i in idx])
        rows = [(b, cont) for b, i in enumerate(idx) for cont in encoded[i].options]
        tail = max(len(c) for _, c in rows) - 1
        with torch.inference_mode():
            first = model(input_ids=ids.to(device), attention_mask=mask.to(device), position_ids=positions.to(device),
                          use_cache=tail > 0, logits_to_keep=1)
            first_lp = torch.log_softmax(first.logits[:, -1].float(), dim=-1).cpu()
            if tail > 0:
                cache = first.cache
                row_b = torch.tensor([b for b, _ in rows])
                cache.reorder_cache(row_b.to(device))
                cont_ids = torch.zeros(len(rows), tail, dtype=torch.long)
                cont_mask = torch.zeros(len(rows), tail, dtype=torch.long)
                for r, (_, cont) in enumerate(rows):
                    cont_ids[r, : len(cont) - 1] = torch.tensor(cont[:-1])
                    cont_mask[r, : len(cont) - 1] = 1
                full_mask = torch.cat([mask[row_b], cont_mask], dim=1)
                cont_pos = mask[row_b].sum(-1, keepdim=True) + torch.arange(tail)
                rest = model(input_ids=cont_ids.to(device), attention_mask=full_mask.to(device),
                             position_ids=cont_pos.to(device), cache=cache).logits
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
    """Token by token, one forward pass per option, in fp32, as lm-evaluation-harness does: the slow reference."""
    import torch

    device = next(model.parameters()).device
    result = []
    for cont in e.options:
        ids = torch.tensor([e.context + cont[:-1] if cont else e.context], device=device)
        with fp32_compute(model):
            logprobs = torch.log_softmax(model(input_ids=ids).logits[0].float(), dim=-1)
        start = len(e.context) - 1
        result.append(sum(logprobs[start + k, tok].item() for k, tok in enumerate(cont)))
    return result


def predictions(items: list[MCQItem], scores: list[list[float]], rescored: list[bool] | None = None,
                encoded: list[Encoded] | None = None, method: str = "letter", mode: str = "exact") -> list[dict]:
    """One row per item, in input order: option labels (A, B, ... by position, also for PubMedQA's yes/no/maybe),
    raw log-likelihoods, probs normalised over the options, and the predicted option's text. The summed
    log-likelihood decides `pred` (lm-eval's `acc`); where choices differ in length, `pred_norm` is lm-eval's
    `acc_norm` argmax (log-likelihood / characters of the choice) beside it."""
    rows = []
    for k, (item, lps) in enumerate(zip(items, scores)):
        probs = softmax(lps)
        pred = argmax(lps)
        row = {"id": item.id, "gold": item.gold_letter, "pred": LETTERS[pred], "correct": pred == item.answer,
               "pred_text": item.options[pred], "logprobs": {LETTERS[j]: lp for j, lp in enumerate(lps)},
               "probs": {LETTERS[j]: p for j, p in enumerate(probs)}, "subject": item.subject,
               "method": method, "mode": mode}
        chars = encoded[k].choice_chars if encoded is not None else None
        if chars and len(set(chars)) > 1:
            norm = argmax([lp / n for lp, n in zip(lps, chars)])
            row["pred_norm"], row["correct_norm"] = LETTERS[norm], norm == item.answer
        if rescored is not None and mode == "fast":
            row["rescored_fp32"] = rescored[k]
        rows.append(row)
    return rows


def argmax(values: list[float]) -> int:
    return max(range(len(values)), key=lambda j: values[j])  # first of equals, as numpy.argmax in lm-eval


def softmax(values: list[float]) -> list[float]:
    top = max(values)
    exps = [math.exp(v - top) for v in values]
    total = sum(exps)
    return [e / total for e in exps]


def rotations(item: MCQItem) -> list[list[int]]:
    """The n cyclic rotations of the option order: rotation r shows original option (i + r) % n at position i."""
    n = len(item.options)
    return [[(i + r) % n for i in range(n)] for r in range(n)]


def permuted_scores(items: list[MCQItem], score_fn, exact_fn=None, margin: float = 0.0
                    ) -> tuple[list[list[float]], list[dict]]:
    """Score every cyclic rotation of every item in one batched call; return the debiased per-option score (each
    option content's log-probability, normalized over the options, averaged across rotations: a pure letter prior
    cancels) and per-item rotation details.

    `score_fn(items) -> scores` may be approximate (bf16): then `exact_fn` re-scores in fp32 every rotation of each
    item whose debiased top-two margin is below `margin`, so the debiased argmax equals exact mode's too."""
    expanded, owners = [], []
    for k, item in enumerate(items):
        for order in rotations(item):
            expanded.append(item.permuted(order))
            owners.append((k, order))
    flat = score_fn(expanded)
    debiased, details = _debias(items, owners, flat)
    if exact_fn is not None:
        close = {k for k, d in enumerate(debiased) if margin_of(d) < margin}
        redo = [j for j, (k, _) in enumerate(owners) if k in close]
        for j, lps in zip(redo, exact_fn([expanded[j] for j in redo]) if redo else []):
            flat[j] = lps
        debiased, details = _debias(items, owners, flat)
        for k, d in enumerate(details):
            d["rescored_fp32"] = k in close
    return debiased, details


def _debias(items: list[MCQItem], owners: list[tuple[int, list[int]]], flat: list[list[float]]):
    debiased = [[0.0] * len(it.options) for it in items]
    details = [{"rotation_correct": [], "rotation_choice": []} for _ in items]
    for (k, order), lps in zip(owners, flat):
        norm = [math.log(p) for p in softmax(lps)]
        for pos, original in enumerate(order):
            debiased[k][original] += norm[pos] / len(order)
        choice = order[argmax(lps)]
        details[k]["rotation_choice"].append(choice)
        details[k]["rotation_correct"].append(choice == items[k].answer)
    return debiased, details
