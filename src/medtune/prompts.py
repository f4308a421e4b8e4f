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

import functools
import re
import threading
import time

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
    import jinja2

    # enable_thinking=False turns Qwen3's thinking off; other templates ignore the extra variable.
    options = {"add_generation_prompt": True, "enable_thinking": False}
    name = getattr(tokenizer, "name_or_path", None) or "the tokenizer"
    try:
        template = tokenizer.get_chat_template()
        # A template is code from the model's files: render it once under a budget, with the same inputs, before
        # transformers renders it (its sandbox stops escapes, not a 10^5 x 10^5 loop). Same inputs, same path.
        render_bounded(template, messages, {**tokenizer.special_tokens_map, **options})
        return tokenizer.apply_chat_template(messages, tokenize=False, **options)
    except jinja2.TemplateError as e:  # syntax, raise_exception, undefined, sandbox violations, includes, budget
        detail = str(e).strip().splitlines()[0][:300] if str(e).strip() else ""
        raise MedtuneError(f"{name}: its chat template failed ({type(e).__name__}: {detail}); fix chat_template in "
                           "its tokenizer_config.json or use --prompt-style harness") from None
    except RecursionError:
        raise MedtuneError(f"{name}: its chat template recurses without end; fix chat_template in its "
                           "tokenizer_config.json or use --prompt-style harness") from None


# The render budget. Steps: every loop iteration and every macro call in a template counts one (the embedded model's
# template takes < 100 per prompt); a 10^5 x 10^5 loop stops in a tenth of a second. Size: the rendered text, every
# `~` join, every `*` repetition and every integer a filter or method gets (a width, a count) stay under
# TEMPLATE_MAX_CHARS, so a string that doubles in a loop stops at 10 MB, not at the machine's memory.
TEMPLATE_STEPS = 100_000
TEMPLATE_SECONDS = 2.0
TEMPLATE_MAX_CHARS = 10_000_000


def render_bounded(template: str, messages: list[dict], variables: dict) -> str:
    _BUDGET.steps, _BUDGET.deadline = 0, time.monotonic() + TEMPLATE_SECONDS  # per thread: serve renders in several
    return _bounded_template(template).render(messages=messages, tools=None, documents=None, **variables)


_BUDGET = threading.local()


@functools.lru_cache(maxsize=8)
def _bounded_template(template: str):
    import jinja2
    from transformers.utils.chat_template_utils import _compile_jinja_template

    # transformers' sandbox (its filters, globals, extensions) from an empty template: compiling this one there would
    # fold constants such as 'x' * 10**10 at compile time, before any budget applies.
    base = _compile_jinja_template("").environment
    env = _bounded_env_class()(trim_blocks=True, lstrip_blocks=True, loader=jinja2.DictLoader({}),  # no includes
                               extensions=[type(ext) for ext in base.extensions.values()])
    env.filters.update({name: _sized(f) for name, f in base.filters.items()})
    env.globals.update(base.globals)
    return env.from_string(template)


def _too_big(what: str):
    from jinja2.exceptions import SecurityError

    return SecurityError(f"{what} over {TEMPLATE_MAX_CHARS} characters; a chat prompt is a few thousand")


def _check_sizes(args, kwargs) -> None:
    for v in (*args, *kwargs.values()):
        if isinstance(v, int) and abs(v) > TEMPLATE_MAX_CHARS:
            raise _too_big(f"a width or count of {v} would build text")


def _sized(f):
    """A filter that refuses a huge integer argument (`center(10**9)`, `indent(10**9)`); keeps jinja's pass_* mark."""
    @functools.wraps(f)
    def checked(*args, **kwargs):
        _check_sizes(args, kwargs)
        return f(*args, **kwargs)
    return checked


def _joined(parts, join=None) -> str:
    out, n = [], 0
    for part in parts:
        n += len(part) if isinstance(part, str) else 0
        if n > TEMPLATE_MAX_CHARS:
            raise _too_big("the rendered text is")
        out.append(part)
    return (join or "".join)(out)


@functools.cache
def _bounded_env_class():
    """An ImmutableSandboxedEnvironment whose compiled templates call `environment.step()` first in every loop body
    and every function (macro) body, join text through `_joined`, and refuse huge `*` and `**`. Built on first use:
    jinja2 is imported only for the chat style."""
    import ast

    from jinja2 import runtime
    from jinja2.exceptions import SecurityError
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    step = ast.parse("environment.step()").body[0]
    rebind = ast.parse("str_join = environment.str_join\nmarkup_join = environment.markup_join").body

    class Steps(ast.NodeTransformer):
        def _visit_body(self, node):
            self.generic_visit(node)
            node.body.insert(0, ast.copy_location(ast.Expr(step.value), node))
            return node

        visit_For = visit_AsyncFor = visit_While = visit_FunctionDef = visit_AsyncFunctionDef = _visit_body

    class Bounded(ImmutableSandboxedEnvironment):
        intercepted_binops = frozenset({"*", "**"})
        concat = staticmethod(_joined)  # the rendered text and every {% set %} / macro buffer
        str_join = staticmethod(lambda seq: _joined(map(str, seq)))  # `a ~ b`
        markup_join = staticmethod(lambda seq: _joined(seq, runtime.markup_join))

        def _compile(self, source: str, filename: str):
            tree = Steps().visit(ast.parse(source, filename))
            tree.body[1:1] = rebind  # after `from jinja2.runtime import ...`: `~` joins through the sized helpers
            return compile(ast.fix_missing_locations(tree), filename, "exec")

        def step(self) -> None:
            _BUDGET.steps += 1
            if _BUDGET.steps > TEMPLATE_STEPS or (_BUDGET.steps % 1024 == 0 and time.monotonic() > _BUDGET.deadline):
                raise SecurityError(f"rendering took over {TEMPLATE_STEPS} loop steps or {TEMPLATE_SECONDS:g} s; "
                                    "a chat template renders one conversation in a few hundred")

        def call(self, context, obj, /, *args, **kwargs):
            _check_sizes(args, kwargs)  # 'x'.center(10**9)
            return super().call(context, obj, *args, **kwargs)

        def call_binop(self, context, operator, left, right):
            if operator == "**" and isinstance(right, (int, float)) and abs(right) > 1024:
                raise SecurityError(f"exponent {right} is too large for a chat template")
            if operator == "*":
                for seq, n in ((left, right), (right, left)):
                    if isinstance(seq, (str, list, tuple)) and isinstance(n, int) and len(seq) * n > TEMPLATE_MAX_CHARS:
                        raise _too_big("a repetition builds")
            return super().call_binop(context, operator, left, right)

    return Bounded


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
                           f"{budget} (train.max_length in training; in evaluation, the context the model takes: its "
                           "config.json's positions, less the room for the answer): its options are too long to fit; drop "
                           "the item or use a model with a longer context")
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


CHARS_PER_TOKEN = 3.0  # a conservative estimate for English medical text (real BPE tokenizers: ~3.5-4.5)


def overlong_warnings(items: list[MCQItem], max_length: int, tokenizer=None, tokenizer_name: str = "") -> list[str]:
    """One warning per item whose prompt + answer is over `max_length` tokens (counted with `tokenizer`, or estimated
    from characters without one): such items get their question cut from the left (fit_prompt above)."""
    def text(it: MCQItem) -> str:
        return build_prompt(it, "harness") + build_target(it, "harness")

    if tokenizer is not None:
        lengths = [_count(tokenizer, text(it)[: max_length * MAX_CHARS_PER_TOKEN]) for it in items]
        how = f"tokens ({tokenizer_name} tokenizer)"
    else:
        lengths = [round(len(text(it)) / CHARS_PER_TOKEN) for it in items]
        how = f"tokens (estimated at {CHARS_PER_TOKEN:g} characters per token; pass --model for exact counts)"
    over = [(it.id, n) for it, n in zip(items, lengths) if n > max_length]
    lines = [f"warning: item {i}: about {n} {how}, over the limit of {max_length}; its question will be cut from "
             "the left in training and evaluation" for i, n in over[:20]]
    if len(over) > 20:
        lines.append(f"warning: ... and {len(over) - 20} more items over {max_length} tokens")
    return lines


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
