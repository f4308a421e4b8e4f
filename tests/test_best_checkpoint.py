"""Training that keeps its best (issue 20 item 6): validation rows in metrics.jsonl at the right steps, train.keep=best
picks the highest validation accuracy (ties: the earlier step), early stopping after train.patience validations
without improvement, validation leaves the training RNG stream alone (keep=last: bit-identical adapter), a resume with
validation on reaches the uninterrupted run's adapter and rows, and the config refusals are one line."""

import json
import random

import pytest
import torch
from safetensors.torch import load_file

from medtune import checkpoint, scoring
from medtune import train as train_mod
from medtune.config import load_config
from medtune.data.items import MCQItem
from medtune.data.prepare import validation_split
from medtune.errors import MedtuneError

VAL = 4  # validation items: accuracies in quarters


def items(n=24, seed=0):
    rng = random.Random(seed)
    out = []
    for k in range(n):
        opts = [f"option {w}" for w in rng.sample(["red", "green", "blue", "cyan", "pink", "gray", "gold"], 4)]
        out.append(MCQItem(id=f"t{k}", question=f"Which colour is item {k}?", options=tuple(opts), answer=k % 4,
                           explanation=f"Item {k} has that colour.", subject="s"))
    return out


def cfg_for(model_dir, out, **sets):
    base = {"model": model_dir, "device": "cpu", "out_dir": str(out), "train.dtype": "float32", "train.batch_size": 4,
            "train.max_steps": 4, "train.lr": 1e-3, "train.max_length": 128, "lora.r": 4, "lora.alpha": 8,
            "lora.dropout": 0.1,  # dropout draws from the RNG: validation must not move that stream
            "data.validation": VAL}
    return load_config(None, [f"{k}={v}" for k, v in {**base, **sets}.items()])


def fit(model_dir, out, resume=False, **sets):
    pool = items()
    return train_mod.train(cfg_for(model_dir, out, **sets), pool[:-VAL], out, resume=resume, quiet=True,
                           val_items=pool[-VAL:])


def adapter(out):
    return load_file(str(out / "adapter" / "adapter_model.safetensors"))


def rows(out):
    return [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]


def scripted(monkeypatch, accuracies):
    """The scorer returns these accuracies, one per validation, in order."""
    left = iter(accuracies)

    def fake(model, tokenizer, items, style, method="letter", mode="fast", margin=None, batch_size=16, progress=None):
        k = round(next(left) * len(items))
        return [{"id": it.id, "correct": i < k} for i, it in enumerate(items)]

    monkeypatch.setattr(scoring, "score_items", fake)


def as_peft_names(weights: dict) -> dict:
    """A checkpoint's tensors under PEFT's saved names, which drop the adapter name ('.default')."""
    return {k.replace(".default", ""): v for k, v in weights.items()}


def test_validation_rows_at_the_right_steps(tiny_model_dir, tmp_path):
    out = tmp_path / "r"
    summary = fit(tiny_model_dir, out, **{"train.max_steps": 5, "train.eval_every": 2})
    got = rows(out)
    assert [r["step"] for r in got] == [1, 2, 3, 4, 5]
    assert [r["step"] for r in got if "val_accuracy" in r] == [2, 4, 5]  # every 2 steps and the last
    for r in got:
        if "val_accuracy" in r:
            assert r["val_n"] == VAL and r["val_accuracy"] == r["val_correct"] / VAL
            assert r["val_ci95"][0] <= r["val_accuracy"] <= r["val_ci95"][1] and "loss" in r
    meta = json.loads((out / "adapter" / "medtune.json").read_text())
    assert meta["kept"] == "last" and meta["validation_ids"] == [i.id for i in items()[-VAL:]]
    assert summary["validation"]["val_n"] == VAL and meta["train_ids"] == [i.id for i in items()[:-VAL]]


def test_keep_best_saves_the_best_step_ties_to_the_earlier(tiny_model_dir, tmp_path, monkeypatch):
    monkeypatch.setattr(checkpoint, "KEEP", 100)  # every step's weights stay to compare against
    scripted(monkeypatch, [0.25, 0.75, 0.5, 0.75, 0.25])  # best 0.75 at steps 2 and 4: step 2 is kept
    out = tmp_path / "b"
    summary = fit(tiny_model_dir, out, **{"train.max_steps": 5, "train.eval_every": 1, "train.save_every": 1,
                                          "train.keep": "best"})
    meta = json.loads((out / "adapter" / "medtune.json").read_text())
    assert (meta["kept"], meta["best_step"], meta["best_val_accuracy"]) == ("best", 2, 0.75)
    assert summary["steps"] == 5 and [r["val_best_step"] for r in rows(out)] == [1, 2, 2, 2, 2]
    saved = adapter(out)
    at = {s: as_peft_names(load_file(str(checkpoint.checkpoint_dir(out, s) / "adapter.safetensors")))
          for s in (2, 4, 5)}
    assert set(saved) == set(at[2])
    assert all(torch.equal(saved[k], at[2][k]) for k in saved)
    assert not all(torch.equal(saved[k], at[s][k]) for s in (4, 5) for k in saved)  # the test can fail
    best = as_peft_names(load_file(str(checkpoint.checkpoint_dir(out, 5) / "best.safetensors")))
    assert all(torch.equal(best[k], at[2][k]) for k in best)  # the checkpoint carries the best weights


def test_early_stop_after_patience_validations_without_improvement(tiny_model_dir, tmp_path, monkeypatch):
    scripted(monkeypatch, [0.5, 0.5, 0.25, 0.75])  # no improvement at steps 2 and 3: stop at 3 (patience 2)
    out = tmp_path / "e"
    summary = fit(tiny_model_dir, out, **{"train.max_steps": 8, "train.eval_every": 1, "train.patience": 2,
                                          "train.keep": "best"})
    assert summary["steps"] == 3 and summary["validation"]["stopped_early_at"] == 3
    assert summary["validation"]["best_step"] == 1 and [r["step"] for r in rows(out)] == [1, 2, 3]
    state = checkpoint.read_state(checkpoint.latest(out))
    assert state["step"] == 3 and state["validation"] == {"best_step": 1, "best_accuracy": 0.5, "since_best": 2,
                                                          "stopped": True}
    again = fit(tiny_model_dir, out, resume=True, **{"train.max_steps": 8, "train.eval_every": 1,
                                                      "train.patience": 2, "train.keep": "best"})
    assert again["steps"] == 3 and len(rows(out)) == 3  # a resumed early-stopped run stays stopped


def test_validation_with_keep_last_gives_the_adapter_without_validation(tiny_model_dir, tmp_path):
    on = fit(tiny_model_dir, tmp_path / "on", **{"train.eval_every": 1})
    off = fit(tiny_model_dir, tmp_path / "off")
    a, b = adapter(tmp_path / "on"), adapter(tmp_path / "off")
    assert set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a)
    assert on["final_loss"] == off["final_loss"] and "validation" in on and "validation" not in off


def crash_after(save, crash_step: int):
    """checkpoint.save that writes checkpoint `crash_step`, then stops the run as a Ctrl-C would."""
    def save_then_crash(out_dir, step, *args, **kwargs):
        path = save(out_dir, step, *args, **kwargs)
        if step == crash_step:
            raise KeyboardInterrupt
        return path
    return save_then_crash


def test_resume_with_validation_reaches_the_uninterrupted_run(tiny_model_dir, tmp_path, monkeypatch):
    sets = {"train.max_steps": 6, "train.save_every": 2, "train.eval_every": 2, "train.keep": "best",
            "train.patience": 3}
    script = [0.75, 0.5, 0.5]  # best at step 2, before the interruption: it must come back from best.safetensors
    scripted(monkeypatch, script)
    full = fit(tiny_model_dir, tmp_path / "full", **sets)
    real_save = checkpoint.save
    scripted(monkeypatch, script)  # the interrupted run and its resume consume one script: steps 2, 4 | 6
    monkeypatch.setattr(checkpoint, "save", crash_after(real_save, 4))
    with pytest.raises(KeyboardInterrupt):
        fit(tiny_model_dir, tmp_path / "cut", **sets)
    monkeypatch.setattr(checkpoint, "save", real_save)
    resumed = fit(tiny_model_dir, tmp_path / "cut", resume=True, **sets)
    assert resumed["resumed_from_step"] == 4 and resumed["validation"] == full["validation"]
    assert full["validation"]["best_step"] == 2
    a, b = adapter(tmp_path / "full"), adapter(tmp_path / "cut")
    assert all(torch.equal(a[k], b[k]) for k in a)
    drop = ("elapsed_s", "tokens_per_s")
    assert [{k: v for k, v in r.items() if k not in drop} for r in rows(tmp_path / "cut")] == \
        [{k: v for k, v in r.items() if k not in drop} for r in rows(tmp_path / "full")]


@pytest.mark.slow
def test_resume_with_the_real_scorer_is_bit_exact(tiny_model_dir, tmp_path, monkeypatch):
    """As above with medtune's scorer: the validation accuracies and the kept adapter are the uninterrupted run's."""
    sets = {"train.max_steps": 6, "train.save_every": 3, "train.eval_every": 1, "train.keep": "best"}
    full = fit(tiny_model_dir, tmp_path / "full", **sets)
    real_save = checkpoint.save
    monkeypatch.setattr(checkpoint, "save", crash_after(real_save, 3))
    with pytest.raises(KeyboardInterrupt):
        fit(tiny_model_dir, tmp_path / "cut", **sets)
    monkeypatch.setattr(checkpoint, "save", real_save)
    resumed = fit(tiny_model_dir, tmp_path / "cut", resume=True, **sets)
    assert resumed["validation"] == full["validation"]
    assert [r.get("val_accuracy") for r in rows(tmp_path / "cut")] == [r.get("val_accuracy") for r in
                                                                        rows(tmp_path / "full")]
    a, b = adapter(tmp_path / "full"), adapter(tmp_path / "cut")
    assert all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("sets, says", [
    (["train.keep=best"], "train.keep=best needs validation during training"),
    (["train.patience=2"], "train.patience=2 needs validation during training"),
    (["train.eval_every=5"], "needs items to validate on; set data.validation"),
    (["data.validation=2.5"], "data.validation 2.5 is out of range"),
])
def test_config_refusals_are_one_line(sets, says):
    with pytest.raises(MedtuneError) as e:
        load_config(None, sets)
    assert says in str(e.value) and "\n" not in str(e.value)


def test_train_without_validation_items_is_one_line(tmp_path):
    cfg = load_config(None, ["train.eval_every=2", "data.validation=0.1", f"out_dir={tmp_path}"])
    with pytest.raises(MedtuneError, match="no validation items") as e:
        train_mod.train(cfg, items(), tmp_path, quiet=True)
    assert "\n" not in str(e.value) and not any(tmp_path.iterdir())


def test_validation_split_is_seeded_and_never_holds_out_eval_duplicates():
    pool = items(40)
    evals = [MCQItem(id=f"e{k}", question=f"Which nerve supplies muscle number {k} of the forearm?",
                     options=("a", "b", "c", "d"), answer=k % 4) for k in range(6)]
    dup = MCQItem(id="e-dup", question=pool[3].question, options=pool[3].options, answer=pool[3].answer)
    cfg = load_config(None, ["data.validation=0.25"])
    data = {"train": {"source": "x", "split": "train", "n": 40, "ids_sha256": "-"}, "eval": {}}
    train, val, out = validation_split(cfg, pool, [*evals, dup], data)
    assert len(val) == 10 and len(train) == 30 and pool[3] in train and pool[3] not in val
    assert {i.id for i in train} | {i.id for i in val} == {i.id for i in pool} and not {i.id for i in train} & {i.id for i in val}
    assert out["validation"]["n"] == 10 and out["train"]["n"] == 30 and data["train"]["n"] == 40
    assert validation_split(cfg, pool, [*evals, dup], data)[1] == val  # seeded
    assert validation_split(load_config(None, ["data.validation=7"]), pool, evals, data)[1].__len__() == 7
    assert validation_split(load_config(None, []), pool, evals, data) == (pool, [], data)
    with pytest.raises(MedtuneError, match="lower data.validation"):
        validation_split(load_config(None, ["data.validation=40"]), pool, evals, data)


def test_report_draws_the_validation_curve_beside_the_loss():
    from medtune import figures

    rows = [{"step": s, "loss": 1.0 / s, "lr": 1e-3} for s in range(1, 7)]
    plain = figures.training_curves(rows)
    for r, acc in zip(rows[1::2], (0.5, 0.75, 0.75)):
        r.update(val_accuracy=acc, val_n=4, val_ci95=[acc - 0.3, min(1.0, acc + 0.2)])
    fig = figures.training_curves(rows)
    assert len(plain.axes) == 2 and len(fig.axes) == 3
    val = fig.axes[1]
    assert val.get_title().startswith("validation accuracy")
    assert val.get_legend().get_texts()[0].get_text() == "best: step 4"  # ties: the earlier step
    assert figures.png(fig)[:4] == b"\x89PNG"
