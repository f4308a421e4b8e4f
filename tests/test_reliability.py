"""Bad input never costs a user their work: every case below ends in exit 2, one `error:` line naming the file, line
and field where there is one, no traceback, and an output dir that is not created or left as it was. Plus the pieces
that make it so: atomic writes, the output-dir rule, the disk check, encodings, hostile pickles, overlong items."""

import json
import os
import pickle
import shutil
from pathlib import Path

import pytest
from typer.testing import CliRunner

from medtune import io
from medtune.cli import app
from medtune.data.formats import read_file
from medtune.data.items import MCQItem
from medtune.errors import DataError, MedtuneError

runner = CliRunner()
DEMO = {"id": "q1", "question": "Which organ pumps blood?", "options": ["Heart", "Lung", "Liver", "Skin"], "answer": 0}
MEDQA = {"question": "Q?", "options": {"A": "a", "B": "b", "C": "c", "D": "d"}, "answer_idx": "B"}


class Payload:
    """Unpickling this creates the marker file: proof that a pickle ran code."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def jsonl(path: Path, rows: list) -> str:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return str(path)


def _tiny_adapter(model_dir: str, out: Path) -> Path:
    """A real PEFT adapter (safetensors) on `model_dir`, with a medtune.json like train.py writes."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from medtune.models import base_signature

    model = AutoModelForCausalLM.from_pretrained(model_dir)
    peft = get_peft_model(model, LoraConfig(r=2, target_modules=["q_proj"], task_type="CAUSAL_LM"))
    peft.save_pretrained(out)
    (out / "medtune.json").write_text(json.dumps({"base_model": model_dir, "prompt_style": "harness",
                                                  "base_signature": base_signature(model.config)}))
    return out


@pytest.fixture(scope="module")
def world(tmp_path_factory, tiny_model_dir):
    """Every bad file once: data, recipes, models, adapters, output paths."""
    from transformers import AutoModelForCausalLM, LlamaConfig

    d = tmp_path_factory.mktemp("bad")
    w = {"d": d, "model": tiny_model_dir, "marker": d / "PWNED", "good": jsonl(d / "good.jsonl", [DEMO])}
    (d / "utf8.jsonl").write_bytes(json.dumps(DEMO).encode() + b"\n" + b'{"id": "q2", "question": "caf\xe9"}\n')
    (d / "binary.jsonl").write_bytes(b"\x00\x01\x02PK\x03\x04" * 50)
    full = json.dumps({**DEMO, "id": "q2"})
    (d / "truncated.jsonl").write_text(json.dumps(DEMO) + "\n" + full[: len(full) // 2])
    (d / "corrupt.json").write_text('[{"question": "q", "options": ["a", "b"],\n "answer": }]')
    (d / "scalar.json").write_text("42")
    (d / "strings.json").write_text('["a"]')
    (d / "columns.csv").write_text("question,A,B,C,D,answer\nq,a,b,c,d,A\nq2,a,b\n")
    (d / "mmlu.csv").write_text("What?,a,b,c,d,Z\n")
    (d / "bad.parquet").write_bytes(b"PAR1 this is not parquet at all PAR1")
    (d / "empty.jsonl").write_text("")
    jsonl(d / "answer.jsonl", [{**DEMO, "answer": 7}])
    jsonl(d / "answer_idx.jsonl", [{**MEDQA, "answer_idx": "F"}])
    jsonl(d / "noquestion.jsonl", [{k: v for k, v in MEDQA.items() if k != "question"}])
    jsonl(d / "emptyoption.jsonl", [{**DEMO, "options": ["Heart", " ", "Liver"]}])
    jsonl(d / "dupes.jsonl", [DEMO, DEMO])
    jsonl(d / "unknown.jsonl", [{"foo": 1, "bar": 2}])
    jsonl(d / "cop.jsonl", [{"question": "q", "opa": "a", "opb": "b", "opc": "c", "opd": "d", "cop": 2}])
    jsonl(d / "qtype.jsonl", [{**DEMO, "question": 12}])
    jsonl(d / "optstype.jsonl", [{**DEMO, "options": "Heart, Lung"}])
    jsonl(d / "notobject.jsonl", [json.dumps([1, 2])])
    (d / "binary.yaml").write_bytes(b"\x89PNG\r\n\x1a\n\x00\x00\xff\xfe" * 20)
    (d / "invalid.yaml").write_text("lora:\n  r: 4\n bad: [\n")
    (d / "list.yaml").write_text("- a\n- b\n")
    (d / "unknown.yaml").write_text("lora:\n  rank: 4\n")
    (d / "type.yaml").write_text("lora:\n  r: abc\n")
    (d / "afile").write_text("not a dir")
    # models
    nocfg = d / "nomodel"
    nocfg.mkdir()
    (nocfg / "weights.txt").write_text("x")
    pkl_model = d / "pickle-model"
    shutil.copytree(tiny_model_dir, pkl_model)
    (pkl_model / "model.safetensors").unlink()
    (pkl_model / "pytorch_model.bin").write_bytes(pickle.dumps(Payload(w["marker"])))
    noweights = d / "noweights-model"
    shutil.copytree(tiny_model_dir, noweights)
    (noweights / "model.safetensors").unlink()
    badcfg = d / "badcfg-model"
    shutil.copytree(tiny_model_dir, badcfg)
    (badcfg / "config.json").write_text('{"model_type": "llama", ')
    # adapters
    (d / "no-adapter").mkdir()
    corrupt = d / "corrupt-adapter"
    corrupt.mkdir()
    (corrupt / "adapter_config.json").write_text('{"peft_type": "LORA", "r": ')
    notpeft = d / "notpeft-adapter"
    notpeft.mkdir()
    (notpeft / "adapter_config.json").write_text('{"hello": 1}')
    binad = d / "bin-adapter"
    binad.mkdir()
    (binad / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 2, "target_modules": ["q_proj"]}))
    (binad / "adapter_model.bin").write_bytes(pickle.dumps(Payload(w["marker"])))
    other = d / "other-base"
    cfg = LlamaConfig(vocab_size=128, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                      num_attention_heads=2, num_key_value_heads=1)
    AutoModelForCausalLM.from_config(cfg).save_pretrained(other)
    _tiny_adapter(str(other), d / "other-adapter")
    # a run dir with an adapter record, for export
    run = d / "run"
    (run / "adapter").mkdir(parents=True)
    (run / "adapter" / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA"}))
    (run / "adapter" / "medtune.json").write_text(json.dumps({"base_model": tiny_model_dir, "prompt_style": "harness"}))
    for name, extra in (("pickle-ckpt", "custom_checkpoint_0.pkl"), ("changed-ckpt", None)):
        ckpt = d / name / "checkpoints" / "step-0000001"
        ckpt.mkdir(parents=True)
        (ckpt / "state.json").write_text(json.dumps({"step": 1, "config": {"train.lr": 0.5}}))
        if extra:
            (ckpt / extra).write_bytes(pickle.dumps(Payload(w["marker"])))
    full_dir = d / "full"
    full_dir.mkdir()
    (full_dir / "results.json").write_text("{}")
    return w


def _eval(w, data, *extra):
    return ["eval", "--model", w["model"], "--data", data, "--out", str(w["d"] / "out"), *extra]


def _train(w, *sets):
    return ["train", "--set", f"model={w['model']}", "--set", "device=cpu", *[x for s in sets for x in ("--set", s)],
            "--out", str(w["d"] / "out")]


def _d(w, name):
    return str(w["d"] / name)


# (case id, argv from the world, substrings the one error line must contain)
CASES = [
    # data: encodings, broken files, bad rows (validate and eval)
    ("invalid-utf8", lambda w: ["data", "validate", _d(w, "utf8.jsonl")], ["utf8.jsonl:2", "encoding", "UTF-8"]),
    ("invalid-utf8-eval", lambda w: _eval(w, _d(w, "utf8.jsonl")), ["utf8.jsonl:2", "encoding"]),
    ("binary-data", lambda w: ["data", "validate", _d(w, "binary.jsonl")], ["binary.jsonl", "binary"]),
    ("truncated-jsonl", lambda w: ["data", "validate", _d(w, "truncated.jsonl")], ["truncated.jsonl:2", "json"]),
    ("corrupt-json", lambda w: _eval(w, _d(w, "corrupt.json")), ["corrupt.json:2", "json"]),
    ("json-scalar", lambda w: ["data", "validate", _d(w, "scalar.json")], ["scalar.json", "expected a list"]),
    ("json-strings", lambda w: ["data", "validate", _d(w, "strings.json")], ["strings.json:1", "row"]),
    ("csv-columns", lambda w: ["data", "validate", _d(w, "columns.csv")], ["columns.csv:3", "columns"]),
    ("csv-answer", lambda w: ["data", "validate", _d(w, "mmlu.csv")], ["mmlu.csv:1", "answer", "'Z'"]),
    ("corrupt-parquet", lambda w: ["data", "validate", _d(w, "bad.parquet")], ["bad.parquet", "parquet"]),
    ("empty-file", lambda w: _eval(w, _d(w, "empty.jsonl")), ["empty.jsonl", "no rows"]),
    ("answer-out-of-range", lambda w: _eval(w, _d(w, "answer.jsonl")), ["answer.jsonl:1", "answer", "out of range"]),
    ("answer-idx-letter", lambda w: ["data", "validate", _d(w, "answer_idx.jsonl")], ["answer_idx.jsonl:1",
                                                                                       "answer_idx"]),
    ("missing-question", lambda w: ["data", "validate", _d(w, "noquestion.jsonl")], ["noquestion.jsonl:1",
                                                                                      "question: missing"]),
    ("empty-option", lambda w: ["data", "validate", _d(w, "emptyoption.jsonl")], ["emptyoption.jsonl:1", "options"]),
    ("duplicate-id", lambda w: ["data", "validate", _d(w, "dupes.jsonl")], ["dupes.jsonl:2", "id: duplicate"]),
    ("unknown-format", lambda w: ["data", "validate", _d(w, "unknown.jsonl")], ["unknown.jsonl", "unknown format"]),
    ("ambiguous-cop", lambda w: ["data", "validate", _d(w, "cop.jsonl")], ["cop.jsonl", "--cop-base"]),
    ("question-type", lambda w: ["data", "validate", _d(w, "qtype.jsonl")], ["qtype.jsonl:1", "question",
                                                                             "expected text"]),
    ("options-type", lambda w: ["data", "validate", _d(w, "optstype.jsonl")], ["optstype.jsonl:1", "options"]),
    ("row-not-object", lambda w: ["data", "validate", _d(w, "notobject.jsonl")], ["notobject.jsonl:1", "row"]),
    ("missing-data-file", lambda w: _eval(w, _d(w, "nope.jsonl")), ["nope.jsonl", "not a file"]),
    ("bad-map", lambda w: ["data", "validate", w["good"], "--map", "question=q,foo=x"], ["--map", "foo=x"]),
    ("bad-cop-base", lambda w: ["data", "validate", _d(w, "cop.jsonl"), "--cop-base", "5"], ["--cop-base", "5"]),
    # recipes
    ("binary-recipe", lambda w: ["train", "-c", _d(w, "binary.yaml"), "--out", _d(w, "out")], ["binary.yaml",
                                                                                                "not a text file"]),
    ("invalid-yaml", lambda w: ["train", "-c", _d(w, "invalid.yaml"), "--out", _d(w, "out")], ["invalid.yaml:",
                                                                                                 "YAML"]),
    ("recipe-list", lambda w: ["run", "-c", _d(w, "list.yaml"), "--out", _d(w, "out")], ["list.yaml", "mapping"]),
    ("recipe-unknown-key", lambda w: ["run", "-c", _d(w, "unknown.yaml"), "--out", _d(w, "out")], ["lora", "rank",
                                                                                                     "valid keys"]),
    ("recipe-type", lambda w: ["train", "-c", _d(w, "type.yaml"), "--out", _d(w, "out")], ["lora: r", "abc"]),
    ("missing-recipe", lambda w: ["train", "-c", _d(w, "nope.yaml"), "--out", _d(w, "out")], ["nope.yaml",
                                                                                               "not found"]),
    # flags and values (range checks: config.py)
    ("set-no-equals", lambda w: _eval(w, w["good"], "--set", "lora.r"), ["--set", "key=value"]),
    ("lora-r-negative", lambda w: _train(w, "lora.r=-3"), ["lora", "r", "-3"]),
    ("batch-size-zero", lambda w: _train(w, "train.batch_size=0"), ["batch_size"]),
    ("limit-zero", lambda w: _eval(w, w["good"], "--limit", "0"), ["limit"]),
    ("limit-negative", lambda w: _eval(w, w["good"], "--limit", "-1"), ["limit"]),
    ("lr-zero", lambda w: _train(w, "train.lr=0"), ["lr"]),
    ("scheduler-typo", lambda w: _train(w, "train.scheduler=cosin"), ["scheduler", "cosin"]),
    ("max-steps-zero", lambda w: _train(w, "train.max_steps=0"), ["max_steps"]),
    ("prompt-style", lambda w: _eval(w, w["good"], "--prompt-style", "fancy"), ["prompt_style", "fancy"]),
    ("eval-method", lambda w: _eval(w, w["good"], "--method", "vibes"), ["method", "vibes"]),
    ("train-dtype", lambda w: _train(w, "train.dtype=float8"), ["dtype", "float8"]),
    # models
    ("not-a-model-dir", lambda w: ["eval", "--model", _d(w, "nomodel"), "--data", w["good"], "--out", _d(w, "out")],
     ["nomodel", "config.json"]),
    ("pickle-model", lambda w: ["eval", "--model", _d(w, "pickle-model"), "--data", w["good"], "--out",
                                _d(w, "out")], ["pickle-model", "safetensors"]),
    ("model-without-weights", lambda w: ["eval", "--model", _d(w, "noweights-model"), "--data", w["good"], "--out",
                                         _d(w, "out")], ["noweights-model", "could not load"]),
    ("corrupt-model-config", lambda w: ["eval", "--model", _d(w, "badcfg-model"), "--data", w["good"], "--out",
                                        _d(w, "out")], ["badcfg-model", "could not load"]),
    # adapters
    ("adapter-missing", lambda w: _eval(w, w["good"], "--adapter", _d(w, "nope-adapter")), ["nope-adapter",
                                                                                            "adapter_config.json"]),
    ("adapter-no-config", lambda w: _eval(w, w["good"], "--adapter", _d(w, "no-adapter")), ["no-adapter",
                                                                                           "not a PEFT adapter"]),
    ("adapter-corrupt-config", lambda w: _eval(w, w["good"], "--adapter", _d(w, "corrupt-adapter")),
     ["corrupt-adapter", "adapter_config.json", "corrupt"]),
    ("adapter-not-peft", lambda w: _eval(w, w["good"], "--adapter", _d(w, "notpeft-adapter")), ["peft_type"]),
    ("adapter-bin", lambda w: _eval(w, w["good"], "--adapter", _d(w, "bin-adapter")), ["adapter_model.bin",
                                                                                       "pickle", "safetensors"]),
    ("adapter-other-base", lambda w: _eval(w, w["good"], "--adapter", _d(w, "other-adapter")),
     ["other-adapter", "trained for base model"]),
    # output paths
    ("out-under-file", lambda w: ["eval", "--model", w["model"], "--data", w["good"], "--out", _d(w, "afile/x")],
     ["afile", "is a file"]),
    ("out-is-file", lambda w: ["data", "split", w["good"], "--train-size", "1", "--out", _d(w, "afile")],
     ["afile", "not a directory"]),
    ("eval-out-not-empty", lambda w: ["eval", "--model", w["model"], "--data", w["good"], "--out", _d(w, "full")],
     ["full", "not empty", "results.json", "--overwrite"]),
    ("split-out-not-empty", lambda w: ["data", "split", w["good"], "--train-size", "1", "--out", _d(w, "full")],
     ["full", "not empty"]),
    ("run-out-not-empty", lambda w: ["run", "--model", w["model"], "--data", w["good"], "--out", _d(w, "full")],
     ["full", "not empty"]),
    ("train-out-not-empty", lambda w: ["train", "--set", f"model={w['model']}", "--out", _d(w, "full")],
     ["full", "not empty", "--overwrite"]),
    ("export-out-not-empty", lambda w: ["export", _d(w, "run"), "--out", _d(w, "full")], ["full", "not empty"]),
    ("export-over-adapter", lambda w: ["export", _d(w, "run"), "--out", _d(w, "run/adapter"), "--no-merge"],
     ["would overwrite"]),
    ("export-no-adapter", lambda w: ["export", _d(w, "nomodel")], ["no trained adapter"]),
    # checkpoints (train --resume): refused before anything in them is read or the model loads
    ("resume-planted-pickle", lambda w: ["train", "--resume", "--set", f"model={w['model']}", "--out",
                                         _d(w, "pickle-ckpt")], ["step-0000001", "custom_checkpoint_0.pkl", "pickle"]),
    ("resume-changed-config", lambda w: ["train", "--resume", "--set", f"model={w['model']}", "--out",
                                         _d(w, "changed-ckpt")], ["--resume", "train.lr: 0.5 -> 0.0002"]),
]


PARAMS = [pytest.param(c, id=c[0]) for c in CASES]


def _snapshot(d: Path) -> dict:
    """Every entry, and every file's size and mtime (a directory's own mtime moves with the write probe)."""
    return {str(p.relative_to(d)): (p.stat().st_size, p.stat().st_mtime_ns) if p.is_file() else "dir"
            for p in sorted(d.rglob("*"))}


def test_at_least_40_cases():
    assert len(CASES) >= 40 and len({c[0] for c in CASES}) == len(CASES)


@pytest.mark.parametrize("case", PARAMS)
def test_bad_input_one_line_exit_2_nothing_written(world, case):
    _, argv, expected = case
    before = _snapshot(world["d"])
    try:
        result = runner.invoke(app, argv(world))
    finally:  # a case that wrongly succeeds must not leave an output dir that changes the next case
        after = _snapshot(world["d"])
        shutil.rmtree(world["d"] / "out", ignore_errors=True)
    out = result.output
    assert result.exit_code == 2, out
    assert result.exception is None or isinstance(result.exception, SystemExit), repr(result.exception)
    assert "Traceback" not in out
    errors = [line for line in out.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and out.rstrip().endswith(errors[0]), out  # one error line, and it is the last
    for text in expected:
        assert text in errors[0], (text, errors[0])
    assert after == before  # no output dir created, nothing changed
    assert not world["marker"].exists()  # no pickle payload ran


# --- the pieces ----------------------------------------------------------------------------------------------------

def test_atomic_write_leaves_old_file_on_failure(tmp_path):
    target = io.write_text(tmp_path / "a.json", "old")

    def rows():
        yield {"ok": 1}
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        io.write_jsonl(target, rows())
    assert target.read_text() == "old" and [p.name for p in tmp_path.iterdir()] == ["a.json"]
    with pytest.raises(RuntimeError), io.atomic_dir(tmp_path / "d") as tmp:
        (tmp / "half").write_text("x")
        raise RuntimeError
    assert [p.name for p in tmp_path.iterdir()] == ["a.json"]
    with io.atomic_dir(tmp_path / "d") as tmp:
        (tmp / "whole").write_text("x")
    assert [p.name for p in (tmp_path / "d").iterdir()] == ["whole"]


def test_claim_out_dir_refuses_then_cleans_up(tmp_path):
    full = tmp_path / "full"
    full.mkdir()
    (full / "keep.txt").write_text("x")
    with pytest.raises(MedtuneError, match=r"full: already exists and is not empty \(keep.txt\)"):
        io.check_out_dir(full)
    io.check_out_dir(full, overwrite=True)
    with pytest.raises(ValueError), io.claim_out_dir(tmp_path / "new"):
        raise ValueError  # heavy work failed: the dir created for it goes again
    assert not (tmp_path / "new").exists()
    # the ranks of one `accelerate launch` claim the same dir: another rank's write probe is not content
    racing = tmp_path / "racing"
    racing.mkdir()
    (racing / ".write-probe.tmp-4242").write_bytes(b"")
    assert io.check_out_dir(racing) == racing


@pytest.mark.skipif(os.geteuid() == 0, reason="root can write anywhere")
def test_unwritable_out_is_found_first(tmp_path):
    locked = tmp_path / "locked"
    locked.mkdir(mode=0o500)
    with pytest.raises(MedtuneError, match="not writable"):
        io.check_out_dir(locked / "out")


def test_disk_check_refuses_with_both_numbers(tmp_path, monkeypatch):
    usage = shutil.disk_usage(tmp_path)
    monkeypatch.setattr(shutil, "disk_usage", lambda p: usage._replace(free=100 << 20))
    with pytest.raises(MedtuneError, match=r"needs about 1\.2 GiB .*, 100\.0 MiB free"):
        io.check_free_space(tmp_path, 1 << 30, "a checkpoint")
    io.check_free_space(tmp_path, 1 << 20, "a checkpoint")  # fits


def test_bom_and_utf16_are_read(tmp_path):
    row = json.dumps(DEMO) + "\n"
    (tmp_path / "bom.jsonl").write_bytes(b"\xef\xbb\xbf" + row.encode())
    (tmp_path / "utf16.jsonl").write_bytes(b"\xff\xfe" + row.encode("utf-16-le"))
    (tmp_path / "bom.csv").write_bytes(b"\xef\xbb\xbfquestion,A,B,answer\nq?,a,b,B\n")
    for name in ("bom.jsonl", "utf16.jsonl"):
        assert read_file(tmp_path / name)[0].question == DEMO["question"]
    assert read_file(tmp_path / "bom.csv")[0].answer == 1
    result = runner.invoke(app, ["data", "validate", str(tmp_path / "bom.jsonl")])
    assert result.exit_code == 0 and "1 valid items" in result.output


def test_line_separator_inside_a_question_is_not_a_new_row(tmp_path):
    path = tmp_path / "ls.jsonl"
    path.write_text(json.dumps({**DEMO, "question": "one\u2028two"}, ensure_ascii=False) + "\n", encoding="utf-8")
    assert read_file(path)[0].question == "one\u2028two"


def test_invalid_utf8_names_line_and_column(tmp_path):
    path = tmp_path / "x.jsonl"
    path.write_bytes(b'{"a": 1}\n{"b": "ok"}\n{"c": "\xff"}\n')
    with pytest.raises(DataError, match=r"x.jsonl:3: encoding: invalid UTF-8 byte 0xff at column 8"):
        read_file(path)


def test_adapter_pickle_never_runs(world, tiny_model_dir):
    from medtune.models import load_model

    with pytest.raises(MedtuneError, match="adapter_model.bin"):
        load_model(tiny_model_dir, adapter=_d(world, "bin-adapter"), log=lambda *_: None)
    with pytest.raises(MedtuneError, match="safetensors"):
        load_model(_d(world, "pickle-model"), log=lambda *_: None)
    assert not world["marker"].exists()


def test_adapter_on_a_same_shape_but_other_base_warns(world, tiny_model_dir, tmp_path):
    from medtune.models import load_model

    twin = tmp_path / "twin"
    shutil.copytree(tiny_model_dir, twin)
    adapter = _tiny_adapter(tiny_model_dir, tmp_path / "ad")
    logged = []
    load_model(str(twin), adapter=str(adapter), log=logged.append)
    assert any("trained for base model" in m for m in logged)
    logged.clear()
    load_model(tiny_model_dir, adapter=str(adapter), log=logged.append)
    assert not logged


def test_latest_questions_is_not_a_test_split():
    from medtune.data.prepare import refuse_test

    refuse_test("data/latest_questions.jsonl")
    refuse_test("contest.csv")
    for name in ("medqa/test.jsonl", "mmlu_anatomy_test.csv", "medqa-test-4opt.jsonl"):
        with pytest.raises(MedtuneError, match="test split"):
            refuse_test(name)


# --- overlong items ------------------------------------------------------------------------------------------------

def _long_item(words: int) -> MCQItem:
    story = " ".join(f"w{i}" for i in range(words))
    return MCQItem(id="long", question=f"{story} Which drug is first line?", options=("Aspirin", "Heparin", "Insulin",
                                                                                      "Saline"), answer=1)


def test_fit_prompt_cuts_the_question_from_the_left(tokenizer_dir):
    from medtune.models import load_tokenizer
    from medtune.prompts import CUT_MARK, build_prompt, fit_prompt

    tok = load_tokenizer(tokenizer_dir)
    short = _long_item(5)
    assert fit_prompt(short, "harness", tok, 256) == (short, build_prompt(short, "harness"), 0)
    item = _long_item(3000)
    fitted, prompt, cut = fit_prompt(item, "harness", tok, 200)
    assert len(tok(prompt, add_special_tokens=False).input_ids) <= 200 and cut > 1000
    assert prompt.startswith(f"Question: {CUT_MARK}") and prompt.endswith("D. Saline\nAnswer:")
    assert fitted.question.endswith("Which drug is first line?") and fitted.options == item.options
    with pytest.raises(MedtuneError, match="options are too long"):
        fit_prompt(item, "harness", tok, 10)


def test_5mb_question_is_cut_not_allocated(tokenizer_dir):
    """A 5 MB question is pre-cut by characters before tokenizing: fast, and the prompt fits."""
    import time

    from medtune.models import load_tokenizer
    from medtune.prompts import fit_prompt

    tok = load_tokenizer(tokenizer_dir)
    item = MCQItem(id="huge", question="lorem ipsum " * 450_000 + "What now?", options=("a", "b"), answer=0)
    started = time.time()
    _, prompt, cut = fit_prompt(item, "harness", tok, 512)
    assert len(tok(prompt, add_special_tokens=False).input_ids) <= 512 and cut > 5_000_000
    assert time.time() - started < 30


def test_validate_warns_about_overlong_items(tmp_path):
    path = jsonl(tmp_path / "long.jsonl", [DEMO, {**DEMO, "id": "q2", "question": "word " * 2000}])
    result = runner.invoke(app, ["data", "validate", path, "--max-length", "512"])
    assert result.exit_code == 0 and "2 valid items" in result.output
    assert "warning: item q2" in result.output and "item q1" not in result.output


def test_hashed_overlap_equals_overlap_on_the_texts():
    from dataclasses import replace

    from medtune.data.split import item_hashes, overlap, overlap_hashed

    text = "a patient presents with fever cough and chest pain after travel abroad which test is best"
    words = text.split()
    train = [MCQItem(id=f"t{k}", question=" ".join(words[k:] + words[:k]), options=("x", "y"), answer=0)
             for k in range(6)]
    evals = [replace(train[0], id="same"), replace(train[2], id="near", question=train[2].question + " now?",
                                                   options=("p", "q")),
             MCQItem(id="new", question="an unrelated question about kidneys and salt", options=("x", "y"), answer=1)]
    want = overlap(train, evals)
    assert want["exact"] and want["near"]
    assert overlap_hashed(item_hashes(train), evals) == want


def test_training_and_scoring_cut_overlong_items_by_the_same_rule(tokenizer_dir, tiny_model_dir):
    from medtune.batches import tokenize_example
    from medtune.config import load_config
    from medtune.models import load_tokenizer
    from medtune.prompts import CUT_MARK
    from medtune.scoring import encode

    tok = load_tokenizer(tokenizer_dir)
    tok.model_max_length = 200
    item = _long_item(3000)
    enc = encode([item], "harness", tok)[0]
    assert enc.cut > 0 and len(enc.context) + max(map(len, enc.options)) <= 200
    cfg = load_config(None, [f"model={tiny_model_dir}", "train.max_length=200", "data.shuffle_options=false"])
    ex = tokenize_example(item, cfg, tok)
    assert ex.cut > 0 and len(ex.input_ids) <= 200 and ex.input_ids[-1] == tok.eos_token_id
    for ids in (enc.context, ex.input_ids[: ex.prompt_len]):
        text = tok.decode(ids)
        assert text.startswith(f"Question: {CUT_MARK}") and text.endswith("Which drug is first line?\nA. Aspirin\n"
                                                                            "B. Heparin\nC. Insulin\nD. Saline\nAnswer:")
    assert tok.decode(ex.input_ids[ex.prompt_len:]).startswith(" B. Heparin")  # the answer is never cut


# --- issue 18: bounded work and one line (docs/reliability.md section 4b) ------------------------------------------

def _issue18_files(d: Path) -> None:
    bomb = "a: &a [x, x, x, x, x, x, x, x, x]\n" + "".join(
        f"{n}: &{n} [{', '.join([f'*{p}'] * 9)}]\n" for p, n in zip("abcdefgh", "bcdefghi"))
    (d / "bomb.yaml").write_text(bomb + "lora:\n  target_modules: *i\n")
    (d / "dupkey.yaml").write_text("train:\n  lr: 0.1\n  lr: 0.2\n")
    (d / "inflr.yaml").write_text("train:\n  lr: .inf\n")
    (d / "infwd.yaml").write_text("train:\n  weight_decay: .inf\n")
    jsonl(d / "objid.jsonl", [{**DEMO, "id": {"a": 1}}])
    (d / "deep.jsonl").write_text('{"a":' * 100_000 + "1" + "}" * 100_000 + "\n")
    (d / "bigfield.csv").write_text("question,A,B,answer\n" + "x" * 200_000 + ",a,b,A\n")


CASES_18 = [
    ("yaml-alias-bomb", lambda w: _train(w) + ["-c", _d(w, "bomb.yaml")], ["bomb.yaml:", "alias bomb"]),
    ("yaml-duplicate-key", lambda w: _train(w) + ["-c", _d(w, "dupkey.yaml")], ["dupkey.yaml:3", "duplicate key 'lr'"]),
    ("lr-inf", lambda w: _train(w) + ["-c", _d(w, "inflr.yaml")], ["lr", "finite"]),
    ("weight-decay-inf", lambda w: _train(w) + ["-c", _d(w, "infwd.yaml")], ["weight_decay", "finite"]),
    ("lora-r-1e9", lambda w: _train(w, "lora.r=1000000000"), ["lora.r", "1000000000", "out of range"]),
    ("seed-outside-numpy", lambda w: _train(w, "train.seed=4294967296"), ["train.seed", "0..4294967295"]),
    ("data-seed-negative", lambda w: _train(w, "data.seed=-1"), ["data.seed", "0..4294967295"]),
    ("id-is-an-object", lambda w: ["data", "validate", _d(w, "objid.jsonl")], ["objid.jsonl:1", "id: expected text"]),
    ("json-100k-deep", lambda w: _eval(w, _d(w, "deep.jsonl")), ["deep.jsonl:1", "nested too deeply"]),
    ("csv-line-it-has", lambda w: ["data", "validate", _d(w, "bigfield.csv")], ["bigfield.csv:2", "csv"]),
]


@pytest.mark.parametrize("case", [pytest.param(c, id=c[0]) for c in CASES_18])
def test_issue18_bad_input_one_line_exit_2_nothing_written(world, case):
    _issue18_files(world["d"])
    test_bad_input_one_line_exit_2_nothing_written(world, case)
