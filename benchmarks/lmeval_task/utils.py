"""lm-evaluation-harness 0.4.13's medqa_4options, medmcqa and pubmedqa prompts, for the benchmarks' ORIGINAL layouts.

Copied from lm_eval/tasks/medqa/preprocess_medqa.py and lm_eval/tasks/medmcqa/utils_medmcqa.py; only the field
names change (the Hub copies rename them). Text is used exactly as in the file: nothing is stripped, as in lm-eval.

MedQA (US, 4 options)  {"question", "options": {"A".."D"}, "answer_idx": "A".."D"}   (Hub: sent1, ending0..3, label)
MedMCQA                {"question", "opa".."opd", "cop"}  cop is 1-based in the published files, 0-based on the Hub
"""

LETTERS = ["A", "B", "C", "D"]


def medqa_doc_to_text(doc) -> str:
    option_choices = {k: doc["options"][k] for k in LETTERS}
    answers = "".join((f"{k}. {v}\n") for k, v in option_choices.items())
    return f"Question: {doc['question']}\n{answers}Answer:"


def medqa_doc_to_target(doc) -> int:
    return LETTERS.index(doc["answer_idx"])


def medmcqa_doc_to_text(doc) -> str:
    choices = [doc["opa"], doc["opb"], doc["opc"], doc["opd"]]
    option_choices = {"A": choices[0], "B": choices[1], "C": choices[2], "D": choices[3]}
    prompt = "Question: " + doc["question"] + "\nChoices:\n"
    for choice, option in option_choices.items():
        prompt += f"{choice.upper()}. {option}\n"
    prompt += "Answer:"
    return prompt


def medmcqa_doc_to_target_cop1(doc) -> int:
    """Published files: cop 1..4."""
    return int(doc["cop"]) - 1


def medmcqa_doc_to_target_cop0(doc) -> int:
    """Hub copy (openlifescienceai/medmcqa): cop 0..3, as lm-eval's own `doc_to_target: cop`."""
    return int(doc["cop"])


def pubmedqa_doc_to_text(doc) -> str:
    """lm_eval/tasks/pubmedqa/preprocess_pubmedqa.py, as in 0.4.13."""
    ctxs = "\n".join(doc["CONTEXTS"])
    return "Abstract: {}\nQuestion: {}\nAnswer:".format(
        ctxs,
        doc["QUESTION"],
    )
