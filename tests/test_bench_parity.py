"""benchmarks/lmeval_parity.py: lm-eval samples parsing and the comparison arithmetic, on hand-made files (no lm-eval,
no model). The numbers in the comments are worked by hand."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
from conftest import write_jsonl

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"


def _load(name: str, path: Path):
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


parity = _load("lmeval_parity", BENCH / "lmeval_parity.py")
task_utils = _load("lmeval_task_utils", BENCH / "lmeval_task" / "utils.py")


def _sample(doc_id: int, lls: list[float], target: int, context: str = "Question: q\nAnswer:") -> dict:
    """One line as lm-eval 0.4.13 logs it: log-likelihoods and target as strings, nested resps."""
    return {"doc_id": doc_id, "doc": {}, "target": str(target),
            "arguments": {f"gen_args_{j}": {"arg_0": context, "arg_1": f" {'ABCD'[j]}"} for j in range(len(lls))},
            "resps": [[[str(x), "False"]] for x in lls], "filtered_resps": [[str(x), "False"] for x in lls],
            "acc": 0.0}


def _row(i: int, lps: list[float], gold: str, pred: str) -> dict:
    # keys deliberately out of letter order: the reader must order them itself
    return {"id": f"q{i}", "gold": gold, "pred": pred, "logprobs": dict(reversed(list(zip("ABCD", lps)))),
            "probs": {}}


LM = {0: [-1.0, -2.0, -3.0, -4.0],   # pred A, gold A
      1: [-2.0, -1.0, -3.0, -4.0],   # pred B, gold C
      2: [-5.0, -4.0, -3.0, -0.5],   # pred D, gold D
      3: [-1.2, -1.1, -3.0, -4.0]}   # pred B, gold B
GOLD = {0: 0, 1: 2, 2: 3, 3: 1}


@pytest.fixture
def files(tmp_path):
    # doc_ids written out of order: mapping back to items must go by doc_id, not by line
    samples = write_jsonl(tmp_path / "samples_medqa_local_x.jsonl",
                          [_sample(i, LM[i], GOLD[i]) for i in (2, 0, 3, 1)])
    exact = write_jsonl(tmp_path / "exact.jsonl", [
        _row(0, [-1.0, -2.0, -3.0, -4.0], "A", "A"),
        _row(1, [-2.0, -1.0, -3.0, -4.0005], "C", "B"),    # |diff| 5e-4 on D
        _row(2, [-5.0, -4.0, -3.0, -0.5], "D", "D"),
        _row(3, [-1.2, -1.1002, -3.0, -4.0], "B", "B"),    # |diff| 2e-4 on B
    ])
    fast = write_jsonl(tmp_path / "fast.jsonl", [
        _row(0, [-1.0, -2.0, -3.0, -4.0], "A", "A"),
        _row(1, [-2.0, -1.0, -3.0, -4.0], "C", "B"),
        _row(2, [-5.0, -4.0, -3.0, -0.5], "D", "D"),
        _row(3, [-1.1, -1.2, -3.0, -4.0], "B", "A"),       # flips the close call 3 to A (wrong)
    ])
    return samples, exact, fast


def test_read_samples_parses_strings_by_doc_id(files):
    s = parity.read_samples(files[0])
    assert sorted(s) == [0, 1, 2, 3]
    assert s[1]["logprobs"] == [-2.0, -1.0, -3.0, -4.0] and s[1]["gold"] == 2 and s[1]["pred"] == 1
    assert s[2]["pred"] == 3 and s[0]["context"] == "Question: q\nAnswer:"


def test_read_samples_falls_back_to_resps(tmp_path):
    line = _sample(0, [-3.0, -1.0], 1)
    del line["filtered_resps"]
    s = parity.read_samples(write_jsonl(tmp_path / "s.jsonl", [line]))
    assert s[0]["logprobs"] == [-3.0, -1.0] and s[0]["pred"] == 1


def test_read_predictions_orders_letters(files):
    rows = parity.read_predictions(files[1])
    assert rows[1]["logprobs"] == [-2.0, -1.0, -3.0, -4.0005]
    assert (rows[1]["gold"], rows[1]["pred"]) == (2, 1)


def test_compare_arithmetic(files):
    s = parity.read_samples(files[0])
    r = parity.compare(s, parity.read_predictions(files[1]), parity.read_predictions(files[2]))
    assert r["n"] == 4
    assert r["logprob_max_abs_diff"] == pytest.approx(5e-4, abs=1e-9)
    assert r["logprob_mean_abs_diff"] == pytest.approx((5e-4 + 2e-4) / 4, abs=1e-9)
    assert r["worst_docs"][0]["doc_id"] == 1 and r["worst_docs"][1]["doc_id"] == 3
    # lm-eval right on 0, 2, 3 -> 0.75; exact the same; fast right on 0, 2 -> 0.5
    assert r["accuracy"] == {"lmeval": 0.75, "exact": 0.75, "fast": 0.5}
    assert r["agreement"] == {"exact": 1.0, "fast": 0.75}
    assert r["accuracy_diff"]["fast"] == pytest.approx(0.25)
    assert r["disagreements_fast"] == [3] and r["disagreements_exact"] == [] and r["gold_mismatches"] == []
    ok = parity.checks(r)
    assert ok == {"logprob_max_abs_diff": True, "agreement_fast": False, "accuracy_diff_fast": False}


def test_checks_fail_on_logprob_diff_and_ratio(files):
    s = parity.read_samples(files[0])
    exact = parity.read_predictions(files[1])
    exact[2]["logprobs"][0] += 2e-3
    r = parity.compare(s, exact, exact)
    r["timing"] = parity.summarize_timing({"lmeval": [{"wall_s": 100.0, "peak_rss_mb": 1.0}],
                                           "exact": [{"wall_s": 80.0, "peak_rss_mb": 2.0}],
                                           "fast": [{"wall_s": 51.0, "peak_rss_mb": None}]})
    ok = r["checks"] = parity.checks(r)
    assert ok["logprob_max_abs_diff"] is False and ok["wall_ratio_fast"] is False
    assert ok["agreement_fast"] is True and ok["accuracy_diff_fast"] is True
    assert "FAIL" in parity.render(r)


def test_compare_rejects_misaligned_runs(files):
    s = parity.read_samples(files[0])
    with pytest.raises(ValueError, match="medtune exact 3"):
        parity.compare(s, parity.read_predictions(files[1])[:3])


def test_summarize_timing_medians_and_ratio():
    t = parity.summarize_timing({
        "lmeval": [{"wall_s": 10.0, "peak_rss_mb": 5.0}, {"wall_s": 30.0, "peak_rss_mb": 6.0},
                   {"wall_s": 20.0, "peak_rss_mb": 4.0}],
        "exact": [{"wall_s": 9.0, "peak_rss_mb": None}] * 3,
        "fast": [{"wall_s": 4.0, "peak_rss_mb": 3.0}, {"wall_s": 6.0, "peak_rss_mb": 3.5}, {"wall_s": 5.0,
                                                                                           "peak_rss_mb": 3.0}]})
    assert t["lmeval"]["wall_s"] == 20.0 and t["lmeval"]["peak_rss_mb"] == 6.0
    assert t["exact"]["peak_rss_mb"] is None
    assert t["ratio"] == {"exact": 0.45, "fast": 0.25}


def test_peak_rss_from_time_v(tmp_path):
    f = tmp_path / "rss.txt"
    f.write_text("\tUser time (seconds): 1.0\n\tMaximum resident set size (kbytes): 2048000\n")
    assert parity.peak_rss_mb(f) == 2000.0
    assert parity.peak_rss_mb(tmp_path / "missing") is None


def test_write_task_fills_template(tmp_path):
    data = tmp_path / "dev.jsonl"
    d = parity.write_task(tmp_path / "task", "medmcqa", data, 1)
    text = (d / "medmcqa_local.yaml").read_text()
    assert f'test: "{data}"' in text and "utils.medmcqa_doc_to_target_cop1" in text and "__" not in text
    assert (d / "utils.py").is_file()
    text = (parity.write_task(tmp_path / "task2", "medqa", data, None) / "medqa_local.yaml").read_text()
    assert "task: medqa_local" in text and "__" not in text


def test_detect_cop_base(tmp_path):
    assert parity.detect_cop_base(write_jsonl(tmp_path / "a.jsonl", [{"cop": 1}, {"cop": 4}])) == 1
    assert parity.detect_cop_base(write_jsonl(tmp_path / "b.jsonl", [{"cop": 0}, {"cop": 2}])) == 0
    with pytest.raises(SystemExit):
        parity.detect_cop_base(write_jsonl(tmp_path / "c.jsonl", [{"cop": 1}, {"cop": 2}]))


def test_task_prompts_match_lmeval_and_medtune():
    """The task's prompts are lm-eval's text, and the same text medtune's harness style builds."""
    from medtune.data.items import MCQItem
    from medtune.prompts import build_prompt

    medqa = {"question": "Q?", "options": {"A": "a", "B": "b", "C": "c", "D": "d"}, "answer_idx": "C"}
    assert task_utils.medqa_doc_to_text(medqa) == "Question: Q?\nA. a\nB. b\nC. c\nD. d\nAnswer:"
    assert task_utils.medqa_doc_to_target(medqa) == 2
    item = MCQItem(id="x", question="Q?", options=("a", "b", "c", "d"), answer=2, benchmark="medqa")
    assert build_prompt(item, "harness") == task_utils.medqa_doc_to_text(medqa)

    mcqa = {"question": "Q?", "opa": "a", "opb": "b", "opc": "c", "opd": "d", "cop": 4}
    text = "Question: Q?\nChoices:\nA. a\nB. b\nC. c\nD. d\nAnswer:"
    assert task_utils.medmcqa_doc_to_text(mcqa) == text
    assert task_utils.medmcqa_doc_to_target_cop1(mcqa) == 3 and task_utils.medmcqa_doc_to_target_cop0({"cop": 3}) == 3
    item = MCQItem(id="y", question="Q?", options=("a", "b", "c", "d"), answer=3, benchmark="medmcqa")
    assert build_prompt(item, "harness") == text


def test_readme_commands_parse(monkeypatch):
    """Every `lmeval_parity.py` command in benchmarks/README.md is accepted by the script's parser."""
    import re
    import shlex
    import sys

    text = (BENCH / "README.md").read_text().replace("\\\n", " ")
    commands = [shlex.split(m, comments=True) for m in re.findall(r"^python benchmarks/lmeval_parity\.py (.*)$", text,
                                                                  re.MULTILINE)]
    assert len(commands) >= 2
    monkeypatch.chdir(BENCH.parent)
    for argv in commands:
        if not Path(argv[argv.index("--data") + 1]).is_file():
            pytest.skip("shared data not present")
        args = parity.parse_args([*argv, "--lmeval-python", sys.executable])
        assert args.benchmark in parity.TASKS and args.out.startswith("runs/")
