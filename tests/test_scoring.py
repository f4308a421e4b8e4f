"""The letter scorer against a slow token-by-token reference, and permutation debiasing on a planted letter bias."""

import math

import pytest
import torch

from medtune.data.items import MCQItem
from medtune.models import load_model
from medtune.scoring import Encoded, encode, permuted_scores, predictions, rotations, score, score_reference


def _items(n=12):
    return [MCQItem(id=f"q{k}", question=f"Which option is number {k}? " + "Long context. " * (k % 5),
                    options=(f"alpha {k}", "beta", "gamma", "delta"), answer=k % 4, subject="s") for k in range(n)]


@pytest.fixture(scope="module")
def tiny(tiny_model_dir):
    model, tok, _ = load_model(tiny_model_dir, device="cpu", log=lambda *_: None)
    return model, tok


@pytest.mark.parametrize("style", ["harness", "chat"])
def test_one_pass_scorer_matches_token_by_token_reference(tiny, style):
    model, tok = tiny
    enc = encode(_items(), style, tok)
    assert all(e.single_token for e in enc)
    fast, rescored = score(model, enc, batch_size=5, mode="exact")
    assert not any(rescored)
    with torch.inference_mode():
        ref = [score_reference(model, e) for e in enc]
    assert max(abs(a - b) for r, f in zip(ref, fast) for a, b in zip(r, f)) < 1e-4


def test_multi_token_continuation_uses_reference_path(tiny):
    model, tok = tiny
    enc = [Encoded(context=tok("Question: x\nAnswer:").input_ids, options=[[330, 42], [389], [340], [422]])]
    scores, _ = score(model, enc, mode="exact")
    with torch.inference_mode():
        assert scores[0] == pytest.approx(score_reference(model, enc[0]), abs=1e-5)


def test_fast_mode_rescores_close_calls_exactly(tiny):
    model, tok = tiny
    enc = encode(_items(), "harness", tok)
    exact, _ = score(model, enc, mode="exact")
    fast, rescored = score(model, enc, mode="fast", margin=1e9)  # every call counts as close: all re-scored
    assert all(rescored)
    assert [x for r in fast for x in r] == pytest.approx([x for r in exact for x in r], abs=1e-6)


def test_predictions_rows():
    items = _items(2)
    rows = predictions(items, [[-1.0, -2.0, -3.0, -4.0], [-5.0, -0.5, -3.0, -4.0]])
    assert [r["pred"] for r in rows] == ["A", "B"] and [r["gold"] for r in rows] == ["A", "B"]
    assert sum(rows[0]["probs"].values()) == pytest.approx(1.0)
    assert rows[0]["logprobs"]["C"] == -3.0


def test_cyclic_rotations_cover_every_position():
    item = _items(1)[0]
    rots = rotations(item)
    assert len(rots) == 4 and all(sorted(r) == [0, 1, 2, 3] for r in rots)
    assert sorted(r.index(0) for r in rots) == [0, 1, 2, 3]  # option 0 visits every letter once


def test_debiasing_recovers_answer_under_planted_letter_bias():
    """A synthetic model that prefers letter A by +3 nats but knows the right content by +1 nat: its raw
    predictions are all A; averaging each content's log-probability over the rotations recovers every answer."""
    items = _items(8)

    def biased_model(its):
        out = []
        for it in its:
            out.append([(3.0 if pos == 0 else 0.0) + (1.0 if pos == it.answer else 0.0) for pos in range(4)])
        return out

    raw = predictions(items, biased_model(items))
    assert {r["pred"] for r in raw} == {"A"}
    debiased, details = permuted_scores(items, biased_model)
    assert all(max(range(4), key=lambda j: d[j]) == it.answer for d, it in zip(debiased, items))
    assert all(sum(d["rotation_correct"]) == 1 for d in details)  # right only when the answer sits at A
    assert all(math.isfinite(x) for d in debiased for x in d)


def test_answer_line_method_matches_reference(tiny):
    model, tok = tiny
    enc = encode(_items(6), "harness", tok, method="answer")
    assert not any(e.single_token for e in enc)
    batched, _ = score(model, enc, batch_size=4, mode="exact")
    with torch.inference_mode():
        ref = [score_reference(model, e) for e in enc]
    assert max(abs(a - b) for r, f in zip(ref, batched) for a, b in zip(r, f)) < 1e-4


def test_generate_method_end_to_end(tiny_model_dir, tmp_path):
    """Greedy generation on a tiny random model: answers are parsed or counted unparseable, never defaulted."""
    from medtune.config import load_config
    from medtune.evaluate import run_eval

    cfg = load_config(None, [f"model={tiny_model_dir}", "device=cpu", "eval.method=generate",
                             "eval.max_new_tokens=6"])
    items = [MCQItem(id=f"g{k}", question="Q?", options=("a", "b", "c", "d"), answer=k % 4,
                     explanation="Reference text.") for k in range(3)]
    results, rows = run_eval(items, cfg, tmp_path, quiet=True, log=lambda *_: None)
    gen = results["metrics"]["generation"]
    assert gen["unparseable"] == sum(r["pred"] is None for r in rows)
    assert all(r["correct"] is (r["pred"] == r["gold"]) for r in rows)
    assert gen["hit_length_cap"] == sum(r["hit_length_cap"] for r in rows) and gen["rougeL_n"] == 3
    assert (tmp_path / "predictions.jsonl").is_file() and results["method"] == "generate-greedy"
