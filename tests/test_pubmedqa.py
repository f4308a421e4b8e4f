"""PubMedQA as lm-eval's `pubmedqa` task scores it (prompt, continuations " yes"/" no"/" maybe"), acc_norm as lm-eval
defines it, and what permutation debiasing means for options that are not lettered."""

import importlib.util
import json
from pathlib import Path

import pytest

from medtune.data.formats import read_file
from medtune.data.items import MCQItem
from medtune.prompts import build_prompt, build_target, choices, continuations
from medtune.scoring import Encoded, permuted_scores, predictions

ROOT = Path(__file__).resolve().parents[1]
spec = importlib.util.spec_from_file_location("lmeval_task_utils", ROOT / "benchmarks" / "lmeval_task" / "utils.py")
task_utils = importlib.util.module_from_spec(spec)
spec.loader.exec_module(task_utils)

DOC = {"QUESTION": "Does X help? ", "CONTEXTS": ["First context. ", " Second context."], "final_decision": "no",
       "LONG_ANSWER": "It does not."}


def _item(tmp_path) -> MCQItem:
    path = tmp_path / "ori_pqal.json"
    path.write_text(json.dumps({"123": DOC}))
    return read_file(path)[0]


def test_prompt_and_continuations_are_lmevals(tmp_path):
    item = _item(tmp_path)
    assert build_prompt(item, "harness") == task_utils.pubmedqa_doc_to_text(DOC)
    assert continuations(item, "harness") == [" yes", " no", " maybe"]
    assert continuations(item, "harness", "answer") == [" yes", " no", " maybe"]  # the answer is the word itself
    assert choices(item, "harness") == ["yes", "no", "maybe"]
    assert build_target(item, "harness", "answer") == " no"
    # other styles still list lettered options (there is no lm-eval text to match)
    assert continuations(item, "chat") == ["A", "B", "C"] and "A. yes" in build_prompt(item, "seed").replace(") ", ". ")


def test_acc_norm_is_lmevals_per_character_argmax():
    item = MCQItem(id="p", question="Q", options=("yes", "no", "maybe"), answer=0, benchmark="pubmedqa")
    enc = [Encoded(context=[1], options=[[2], [3], [4]], choice_chars=[3, 2, 5])]
    # summed: -3.0, -2.5, -5.0 -> "no"; per character: -1.0, -1.25, -1.0 -> "yes" (the first of equals, numpy.argmax)
    (row,) = predictions([item], [[-3.0, -2.5, -5.0]], encoded=enc, method="letter")
    assert (row["pred"], row["pred_text"], row["correct"]) == ("B", "no", False)
    assert (row["pred_norm"], row["correct_norm"]) == ("A", True)
    (row,) = predictions([item], [[-3.0, -2.5, -5.0]], encoded=[Encoded([1], [[2], [3], [4]], [1, 1, 1])])
    assert "pred_norm" not in row  # equal lengths: acc_norm is acc


def test_debiased_argmax_is_margin_checked_in_fp32():
    """An approximate scorer whose rotation average flips a close call is corrected by the exact re-score."""
    items = [MCQItem(id=f"q{k}", question="Q", options=("a", "b", "c", "d"), answer=1) for k in range(3)]

    def exact(its):  # content "b" beats "a" by 0.1 nats wherever it is shown
        return [[(0.1 if it.options[p] == "b" else 0.0) for p in range(4)] for it in its]

    def approx(its):  # bf16-like error: "a" gains 0.2 nats
        return [[s + (0.2 if it.options[p] == "a" else 0.0) for p, s in enumerate(row)]
                for it, row in zip(its, exact(its))]

    wrong, _ = permuted_scores(items, approx)
    assert all(max(range(4), key=lambda j: d[j]) == 0 for d in wrong)
    fixed, details = permuted_scores(items, approx, exact_fn=exact, margin=0.5)
    assert all(max(range(4), key=lambda j: d[j]) == 1 for d in fixed) and all(d["rescored_fp32"] for d in details)
    assert fixed == permuted_scores(items, exact)[0]


@pytest.mark.slow
def test_eval_pubmedqa_end_to_end(tiny_model_dir, tmp_path):
    """Rows, acc_norm beside acc, the majority-class baseline, and --permute cyclic recorded as not applicable."""
    from medtune.config import load_config
    from medtune.evaluate import run_eval

    path = tmp_path / "ori_pqal.json"
    path.write_text(json.dumps({str(k): {**DOC, "final_decision": d} for k, d in enumerate(["yes", "no", "no"])}))
    items = read_file(path)
    cfg = load_config(None, [f"model={tiny_model_dir}", "device=cpu", "eval.permute=cyclic", "eval.mode=exact"])
    results, rows = run_eval(items, cfg, tmp_path / "out", quiet=True, log=lambda *_: None)
    m = results["metrics"]
    assert results["permute"].startswith("not applicable") and "permute" not in m
    assert m["letters"]["majority_baseline"] == pytest.approx(2 / 3) and m["letters"]["majority_letter"] == "B"
    assert m["accuracy_norm"] == sum(r["correct_norm"] for r in rows) / 3
    assert all(r["pred_text"] in ("yes", "no", "maybe") and len(r["logprobs"]) == 3 for r in rows)
    assert results["precision"]["logprobs"] == "fp32" and "decides" in results


def test_accuracy_norm_with_items_whose_choices_have_equal_length():
    """Answer lines of equal length carry no pred_norm; acc_norm there is acc (dividing by one constant)."""
    from medtune.report import metrics

    items = [MCQItem(id=f"q{k}", question="Q", options=("ab", "c", "d", "e"), answer=0) for k in range(2)]
    enc = [Encoded([1], [[2], [3], [4], [5]], [5, 4, 4, 4]), Encoded([1], [[2], [3], [4], [5]], [4, 4, 4, 4])]
    rows = predictions(items, [[-4.5, -4.0, -9.0, -9.0], [-1.0, -2.0, -3.0, -4.0]], encoded=enc, method="answer")
    assert "pred_norm" in rows[0] and "pred_norm" not in rows[1]
    # item 0: summed picks B (wrong), per character A (-0.9 vs -1.0, right); item 1: A either way (right)
    assert metrics(items, rows)["accuracy_norm"] == 1.0 and metrics(items, rows)["accuracy"] == 0.5


def test_selective_accuracy_only_from_fp32_rows():
    """bf16 reorders near-tied confidences (accuracy at 50% coverage moved 0.011 on MedQA), so selective accuracy is
    reported only when every row was scored in fp32, and the precision record says which."""
    from medtune.evaluate import precision_record
    from medtune.report import metrics

    items = [MCQItem(id=f"q{k}", question="Q", options=("a", "b", "c", "d"), answer=k % 2) for k in range(4)]
    rows = predictions(items, [[-1.0, -2.0, -3.0, -4.0], [-0.5, -2.0, -3.0, -4.0], [-1.0, -1.1, -3.0, -4.0],
                               [-2.0, -1.0, -3.0, -4.0]])
    for r in rows:
        r["precision"] = "fp32"
    assert metrics(items, rows)["selective"]["accuracy_at_coverage"]["50"] == 0.5
    assert precision_record(rows, None)["selective"] == "fp32"
    rows[2]["precision"] = "bf16"
    assert "--mode exact" in metrics(items, rows)["selective"]["omitted"]
    assert precision_record(rows, None)["selective"].startswith("omitted")
