r"""Read the chosen letter out of generated text. Never guesses: text it can't read gives letter=None.

Rules, in priority order (the first that applies decides):

 1. Clean up: Unicode NFKC (full-width "Ａ" → "A", "：" → ":"), drop zero-width characters and special tokens
    ("</s>", "<|im_end|>", "<eos>", …), markdown emphasis/code ("**B**" → "B"), outer whitespace, and a made-up
    next few-shot question ("B\n\nQuestion: … Answer: C" keeps "B"; text that opens with "Question" is a prompt
    echo and is kept whole). Empty after clean-up → None, "empty".
 2. Explicit statements anywhere: "the answer is C", "Answer: (C)", "Final answer: C", "correct option is (C)",
    "option C is correct", "(C) is the correct answer", "I choose C", "I think it's C", "\boxed{C}", "答案是C".
    Reason "answer-prefix" when an "answer …" statement opens the text, else "explicit". Statements naming two
    different letters, or "answer is A or B" → None, "multiple-letters". A lowercase "a"/"i" counts only when
    nothing but punctuation follows it ("the answer is a." yes, "the answer is a bit unclear" no); "I" followed
    by a lowercase word is the pronoun. A letter that starts an option listing ("Answer:\nA. x\nB. y") is not a
    statement. If a leading letter (rule 4) names another letter, the explicit one wins and ambiguous=True.
 3. Letter lists without a statement: "A or B", "Both A and C are correct", "either B or D" → None,
    "multiple-letters".
 4. A leading letter token, after an optional "Answer:"/"Option" prefix and "(" or "[": "B. Metformin", "B)",
    "(B)", "[B]", "B:", "B\n…", "B" alone, "B - …" → "leading-letter". It must stand alone: "Because …" and
    "B-cell" are words. A letter followed by a space and a word is an answer only if the word is one of
    is/because/since/seems/appears/fits/explains, or (for letters other than A and I) a capitalised word; so
    "A 45-year-old man" (article), "I think" (pronoun) and "B cells" are not answers. Text that begins with an
    option listing ("A. x\nB. y", a prompt echo) is not an answer either. With `options`, a leading letter whose
    text names a different option ("B. Insulin" where B is Metformin) keeps the letter with ambiguous=True.
 5. If `options` are given and the text is not a prompt echo: the text starts with exactly one option's text
    (case-insensitive, whitespace normalised), or else its first sentence contains exactly one → "option-text".
    A first sentence with a negation ("not", "unlikely", …) matches nothing. An option nested in a longer
    matching one ("Insulin" in "Insulin glargine") yields to it. Several options → None, "multiple-options".
 6. Refusals ("I cannot provide medical advice", "I'm not sure", "consult a doctor") → None, "refusal".
 7. Otherwise None, "no-letter". Any letter beyond the options (A..A+n−1), e.g. "E" with 4 options, gives None,
    "out-of-range".
"""

from __future__ import annotations

import re
import unicodedata
from dataclasses import dataclass

LETTERS = "ABCDEFGHIJKLMNOPQRSTUVWXYZ"


@dataclass(frozen=True)
class ParseResult:
    letter: str | None  # "A", "B", …; None when the text doesn't name exactly one letter within the options
    reason: str  # which rule decided: answer-prefix, explicit, leading-letter, option-text, multiple-letters, ...
    ambiguous: bool = False  # the text also points elsewhere (two letters, a conflicting leading letter)


def parse_answer(text: str, n_options: int = 4, options: list[str] | None = None) -> ParseResult:
    """Parse one generated answer; see the module docstring for the rules. `options`, when given, sets n_options."""
    n = len(options) if options is not None else n_options
    if not 1 <= n <= len(LETTERS):
        raise ValueError(f"n_options must be between 1 and {len(LETTERS)}, got {n}")
    clean = _cut_continuation(_clean(text))
    if not clean:
        return ParseResult(None, "empty")
    lead = _leading_letter(clean)
    found = _explicit(clean)
    if found:
        letters = {letter for _, letter, _ in found}
        if len(letters) > 1 or any(multi for _, _, multi in found):
            return ParseResult(None, "multiple-letters", True)
        letter = letters.pop()
        if LETTERS.index(letter) >= n:
            return ParseResult(None, "out-of-range")
        opening = _ANSWER_PREFIX.match(clean)
        reason = "answer-prefix" if opening and found[0][0] < opening.end() else "explicit"
        return ParseResult(letter, reason, lead is not None and lead != letter)
    if _MULTI.search(clean):
        return ParseResult(None, "multiple-letters", True)
    if lead is not None:
        if LETTERS.index(lead) >= n:
            return ParseResult(None, "out-of-range")
        return ParseResult(lead, "leading-letter", _conflicts_with_option_text(clean, lead, options))
    if options and not _is_echo(clean):
        matched = _option_text_match(clean, options)
        if len(matched) == 1:
            return ParseResult(LETTERS[matched[0]], "option-text")
        if len(matched) > 1:
            return ParseResult(None, "multiple-options", True)
    if _REFUSAL.search(clean):
        return ParseResult(None, "refusal")
    return ParseResult(None, "no-letter")


def contradiction(letter: str | None, explanation: str, options: list[str] | None = None) -> bool:
    """True when `explanation` explicitly states a different answer than `letter`.

    Counts explicit letter statements (rule 2: "the answer is B", "option B is correct") and, with `options`,
    statements of an option's text ("the answer is metformin", "metformin is the correct answer"). No chosen
    letter means nothing to contradict.
    """
    if letter is None:
        return False
    clean = _clean(explanation)
    named = {found for _, found, _ in _explicit(clean)}
    for i, opt in enumerate(options or []):
        o = re.escape(_norm(opt))
        stated = rf"answer\s*(?:is\b|:)\s*{o}(?![a-z0-9])|(?<![a-z0-9]){o}\s+is\s+the\s+(?:correct|right|best)"
        if o and re.search(stated, _norm(clean)):
            named.add(LETTERS[i])
    return any(found != letter.upper() for found in named)


# --- rule 1: clean-up ---------------------------------------------------------------------------------------

_SPECIAL_TOKENS = re.compile(r"</?s>|<\|[^<>|]{1,40}\|>|<(?:eos|bos|pad)>|</?(?:start|end)_of_turn>")
_MARKDOWN = re.compile(r"\*+|`+|(?<![A-Za-z0-9])_{1,2}|_{1,2}(?![A-Za-z0-9])")


def _clean(text: str) -> str:
    text = unicodedata.normalize("NFKC", text)
    text = re.sub(r"[\u200b-\u200d\u2060\ufeff]", "", text).replace("\u2019", "'")
    text = _MARKDOWN.sub("", _SPECIAL_TOKENS.sub("", text))
    # one whitespace character per run ("\n" if the run has a line break): keeps the patterns' \s* linear
    return re.sub(r"\s+", lambda m: "\n" if "\n" in m.group() else " ", text).strip()


def _cut_continuation(text: str) -> str:
    r"""Drop a made-up next few-shot question ("B\n\nQuestion: … Answer: C"); a whole prompt echo is kept."""
    if re.match(r"question\b", text, re.IGNORECASE):
        return text
    m = re.search(r"\n\s*(?:question|q)\s*\d*\s*:", text, re.IGNORECASE)
    return text[:m.start()].strip() if m else text


# --- rule 2: explicit statements ----------------------------------------------------------------------------

# A letter, optionally in brackets, that is not the start or end of a longer token ("B-cell", "Cx", "C's").
_LET = r"[\(\[]?\s*(?P<letter>[A-Za-z])\s*[\)\]]?(?![A-Za-z0-9']|-[A-Za-z0-9])"
_ADV = r"(?:(?:(?:most\s+)?likely|probably|clearly|therefore|thus|definitely)\s+)?"
_EXPLICIT = [re.compile(p, re.IGNORECASE) for p in (
    # "the answer is C", "Correct answer: (C)", "final answer = C", "the best option is C", "answer would be option C"
    (rf"\b(?:answer|option|choice)\s*(?:is|was|would\s+be|should\s+be|will\s+be|must\s+be|=|:|-)\s*:?\s*{_ADV}"
     rf"(?:(?:option|choice|letter)\s*:?\s*)?{_LET}"),
    # "option C is correct", "choice (B) is the best answer"
    rf"\b(?:option|choice|letter)\s*{_LET}\s+is\s+(?:the\s+)?(?:most\s+)?(?:correct|right|best|answer|true)",
    # "(C) is the correct answer": brackets required, or "Vitamin C is the correct ..." would count
    r"[\(\[](?P<letter>[A-Za-z])[\)\]]\s+is\s+(?:the\s+)?(?:most\s+)?(?:correct|right|best|answer|true)",
    # "I choose C", "I would go with (B)", "I'll pick option D"
    rf"\bI(?:'ll|\s+will|\s+would)?\s+(?:choose|pick|select|go\s+with)\s+(?:option|choice|answer)?\s*{_LET}",
    # "I think it's B", "I believe it is (C)"
    rf"\bI\s+(?:think|believe)\s+(?:that\s+)?(?:it's|it\s+is|it\s+would\s+be)\s+(?:option\s+)?{_LET}",
    r"\\boxed\{\s*(?:\\text\{)?\s*\(?(?P<letter>[A-Za-z])\)?\s*\}?\s*\}",
    rf"答案\s*(?:应该是|應該是|是|为|為)?\s*:?\s*{_LET}",
)]
# After a statement's letter: "or B", ", D", "and (C)" means the statement names several letters.
_TAIL_LETTER = re.compile(r"\s*(?:,|/|&|\bor\b|\band\b)\s*(?:option\s*)?[\(\[]?(?P<letter>[A-Za-z])[\)\]]?"
                          r"(?![A-Za-z0-9']|-[A-Za-z0-9])", re.IGNORECASE)
_ANSWER_PREFIX = re.compile(r"[\W_]*(?:the\s+)?(?:(?:correct|final|best|right)\s+)?(?:answer\b|答案)", re.IGNORECASE)
_TERMINATED = re.compile(r"\s*(?:$|[.,;:!?)\]\n])")


def _explicit(text: str) -> list[tuple[int, str, bool]]:
    """(position, letter, names-several-letters) for each explicit statement, in text order."""
    found = []
    for pattern in _EXPLICIT:
        for m in pattern.finditer(text):
            letter, end = m.group("letter"), m.end("letter")
            if not _is_letter_token(text, letter, end) or _starts_listing(text, m.start("letter")):
                continue
            tail = _TAIL_LETTER.match(text, m.end())
            multi = bool(tail and tail.group("letter").isupper() == letter.isupper()
                         and _is_letter_token(text, tail.group("letter"), tail.end("letter"))
                         and tail.group("letter").upper() != letter.upper())
            found.append((m.start(), letter.upper(), multi))
    return sorted(found)


def _is_letter_token(text: str, letter: str, end: int) -> bool:
    """Reject the words hiding in letters: lowercase "a"/"i" unless only punctuation follows, pronoun "I"."""
    if letter in "ai":
        return bool(_TERMINATED.match(text, end))
    if letter == "I":
        return not re.match(r"\s+[a-z]", text[end:])
    return True


def _starts_listing(text: str, pos: int) -> bool:
    """True if an option listing starts at pos: a line "X. …" / "X) …" whose next non-empty line is "Y. …", Y = X+1."""
    m = re.match(r"([A-Z])[.)][^\n]*\n\s*([A-Z])[.)]", text[pos:])
    return bool(m) and ord(m.group(2)) == ord(m.group(1)) + 1


# --- rule 3: letter lists -----------------------------------------------------------------------------------

_L = r"[\(\[]?[A-Z][\)\]]?"
_SEP = r"\s*(?:,|/|&|(?i:or)|(?i:and))\s*(?:(?i:option)\s+)?"
_END = r"(?![A-Za-z0-9']|-[A-Za-z0-9])"
_MULTI = re.compile(
    rf"^{_L}{_SEP}{_L}{_END}"  # "A or B" opening the text
    rf"|(?i:\b(?:both|either|options|choices))\s+{_L}{_SEP}{_L}{_END}"  # "Both A and C", "either B or D"
    rf"|(?<![A-Za-z0-9]){_L}{_SEP}{_L}\s+(?i:are|could|may|might|seem|both)\b"  # "A and C are correct"
)


# --- rule 4: leading letter ---------------------------------------------------------------------------------

_PREFIX = re.compile(r"^[\s#>\"']*(?:(?:the\s+)?(?:correct\s+|final\s+|best\s+|right\s+)?answer\b\s*(?:is\b|:)?\s*)?"
                     r"(?:(?:option|choice)\s+)?[\(\[]?\s*", re.IGNORECASE)
_ANSWER_WORDS = {"is", "because", "since", "seems", "appears", "fits", "explains"}


def _leading_letter(text: str) -> str | None:
    """The letter the text opens with, if it stands alone as an answer (rule 4); else None."""
    pos = _PREFIX.match(text).end()
    if pos >= len(text) or not text[pos].isascii() or not text[pos].isalpha() or _starts_listing(text, pos):
        return None
    letter, rest = text[pos], text[pos + 1:]
    if not rest or rest[0] == "\n":
        return letter.upper()
    if rest[0].isascii() and (rest[0].isalnum() or rest[0] == "'" or re.match(r"-[A-Za-z0-9]", rest)):
        return None  # part of a word: "Because", "B12", "I'm", "B-cell"
    if letter.islower():  # "b." / "c)" yes; "a patient" no
        return letter.upper() if _TERMINATED.match(rest) else None
    if not rest[0].isspace():
        return letter  # punctuation or a non-Latin character: "B.", "B)", "B:", "B因为"
    word = rest.lstrip(" \t")
    if not word or word[0] == "\n" or not (word[0].isascii() and word[0].isalnum()):
        return letter  # "B - Metformin", "B (Metformin)"
    first = re.match(r"[A-Za-z0-9]+", word).group(0)
    if first in _ANSWER_WORDS or (first[0].isupper() and letter not in "AI"):
        return letter
    return None  # "A 45-year-old", "A patient", "I think", "B cells"


def _conflicts_with_option_text(text: str, letter: str, options: list[str] | None) -> bool:
    """True if the text after the leading letter starts with a different option's text ("B. Insulin", B = Metformin)."""
    if not options:
        return False
    rest = _norm(re.sub(r"^\W*[A-Za-z]\W*", "", _PREFIX.sub("", text, count=1), count=1))
    starts = _longest_only([i for i, o in enumerate(options) if _norm(o) and _starts_with(rest, _norm(o))], options)
    return bool(starts) and LETTERS.index(letter) not in starts


# --- rule 5: option text ------------------------------------------------------------------------------------

_NEGATION = {"not", "no", "never", "unlikely", "avoid", "contraindicated", "instead", "rather", "incorrect", "wrong"}


def _option_text_match(text: str, options: list[str]) -> list[int]:
    """Indices of options the text opens with, else those its first sentence states; none if that sentence negates."""
    norm_opts = [_norm(o) for o in options]
    sentence = _norm(re.split(r"(?<=[.!?])\s|\n", text, maxsplit=1)[0])
    negations = _NEGATION - set(norm_opts)  # PubMedQA's "no" is an option, not a negation
    if negations & set(re.findall(r"[a-z']+", sentence)):
        return []
    body = _norm(text)
    starts = [i for i, o in enumerate(norm_opts) if o and _starts_with(body, o)]
    if starts:
        return _longest_only(starts, options)
    within = [i for i, o in enumerate(norm_opts) if o and re.search(rf"(?<![a-z0-9]){re.escape(o)}(?![a-z0-9])",
                                                                    sentence)]
    return _longest_only(within, options)


def _longest_only(indices: list[int], options: list[str]) -> list[int]:
    """Drop options whose text lies inside another matched option's text ("insulin" inside "insulin glargine")."""
    texts = {i: _norm(options[i]) for i in indices}
    return [i for i in indices if not any(j != i and texts[i] in texts[j] and texts[i] != texts[j] for j in indices)]


def _starts_with(body: str, option: str) -> bool:
    return body.startswith(option) and not body[len(option):len(option) + 1].isalnum()


def _norm(s: str) -> str:
    return " ".join(s.lower().split()).rstrip(".")


def _is_echo(text: str) -> bool:
    """A repeated prompt: it opens with "Question" or contains an option listing."""
    if re.match(r"question\b", text, re.IGNORECASE):
        return True
    return any(_starts_listing(text, m.start(1)) for m in re.finditer(r"(?m)^[ \t]*([A-Z])[.)]", text))


# --- rule 6: refusals ---------------------------------------------------------------------------------------

_REFUSAL = re.compile(
    r"\bi\s*(?:cannot|can't|can\s+not|am\s+unable\s+to|'m\s+unable\s+to|won't)\s+"
    r"(?:provide|give|offer|answer|help|determine|diagnose|choose)"
    r"|\bnot\s+(?:sure|certain)\b|\bi\s+don'?t\s+know\b|\bmedical\s+advice\b|\bas\s+an\s+ai\b"
    r"|\bconsult\s+(?:a|your|with\s+a)\s+(?:doctor|physician|healthcare|medical|qualified)",
    re.IGNORECASE,
)
