"""Hostile input, round five (a fresh probe, 293 cases): the command line itself (usage errors, over-long names,
newlines in paths, a 30 MB recipe), what medtune reads back from a run (predictions, metrics, explanations, cost),
`report --out`, `compare --json`, training trackers, and run directories a failed or interrupted command leaves."""

import errno
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from test_bounded import one_line  # exit 2, one `error:` line, no traceback
from typer.testing import CliRunner

from medtune import io
from medtune.cli import app
from medtune.errors import MedtuneError, TrainingInterrupted

runner = CliRunner()




def test_usage_errors_are_one_line_with_exit_2():
    """An unknown command or flag, or a value of the wrong type: one `error:` line naming it (click's usage box was
    five lines with no `error:`)."""
    for args, said in ((["eval", "--limit", "abc"], "--limit"), (["eval", "--bogus-flag"], "--bogus-flag"),
                       (["doctor"], "doctor")):
        done = subprocess.run([sys.executable, "-m", "medtune", *args], capture_output=True, text=True, timeout=120, check=False)
        assert done.returncode == 2 and done.stdout == "", done
        assert done.stderr.startswith("error: ") and done.stderr.count("\n") == 1 and said in done.stderr, done.stderr


def test_a_name_longer_than_the_file_system_allows_is_one_line(tmp_path):
    long = str(tmp_path / ("z" * 300))
    for args in (["data", "validate", f"{long}.jsonl"], ["eval", "--config", f"{long}.yaml"], ["report", long],
                 ["compare", long, long], ["cost", long, "--price-per-hour", "1"], ["conformal", long, long], ["export", long]):
        one_line(runner.invoke(app, args), "longer than the file system allows")


def test_a_newline_in_a_path_stays_on_one_line(tmp_path):
    line = one_line(runner.invoke(app, ["data", "validate", str(tmp_path / "missing\nfile.jsonl")]))
    assert "missing\\nfile.jsonl" in line


def test_a_30_mb_recipe_is_refused_before_it_is_parsed(tmp_path):
    recipe = tmp_path / "huge.yaml"
    recipe.write_text("model: " + "x" * 30_000_000 + "\n")
    one_line(runner.invoke(app, ["eval", "--config", str(recipe)]), "huge.yaml", "a recipe is a few KB")


def _predictions(path: Path, rows: list) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    (path / "predictions.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


ROWS = [{"id": f"q{i}", "gold": "A", "pred": "A" if i % 2 else "B", "correct": bool(i % 2),
         "probs": {"A": 0.6, "B": 0.4}} for i in range(6)]


def test_compare_json_keeps_both_paths_beside_the_mcnemar_counts(tmp_path):
    a = _predictions(tmp_path / "a", ROWS)
    b = _predictions(tmp_path / "b", [{**r, "correct": True, "pred": "A"} for r in ROWS])
    out = json.loads(runner.invoke(app, ["compare", str(a), str(b), "--json"]).output)
    assert (out["path_a"], out["path_b"]) == (str(a), str(b)) and (out["b"], out["c"]) == (0, 3)


def test_a_predictions_row_without_pred_is_named_not_a_traceback(tmp_path):
    a = _predictions(tmp_path / "a", ROWS)
    b = _predictions(tmp_path / "b", [{k: v for k, v in r.items() if k != "pred"} for r in ROWS])
    for extra in ([], ["--parity"]):
        one_line(runner.invoke(app, ["compare", str(a), str(b), *extra]), "predictions.jsonl:1: pred: missing")


@pytest.mark.parametrize("kind,lines,said", [
    ("predictions", ['{"id": "q1", "gold": "A", "pred": "A", "correct": true}', "[1]"], ":2: expected a JSON object"),
    ("predictions", ['{"id": "q1", "gold": "A", "pred": "A", "correct": true, "probs": {"A": "x"}}'], ":1: item q1: probs"),
    ("metrics", ['{"step": 1, "loss": 1.0, "lr": 0.1}', '{"step": "x", "loss": "nan"}'], ":2: step"),
    ("metrics", ['{"step": 1, "loss": 1.0}'], ":1: lr"),
    ("explanations", ['{"id": "q1", "pred": "A", "explanation": "ok"}', "not json"], ":2: not valid JSON"),
])
def test_rows_read_back_from_a_run_are_checked_line_by_line(tmp_path, kind, lines, said):
    """The report read predictions.jsonl, metrics.jsonl and explanations.jsonl unchecked (a `[1]` line or a metrics
    row without lr was a traceback; a bad explanations line was always reported as line 1)."""
    from medtune.records import read_rows

    path = tmp_path / f"{kind}.jsonl"
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(MedtuneError, match=said):
        read_rows(path, kind)


def test_report_out_must_be_an_html_page_and_never_replaces_the_results(tmp_path):
    (tmp_path / "results.json").write_text('{"kind": "run"}')
    one_line(runner.invoke(app, ["report", str(tmp_path), "--out", str(tmp_path / "results.json")]), "name a .html")
    assert (tmp_path / "results.json").read_text() == '{"kind": "run"}'


@pytest.mark.parametrize("field,value", [("train_tokens", -5), ("energy_j", -1), ("wall_s", 1e308),
                                         ("device_count", 10**30)])
def test_an_edited_cost_record_cannot_price_below_zero_or_at_infinity(tmp_path, field, value):
    from medtune.records import read_record

    record = {"kind": "train", "device_kind": "cpu", "device_name": "x", "device_count": 1, "wall_s": 1.5,
              "energy_j": None, "train_tokens": 100}
    path = tmp_path / "cost.json"
    path.write_text(json.dumps(record))
    read_record(path, "cost")
    path.write_text(json.dumps({**record, field: value}))
    with pytest.raises(MedtuneError, match=field):
        read_record(path, "cost")


def test_a_tracker_that_is_not_installed_is_refused_before_training(tmp_path):
    pytest.importorskip("importlib")
    import importlib.util

    if importlib.util.find_spec("wandb"):
        pytest.skip("wandb is installed here")
    one_line(runner.invoke(app, ["train", "--set", "train.report_to=wandb", "--out", str(tmp_path / "t")]),
             "train.report_to: wandb is not installed")
    assert not (tmp_path / "t").exists()


def test_a_failed_command_leaves_nothing_in_a_fresh_out_dir(tmp_path, tiny_model_dir, monkeypatch):
    """A full disk when results.json is written: predictions.jsonl was left behind, and `compare` then read it as a
    finished evaluation. Now the dir the command created goes with it (an empty dir the user made stays empty)."""
    real = io.write_bytes

    def full_at_results(path, data):
        if Path(path).name == "results.json":
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))
        return real(path, data)

    monkeypatch.setattr(io, "write_bytes", full_at_results)
    for out, made in ((tmp_path / "new", False), (tmp_path / "mine", True)):
        if made:
            out.mkdir()
        one_line(runner.invoke(app, ["eval", "--model", tiny_model_dir, "--data", "demo", "--limit", "2", "--out",
                                     str(out), "--quiet"]), "disk full")
        assert (out.is_dir() and not any(out.iterdir())) if made else not out.exists()


def test_an_interrupted_run_is_rolled_back_and_the_old_run_kept(tmp_path, monkeypatch):
    """`run` has no --resume: a SIGTERM during its training swapped the half-finished run in over the old complete one
    and told the user to `train --resume`. Now the old run stays whole and the message says what happened."""
    import medtune.run

    out = tmp_path / "run"
    out.mkdir()
    (out / "results.json").write_text('{"old": true}')

    def interrupted(cfg, quiet, log, out):
        (out / "checkpoints" / "step-6").mkdir(parents=True)
        raise TrainingInterrupted(f"SIGTERM at step 6 of 30: checkpoint written. Resume with `medtune train "
                                  f"--resume --out {out}`", 143)

    monkeypatch.setattr(medtune.run, "run", interrupted)
    result = runner.invoke(app, ["run", "--out", str(out), "--overwrite", "--quiet"])
    assert result.exit_code == 143 and "rolled back" in result.output and "--resume" not in result.output
    assert sorted(p.name for p in out.iterdir()) == ["results.json"]
    assert [p.name for p in tmp_path.iterdir()] == ["run"]  # no half-built run beside it


def test_a_training_that_wrote_no_checkpoint_leaves_nothing_but_one_that_did_is_kept(tmp_path):
    for checkpointed in (False, True):
        out = tmp_path / f"t{checkpointed}"
        with pytest.raises(OSError), io.claim_out_dir(out, resumable=True) as dest:
            (dest / "metrics.jsonl").write_text("{}\n")
            if checkpointed:
                (dest / "checkpoints" / "step-2").mkdir(parents=True)
            raise OSError(errno.ENOSPC, "No space left on device")
        assert out.exists() == checkpointed


# --- round six (a second fresh probe: 271 cases, 257 clean) ----------------------------------------------------------

def test_a_directory_or_fifo_where_a_file_is_expected_is_named_as_such(tmp_path):
    fifo = tmp_path / "items.jsonl"
    os.mkfifo(fifo)
    one_line(runner.invoke(app, ["data", "validate", str(tmp_path)]), "is a directory")  # was "file not found"
    one_line(runner.invoke(app, ["data", "validate", str(fifo)]), "not a regular file")
    one_line(runner.invoke(app, ["eval", "--config", str(tmp_path)]), "config is a directory")


def test_a_medqa_answer_text_that_contradicts_answer_idx_is_refused(tmp_path):
    row = {"question": "Q?", "options": {"A": "a", "B": "b", "C": "c", "D": "d"}, "answer_idx": "B", "answer": "b"}
    good, bad = tmp_path / "good.jsonl", tmp_path / "bad.jsonl"
    good.write_text(json.dumps(row) + "\n")
    bad.write_text(json.dumps({**row, "answer": "totally different"}) + "\n")
    assert runner.invoke(app, ["data", "validate", str(good)]).exit_code == 0
    one_line(runner.invoke(app, ["data", "validate", str(bad)]), "bad.jsonl:1: answer:", "answer_idx")


def test_an_empty_option_is_counted_as_empty_not_missing():
    from medtune.ask import make_item

    with pytest.raises(MedtuneError, match=r"1 option\(s\) given \(1 more empty\)"):
        make_item("Q?", ["a", ""])


def test_a_truncated_gguf_says_truncated_and_a_non_lora_adapter_says_so(tmp_path):
    from medtune.gguf_check import check_gguf
    from medtune.models import check_adapter

    gguf = tmp_path / "cut.gguf"
    gguf.write_bytes(b"GGUF\x03\x00\x00\x00garbage")
    with pytest.raises(MedtuneError, match="truncated: 15 bytes"):
        check_gguf(gguf)
    (tmp_path / "adapter").mkdir()
    (tmp_path / "adapter" / "adapter_config.json").write_text('{"peft_type": "EVIL"}')
    with pytest.raises(MedtuneError, match="peft_type 'EVIL'"):
        check_adapter(str(tmp_path / "adapter"))


def test_a_checkpoint_with_nan_weights_is_never_resumed(tmp_path):
    """A NaN checkpoint at the last step was published as the final adapter by `--resume`, exit 0."""
    import torch
    from safetensors.torch import save_file

    from medtune import checkpoint

    save_file({"w": torch.full((2, 2), float("nan"))}, tmp_path / "adapter.safetensors")
    with pytest.raises(MedtuneError, match="adapter.safetensors: w holds NaN"):
        checkpoint.load(tmp_path, None, None, None)


# --- round seven (a third fresh probe: 170 cases, 161 clean) ---------------------------------------------------------

def test_data_split_overwrite_never_deletes_its_own_input(tmp_path):
    """`data split SRC --out DIR --overwrite` with SRC inside DIR deleted SRC (eval and train already refused it)."""
    rows = "".join(json.dumps({"question": f"Q{i}?", "options": {"A": "a", "B": "b", "C": "c", "D": "d"},
                               "answer_idx": "A"}) + "\n" for i in range(8))
    for src in (tmp_path / "hold" / "mq.jsonl", tmp_path / "hold2" / "sub" / "mq.jsonl"):
        src.parent.mkdir(parents=True)
        src.write_text(rows)
        out = src.parent if src.parent.name != "sub" else src.parent.parent
        one_line(runner.invoke(app, ["data", "split", str(src), "--train-size", "4", "--out", str(out),
                                     "--overwrite"]), "holds this command's input")
        assert src.read_text() == rows


def test_report_out_under_a_missing_directory_is_created(tmp_path):
    from medtune import io

    path = io.check_file_target(tmp_path / "new" / "sub" / "r.html")
    io.write_text(path, "<html></html>")  # was FileNotFoundError on its temp name
    assert path.read_text() == "<html></html>"


def test_cost_of_an_eval_dir_has_no_gain_instead_of_an_error(tmp_path):
    from medtune import cost

    (tmp_path / "cost.json").write_text(json.dumps({"kind": "eval", "device_kind": "cpu", "device_name": "x",
                                                    "device_count": 1, "wall_s": 2.0}))
    (tmp_path / "results.json").write_text(json.dumps({"metrics": {"accuracy": 0.5, "n": 2, "ci95": [0.1, 0.9]}}))
    c = cost.collect(tmp_path)
    assert c["wall_s"] == 2.0 and c["gain_points"] is None


def test_predict_resume_refuses_a_source_that_changed_and_a_full_disk_leaves_whole_lines(tmp_path, tiny_model_dir,
                                                                                         monkeypatch):
    rows = [{"question": f"Q{i}?", "options": {"A": "a", "B": "b", "C": "c", "D": "d"}, "answer_idx": "A"}
            for i in range(4)]
    src, out = tmp_path / "src.jsonl", tmp_path / "p.jsonl"
    src.write_text("".join(json.dumps(r) + "\n" for r in rows))
    args = ["predict", str(src), "--model", tiny_model_dir, "--out", str(out), "-q"]
    assert runner.invoke(app, [*args, "--limit", "2"]).exit_code == 0
    src.write_text("".join(json.dumps({**r, "answer_idx": "B"}) + "\n" for r in rows))  # edited since
    one_line(runner.invoke(app, args), "src-1", "the source changed")

    from medtune import predict

    written = out.read_bytes()

    class Full:  # the disk fills after 10 bytes of the next chunk
        def __init__(self, f):
            self.f = f

        def __getattr__(self, name):
            return getattr(self.f, name)

        def write(self, data):
            self.f.write(bytes(data[:10]))
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(out))

    with open(out, "ab", buffering=0) as f, pytest.raises(OSError):
        predict.append_lines(Full(f), b'{"id": "x", "more": "text"}\n')
    assert out.read_bytes() == written  # cut back: no half line
