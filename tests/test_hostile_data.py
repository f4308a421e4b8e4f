"""Hostile input to the data readers, ask and predict (probe 5): each ends in one `error:` line naming the file (or
flag, or stdin field), the line and the field, exit 2, nothing written; and files medtune wrote read back as they are.
Driven through the CLI where a user meets it; fast (no model, or the tiny one)."""

import json
from pathlib import Path

from test_bounded import one_line  # exit 2, one `error:` line, no traceback
from typer.testing import CliRunner

from medtune.cli import app

runner = CliRunner()
MEDQA = {"question": "Which drug treats it?", "options": {"A": "Gentamicin", "B": "Ciprofloxacin", "C": "Ceftriaxone",
                                                        "D": "Trimethoprim"}, "answer_idx": "C", "meta_info": "step1"}
SURROGATE_Q = json.dumps({**MEDQA, "question": "\ud800 lone"})  # ensure_ascii: written as the escape \ud800




def lines(path: Path, rows: list) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows), encoding="utf-8")
    return path


def medmcqa_rows(n: int) -> list[dict]:
    """MedMCQA as published, with only cop values 1-3 (the base can't be told from the file alone)."""
    return [{"id": f"m{k}", "question": f"Question number {k} about anatomy?", "opa": f"a{k}", "opb": f"b{k}",
             "opc": f"c{k}", "opd": f"d{k}", "cop": 1 + k % 3, "exp": "Because.", "subject_name": "Anatomy"}
            for k in range(n)]


# --- lone surrogates (D49, E01, D55, AS10, AS11) ---------------------------------------------------------------------

def test_surrogate_in_a_data_file_is_refused_at_read_naming_file_line_field(tmp_path, tiny_model_dir):
    assert "\\ud800" in SURROGATE_Q and json.loads(SURROGATE_Q)["question"].startswith("\ud800")
    bad = lines(tmp_path / "sur.jsonl", [SURROGATE_Q])
    one_line(runner.invoke(app, ["data", "validate", str(bad)]), f"{bad}:1: question:", "surrogate")  # was "valid"
    one_line(runner.invoke(app, ["data", "validate", str(bad), "--model", tiny_model_dir]),  # was a traceback (D49)
             f"{bad}:1: question:")
    three = lines(tmp_path / "sur3.jsonl", [{**MEDQA, "id": "a"}, SURROGATE_Q, {**MEDQA, "id": "c"}])
    out = tmp_path / "ev"
    one_line(runner.invoke(app, ["eval", "--model", tiny_model_dir, "--data", str(three), "--out", str(out), "-q"]),
             f"{three}:2: question:")  # E01: was "the input holds text that is not valid Unicode" with no file
    assert not out.exists()


def test_surrogate_in_an_option_or_explanation_names_that_field(tmp_path):
    demo = {"question": "Q?", "options": ["fine", "bad \udc80"], "answer": 0}
    bad = tmp_path / "opt.jsonl"
    bad.write_text(json.dumps(demo) + "\n", encoding="utf-8")  # json.dumps escapes the surrogate as \udc80
    one_line(runner.invoke(app, ["data", "validate", str(bad)]), f"{bad}:1: options[1]:", "U+DC80")
    lines(bad, [{**demo, "options": ["a", "b"], "explanation": "x\ud83d"}])
    one_line(runner.invoke(app, ["data", "validate", str(bad)]), f"{bad}:1: explanation:")


def test_split_of_a_file_with_a_surrogate_writes_nothing(tmp_path):
    three = lines(tmp_path / "sur3.jsonl", [{**MEDQA, "id": "a"}, {**MEDQA, "id": "b"}, SURROGATE_Q])
    out = tmp_path / "sp"
    one_line(runner.invoke(app, ["data", "split", str(three), "--train-size", "1", "--out", str(out)]),
             f"{three}:3: question:")
    assert not out.exists()  # D55: train.jsonl was left without eval.jsonl


def test_ask_refuses_surrogates_naming_the_flag_or_stdin_field(tiny_model_dir):
    args = ["ask", "--model", tiny_model_dir, "--max-new-tokens", "0"]
    # invalid UTF-8 bytes in argv reach Python as surrogate escapes (AS11)
    one_line(runner.invoke(app, [*args, "--question", "bad \udcff\udcfe bytes", "-o", "a", "-o", "b"]),
             "--question:", "U+DCFF")
    one_line(runner.invoke(app, [*args, "--question", "q", "-o", "a", "-o", "b\udcff"]), "--option B:")
    one_line(runner.invoke(app, args, input='{"question": "q \\ud800", "options": ["a", "b"]}'),  # AS10
             "stdin: question:")
    one_line(runner.invoke(app, args, input='{"question": "q", "options": {"A": "a", "B": "\\udfff"}}'),
             "stdin: options B:")


# --- ask's stdin JSON (AS8, AS13) -----------------------------------------------------------------------------------

def test_ask_stdin_duplicate_key_and_non_text_question_are_refused(tiny_model_dir):
    args = ["ask", "--model", tiny_model_dir, "--max-new-tokens", "0"]
    one_line(runner.invoke(app, args, input='{"question": "q", "options": ["a", "b"], "question": "x"}'),
             "stdin:", "duplicate key 'question'")
    one_line(runner.invoke(app, args, input='{"question": {"a": 1}, "options": ["a", "b"]}'),
             "stdin: question: expected text, got dict")
    one_line(runner.invoke(app, args, input='{"question": "q", "options": ["a", 2]}'), "stdin: options:")
    one_line(runner.invoke(app, args, input='{"question": "q", "options": {"A": "a", "B": 2}}'), "stdin: options:")


def test_ask_stdin_options_keep_their_letters_or_are_refused(tiny_model_dir):
    from medtune import ask

    item = ask.item_from_json('{"question": "Q?", "options": {"B": "x", "A": "y", "C": "z"}}')
    assert item.options == ("y", "x", "z")  # the option lettered B is B, whatever the key order
    args = ["ask", "--model", tiny_model_dir, "--max-new-tokens", "0", "--json"]
    result = runner.invoke(app, args, input='{"question": "Q?", "options": {"B": "x", "A": "y"}}')
    assert result.exit_code == 0, result.output
    got = json.loads(result.output[result.output.index("{"):])
    assert got["answer_text"] == {"A": "y", "B": "x"}[got["answer"]]
    one_line(runner.invoke(app, args, input='{"question": "q", "options": {"B": "x", "C": "y"}}'),
             "stdin: options: keys B, C", "from A")
    one_line(runner.invoke(app, args, input='{"question": "q", "options": {"A": "x", "b": "y"}}'), "stdin: options:")
    one_line(runner.invoke(app, args, input='{"question": "q", "options": {"A": "x", "B": " ", "C": "z"}}'),
             "stdin: options.B: empty")


# --- Parquet decompression bomb (P05) --------------------------------------------------------------------------------

def test_parquet_dictionary_bomb_is_refused_before_it_is_all_decoded(tmp_path, monkeypatch):
    import pyarrow as pa
    import pyarrow.parquet as pq

    from medtune.data import formats

    n, text = 2000, "x" * 9000
    path = tmp_path / "bomb.parquet"
    pq.write_table(pa.table({"question": pa.array([text] * n).dictionary_encode(), "choices": [["a", "b"]] * n,
                             "answer": [0] * n}), path, compression="zstd")
    assert path.stat().st_size < 20_000  # 18 million characters in a few KB
    monkeypatch.setattr(formats, "MAX_PARQUET_CHARS", 1_000_000)  # the real cap is 256 million: same rule, smaller
    line = one_line(runner.invoke(app, ["data", "validate", str(path)]), f"{path}:row 112: parquet:", "1,000,000")
    assert "characters" in line  # row 112 of 2,000: stopped while decoding, not after materialising every row
    small = tmp_path / "ok.parquet"
    pq.write_table(pa.table({"question": ["Q1?", "Q2?"], "choices": [["a", "b"], ["c", "d"]], "answer": [0, 1]}), small)
    result = runner.invoke(app, ["data", "validate", str(small)])
    assert result.exit_code == 0 and "2 valid items" in result.output, result.output


# --- MedMCQA's cop (DS4, D44) ----------------------------------------------------------------------------------------

def test_a_split_medtune_wrote_from_medmcqa_validates_without_flags(tmp_path):
    src = lines(tmp_path / "mm.jsonl", medmcqa_rows(12))
    out = tmp_path / "sp"
    result = runner.invoke(app, ["data", "split", str(src), "--cop-base", "1", "--train-size", "6", "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert '"benchmark": "medmcqa"' in (out / "train.jsonl").read_text()
    for name in ("train", "eval"):
        result = runner.invoke(app, ["data", "validate", str(out / f"{name}.jsonl")])
        assert result.exit_code == 0 and "6 valid items (medmcqa format)" in result.output, result.output
    one_line(runner.invoke(app, ["data", "validate", str(src)]), "pass --cop-base")  # raw MedMCQA: still asked


def test_medmcqa_cop_that_is_not_an_integer_says_so(tmp_path):
    bad = lines(tmp_path / "strcop.jsonl", [{**medmcqa_rows(1)[0], "cop": "\u00b9"}])
    line = one_line(runner.invoke(app, ["data", "validate", str(bad)]), f"{bad}:1: cop:", "integer", "'\u00b9'")
    assert "only values 1-3" not in line
    ok = lines(tmp_path / "strint.jsonl", [{**r, "cop": str(r["cop"])} for r in medmcqa_rows(3)] +
               [{**medmcqa_rows(1)[0], "id": "z", "cop": "4"}])  # integers written as text are integers
    result = runner.invoke(app, ["data", "validate", str(ok)])
    assert result.exit_code == 0 and "1-based (published) detected" in result.output, result.output


# --- --map naming a column that does not exist (M05) -----------------------------------------------------------------

def test_map_naming_a_missing_column_lists_the_columns(tmp_path):
    csv = tmp_path / "m.csv"
    csv.write_text("q,a,b,lab\nWhat?,x,y,0\n")
    one_line(runner.invoke(app, ["data", "validate", str(csv), "--map", "question=q,options=a|a2,answer=lab"]),
             f"{csv}:1: a2: no such column", "q, a, b, lab", "--map")
    jl = lines(tmp_path / "m.jsonl", [{"q": "Q?", "a": "x", "b": "y", "lab": 0}, {"q": "Q2?", "a": "x", "lab": 1}])
    one_line(runner.invoke(app, ["data", "validate", str(jl), "--map", "question=q,options=a|b,answer=lab"]),
             f"{jl}:2: b: missing")  # missing in a later row only: that row, "missing" (was "null")


# --- train sizes the source cannot give (T12, T13) -------------------------------------------------------------------

def test_train_size_larger_than_the_source_is_refused(tmp_path, tiny_model_dir):
    base = ["train", "--set", f"model={tiny_model_dir}", "--set", "device=cpu", "--set", "train.max_steps=1", "-q"]
    out = tmp_path / "t12"
    one_line(runner.invoke(app, [*base, "--set", "data.train_size=5000", "--out", str(out)]),
             "data.train_size=5000: demo:train has only 128 items")  # was: trained on 128, silently
    assert not out.exists()
    one_item = lines(tmp_path / "one.jsonl", [{**MEDQA, "id": "only"}])
    line = one_line(runner.invoke(app, [*base, "--set", f"data.source={one_item}", "--out", str(out)]),
                    f"data.source {one_item}: 1 item(s)", "at least 2")
    assert "train size 0" not in line and "data.train_size" not in line  # no value the user did not set
    three = lines(tmp_path / "three.jsonl", [{**MEDQA, "id": str(k)} for k in range(3)])
    one_line(runner.invoke(app, [*base, "--set", f"data.source={three}", "--set", "data.train_size=3", "--out",
                                 str(out)]), f"data.train_size=3: {three} has 3 items", "at most 2")
    one_line(runner.invoke(app, ["data", "split", str(one_item), "--train-size", "1", "--out", str(out)]),
             f"--train-size 1: {one_item} has 1 item(s)")
    assert not out.exists()


def test_shipped_recipes_train_sizes_fit_their_sources():
    """The rule above must not refuse a shipped recipe: a train_size on a file needs more items than it names."""
    import yaml

    recipes = Path(__file__).resolve().parents[1] / "recipes"
    for path in recipes.glob("*.yaml"):
        data = (yaml.safe_load(path.read_text()) or {}).get("data") or {}
        size, source = data.get("train_size"), data.get("source", "demo")
        if size is None or not str(source).endswith(".jsonl"):
            continue  # demo without a size; Hub presets (182k MedMCQA rows) are far above any recipe's size
        file = (recipes.parent / source).resolve()
        if file.is_file():
            assert sum(1 for line in file.read_text().splitlines() if line.strip()) > size, path


# --- predict with a broken sidecar (PR9) -----------------------------------------------------------------------------

def test_predict_names_the_broken_meta_file(tmp_path, tiny_model_dir):
    out = tmp_path / "m.jsonl"
    args = ["predict", "demo", "--out", str(out), "--limit", "2", "--model", tiny_model_dir, "-q"]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    meta = tmp_path / "m.meta.json"
    meta.write_text('{"source": \n')
    line = one_line(runner.invoke(app, args), f"{meta}:2: not valid JSON", "another --out")
    assert f"{out}:" not in line  # was: blamed the valid predictions file
    meta.write_text("[1, 2]")
    one_line(runner.invoke(app, args), f"{meta}: expected a JSON object")
