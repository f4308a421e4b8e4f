"""The answer parser on realistic generated outputs: it must read the letter or say it can't, never guess."""

from __future__ import annotations

import pytest

from medtune.parse import ParseResult, contradiction, parse_answer

OPTIONS = ["Metformin", "Insulin glargine", "Sulfonylurea", "Insulin"]
ECHO = ("Question: A 45-year-old man has polyuria and an HbA1c of 8.1%. Which drug is first-line?\n"
        "A. Metformin\nB. Insulin glargine\nC. Sulfonylurea\nD. Insulin\nAnswer: B")

# (generated text, expected letter, expected reason)
CASES = [
    # answer first
    ("B", "B", "leading-letter"),
    ("B. Metformin is the first-line agent.", "B", "leading-letter"),
    ("B) Because HbA1c is above target.", "B", "leading-letter"),
    ("B\nExplanation: metformin lowers hepatic glucose output.", "B", "leading-letter"),
    ("C:", "C", "leading-letter"),
    ("C.", "C", "leading-letter"),
    ("(B)", "B", "leading-letter"),
    ("[C] Sulfonylurea", "C", "leading-letter"),
    ("**C**", "C", "leading-letter"),
    ("**C.** Sulfonylureas stimulate insulin release.", "C", "leading-letter"),
    ("D - Insulin", "D", "leading-letter"),
    ("C Sulfonylurea", "C", "leading-letter"),
    ("A is correct because metformin is first-line.", "A", "leading-letter"),
    ("b. metformin", "B", "leading-letter"),
    ("Option D: insulin", "D", "leading-letter"),
    # explicit statements
    ("Answer: A", "A", "answer-prefix"),
    ("The answer is D.", "D", "answer-prefix"),
    ("the answer is c", "C", "answer-prefix"),
    ("Correct answer: (B)", "B", "answer-prefix"),
    ("Final answer: **D**", "D", "answer-prefix"),
    ("The answer is (a).", "A", "answer-prefix"),
    ("The patient is obese with type 2 diabetes. Therefore, the answer is D.", "D", "explicit"),
    ("Given the HbA1c, the correct option is (C).", "C", "explicit"),
    ("Option C is correct because sulfonylureas are cheap.", "C", "explicit"),
    ("I choose C.", "C", "explicit"),
    ("I think it's B.", "B", "explicit"),
    ("Let me reason step by step. ... \\boxed{B}", "B", "explicit"),
    ("Metformin is first-line, so the answer is A. B is used later.", "A", "explicit"),
    # prompt echo: the listed options are not answers, only the final "Answer: B" counts
    (ECHO, "B", "explicit"),
    ("A. Metformin\nB. Insulin glargine\nC. Sulfonylurea\nD. Insulin", None, "no-letter"),
    ("Answer:\nA. Metformin\nB. Insulin glargine", None, "no-letter"),
    # made-up next few-shot question after the answer
    ("B\n\nQuestion: A 30-year-old woman has a headache.\nA. x\nB. y\nAnswer: C", "B", "leading-letter"),
    # several letters
    ("A or B", None, "multiple-letters"),
    ("Both A and C are correct.", None, "multiple-letters"),
    ("The answer is A or B.", None, "multiple-letters"),
    ("Answer: C. On reflection, the answer is D.", None, "multiple-letters"),
    # refusals and nothing
    ("I cannot provide medical advice. Please consult a doctor.", None, "refusal"),
    ("I'm not sure which of these is correct.", None, "refusal"),
    ("", None, "empty"),
    ("  \n\t ", None, "empty"),
    ("</s>", None, "empty"),
    ("Because the patient has diabetes, lifestyle change comes first.", None, "no-letter"),
    ("A 45-year-old man with diabetes should start metformin.", None, "no-letter"),
    ("A patient like this needs further tests.", None, "no-letter"),
    ("A Mallory-Weiss tear is the likely cause.", None, "no-letter"),
    ("I Think so.", None, "no-letter"),
    ("B cells produce antibodies.", None, "no-letter"),
    ("I think the question is unclear.", None, "no-letter"),
    ("The answer is a bit unclear here.", None, "no-letter"),
    # out of range for 4 options
    ("E", None, "out-of-range"),
    ("The answer is E.", None, "out-of-range"),
    # special tokens, odd whitespace, other scripts
    ("B</s>", "B", "leading-letter"),
    ("C<|im_end|>", "C", "leading-letter"),
    ("\u3000\u00a0B\u200b\n", "B", "leading-letter"),
    ("Ｂ．二甲双胍", "B", "leading-letter"),
    ("答案是C。", "C", "answer-prefix"),
]


@pytest.mark.parametrize(("text", "letter", "reason"), CASES)
def test_parse_answer_table(text, letter, reason):
    result = parse_answer(text, n_options=4)
    assert (result.letter, result.reason) == (letter, reason)


def test_unparseable_never_defaults_to_a_letter():
    assert all(parse_answer(t).letter is None for t, expected, _ in CASES if expected is None)


def test_multiple_letters_are_ambiguous():
    assert parse_answer("Both A and C are correct.").ambiguous
    assert not parse_answer("The answer is C.").ambiguous


def test_explicit_statement_beats_a_different_leading_letter_but_is_flagged():
    r = parse_answer("B. Metformin.\nOn reflection, the answer is C.")
    assert r == ParseResult("C", "explicit", True)


def test_range_follows_n_options():
    assert parse_answer("E", n_options=5).letter == "E"
    assert parse_answer("The answer is J", n_options=10).letter == "J"
    assert parse_answer("The answer is E", options=["a", "b", "c", "d", "e"]).letter == "E"
    assert parse_answer("B", n_options=1).reason == "out-of-range"
    assert parse_answer("C").letter == "C"


@pytest.mark.parametrize(("text", "letter", "reason"), [
    ("Metformin", "A", "option-text"),
    ("metformin, because it lowers hepatic glucose output.", "A", "option-text"),
    ("Insulin glargine is preferred here.", "B", "option-text"),  # "Insulin" nested in it yields
    ("The best choice is insulin.", "D", "option-text"),
    ("Metformin is not appropriate; insulin is.", None, "no-letter"),  # negation: no guess
    ("Either metformin or a sulfonylurea would work.", None, "multiple-options"),
    (ECHO.replace("\nAnswer: B", ""), None, "no-letter"),  # an echo lists every option: not an answer
])
def test_option_text_match(text, letter, reason):
    result = parse_answer(text, options=OPTIONS)
    assert (result.letter, result.reason) == (letter, reason)


def test_option_text_pubmedqa_yes_no():
    assert parse_answer("No. The trial showed no benefit.", options=["yes", "no", "maybe"]).letter == "B"
    assert parse_answer("Yes", options=["yes", "no", "maybe"]).letter == "A"


def test_leading_letter_naming_another_option_is_flagged():
    r = parse_answer("B. Metformin", options=OPTIONS)
    assert (r.letter, r.ambiguous) == ("B", True)
    assert parse_answer("A. Metformin", options=OPTIONS) == ParseResult("A", "leading-letter", False)


@pytest.mark.parametrize(("letter", "explanation", "options", "expected"), [
    ("B", "Option C is correct because sulfonylureas are cheap.", None, True),
    ("B", "So the answer is C.", None, True),
    ("b", "Therefore, the answer is B.", None, False),
    ("B", "Metformin lowers glucose; option A is not correct.", None, False),
    ("B", "B cells are not involved.", None, False),
    ("A", "So the answer is insulin.", OPTIONS, True),
    ("A", "Final answer: Sulfonylurea", OPTIONS, True),
    ("D", "So the answer is insulin.", OPTIONS, False),
    ("A", "Metformin lowers hepatic glucose output.", OPTIONS, False),
    (None, "The answer is C.", None, False),
])
def test_contradiction(letter, explanation, options, expected):
    assert contradiction(letter, explanation, options) is expected
