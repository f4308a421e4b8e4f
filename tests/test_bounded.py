"""Issue 18: bounded work and one line. Hostile chat templates stop within a budget; library errors that escape from
transformers, PEFT, safetensors or jinja (corrupt or truncated weights, a symlink to a non-model file, a corrupt
state.json, a full disk, a target module that matches nothing) end in one `error:` line naming the file, exit 2, no
traceback. Everything goes through the CLI, as a user meets it."""

import errno
import json
import os
import shutil
import subprocess
import time
from pathlib import Path

import pytest
from typer.testing import CliRunner

from medtune.cli import app
from medtune.data.items import MCQItem
from medtune.errors import MedtuneError, explain

runner = CliRunner()
DEMO = {"id": "q1", "question": "Which organ pumps blood?", "options": ["Heart", "Lung", "Liver", "Skin"], "answer": 0}


def one_line(result, *expected) -> str:
    """Exit 2, exactly one `error:` line and it is the last, no traceback; returns that line."""
    out = result.output
    assert result.exit_code == 2, out
    assert result.exception is None or isinstance(result.exception, SystemExit), repr(result.exception)
    assert "Traceback" not in out
    errors = [line for line in out.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and out.rstrip().endswith(errors[0]), out
    for text in expected:
        assert text in errors[0], (text, errors[0])
    if os.environ.get("MEDTUNE_SHOW"):
        print("\nSHOW", errors[0])
    return errors[0]


@pytest.fixture(scope="module")
def adapter(tmp_path_factory, tiny_model_dir) -> Path:
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    out = tmp_path_factory.mktemp("adapter") / "adapter"
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    get_peft_model(model, LoraConfig(r=2, target_modules=["q_proj"], task_type="CAUSAL_LM")).save_pretrained(out)
    return out


@pytest.fixture
def good(tmp_path) -> str:
    path = tmp_path / "good.jsonl"
    path.write_text(json.dumps(DEMO) + "\n")
    return str(path)


# --- chat templates ------------------------------------------------------------------------------------------------

HOSTILE_TEMPLATES = {
    "loop-1e5x1e5": ("{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}x", "loop steps"),
    "macro-2^60": ("{% macro f(n) %}{% if n > 0 %}{{ f(n-1) }}{{ f(n-1) }}{% endif %}{% endmacro %}{{ f(60) }}",
                   "loop steps"),
    "recursion": ("{% macro f(n) %}{{ f(n) }}{% endmacro %}{{ f(1) }}", "recurses"),
    "string-bomb": ("{{ 'x' * 10000000000 }}", "repetition"),
    "list-bomb": ("{{ ([1] * 100000) * 100000 }}", "repetition"),
    "width-bomb": ("{{ 'x'|center(1000000000) }}", "width or count"),
    "method-width": ("{{ 'x'.ljust(1000000000) }}", "width or count"),
    "doubling": ("{% set ns = namespace(s='x') %}{% for i in range(60) %}{% set ns.s = ns.s ~ ns.s %}{% endfor %}"
                 + "{{ ns.s }}", "rendered text"),
    "output-loop": ("{% set s = 'x' * 9000000 %}{% for i in range(1000) %}{{ s }}{% endfor %}", "rendered text"),
    "raise_exception": ("{{ raise_exception('System role not supported') }}", "System role not supported"),
    "include": ("{% include 'secrets.txt' %}", "TemplateNotFound"),
    "sandbox": ("{{ ''.__class__.__mro__[1].__subclasses__() }}", "SecurityError"),
    "syntax": ("{% for %}", "TemplateSyntaxError"),
    "undefined": ("{{ foo.bar }}", "UndefinedError"),
}


@pytest.mark.parametrize("name", sorted(HOSTILE_TEMPLATES))
def test_hostile_chat_template_stops_within_budget_in_one_line(tokenizer_dir, name):
    from transformers import AutoTokenizer

    from medtune.prompts import build_prompt

    template, expected = HOSTILE_TEMPLATES[name]
    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    tok.chat_template = template
    item = MCQItem(id="x", question="Q?", options=("a", "b"), answer=0)
    started = time.monotonic()
    with pytest.raises(MedtuneError) as e:
        build_prompt(item, "chat", tok)
    assert time.monotonic() - started < 5
    message = str(e.value)
    assert "\n" not in message and expected in message and "chat template" in message
    assert tokenizer_dir in message and "--prompt-style harness" in message


def test_budgeted_render_equals_transformers_render(tokenizer_dir):
    from transformers import AutoTokenizer

    from medtune.prompts import build_prompt, render_bounded

    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    item = MCQItem(id="x", question="Which organ?", options=("Heart", "Lung"), answer=0)
    messages = [{"role": "user", "content": "Which organ?"}]
    options = {"add_generation_prompt": True, "enable_thinking": False}
    assert render_bounded(tok.get_chat_template(), messages, {**tok.special_tokens_map, **options}) == \
        tok.apply_chat_template(messages, tokenize=False, **options)
    started = time.monotonic()
    for _ in range(200):
        build_prompt(item, "chat", tok)
    assert time.monotonic() - started < 5  # the budget costs little per prompt


def test_eval_with_a_looping_chat_template_is_one_line_and_writes_nothing(tiny_model_dir, tmp_path, good):
    model = tmp_path / "model"
    shutil.copytree(tiny_model_dir, model)
    cfg_path = model / "tokenizer_config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["chat_template"] = HOSTILE_TEMPLATES["loop-1e5x1e5"][0]
    cfg_path.write_text(json.dumps(cfg))
    (model / "chat_template.jinja").unlink(missing_ok=True)
    started = time.monotonic()
    result = runner.invoke(app, ["eval", "--model", str(model), "--data", good, "--out", str(tmp_path / "out"),
                                 "--prompt-style", "chat"])
    one_line(result, str(model), "chat template", "loop steps")
    assert time.monotonic() - started < 60 and not (tmp_path / "out").exists()


# --- weights that are not safetensors, truncated, or a link to something else --------------------------------------

def _variant(src: Path, dst: Path, name: str, how: str) -> Path:
    shutil.copytree(src, dst)
    f = dst / name
    if how == "garbage":
        f.write_bytes(b"this is not a safetensors file\n" * 20)
    elif how == "truncated":
        f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
    elif how == "symlink":
        target = dst.parent / f"notes-{dst.name}.txt"
        target.write_text("a text file, not model weights\n" * 10)
        f.unlink()
        os.symlink(target, f)
    return f


@pytest.mark.parametrize("how", ["garbage", "truncated", "symlink"])
def test_adapter_weights_not_safetensors_truncated_or_a_link_are_one_line(adapter, tmp_path, tiny_model_dir, good,
                                                                          how):
    f = _variant(adapter, tmp_path / "ad", "adapter_model.safetensors", how)
    result = runner.invoke(app, ["eval", "--model", tiny_model_dir, "--data", good, "--out", str(tmp_path / "out"),
                                 "--adapter", str(tmp_path / "ad")])
    line = one_line(result, str(f), "not a readable safetensors file")
    assert ("a link to" in line) == (how == "symlink")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("how", ["garbage", "truncated"])
def test_model_weights_not_safetensors_or_truncated_are_one_line(tiny_model_dir, tmp_path, good, how):
    f = _variant(Path(tiny_model_dir), tmp_path / "m", "model.safetensors", how)
    result = runner.invoke(app, ["eval", "--model", str(tmp_path / "m"), "--data", good, "--out",
                                 str(tmp_path / "out")])
    one_line(result, str(f), "not a readable safetensors file")
    assert not (tmp_path / "out").exists()


def test_adapter_config_nested_100k_deep_is_one_line(adapter, tmp_path, tiny_model_dir, good):
    shutil.copytree(adapter, tmp_path / "ad")
    (tmp_path / "ad" / "adapter_config.json").write_text("[" * 100_000 + "]" * 100_000)
    result = runner.invoke(app, ["eval", "--model", tiny_model_dir, "--data", good, "--out", str(tmp_path / "out"),
                                 "--adapter", str(tmp_path / "ad")])
    one_line(result, "adapter_config.json")


def test_data_file_nested_100k_deep_is_one_line_through_the_cli(tmp_path):
    (tmp_path / "deep.json").write_text("[" * 100_000 + "]" * 100_000)
    one_line(runner.invoke(app, ["data", "validate", str(tmp_path / "deep.json")]), "deep.json", "nested too deeply")


# --- checkpoints (checkpoint.py is read through the CLI only) --------------------------------------------------------

@pytest.mark.parametrize("state", ["{\"step\": 1, \"config\": ", "\x00\x01binary", "[" * 100_000])
def test_corrupt_state_json_is_one_line(tmp_path, tiny_model_dir, state):
    ckpt = tmp_path / "run" / "checkpoints" / "step-0000001"
    ckpt.mkdir(parents=True)
    (ckpt / "state.json").write_text(state)
    before = sorted(p.name for p in ckpt.iterdir())
    result = runner.invoke(app, ["train", "--resume", "--set", f"model={tiny_model_dir}", "--set", "device=cpu",
                                 "--out", str(tmp_path / "run")])
    one_line(result, "state.json")
    assert sorted(p.name for p in ckpt.iterdir()) == before


# --- LoRA targets ----------------------------------------------------------------------------------------------------

def test_target_modules_matching_nothing_is_one_line(tmp_path, tiny_model_dir):
    result = runner.invoke(app, ["train", "--set", f"model={tiny_model_dir}", "--set", "device=cpu", "--set",
                                 "lora.target_modules=[no_such_proj]", "--set", "train.max_steps=1", "--set",
                                 "data.train_size=8", "--out", str(tmp_path / "run")])
    one_line(result, "lora.target_modules", "no_such_proj", "all-linear")
    assert not (tmp_path / "run" / "adapter").exists()


# --- a full disk -----------------------------------------------------------------------------------------------------

@pytest.fixture(params=["tmpfs", "simulated"])
def full_disk(request, tmp_path, monkeypatch):
    """A directory on a full filesystem: a 1 MiB tmpfs filled up (where this test may mount one: root, Linux), and
    a simulated one where every medtune write (medtune.io.write_bytes, the one helper) raises ENOSPC."""
    mnt = tmp_path / "small"
    mnt.mkdir()
    if request.param == "simulated":
        from medtune import io

        def no_space(path, data):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))

        monkeypatch.setattr(io, "write_bytes", no_space)
        yield mnt
        return
    if not (shutil.which("mount") and os.geteuid() == 0 and subprocess.run(
            ["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(mnt)], check=False, capture_output=True
    ).returncode == 0):
        pytest.skip("cannot mount a tmpfs here (needs root); the simulated case covers it")
    free = shutil.disk_usage(mnt).free
    (mnt / "filler").write_bytes(b"\0" * (free - 3 * 4096))  # room for the lock and probe files, not for results
    yield mnt
    subprocess.run(["umount", "-l", str(mnt)], check=False)


@pytest.fixture
def many(tmp_path) -> str:
    """50 items: their predictions (~20 KB) do not fit in what the full disk has left."""
    path = tmp_path / "many.jsonl"
    path.write_text("".join(json.dumps({**DEMO, "id": f"q{i}"}) + "\n" for i in range(50)))
    return str(path)


def test_full_disk_in_eval_is_one_line(full_disk, tiny_model_dir, many):
    out = full_disk / "eval"
    one_line(runner.invoke(app, ["eval", "--model", tiny_model_dir, "--data", many, "--out", str(out)]),
             "disk full", str(full_disk), "free space")
    assert not (out / "results.json").exists()


def test_full_disk_in_predict_is_one_line(full_disk, tiny_model_dir, many):
    one_line(runner.invoke(app, ["predict", many, "--model", tiny_model_dir, "--out", str(full_disk / "p.jsonl")]),
             "disk full", str(full_disk), "free space")


def test_full_disk_in_export_no_merge_is_one_line(full_disk, adapter, tiny_model_dir, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(adapter, run / "adapter")
    (run / "adapter" / "medtune.json").write_text(json.dumps({"base_model": tiny_model_dir,
                                                               "prompt_style": "harness"}))
    one_line(runner.invoke(app, ["export", str(run), "--no-merge", "--out", str(full_disk / "export")]),
             "disk full", "free space")
    assert not (full_disk / "export").exists()


# --- the mapping itself ----------------------------------------------------------------------------------------------

def test_explain_maps_each_library_error_and_leaves_bugs_alone(tmp_path):
    import jinja2
    import yaml
    from safetensors import SafetensorError

    def raised(fn):
        try:
            fn()
        except Exception as e:  # noqa: BLE001 (the test collects whatever the library raises)
            return e
        raise AssertionError("did not raise")

    bad = tmp_path / "w.safetensors"
    bad.write_bytes(b"\xff" * 64)
    from safetensors.torch import load_file

    cases = {
        "safetensors": (raised(lambda: load_file(str(bad))), str(bad)),
        "jinja": (jinja2.exceptions.TemplateSyntaxError("bad", 1), "chat template"),
        "json": (raised(lambda: json.loads("{")), "not valid JSON"),
        "recursion": (RecursionError("maximum recursion depth exceeded"), "nested too deeply"),
        "yaml": (raised(lambda: yaml.safe_load("a: [")), "not valid YAML"),
        "enospc": (OSError(errno.ENOSPC, "No space left on device", str(tmp_path / "x")), "disk full"),
        "edquot": (OSError(errno.EDQUOT, "Disk quota exceeded", str(tmp_path / "x")), "quota"),
        "erofs": (OSError(errno.EROFS, "Read-only file system", str(tmp_path / "x")), "read-only file system"),
        "eacces": (OSError(errno.EACCES, "Permission denied", str(tmp_path / "x")), "permission denied on"),
        "memory": (MemoryError(), "out of memory"),
    }
    assert isinstance(cases["safetensors"][0], SafetensorError)
    for name, (exc, expected) in cases.items():
        mapped = explain(exc)
        assert isinstance(mapped, MedtuneError) and expected in str(mapped) and "\n" not in str(mapped), name
    for bug in (KeyError("x"), ValueError("y"), TypeError("z"), OSError(errno.EBADF, "bad file descriptor")):
        assert explain(bug) is None


@pytest.mark.slow
def test_truncated_checkpoint_weights_are_one_line_on_resume(tmp_path, tiny_model_dir):
    """A real 2-step run with a checkpoint per step; the newest checkpoint's weights cut to 50 bytes."""
    argv = ["train", "--set", f"model={tiny_model_dir}", "--set", "device=cpu", "--set", "train.max_steps=2", "--set",
            "train.save_every=1", "--set", "data.train_size=8", "--set", "train.batch_size=4", "--out",
            str(tmp_path / "run"), "--quiet"]
    assert runner.invoke(app, argv).exit_code == 0
    last = max((tmp_path / "run" / "checkpoints").iterdir())
    weights = last / "adapter.safetensors"
    weights.write_bytes(weights.read_bytes()[:50])
    one_line(runner.invoke(app, [*argv, "--resume"]), str(weights), "not a readable safetensors file",
             "resume from the one before")


def test_text_that_is_not_valid_unicode_is_one_line(tmp_path, tiny_model_dir):
    """A lone surrogate (valid JSON escape, not encodable text) reached the tokenizer as a traceback (hostile probe)."""
    from typer.testing import CliRunner

    from medtune.cli import app

    data = tmp_path / "s.jsonl"
    data.write_text('{"question": "Q\\ud800", "options": {"A": "a", "B": "b", "C": "c", "D": "d"}, "answer_idx": "A"}\n')
    result = CliRunner().invoke(app, ["eval", "--model", tiny_model_dir, "--data", str(data), "--out",
                                      str(tmp_path / "o"), "--quiet"])
    assert result.exit_code == 2, result.output
    lines = [x for x in result.output.splitlines() if x.strip()]
    assert len(lines) == 1 and "not valid Unicode" in lines[0]


# --- round two of the hostile probe: what it still found after the first fixes ----------------------------------------

def test_duplicate_json_key_is_refused_naming_line_and_key(tmp_path):
    row = json.dumps(DEMO)
    dup = row[:-1] + ', "answer": 2}'  # "answer" twice: json.loads would silently keep 2
    (tmp_path / "d.jsonl").write_text(row + "\n" + dup.replace('"q1"', '"q2"') + "\n")
    one_line(runner.invoke(app, ["data", "validate", str(tmp_path / "d.jsonl")]), "d.jsonl:2", "duplicate key 'answer'")
    (tmp_path / "d.json").write_text(f"[{dup}]")
    one_line(runner.invoke(app, ["data", "validate", str(tmp_path / "d.json")]), "d.json", "duplicate key 'answer'")


def test_unclosed_csv_quote_does_not_swallow_the_next_row(tmp_path):
    (tmp_path / "m.csv").write_text('q1,"open,b,c,d,A\nq2,a,b,c,d,B\nq3,a,b,c,d,C\n')
    one_line(runner.invoke(app, ["data", "validate", str(tmp_path / "m.csv")]), "m.csv:1", "never closed")


def test_a_question_of_megabytes_is_refused_before_any_work(tmp_path):
    (tmp_path / "big.jsonl").write_text(json.dumps({**DEMO, "question": "x" * 5_000_000}) + "\n")
    started = time.monotonic()
    one_line(runner.invoke(app, ["data", "validate", str(tmp_path / "big.jsonl")]), "big.jsonl:1", "question",
             "5,000,000 characters")
    assert time.monotonic() - started < 30


def test_config_json_claiming_a_huge_model_is_refused_before_allocation(tiny_model_dir, tmp_path, good):
    shutil.copytree(tiny_model_dir, tmp_path / "m")
    cfg = json.loads((tmp_path / "m" / "config.json").read_text())
    (tmp_path / "m" / "config.json").write_text(json.dumps({**cfg, "hidden_size": 10**9}))
    started = time.monotonic()
    result = runner.invoke(app, ["eval", "--model", str(tmp_path / "m"), "--data", good, "--out", str(tmp_path / "o")])
    one_line(result, "config.json", "does not belong to these weights")
    assert time.monotonic() - started < 60 and not (tmp_path / "o").exists()


@pytest.mark.parametrize("name", ["./no-such-model", "runs-typo/nested/model", "/nonexistent/model"])
def test_misspelled_local_model_path_is_not_sent_to_the_hub(tmp_path, good, name, monkeypatch):
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)  # would the Hub be asked? It must not be: one line at once
    started = time.monotonic()
    result = runner.invoke(app, ["eval", "--model", name, "--data", good, "--out", str(tmp_path / "o")])
    one_line(result, name, "no such directory")
    assert time.monotonic() - started < 20


@pytest.mark.parametrize("field,value", [("r", "x"), ("r", 0), ("lora_alpha", None), ("target_modules", 5),
                                         ("lora_dropout", 2)])
def test_adapter_config_with_a_bad_lora_field_is_one_line(adapter, tmp_path, tiny_model_dir, good, field, value):
    shutil.copytree(adapter, tmp_path / "ad")
    cfg = json.loads((tmp_path / "ad" / "adapter_config.json").read_text())
    (tmp_path / "ad" / "adapter_config.json").write_text(json.dumps({**cfg, field: value}))
    result = runner.invoke(app, ["eval", "--model", tiny_model_dir, "--data", good, "--out", str(tmp_path / "out"),
                                 "--adapter", str(tmp_path / "ad")])
    one_line(result, "adapter_config.json", field)


GOOD_ROW = {"id": "q1", "pred": "A", "gold": "A", "correct": True, "logprobs": {"A": -0.1, "B": -2.5}}


@pytest.mark.parametrize("bad", ["[]", "5", json.dumps({**GOOD_ROW, "correct": "yes"}),
                                 json.dumps({**GOOD_ROW, "id": {"x": 1}}),
                                 json.dumps({**GOOD_ROW, "logprobs": {"A": "high", "B": -1}}),
                                 json.dumps(GOOD_ROW).replace("-0.1", "NaN")])
@pytest.mark.parametrize("parity", [False, True])
def test_compare_on_malformed_predictions_is_one_line_not_a_verdict(tmp_path, bad, parity):
    a, b = tmp_path / "a", tmp_path / "b"
    for d, line in ((a, json.dumps(GOOD_ROW)), (b, bad)):
        d.mkdir()
        (d / "predictions.jsonl").write_text(line + "\n")
    one_line(runner.invoke(app, ["compare", str(a), str(b), *(["--parity"] if parity else [])]),
             str(b / "predictions.jsonl") + ":1")


def test_second_signal_during_training_is_one_line_with_its_exit_code(monkeypatch, tmp_path, tiny_model_dir):
    """The first SIGTERM asks for a checkpoint; a second one stops at once (checkpoint.Signals raises
    KeyboardInterrupt(signum)): the CLI names it and exits 128 + the signal's number, never silently."""
    import signal

    import medtune.train

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt(signal.SIGTERM)

    monkeypatch.setattr(medtune.train, "train", interrupted)
    result = runner.invoke(app, ["train", "--set", f"model={tiny_model_dir}", "--set", "device=cpu", "--set",
                                 "data.train_size=8", "--out", str(tmp_path / "run")])
    assert result.exit_code == 128 + signal.SIGTERM, result.output
    errors = [x for x in result.output.splitlines() if x.startswith("error:")]
    assert len(errors) == 1 and "SIGTERM: stopped at once" in errors[0], result.output


def test_second_signal_handler_raises_with_the_signal_number():
    import signal

    from medtune.checkpoint import Signals

    with Signals() as signals:
        signals._handle(signal.SIGTERM, None)
        assert signals.received == signal.SIGTERM
        with pytest.raises(KeyboardInterrupt) as e:
            signals._handle(signal.SIGINT, None)
    assert e.value.args == (signal.SIGINT,)


def test_resume_without_an_earlier_run_is_refused(tmp_path, tiny_model_dir):
    result = runner.invoke(app, ["train", "--resume", "--set", f"model={tiny_model_dir}", "--set", "device=cpu",
                                 "--out", str(tmp_path / "never-ran")])
    one_line(result, "--resume", "holds no earlier run", "drop --resume")
    assert not (tmp_path / "never-ran").exists()


@pytest.mark.parametrize("key", ["train.batch_size", "eval.batch_size", "train.grad_accum"])
def test_absurd_batch_sizes_are_refused_not_warned_about(tmp_path, key):
    one_line(runner.invoke(app, ["train", "--set", f"{key}=100000000000000000000", "--out", str(tmp_path / "r")]),
             key, "out of range")


def test_predict_resume_names_the_corrupt_line(tmp_path, tiny_model_dir, good):
    out = tmp_path / "p.jsonl"
    argv = ["predict", good, "--model", tiny_model_dir, "--out", str(out), "--quiet"]
    assert runner.invoke(app, argv).exit_code == 0
    out.write_text(out.read_text() + "{not json\n" + json.dumps({"id": "q9"}) + "\n")
    one_line(runner.invoke(app, argv), f"{out}:2")


# --- round three: a fresh probe of 242 cases (40 not clean before these fixes) ----------------------------------------

@pytest.mark.parametrize("name,content,expected", [
    ("results.json", "[1]", "expected a JSON object"),
    ("results.json", json.dumps({"kind": "run", "tuned": {}}), "base.metrics"),
    ("results.json", json.dumps({"kind": "run", "base": {"metrics": {"accuracy": 0.5, "n": 2, "ci95": [0, 1]}},
                                 "tuned": {"metrics": {"accuracy": 0.5, "n": 2, "ci95": [0, 1]}}, "comparison": {}}),
     "comparison.raw"),
    ("cost.json", "{}", "kind"), ("cost.json", "[]", "expected a JSON object"),
    ("cost.json", json.dumps({"kind": "train", "wall_s": "abc", "device_kind": "cpu", "device_name": "x",
                              "device_count": 1}), "wall_s"),
])
@pytest.mark.parametrize("verb", ["report", "cost"])
def test_edited_run_records_are_one_line_in_report_and_cost(tmp_path, name, content, expected, verb):
    run = tmp_path / "run"
    run.mkdir()
    (run / name).write_text(content)
    if name == "results.json":  # cost reads cost.json first, report results.json: give each the other file sound
        (run / "cost.json").write_text(json.dumps({"kind": "run", "wall_s": 1.0, "device_kind": "cpu",
                                                   "device_name": "cpu", "device_count": 1}))
    argv = ["report", str(run), "-q"] if verb == "report" else ["cost", str(run), "--price-per-hour", "1"]
    result = runner.invoke(app, argv)
    if verb == "report" and name == "cost.json":
        one_line(result, "results.json")  # the report reads results.json first; there is none here
    else:
        one_line(result, name, expected)


@pytest.mark.parametrize("meta,expected", [("[]", "expected a JSON object"),
                                           (json.dumps({"prompt_style": "__import__('os')"}), "prompt_style")])
def test_adapter_medtune_json_is_checked_before_the_model_loads(adapter, tmp_path, tiny_model_dir, good, meta,
                                                                expected):
    shutil.copytree(adapter, tmp_path / "ad")
    (tmp_path / "ad" / "medtune.json").write_text(meta)
    result = runner.invoke(app, ["eval", "--model", tiny_model_dir, "--data", good, "--out", str(tmp_path / "out"),
                                 "--adapter", str(tmp_path / "ad")])
    one_line(result, "medtune.json", expected)


def test_a_model_dir_without_tokenizer_files_is_one_line(tiny_model_dir, tmp_path, good):
    (tmp_path / "m").mkdir()
    for f in ("config.json", "model.safetensors"):
        shutil.copy(Path(tiny_model_dir) / f, tmp_path / "m" / f)
    result = runner.invoke(app, ["eval", "--model", str(tmp_path / "m"), "--data", good, "--out", str(tmp_path / "o")])
    one_line(result, "no tokenizer here")


@pytest.mark.parametrize("change", [{"hidden_size": 64}, {"num_hidden_layers": 100_000}])
def test_a_config_that_does_not_fit_its_weights_is_one_line(tiny_model_dir, tmp_path, good, change):
    shutil.copytree(tiny_model_dir, tmp_path / "m")
    cfg = json.loads((tmp_path / "m" / "config.json").read_text())
    (tmp_path / "m" / "config.json").write_text(json.dumps({**cfg, **change}))
    result = runner.invoke(app, ["eval", "--model", str(tmp_path / "m"), "--data", good, "--out", str(tmp_path / "o")])
    one_line(result, "config.json")


def test_parquet_claiming_more_rows_than_the_limit_is_refused_before_reading(tmp_path, monkeypatch):
    import pyarrow as pa
    import pyarrow.parquet as pq

    from medtune.data import formats

    monkeypatch.setattr(formats, "MAX_ROWS", 10)  # the rule, at a size a test can write
    pq.write_table(pa.table({"question": ["q"] * 11}), tmp_path / "rows.parquet")
    one_line(runner.invoke(app, ["data", "validate", str(tmp_path / "rows.parquet")]), "11 rows", "limit is 10")


@pytest.mark.parametrize("text,expected", [
    ('{"id": "q", "question": "Q", "options": ["a", "b"], "answer": 1' + "0" * 5000 + "}\n", "d.jsonl:1"),
    ('{"id": "q", "question": "Q", "options": ["only one"], "answer": 0}\n', "options"),
])
def test_numbers_beyond_python_limits_and_one_option_items_are_refused(tmp_path, text, expected):
    (tmp_path / "d.jsonl").write_text(text)
    one_line(runner.invoke(app, ["data", "validate", str(tmp_path / "d.jsonl")]), expected)


def test_csv_with_one_option_column_and_mapped_object_options_are_refused(tmp_path):
    (tmp_path / "one.csv").write_text("q1,only,A\n")
    one_line(runner.invoke(app, ["data", "validate", str(tmp_path / "one.csv")]), "at least 2")
    (tmp_path / "m.jsonl").write_text(json.dumps({"qq": "Q", "o1": {"x": 1}, "o2": "b", "lab": 0}) + "\n")
    one_line(runner.invoke(app, ["data", "validate", str(tmp_path / "m.jsonl"), "--map",
                                 "question=qq,options=o1|o2,answer=lab"]), "o1", "expected text")


def test_a_pubmedqa_key_with_a_newline_stays_one_line(tmp_path):
    (tmp_path / "p.json").write_text(json.dumps({"12\n34": "not an object"}))
    one_line(runner.invoke(app, ["data", "validate", str(tmp_path / "p.json")]), "'12\\n34'")


def test_out_through_a_missing_dir_and_dotdot_is_judged_as_the_dir_it_names(tmp_path, good):
    keep = tmp_path / "keep"
    keep.mkdir()
    (keep / "train.jsonl").write_text("PRECIOUS")
    result = runner.invoke(app, ["data", "split", good, "--train-size", "1", "--out", f"{keep}/missing/.."])
    one_line(result, "keep")
    assert (keep / "train.jsonl").read_text() == "PRECIOUS" and not (keep / "missing").exists()


@pytest.mark.parametrize("argv,expected", [
    (["data", "split", "GOOD", "--train-size", "1", "--out", "OUT", "--seed", "-1"], "--seed"),
    (["data", "validate", "GOOD", "--max-length", "-5"], "--max-length"),
    (["ask", "--question", "Q?", "-o", "a", "-o", "b", "--max-new-tokens", "1000000000"], "--max-new-tokens"),
    (["cost", "RUN", "--price-per-hour", "-5"], "--price-per-hour"),
    (["cost", "RUN", "--price-per-hour", "1e308"], "--price-per-hour"),
    (["cost", "RUN", "--price-per-hour", "nan"], "--price-per-hour"),
    (["report", "RUN", "--price-per-hour", "nan"], "--price-per-hour"),
    (["compare", "RUN", "RUN", "--parity", "--tolerance-flips", "nan"], "--tolerance-flips"),
    (["serve", "--port", "99999"], "--port"),
    (["serve", "--host", "no such host..", "--port", "7992"], "cannot listen there"),
])
def test_numeric_flags_and_addresses_are_checked_before_any_work(tmp_path, good, argv, expected):
    argv = [a.replace("GOOD", good).replace("OUT", str(tmp_path / "o")).replace("RUN", str(tmp_path)) for a in argv]
    started = time.monotonic()
    one_line(runner.invoke(app, argv), expected)
    assert time.monotonic() - started < 20  # before any model loads


@pytest.mark.parametrize("prices,expected", [("FIFO", "not a regular file"), ("x: !!python/object:os.system ls",
                                                                                "not valid YAML"),
                                             ("cpu: .nan", "expected a mapping")])
def test_hostile_prices_files_are_one_line(tmp_path, prices, expected):
    path = tmp_path / "prices.yaml"
    if prices == "FIFO":
        os.mkfifo(path)
    else:
        path.write_text(prices)
    started = time.monotonic()
    one_line(runner.invoke(app, ["cost", str(tmp_path), "--prices", str(path)]), "prices.yaml", expected)
    assert time.monotonic() - started < 20


def test_report_out_that_is_a_directory_is_one_line(tmp_path):
    one_line(runner.invoke(app, ["report", str(tmp_path), "--out", str(tmp_path)]), "not a regular file")


def test_parity_on_huge_logprobs_is_one_line_not_an_overflow(tmp_path):
    row = {"id": "q1", "pred": "A", "gold": "A", "correct": True, "logprobs": {"A": -1e308, "B": -1e308}}
    for d in ("a", "b"):
        (tmp_path / d).mkdir()
        (tmp_path / d / "predictions.jsonl").write_text(json.dumps(row) + "\n")
    one_line(runner.invoke(app, ["compare", str(tmp_path / "a"), str(tmp_path / "b"), "--parity"]), "logprobs")


def test_adapter_tokenizer_asking_for_its_own_code_never_runs_it_even_on_a_terminal(adapter, tmp_path, tiny_model_dir,
                                                                                    good):
    """An adapter whose tokenizer_config.json has an `auto_map` to its own Python: with a pseudo-terminal attached
    (where transformers would ask "run the custom code? [y/N]" if medtune left trust_remote_code unset), medtune
    answers one line, exit 2, and the adapter's code never runs."""
    import pty
    import select
    import sys

    ad = tmp_path / "ad"
    shutil.copytree(adapter, ad)
    for f in Path(tiny_model_dir).glob("tokenizer*"):
        shutil.copy(f, ad / f.name)
    marker = tmp_path / "PWNED"
    (ad / "evil_tok.py").write_text(f"open({str(marker)!r}, 'w').write('ran')\n"
                                    "from transformers import PreTrainedTokenizerFast as EvilTokenizer\n")
    cfg = json.loads((ad / "tokenizer_config.json").read_text())
    cfg.update({"auto_map": {"AutoTokenizer": [None, "evil_tok.EvilTokenizer"]}, "tokenizer_class": "EvilTokenizer"})
    (ad / "tokenizer_config.json").write_text(json.dumps(cfg))
    main, child = pty.openpty()
    proc = subprocess.Popen([sys.executable, "-m", "medtune", "eval", "--model", tiny_model_dir, "--data", good,
                             "--out", str(tmp_path / "out"), "--adapter", str(ad), "--quiet"],
                            stdin=child, stdout=child, stderr=child, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    os.close(child)
    output, deadline = b"", time.monotonic() + 120
    while time.monotonic() < deadline:
        ready, _, _ = select.select([main], [], [], 1)
        if ready:
            try:
                chunk = os.read(main, 4096)
            except OSError:  # the child closed the terminal
                break
            if not chunk:
                break
            output += chunk
        elif proc.poll() is not None:
            break
    proc.kill() if proc.poll() is None else None
    os.close(main)
    text = output.decode(errors="replace")
    assert proc.wait() == 2, text
    assert "[y/N]" not in text and "Traceback" not in text, text
    errors = [line for line in text.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "own Python code" in errors[0], text
    assert not marker.exists() and not (tmp_path / "out").exists()


# --- round four: the re-run probe's new cases ------------------------------------------------------------------------

def test_report_and_predict_never_replace_a_fifo_a_dir_or_a_device(tmp_path, good, tiny_model_dir):
    fifo = tmp_path / "fifo.html"
    os.mkfifo(fifo)
    one_line(runner.invoke(app, ["report", str(tmp_path), "--out", str(fifo)]), "not a regular file")
    assert fifo.is_fifo()
    (tmp_path / "file").write_text("x")
    one_line(runner.invoke(app, ["report", str(tmp_path), "--out", str(tmp_path / "file" / "r.html")]), "is a file")
    (tmp_path / "p.csv").mkdir()
    argv = ["predict", good, "--model", tiny_model_dir, "--out", str(tmp_path / "p.jsonl"), "--csv", "-q"]
    one_line(runner.invoke(app, argv), "p.csv", "not a regular file")
    assert not (tmp_path / "p.jsonl").exists() and not (tmp_path / "p.meta.json").exists()
    os.mkfifo(tmp_path / "q.jsonl")
    one_line(runner.invoke(app, ["predict", good, "--model", tiny_model_dir, "--out", str(tmp_path / "q.jsonl")]),
             "not a regular file")
    node = tmp_path / "null.html"  # a character device like /dev/null, where the test may make one
    try:
        os.mknod(node, 0o666 | __import__("stat").S_IFCHR, os.makedev(1, 3))
    except PermissionError:
        return
    one_line(runner.invoke(app, ["report", str(tmp_path), "--out", str(node)]), "not a regular file")
    assert node.is_char_device()


def test_an_out_name_over_255_bytes_is_one_line(tmp_path, good, tiny_model_dir):
    one_line(runner.invoke(app, ["eval", "--model", tiny_model_dir, "--data", good, "--out",
                                 str(tmp_path / ("a" * 300))]), "over 255 bytes")


def test_sigterm_during_eval_is_one_line_and_leaves_no_out_dir(tmp_path, tiny_model_dir, shared_data):
    import signal
    import sys

    out = tmp_path / "o"
    proc = subprocess.Popen([sys.executable, "-m", "medtune", "eval", "--model", tiny_model_dir, "--data",
                             str(shared_data / "medmcqa" / "dev.jsonl"), "--out", str(out), "--quiet"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "HF_HUB_OFFLINE": "1"})
    deadline = time.monotonic() + 120
    while not out.exists() and proc.poll() is None and time.monotonic() < deadline:  # claimed: the model is loading
        time.sleep(0.2)
    time.sleep(1)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 128 + signal.SIGTERM, err
    errors = [x for x in err.splitlines() if x.startswith("error:")]
    assert len(errors) == 1 and "SIGTERM" in errors[0] and "Traceback" not in err, err
    assert not out.exists()


def _eval_dir(path: Path, rows: list[dict], data=None) -> Path:
    path.mkdir()
    (path / "predictions.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (path / "results.json").write_text(json.dumps({
        "metrics": {"accuracy": 0.5, "n": len(rows), "ci95": [0.1, 0.9]}, "model": "m", "adapter": None,
        "prompt_style": "harness", "method": "letter-logprob",
        "data": data if data is not None else {"source": "dev.jsonl", "split": "file"}}))
    return path


def _prob_row(i: int, probs) -> dict:
    return {"id": f"q{i}", "pred": "A", "gold": "A", "correct": True, "probs": probs}


@pytest.mark.parametrize("probs,expected", [
    ({"A": "0.5", "B": "0.5"}, "numbers in [0, 1]"), ({"A": {"x": 1}, "B": 0.5}, "numbers in [0, 1]"),
    ({"A": float("nan"), "B": 0.5}, "numbers in [0, 1]"), ({"A": 5.0, "B": -4.0}, "numbers in [0, 1]"),
    ({"A": True, "B": False}, "numbers in [0, 1]"), ({"A": 0.5, "D": 0.5}, "not A, B"),
    ({"a": 0.5, "b": 0.5}, "not A, B"), ({"A": 0.9, "B": 0.9}, "sum to"),
])
def test_conformal_refuses_rows_whose_probabilities_are_not_probabilities(tmp_path, probs, expected):
    cal = _eval_dir(tmp_path / "cal", [_prob_row(i, {"A": 0.6, "B": 0.4}) for i in range(10)])
    ev = _eval_dir(tmp_path / "ev", [_prob_row(100, probs)])
    one_line(runner.invoke(app, ["conformal", str(cal), str(ev)]), "q100", expected)


def test_conformal_refuses_empty_predictions_and_a_data_record_that_is_not_one(tmp_path):
    cal = _eval_dir(tmp_path / "cal", [])
    ev = _eval_dir(tmp_path / "ev", [_prob_row(1, {"A": 0.6, "B": 0.4})])
    one_line(runner.invoke(app, ["conformal", str(cal), str(ev)]), "no predictions")
    odd = _eval_dir(tmp_path / "odd", [_prob_row(2, {"A": 0.6, "B": 0.4})], data="dev.jsonl")
    one_line(runner.invoke(app, ["conformal", str(odd), str(ev)]), "data")


@pytest.mark.parametrize("spec,expected", [
    ("question=qq,options=" + "|".join(f"o{i}" for i in range(11)) + ",answer=lab", "2 to 10 different columns"),
    ("question=qq,options=o1|o1,answer=lab", "2 to 10 different columns"),
    ("question=qq,question=o1,options=o1|o2,answer=lab", "question given twice"),
])
def test_map_specs_that_cannot_be_meant_are_refused(tmp_path, spec, expected):
    (tmp_path / "m.csv").write_text("qq,o1,o2,lab\nQ,a,b,0\n")
    one_line(runner.invoke(app, ["data", "validate", str(tmp_path / "m.csv"), "--map", spec]), expected)


def test_cop_base_other_than_0_or_1_is_refused_for_any_file(good):
    one_line(runner.invoke(app, ["data", "validate", good, "--cop-base", "2"]), "--cop-base")


def test_a_config_with_an_unknown_dtype_is_one_line(tiny_model_dir, tmp_path, good):
    shutil.copytree(tiny_model_dir, tmp_path / "m")
    cfg = json.loads((tmp_path / "m" / "config.json").read_text())
    (tmp_path / "m" / "config.json").write_text(json.dumps({**cfg, "torch_dtype": "float1024",
                                                             "dtype": "float1024"}))
    one_line(runner.invoke(app, ["eval", "--model", str(tmp_path / "m"), "--data", good, "--out", str(tmp_path / "o")]),
             "config.json")  # the default mode reads the checkpoint in its own dtype ("auto"): the config's


def test_explanations_decode_greedily_whatever_generation_config_asks(tiny_model_dir, tmp_path):
    """A generation_config.json asking for 100,000 beams made `ask` allocate ~20 GB and crash."""
    shutil.copytree(tiny_model_dir, tmp_path / "m")
    (tmp_path / "m" / "generation_config.json").write_text(json.dumps({"num_beams": 100_000, "do_sample": True,
                                                                       "temperature": 5.0}))
    started = time.monotonic()
    result = runner.invoke(app, ["ask", "--model", str(tmp_path / "m"), "--question", "Which organ pumps blood?",
                                 "-o", "Heart", "-o", "Lung", "--max-new-tokens", "3", "--json"])
    assert result.exit_code == 0, result.output
    assert time.monotonic() - started < 60


def test_report_refuses_an_edited_cost_json_instead_of_saying_there_is_none(tmp_path):
    from medtune.html_report import run_cost

    (tmp_path / "cost.json").write_text("{}")
    with pytest.raises(MedtuneError, match="cost.json"):
        run_cost(tmp_path, None)
    assert run_cost(tmp_path / "nothing", None) is None


@pytest.mark.parametrize("prices,expected", [("cpu: 1\ncpu: 2\n", "duplicate key"), ("cpu: 1.0e+308\n", "mapping")])
def test_prices_listed_twice_or_absurd_are_refused(tmp_path, prices, expected):
    (tmp_path / "p.yaml").write_text(prices)
    one_line(runner.invoke(app, ["cost", str(tmp_path), "--prices", str(tmp_path / "p.yaml")]), expected)


def test_results_with_an_accuracy_outside_0_1_are_refused(tmp_path):
    metrics = {"accuracy": 5.0, "n": 4, "ci95": [-3.0, 7.0]}
    (tmp_path / "results.json").write_text(json.dumps({"kind": "run", "base": {"metrics": metrics},
                                                       "tuned": {"metrics": metrics}, "comparison": {"raw": {}}}))
    one_line(runner.invoke(app, ["report", str(tmp_path), "-q"]), "base.metrics")


def test_a_closed_or_full_standard_output_is_named_as_such(tmp_path, good):
    import sys

    base = [sys.executable, "-m", "medtune", "data", "show", good, "--json"]
    closed = subprocess.run(" ".join(base) + " >&-", check=False, shell=True, capture_output=True, text=True,
                            timeout=120)
    assert closed.returncode == 2 and closed.stderr.strip() == \
        "error: standard output is closed; medtune prints its results there", closed.stderr
    full = tmp_path / "full"
    try:
        os.mknod(full, 0o666 | __import__("stat").S_IFCHR, os.makedev(1, 7))  # like /dev/full
    except PermissionError:
        return
    with open(full, "w") as out:
        result = subprocess.run(base, check=False, stdout=out, stderr=subprocess.PIPE, text=True, timeout=120)
    assert result.returncode == 2 and result.stderr.strip().startswith("error: disk full while writing the standard "
                                                                       "output"), result.stderr
