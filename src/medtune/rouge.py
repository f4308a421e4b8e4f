"""ROUGE-L of generated explanations, as rouge_score 0.1.2 computes it with `use_stemmer=True`, without its
dependencies (absl-py, nltk, joblib, ...): the F-measure of the longest common subsequence of tokens.

Tokens: lowercase, every run of non-alphanumerics -> one space, split; words over 3 characters go through NLTK's
Porter stemmer in its default NLTK_EXTENSIONS mode, ported below rule for rule (nltk/stem/porter.py).
tests/test_rouge.py holds values computed by rouge_score itself. Kept out of stats.py for its length; torch-free.
"""

from __future__ import annotations

import re
from itertools import pairwise


def rouge_l(reference: str, candidate: str) -> float:
    """ROUGE-L F-measure of `candidate` against `reference` (0.0 when either has no tokens)."""
    ref, can = _rouge_tokens(reference), _rouge_tokens(candidate)
    if not ref or not can:
        return 0.0
    lcs = _lcs_length(ref, can)
    precision, recall = lcs / len(can), lcs / len(ref)
    return 2 * precision * recall / (precision + recall) if precision + recall > 0 else 0.0


def _rouge_tokens(text: str) -> list[str]:
    words = re.sub(r"[^a-z0-9]+", " ", text.lower()).split()
    return [porter_stem(w) if len(w) > 3 else w for w in words]


def _lcs_length(a: list[str], b: list[str]) -> int:
    previous = [0] * (len(b) + 1)  # one row of the dynamic-programming table at a time
    for x in a:
        current = [0]
        for j, y in enumerate(b):
            current.append(previous[j] + 1 if x == y else max(previous[j + 1], current[j]))
        previous = current
    return previous[-1]


_IRREGULAR = {"skies": "sky", "sky": "sky", "dying": "die", "lying": "lie", "tying": "tie", "news": "news",
              "innings": "inning", "inning": "inning", "outings": "outing", "outing": "outing",
              "cannings": "canning", "canning": "canning", "howe": "howe", "proceed": "proceed",
              "exceed": "exceed", "succeed": "succeed"}
# (suffix, replacement) per step; the first suffix that matches decides, whether or not its condition holds
_STEP2 = [("ational", "ate"), ("tional", "tion"), ("enci", "ence"), ("anci", "ance"), ("izer", "ize"),
          ("bli", "ble"), ("alli", "al"), ("entli", "ent"), ("eli", "e"), ("ousli", "ous"), ("ization", "ize"),
          ("ation", "ate"), ("ator", "ate"), ("alism", "al"), ("iveness", "ive"), ("fulness", "ful"),
          ("ousness", "ous"), ("aliti", "al"), ("iviti", "ive"), ("biliti", "ble"), ("fulli", "ful"), ("logi", "log")]
_STEP3 = [("icate", "ic"), ("ative", ""), ("alize", "al"), ("iciti", "ic"), ("ical", "ic"), ("ful", ""), ("ness", "")]
_STEP4 = ["al", "ance", "ence", "er", "ic", "able", "ible", "ant", "ement", "ment", "ent", "ion", "ou", "ism", "ate",
          "iti", "ous", "ive", "ize"]


def porter_stem(word: str) -> str:
    """NLTK's PorterStemmer().stem (NLTK_EXTENSIONS mode) for a lowercase word."""
    if word in _IRREGULAR:
        return _IRREGULAR[word]
    if len(word) <= 2:
        return word
    for step in (_step1a, _step1b, _step1c, _step2, _step3, _step4, _step5):
        word = step(word)
    return word


def _consonants(word: str) -> list[bool]:
    """Per letter: consonant? A 'y' is a consonant at the start or after a vowel."""
    flags: list[bool] = []
    for i, ch in enumerate(word):
        flags.append(ch not in "aeiou" and (ch != "y" or i == 0 or not flags[i - 1]))
    return flags


def _measure(stem: str) -> int:
    """Porter's m: the number of vowel-consonant sequences."""
    flags = _consonants(stem)
    return sum(not a and b for a, b in pairwise(flags))


def _ends_cvc(word: str) -> bool:
    c = _consonants(word)
    if len(word) == 2:
        return not c[0] and c[1]
    return len(word) >= 3 and c[-3] and not c[-2] and c[-1] and word[-1] not in "wxy"


def _step1a(word: str) -> str:
    if word.endswith("ies") and len(word) == 4:
        return word[:-3] + "ie"  # NLTK: "ties" -> "tie", not "ti"
    for suffix, replacement in (("sses", "ss"), ("ies", "i"), ("ss", "ss"), ("s", "")):
        if word.endswith(suffix):
            return word[: -len(suffix)] + replacement
    return word


def _step1b(word: str) -> str:
    if word.endswith("ied"):
        return word[:-3] + ("ie" if len(word) == 4 else "i")
    if word.endswith("eed"):
        return word[:-1] if _measure(word[:-3]) > 0 else word
    for suffix in ("ed", "ing"):
        stem = word[: -len(suffix)]
        if word.endswith(suffix) and not all(_consonants(stem)):
            break
    else:
        return word
    if stem.endswith(("at", "bl", "iz")):
        return stem + "e"
    if len(stem) >= 2 and stem[-1] == stem[-2] and _consonants(stem)[-1]:
        return stem[:-1] if stem[-1] not in "lsz" else stem
    return stem + "e" if _measure(stem) == 1 and _ends_cvc(stem) else stem


def _step1c(word: str) -> str:
    return word[:-1] + "i" if word.endswith("y") and len(word) > 2 and _consonants(word[:-1])[-1] else word


def _step2(word: str) -> str:
    if word.endswith("alli") and _measure(word[:-4]) > 0:
        return _step2(word[:-4] + "al")
    for suffix, replacement in _STEP2:
        if word.endswith(suffix):
            stem = word[:-3] if suffix == "logi" else word[: -len(suffix)]  # NLTK measures "logi" on word[:-3]
            return word[: -len(suffix)] + replacement if _measure(stem) > 0 else word
    return word


def _step3(word: str) -> str:
    for suffix, replacement in _STEP3:
        if word.endswith(suffix):
            return word[: -len(suffix)] + replacement if _measure(word[: -len(suffix)]) > 0 else word
    return word


def _step4(word: str) -> str:
    for suffix in _STEP4:
        if word.endswith(suffix):
            stem = word[: -len(suffix)]
            keep = _measure(stem) > 1 and (suffix != "ion" or stem[-1] in "st")
            return stem if keep else word
    return word


def _step5(word: str) -> str:
    if word.endswith("e"):
        stem = word[:-1]
        if _measure(stem) > 1 or (_measure(stem) == 1 and not _ends_cvc(stem)):
            word = stem
    if word.endswith("ll") and _measure(word[:-1]) > 1:
        word = word[:-1]
    return word
