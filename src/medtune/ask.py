"""Ask one question: the scored answer, every option's probability, and a greedy explanation of that answer.

The letter and the probabilities come from the scoring `eval` uses (same encoding, same method, same mode), so an
answer here equals `eval`'s answer on the same item. The explanation is generated after the scored answer: the model
reads its own answer line (`B. <option text>` in the trained format) and continues from `Explanation:`, greedily,
up to a token cap. It therefore explains the scored answer and can never name a different letter.

`ask`, `predict` and `serve` share `load()` (model, adapter or merged export, prompt style, scoring defaults and the
results.json headline) and `answer()`.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field, replace
from pathlib import Path

from medtune.data.items import LETTERS, MCQItem
from medtune.errors import MedtuneError

MAX_QUESTION_CHARS = 4000  # a long vignette fits; a pasted document does not
MAX_OPTION_CHARS = 500
MIN_OPTIONS, MAX_OPTIONS = 2, len(LETTERS)
MAX_PROMPT_TOKENS = 2048  # prompt + explanation: well inside the embedded model's 8k context; bounds a request
MAX_NEW_TOKENS = 96  # default explanation cap


@dataclass
class Loaded:
    """A model ready to answer, and what it is (shown with every answer)."""
    model: object
    tokenizer: object
    model_name: str
    adapter: str | None
    style: str
    method: str  # letter or answer (the scoring method; `generate` is eval-only)
    mode: str  # exact or fast
    headline: dict | None = None  # the results.json headline of the adapter's or export's eval, when one exists
    info: dict = field(default_factory=dict)


def load(model: str = "embedded", adapter: str | None = None, method: str | None = None, mode: str = "exact",
         prompt_style: str | None = None, device: str = "auto", log=print) -> Loaded:
    """Base model, base + adapter (an adapter dir or a run dir holding adapter/), or a merged export dir.

    The weights are held once on the policy's device (`device`: auto or an explicit one), in bf16 where bf16 is
    native: the explanation decodes from them directly (greedy decoding is bound by memory bandwidth, and bf16 halves
    the bytes per token), while the answer and its probabilities are computed in fp32 in exact mode
    (scoring.fp32_compute), so they equal eval's exact numbers.

    The prompt style saved with the adapter or export wins (scoring with another style measures something else).
    The scoring method defaults to the one its results.json was measured with, so the numbers shown beside the
    headline come from the same scoring; otherwise `letter`, eval's default."""
    from medtune.evaluate import adapter_style
    from medtune.hardware import resolve_device, weights_dtype
    from medtune.models import adapter_dir, load_model
    from medtune.prompts import check_style

    adapter = adapter_dir(adapter) if adapter else None  # a run dir or its adapter
    if adapter and not Path(adapter).is_dir():
        raise MedtuneError(f"{adapter}: no such adapter directory")
    if mode not in ("exact", "fast"):
        raise MedtuneError(f"unknown mode {mode!r}; choose exact or fast")
    device = resolve_device(device)  # a missing device is one line, before any model loads
    headline = find_headline(model, adapter)
    if method is None:
        method = (headline or {}).get("method", "letter-logprob").removesuffix("-logprob")
        method = method if method in ("letter", "answer") else "letter"
    if method not in ("letter", "answer"):
        raise MedtuneError(f"unknown method {method!r}; ask/predict/serve score with letter or answer")
    style = check_style(prompt_style or "harness")
    saved_from = adapter or (model if (Path(model) / "medtune.json").is_file() else None)
    if saved_from:
        style = adapter_style(saved_from, style, log)
    m, tokenizer, _ = load_model(model, adapter=adapter, dtype=weights_dtype(device, mode=mode), device=device, log=log,
                                 merge=True)
    return Loaded(m, tokenizer, model, adapter, style, method, mode, headline)


def make_item(question: str, options: list[str], item_id: str = "asked",
              names: tuple[str, str] = ("--question", "--option")) -> MCQItem:
    """A question typed by a person, checked against the input limits. The answer index is a placeholder: an asked
    question has no gold answer, and nothing here reads it. `names`: how the question and the options were given
    (flags, or stdin's fields), for the message about text that is not valid Unicode."""
    from medtune.data.formats import not_unicode

    question = (question or "").strip()
    blank = sum(1 for o in options if not (o or "").strip())
    options = [o.strip() for o in options if o and o.strip()]
    if not question:
        raise MedtuneError("the question is empty")
    if len(question) > MAX_QUESTION_CHARS:
        raise MedtuneError(f"the question is {len(question)} characters; the limit is {MAX_QUESTION_CHARS}")
    if not MIN_OPTIONS <= len(options) <= MAX_OPTIONS:
        empty = f" ({blank} more empty)" if blank else ""
        raise MedtuneError(f"{len(options)} option(s) given{empty}; give between {MIN_OPTIONS} and {MAX_OPTIONS} "
                           "non-empty options")
    for i, text in enumerate(options):
        if len(text) > MAX_OPTION_CHARS:
            raise MedtuneError(f"option {LETTERS[i]} is {len(text)} characters; the limit is {MAX_OPTION_CHARS}")
    # a lone surrogate (undecodable bytes on the command line, or a JSON "\ud800") breaks the tokenizer: refused here
    for name, text in [(names[0], question), *((f"{names[1]} {LETTERS[i]}", o) for i, o in enumerate(options))]:
        problem = not_unicode(text)
        if problem:
            raise MedtuneError(f"{name}: {problem}")
    return MCQItem(id=item_id, question=question, options=tuple(options), answer=0)


def item_from_json(text: str) -> MCQItem:
    """A JSON item as medtune's JSONL files hold it: {"question": ..., "options": [...] or {"A": ..., "B": ...}}.
    Read as data files are (a duplicate key is refused); options keyed by letters keep their letters."""
    from medtune.data.formats import load_json

    try:
        raw = load_json(text)
    except json.JSONDecodeError as e:
        raise MedtuneError(f"stdin:{e.lineno}: not a JSON item ({e.msg} at column {e.colno})") from None
    except ValueError as e:  # a duplicate key, or a number of over 4,300 digits
        raise MedtuneError(f"stdin: {str(e)[:200]}; give each field once") from None
    except RecursionError:
        raise MedtuneError("stdin: nested too deeply; an item is a flat object") from None
    if not isinstance(raw, dict) or "question" not in raw or "options" not in raw:
        raise MedtuneError('stdin: expected {"question": "...", "options": ["...", "..."]}')
    if not isinstance(raw["question"], str):
        raise MedtuneError(f"stdin: question: expected text, got {type(raw['question']).__name__}")
    options = raw["options"]
    if isinstance(options, dict):  # the letter the user gave is the letter shown and answered, whatever the key order
        letters = sorted(options)
        if letters != list(LETTERS[: len(letters)]):
            raise MedtuneError(f"stdin: options: keys {', '.join(map(str, letters))[:200]}; key them A, B, C, ... "
                               f"in sequence from A (at most {MAX_OPTIONS}), or give a list")
        blank = [k for k in letters if isinstance(options[k], str) and not options[k].strip()]
        if blank:
            raise MedtuneError(f"stdin: options.{blank[0]}: empty; give every letter a text, or drop the last ones")
        options = [options[k] for k in letters]
    if not isinstance(options, list) or not all(isinstance(o, str) for o in options):
        raise MedtuneError("stdin: options: must be a list of strings or a {letter: text} mapping of strings")
    item_id = raw.get("id", "asked")
    if isinstance(item_id, bool) or not isinstance(item_id, (str, int)):
        raise MedtuneError(f"stdin: id: expected text or an integer, got {type(item_id).__name__}")
    return make_item(raw["question"], options, str(item_id), names=("stdin: question", "stdin: options"))


def answer(loaded: Loaded, item: MCQItem, max_new_tokens: int = MAX_NEW_TOKENS, explain: bool = True) -> dict:
    """The chosen letter, every option's probability (eval's scoring), and a greedy explanation of that choice."""
    from medtune.models import placement
    from medtune.prompts import build_prompt
    from medtune.scoring import score_items

    n_tokens = len(loaded.tokenizer(build_prompt(item, loaded.style, loaded.tokenizer), add_special_tokens=False)
                   .input_ids)
    if n_tokens + max_new_tokens > MAX_PROMPT_TOKENS:
        raise MedtuneError(f"the question and options are {n_tokens} tokens long; the limit is "
                           f"{MAX_PROMPT_TOKENS - max_new_tokens}")
    row = score_items(loaded.model, loaded.tokenizer, [item], loaded.style, loaded.method, loaded.mode,
                      batch_size=1)[0]
    choice = LETTERS.index(row["pred"])
    out = {"id": item.id, "answer": row["pred"], "answer_text": item.options[choice], "probs": row["probs"],
           "logprobs": row["logprobs"], "scoring": {"method": f"{loaded.method}-logprob", "mode": loaded.mode,
                                                    "prompt_style": loaded.style},
           "model": loaded.model_name, "adapter": loaded.adapter, "placement": placement(loaded.model)}
    if explain:
        text, capped = explanation(loaded, item, choice, max_new_tokens)
        out["explanation"], out["explanation_hit_cap"] = text, capped
        out["explanation_dtype"] = str(loaded.model.get_input_embeddings().weight.dtype).removeprefix("torch.")
    return out


def explanation(loaded: Loaded, item: MCQItem, choice: int, max_new_tokens: int) -> tuple[str, bool]:
    """Greedy continuation after the chosen answer line, in the format the model was trained on; (text, hit cap)."""
    from medtune.generate import greedy
    from medtune.prompts import build_prompt, build_target

    tok = loaded.tokenizer
    chosen = replace(item, answer=choice, explanation=None)
    if loaded.style == "seed":  # the seed's target: `B) text\n\n### Explanation:\n...`
        prefix = build_target(chosen, "seed").removesuffix("No explanation provided.")
    else:  # ` B. text\nExplanation: ...`, as prompts.build_target writes it for training
        prefix = build_target(chosen, loaded.style, "answer") + "\nExplanation:"
    text, capped = greedy(loaded.model, tok, [build_prompt(item, loaded.style, tok) + prefix], max_new_tokens)[0]
    return text.strip(), capped


def find_headline(model: str, adapter: str | None) -> dict | None:
    """Accuracy with its CI from the results.json that measured this adapter (RUN/tuned/results.json beside
    RUN/adapter) or this export (RUN/merged or RUN/export, whose medtune.json names the run)."""
    from medtune.models import read_meta
    from medtune.records import read_record

    candidates = [Path(adapter).parent / "tuned" / "results.json"] if adapter else []
    for d in (adapter, model):
        if d and (Path(d) / "medtune.json").is_file():
            run = read_meta(d).get("export", {}).get("run")
            if run and Path(d).resolve().parent.name == run:
                candidates.append(Path(d).resolve().parent / "tuned" / "results.json")
    for path in candidates:
        if path.is_file():
            return headline_of(read_record(path, "eval"), path)
    return None


def headline_of(results: dict, path: Path) -> dict:
    m = results["metrics"]
    out = {"results": str(path), "accuracy": m["accuracy"], "ci95": m["ci95"], "n": m["n"],
           "method": results.get("method"), "mode": results.get("mode"),
           "eval_set": (results.get("data") or {}).get("source")}
    if "permute" in m:
        out["debiased_accuracy"] = m["permute"]["debiased_accuracy"]
    return out


def render(result: dict) -> str:
    """The terminal view of one answer."""
    from medtune.report import DISCLAIMER

    s = result["scoring"]
    lines = [f"answer: {result['answer']}. {result['answer_text']}",
             f"probabilities ({s['method']}, {s['mode']} mode, {s['prompt_style']} prompt):"]
    for letter, p in result["probs"].items():
        lines.append(f"  {letter} {p:6.1%} {'#' * round(p * 40)}")
    if "explanation" in result:
        cap = " [hit the length cap]" if result["explanation_hit_cap"] else ""
        lines.append(f"explanation: {result['explanation']}{cap}")
    lines.append(DISCLAIMER)
    return "\n".join(lines)
