"""Never train on test, whatever the spelling: every way of naming a test split as the training source is refused in
one line by the one rule (sources.trains_on_test, used by data.prepare.prepare_data for `train` and `run`), before any file or
the network is read."""

import json

import pytest

from medtune.config import load_config
from medtune.data import sources
from medtune.data.prepare import prepare_data
from medtune.errors import MedtuneError


@pytest.fixture
def no_network(monkeypatch):
    import datasets

    def fail(*args, **kwargs):
        raise AssertionError(f"datasets.load_dataset called: {args}")

    monkeypatch.setattr(datasets, "load_dataset", fail)


REFUSED = [
    ("medqa:eval", "GBaker/MedQA-USMLE-4-options-hf split 'test'"),
    ("medqa:test", "GBaker/MedQA-USMLE-4-options-hf split 'test'"),  # the preset with its Hub split named explicitly
    ("mmlu-anatomy:eval", "cais/mmlu split 'test'"),
    ("mmlu-anatomy", "only data on the Hub is cais/mmlu split 'test'"),  # no training split: its only split is test
    ("mmlu-professional-medicine:test", "cais/mmlu split 'test'"),
    ("medmcqa:eval", "openlifescienceai/medmcqa split 'validation'"),  # published MedMCQA scores use validation
    ("medmcqa:validation", "openlifescienceai/medmcqa split 'validation'"),
    ("pubmedqa", "only data on the Hub is qiaojin/PubMedQA split 'train'.*test fold"),  # test-derived, whatever named
    ("pubmedqa:train", "qiaojin/PubMedQA split 'train'.*test fold"),
    ("pubmedqa:eval", "qiaojin/PubMedQA split 'train'"),
    ("demo:eval", "demo set's eval split"),
    ("test.jsonl", "test.jsonl' looks like a test split"),
    ("medqa_test.csv", "looks like a test split"),
    ("x-test-4opt.jsonl", "looks like a test split"),
    ("data/mmlu/anatomy.test.parquet", "looks like a test split"),
]


@pytest.mark.parametrize("source,why", REFUSED, ids=[s for s, _ in REFUSED])
def test_every_spelling_of_a_test_split_is_refused_before_any_read(source, why, no_network, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    if "." in source:  # a real file, so that only its name can be the reason
        (tmp_path / source).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / source).write_text("")
    assert sources.trains_on_test(source)
    cfg = load_config(None, [f"data.source={source}"])
    with pytest.raises(MedtuneError, match=why) as e:
        prepare_data(cfg, log=lambda *_: None)
    assert "\n" not in str(e.value) and "never trains on test data" in str(e.value) and "eval_source" in str(e.value)


@pytest.mark.parametrize("source", ["medqa", "medqa:train", "medmcqa", "medmcqa:train", "demo", "demo:train",
                                    "latest_questions.jsonl", "contest.csv", "train.jsonl", "medqa/dev.jsonl"])
def test_train_splits_pass_the_rule(source):
    assert sources.trains_on_test(source) is None


def test_a_preset_named_by_its_hub_split_loads_that_split(no_network):
    assert sources.resolve("medqa:test") == ("medqa", "eval")
    assert sources.resolve("medqa:train") == ("medqa", "train")
    assert sources.resolve("medmcqa:validation") == ("medmcqa", "eval")
    assert sources.resolve("data/x.jsonl", "eval") == ("data/x.jsonl", "eval")


def test_a_test_file_is_still_fine_as_the_eval_source(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    rows = [{"id": f"q{k}", "question": f"Question {k}?", "options": ["a", "b", "c", "d"], "answer": k % 4}
            for k in range(8)]
    for name in ("train.jsonl", "test.jsonl"):
        (tmp_path / name).write_text("".join(json.dumps(r) + "\n" for r in rows))
    train, evals, _ = prepare_data(load_config(None, ["data.source=train.jsonl", "data.eval_source=test.jsonl"]),
                                   log=lambda *_: None)
    assert len(train) == len(evals) == 8
