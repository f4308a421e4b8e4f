"""medtune.rouge against rouge_score 0.1.2 (RougeScorer(["rougeL"], use_stemmer=True)), whose values are written here
as literals: rouge_score is no longer a dependency. When the port was written it also matched NLTK's PorterStemmer on
every one of the 55,454 distinct words in ../shared/data and rouge_score on 3,000 random pairs of its sentences."""

from __future__ import annotations

import pytest

from medtune.rouge import porter_stem, rouge_l

# (reference, candidate, rouge_score's rougeL fmeasure)
KNOWN = [
    ("The patient has hypertension.", "The patient has hypertension.", 1.0),
    ("The patient has hypertension.", "the PATIENT has hypertension!!", 1.0),
    ("Beta blockers reduce heart rate.", "Heart rate is reduced by beta blockers.", 0.3333333333333333),
    ("Metformin is first-line therapy for type 2 diabetes.", "First line treatment of type 2 diabetes is metformin.",
     0.5555555555555556),
    ("", "anything at all", 0.0),
    ("anything at all", "", 0.0),
    ("!!! ---", "???", 0.0),
    ("Aspirin inhibits cyclooxygenase irreversibly.", "Ibuprofen is a reversible COX inhibitor.", 0.0),
    ("running runs runner ran", "run running ran runs", 0.75),
    ("The kidneys filter blood; the nephron is the functional unit.",
     "Nephrons: functional units of kidneys, filtering the blood.", 0.33333333333333326),
    ("Vitamin B12 deficiency causes megaloblastic anaemia", "B12 deficiency -> megaloblastic anemia (vitamin)",
     0.5454545454545454),
    ("a a a a b", "a b a b a b", 0.7272727272727272),
    ("Generalization of the conditional relational hopefulness", "generalize conditionally relate hopeful", 0.8),
    ("skies dying lying tying news innings", "sky die lie tie news inning", 1.0),
    ("Café résumé naïve", "cafe resume naive", 0.0),
    ("Insulin lowers glucose; glucagon raises it.", "Glucagon raises glucose; insulin lowers it.", 0.5),
    ("The answer is C because the ECG shows ST elevation in leads II, III and aVF.",
     "C. Inferior MI: ST elevation in II, III, aVF on the ECG.", 0.5),
    ("hopping hoped hoping", "hop hope hope", 1.0),
    ("x", "y", 0.0),
    ("Tachycardia, hypotension and fever suggest sepsis.",
     "Sepsis is suggested by fever, tachycardia and hypotension; start antibiotics early.", 0.23529411764705885),
    ("controlling rolled agreed feed", "control roll agree fe", 0.75),
    ("123 mg/dL at 09:00", "123 mg per dL", 0.6),
]

# nltk.stem.porter.PorterStemmer().stem
STEMS = {"running": "run", "hypertension": "hypertens", "generalization": "gener", "conditional": "condit",
         "relational": "relat", "hopefulness": "hope", "controlling": "control", "agreed": "agre", "skies": "sky",
         "ties": "tie", "cried": "cri", "happy": "happi", "analogi": "analog", "formalli": "formal", "rolling": "roll",
         "nephrons": "nephron", "filtering": "filter", "megaloblastic": "megaloblast", "reversible": "revers",
         "inhibitor": "inhibitor"}


@pytest.mark.parametrize(("reference", "candidate", "expected"), KNOWN)
def test_rouge_l_matches_rouge_score(reference, candidate, expected):
    assert rouge_l(reference, candidate) == pytest.approx(expected, abs=1e-12)


@pytest.mark.parametrize(("word", "stem"), STEMS.items())
def test_porter_stem_matches_nltk(word, stem):
    assert porter_stem(word) == stem


def test_rouge_l_is_symmetric_and_bounded():
    """F-measure swaps precision and recall when the texts swap, so it is symmetric; 1.0 only for equal token lists."""
    for reference, candidate, _ in KNOWN:
        score = rouge_l(reference, candidate)
        assert score == pytest.approx(rouge_l(candidate, reference), abs=1e-12) and 0.0 <= score <= 1.0
