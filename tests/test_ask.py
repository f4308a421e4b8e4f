"""`medtune ask` and `medtune predict`: eval's scoring on one question or a streamed file, deterministic, resumable."""

import json
from dataclasses import replace

import pytest
from typer.testing import CliRunner

from medtune import ask
from medtune.cli import app
from medtune.config import load_config
from medtune.data.sources import demo_items
from medtune.errors import MedtuneError
from medtune.predict import predict

runner = CliRunner()


@pytest.fixture(scope="module")
def items():
    return demo_items("eval")[:12]


@pytest.fixture(scope="module", params=["letter", "answer"])
def loaded(request, tiny_model_dir):
    return ask.load(tiny_model_dir, method=request.param, log=lambda *_: None)


@pytest.fixture(scope="module")
def loaded_answer(tiny_model_dir):
    return ask.load(tiny_model_dir, method="answer", log=lambda *_: None)


def _eval_rows(tiny_model_dir, items, method):
    from medtune.evaluate import run_eval

    cfg = load_config(None, [f"model={tiny_model_dir}", "eval.mode=exact", f"eval.method={method}", "device=cpu"])
    return run_eval(items, cfg, None, quiet=True, log=lambda *_: None)[1]


@pytest.mark.slow  # ~10 s per method on a busy 2-core machine (eval of 12 items, then 12 asks)
def test_ask_equals_eval_on_the_same_items_and_repeats_exactly(loaded, items, tiny_model_dir):
    rows = _eval_rows(tiny_model_dir, items, loaded.method)
    for item, row in zip(items, rows):
        got = ask.answer(loaded, item, explain=False)
        assert got["answer"] == row["pred"]
        assert got["probs"] == pytest.approx(row["probs"], abs=1e-5)  # eval batches 12 items, ask scores one
        assert got["scoring"] == {"method": f"{loaded.method}-logprob", "mode": "exact", "prompt_style": "harness"}
    first, again = (ask.answer(loaded, items[0], max_new_tokens=8) for _ in range(2))
    assert first == again and first["explanation"]


def test_input_limits_say_what_is_wrong():
    with pytest.raises(MedtuneError, match="limit is 4000"):
        ask.make_item("x" * 4001, ["a", "b"])
    with pytest.raises(MedtuneError, match="1 option"):
        ask.make_item("q?", ["a", " "])
    with pytest.raises(MedtuneError, match="between 2 and 10"):
        ask.make_item("q?", [str(i) for i in range(11)])
    with pytest.raises(MedtuneError, match="option B is 501"):
        ask.make_item("q?", ["a", "b" * 501])
    with pytest.raises(MedtuneError, match="not a JSON item"):
        ask.item_from_json("{nope")
    item = ask.item_from_json('{"question": "Q?", "options": {"A": "one", "B": "two"}}')
    assert item.options == ("one", "two")


@pytest.mark.slow  # ~6 s: three CLI runs, each loading the tiny model
def test_ask_cli_flags_and_stdin_agree(tiny_model_dir):
    args = ["ask", "--model", tiny_model_dir, "--json", "--max-new-tokens", "6"]
    by_flags = runner.invoke(app, [*args, "--question", "Which vitamin prevents scurvy?", "-o", "Vitamin C",
                                   "-o", "Vitamin D", "-o", "Iron"])
    assert by_flags.exit_code == 0, by_flags.output
    by_stdin = runner.invoke(app, args, input=json.dumps(
        {"question": "Which vitamin prevents scurvy?", "options": ["Vitamin C", "Vitamin D", "Iron"]}))
    a, b = json.loads(by_flags.stdout), json.loads(by_stdin.stdout)
    assert a == b and set(a["probs"]) == {"A", "B", "C"} and sum(a["probs"].values()) == pytest.approx(1)
    text = runner.invoke(app, ["ask", "--model", tiny_model_dir, "--question", "Q?", "-o", "x", "-o", "y",
                               "--max-new-tokens", "4"])
    assert text.exit_code == 0 and "answer: " in text.stdout and "Research and education only" in text.stdout
    bad = runner.invoke(app, ["ask", "--model", tiny_model_dir, "--question", "Q?", "-o", "only one"])
    assert bad.exit_code == 2 and bad.output.strip() == "error: 1 option(s) given; give between 2 and 10 non-empty options"


def test_headline_comes_from_the_adapters_run(tmp_path):
    (tmp_path / "adapter").mkdir()
    (tmp_path / "tuned").mkdir()
    results = {"metrics": {"accuracy": 0.5, "ci95": [0.4, 0.6], "n": 64, "permute": {"debiased_accuracy": 0.53}},
               "method": "answer-logprob", "mode": "fast", "data": {"source": "demo:eval"}}
    (tmp_path / "tuned" / "results.json").write_text(json.dumps(results))
    h = ask.find_headline("embedded", str(tmp_path / "adapter"))
    assert h["accuracy"] == 0.5 and h["ci95"] == [0.4, 0.6] and h["debiased_accuracy"] == 0.53
    assert h["method"] == "answer-logprob" and h["eval_set"] == "demo:eval"
    assert ask.find_headline("embedded", None) is None
    (tmp_path / "merged").mkdir()  # an export at its default place names its run in medtune.json
    (tmp_path / "merged" / "medtune.json").write_text(json.dumps({"export": {"run": tmp_path.name}}))
    assert ask.find_headline(str(tmp_path / "merged"), None)["accuracy"] == 0.5


@pytest.mark.slow  # ~10 s on a busy machine: three predict passes and one eval
def test_predict_streams_in_chunks_resumes_and_equals_eval(loaded_answer, items, tiny_model_dir, tmp_path,
                                                            monkeypatch):
    from medtune import scoring

    loaded = loaded_answer
    sizes = []
    real_score = scoring.score
    monkeypatch.setattr(scoring, "score", lambda model, enc, *a, **k: sizes.append(len(enc)) or
                        real_score(model, enc, *a, **k))
    out = tmp_path / "p" / "predictions.jsonl"
    summary = predict(loaded, items, out, "demo:eval", chunk=5, write_csv=True, quiet=True)
    assert summary["new"] == 12 and sizes == [5, 5, 2]  # memory is bounded by one chunk
    full = out.read_text()
    rows = [json.loads(line) for line in full.splitlines()]
    for row, ref in zip(rows, _eval_rows(tiny_model_dir, items, loaded.method)):
        assert row["id"] == ref["id"] and row["pred"] == ref["pred"]
        assert row["probs"] == pytest.approx(ref["probs"], abs=1e-5)
    csv_lines = out.with_suffix(".csv").read_text().splitlines()
    assert csv_lines[0].startswith("id,pred,gold,correct,subject,p_A") and len(csv_lines) == 13

    # a kill mid-write: 7 whole lines and half of the 8th; the rerun scores the 5 missing items only
    lines = full.splitlines(keepends=True)
    out.write_text("".join(lines[:7]) + lines[7][:20])
    sizes.clear()
    again = predict(loaded, items, out, "demo:eval", chunk=5, quiet=True)
    assert (again["skipped"], again["new"], sizes) == (7, 5, [5])
    assert [json.loads(line)["id"] for line in out.read_text().splitlines()] == [it.id for it in items]
    assert predict(loaded, items, out, "demo:eval", quiet=True)["new"] == 0

    other = replace(loaded, method="letter" if loaded.method == "answer" else "answer")
    with pytest.raises(MedtuneError, match="written with other settings"):
        predict(other, items, out, "demo:eval", quiet=True)


def test_predict_cli(tiny_model_dir, tmp_path):
    out = tmp_path / "preds.jsonl"
    r = runner.invoke(app, ["predict", "demo", "--model", tiny_model_dir, "--out", str(out), "--limit", "3", "--csv",
                            "--json", "-q"])
    assert r.exit_code == 0, r.output
    summary = json.loads(r.stdout)
    assert summary["new"] == 3 and summary["method"] == "letter-logprob" and out.with_suffix(".csv").is_file()
    assert len(out.read_text().splitlines()) == 3
    bad = runner.invoke(app, ["predict", "demo", "--model", tiny_model_dir, "--out", str(tmp_path / "x.txt")])
    assert bad.exit_code == 2 and "must be a .jsonl" in bad.output


@pytest.mark.slow  # ~8 s CPU: ask, then predict on the 64 demo questions
def test_readme_ask_and_predict_examples_run(tiny_model_dir, tmp_path, monkeypatch):
    """The README's ask and predict commands run as written (on the tiny model); serve's is run by test_serve.py."""
    import re
    import shlex
    from pathlib import Path

    text = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    section = text.split("## Ask the model: ask, predict, serve")[1].split("\n## ")[0]
    commands = [shlex.split(line.split("#")[0]) for block in re.findall(r"```bash\n(.*?)```", section, re.DOTALL)
                for line in block.splitlines() if line.startswith("medtune ")]
    assert [c[1] for c in commands] == ["ask", "predict", "serve"]
    monkeypatch.chdir(tmp_path)
    for argv in commands[:2]:
        result = runner.invoke(app, [*argv[1:], "--model", tiny_model_dir])
        assert result.exit_code == 0, (argv, result.output)
    assert len((tmp_path / "runs" / "predictions.jsonl").read_text().splitlines()) == len(demo_items("eval"))
    assert (tmp_path / "runs" / "predictions.csv").is_file()


def test_ask_quiet_prints_the_answer_and_nothing_on_stderr(tiny_model_dir):
    """Probe 6: ask had no --quiet, so its weight-loading bar always reached the terminal."""
    r = runner.invoke(app, ["ask", "--model", tiny_model_dir, "--question", "Which organ pumps blood?", "-o", "Heart",
                            "-o", "Lung", "--max-new-tokens", "0", "-q"])
    assert r.exit_code == 0, r.output
    assert r.stdout.startswith("answer: ") and r.stderr == ""
