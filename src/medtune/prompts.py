"""Named prompt styles. One style is chosen per run and used identically for training and evaluation.

harness  the lm-evaluation-harness text for the item's benchmark (`Question: ...\\nA. ...\\nAnswer:`), scored on the
         continuations " A", " B", ...; the default, so numbers compare with published harness numbers. PubMedQA is
         lm-eval's `pubmedqa` task: `Abstract: ...\\nQuestion: ...\\nAnswer:` scored on " yes", " no", " maybe" (its
         options are not lettered: the model is scored on what the harness scores).
chat     the model's chat template: the question as the user turn, the answer as the assistant turn (thinking off for
         templates that have it, e.g. Qwen3); scored on the continuations "A", "B", ... after the generation prompt.
seed     the seed project's text (`### Question:` / `### Options:` with `A) ...` / `### Answer:`), for reproducing it;
         its target is `B) text\n\n### Explanation:\n...`, scored on the continuations "A", "B", ...

The training target is `<letter>. <option text>` (the bare continuation, e.g. ` yes`, where options are not lettered), then `\\nExplanation: ...` when the item has one, then EOS.
"""

from __future__ import annotations

import re

from medtune.data.items import LETTERS, MCQItem
from medtune.errors import MedtuneError

STYLES = ("harness", "chat", "seed")
CHAT_INSTRUCTION = ("Answer the following multiple-choice question with the letter of the correct option, "
                    "then explain briefly.")
MMLU_SUBJECT = "The following are multiple choice questions (with answers) about {}.\n\n"


def check_style(style: str) -> str:
    if style not in STYLES:
        raise MedtuneError(f"unknown prompt style {style!r}; choose one of: {', '.join(STYLES)}")
    return style


def question_block(item: MCQItem) -> str:
    """`Question: ...\\nA. ...\\nB. ...` exactly as lm-evaluation-harness writes it for the item's benchmark."""
    options = "".join(f"{LETTERS[i]}. {text}\n" for i, text in enumerate(item.options))
    if item.benchmark == "medmcqa":
        return f"Question: {item.question}\nChoices:\n{options}"
    if item.benchmark == "mmlu":
        header = MMLU_SUBJECT.format(item.subject.replace("_", " ")) if item.subject else ""
        return f"{header}{item.question.strip()}\n{options}"
    if item.benchmark == "pubmedqa":  # the item text already reads `Abstract: ...\nQuestion: ...`
        return f"{item.question}\n{options}"
    return f"Question: {item.question}\n{options}"


def lettered(item: MCQItem, style: str) -> bool:
    """Whether options are shown and scored as letters. lm-eval's pubmedqa lists no options and scores the words."""
    return not (style == "harness" and item.benchmark == "pubmedqa")


def build_prompt(item: MCQItem, style: str, tokenizer=None) -> str:
    if not lettered(item, style):
        return f"{item.question}\nAnswer:"
    if style == "harness":
        return question_block(item) + "Answer:"
    if style == "seed":
        options = "\n".join(f"{LETTERS[i]}) {text}" for i, text in enumerate(item.options))
        return f"### Question:\n{item.question}\n\n### Options:\n{options}\n\n### Answer:\n"
    return _chat(tokenizer, [{"role": "user", "content": f"{CHAT_INSTRUCTION}\n\n{question_block(item).rstrip()}"}])


def choices(item: MCQItem, style: str, method: str = "letter") -> list[str]:
    """Each option's scored text without the delimiter before it, as lm-eval's `doc_to_choice`: "A" (letter), "A. text"
    (the answer line), or the option itself where options are not lettered ("yes", "no", "maybe")."""
    if not lettered(item, style):
        return list(item.options)
    if method == "answer":
        return [f"{LETTERS[i]}. {text}" for i, text in enumerate(item.options)]
    return [LETTERS[i] for i in range(len(item.options))]


def continuations(item: MCQItem, style: str, method: str = "letter") -> list[str]:
    """The text scored for each option: " A" after `Answer:` (harness), "A" after the assistant header (chat)."""
    space = " " if style == "harness" else ""
    return [space + c for c in choices(item, style, method)]


def build_target(item: MCQItem, style: str, target: str = "answer+explanation") -> str:
    """The completion the model learns (EOS is appended as a token by the tokenizing code, not as text)."""
    if style == "seed":  # the seed's own target, explanation placeholder included
        return (f"{item.gold_letter}) {item.options[item.answer]}\n\n### Explanation:\n"
                f"{item.explanation or 'No explanation provided.'}")
    text = continuations(item, style, "answer")[item.answer]
    explanation = clean_explanation(item.explanation) if target == "answer+explanation" else None
    return text + (f"\nExplanation: {explanation}" if explanation else "")


_LETTER_REF = re.compile(
    r"^\s*(?:ans(?:wer)?\.?\s*(?:is|:|-|–)?\s*)?(?:option\s*)?[\(\[\"'‘’]?\s*[a-e]\s*[\)\]\"'‘’]?\s*(?:i\s*\.?\s*e\.?,?|[.:,\-–)])\s*",
    re.IGNORECASE,
)


def clean_explanation(text: str | None) -> str | None:
    """Drop a leading letter reference ("Ans. is 'c' i.e., ...", "Ans-a. ...") that would be wrong once options are
    shuffled; the rest of the explanation is kept as written."""
    if not text:
        return None
    head = text.lstrip()
    if re.match(r"^(ans|answer|option|\(?[a-e][\).])", head, re.IGNORECASE):
        head = _LETTER_REF.sub("", head, count=1)
    head = head.strip()
    return head or None


def _chat(tokenizer, messages: list[dict]) -> str:
    if tokenizer is None or not getattr(tokenizer, "chat_template", None):
        raise MedtuneError("prompt style 'chat' needs a tokenizer with a chat template; use --prompt-style harness")
    # enable_thinking=False turns Qwen3's thinking off; other templates ignore the extra variable.
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True, enable_thinking=False)


# Overlong items: one rule for training and evaluation (train.py and evaluate.py both call fit_prompt).
# The question text (a vignette, or PubMedQA's "Abstract: ... Question: ..." context) is cut from the LEFT, marked with
# CUT_MARK, until the prompt fits the token budget. The prompt template's header ("Question:", the MMLU subject line),
# every option and the answer are never cut; if they alone do not fit, the item is refused with the numbers.
CUT_MARK = "... "
MAX_CHARS_PER_TOKEN = 64  # a generous bound: text longer than budget * this is pre-cut before tokenizing (no 5 MB pass)


def fit_prompt(item: MCQItem, style: str, tokenizer, budget: int) -> tuple[MCQItem, str, int]:
    """(item, prompt, characters cut from the question's start) with the prompt at most `budget` tokens long."""
    prompt = build_prompt(item, style, tokenizer)
    if len(prompt.encode("utf-8")) <= budget or _count(tokenizer, prompt) <= budget:  # tokens <= UTF-8 bytes
        return item, prompt, 0
    bare = _count(tokenizer, build_prompt(_with_question(item, CUT_MARK), style, tokenizer))
    keep = budget - bare
    if keep < 1:
        raise MedtuneError(f"item {item.id}: the prompt without its question text is {bare} tokens, over the limit of "
                           f"{budget}; its options are too long to fit (raise train.max_length or drop the item)")
    tail = item.question[-budget * MAX_CHARS_PER_TOKEN:]
    ids = tokenizer(tail, add_special_tokens=False).input_ids
    for _ in range(4):  # re-tokenizing the joined text can merge tokens differently: shrink until it fits
        question = CUT_MARK + tokenizer.decode(ids[-keep:] if keep > 0 else [], skip_special_tokens=True).lstrip()
        fitted = _with_question(item, question)
        prompt = build_prompt(fitted, style, tokenizer)
        over = _count(tokenizer, prompt) - budget
        if over <= 0:
            return fitted, prompt, len(item.question) - (len(question) - len(CUT_MARK))
        keep -= over
    raise MedtuneError(f"item {item.id}: could not fit the prompt into {budget} tokens")


DEFAULT_CONTEXT = 8192  # when the tokenizer does not state its model's context length


def context_limit(tokenizer) -> int:
    """Tokens an evaluation prompt + continuation may take: the tokenizer's model_max_length (transformers sets a huge
    placeholder when the model card gives none; then DEFAULT_CONTEXT)."""
    n = getattr(tokenizer, "model_max_length", None)
    return int(n) if isinstance(n, int) and 0 < n < 1_000_000 else DEFAULT_CONTEXT


def _count(tokenizer, text: str) -> int:
    return len(tokenizer(text, add_special_tokens=False).input_ids)


def _with_question(item: MCQItem, question: str) -> MCQItem:
    from dataclasses import replace

    return replace(item, question=question)
