"""Hostile input, round eight (a fresh probe, 330 cases, 94.8% clean): the cases of the command line, run directories
and training. Each refused case is one `error:` line, exit 2, nothing touched; the valid neighbour works."""

import os
import shutil
from pathlib import Path

import pytest
from test_bounded import one_line  # exit 2, one `error:` line, no traceback
from typer.testing import CliRunner

from medtune.cli import app
from medtune.errors import MedtuneError

runner = CliRunner()
ROWS = "".join(f'{{"id": "q{i}", "question": "Which {i}?", "options": ["a", "b"], "answer": 0}}\n' for i in range(8))


def _tree(path: Path) -> list:
    return sorted((p.relative_to(path), p.read_bytes() if p.is_file() else None) for p in path.rglob("*"))


def test_overwrite_refuses_an_input_reached_through_a_link_and_the_recipe_it_read(tmp_path, tiny_model_dir):
    """L07: --data a symlink (outside --out) to a file inside --out was deleted by --overwrite (the guard compared
    unresolved paths). L06: `eval --config RUN/config.yaml --out RUN --overwrite` replaced the recipe it read."""
    out = tmp_path / "out"
    out.mkdir()
    (out / "in.jsonl").write_text(ROWS)
    (out / "config.yaml").write_text(f"model: {tiny_model_dir}\ndata:\n  source: demo\n")
    (tmp_path / "link.jsonl").symlink_to(out / "in.jsonl")
    before = _tree(out)
    for args in (["--model", tiny_model_dir, "--data", str(tmp_path / "link.jsonl")],
                 ["--config", str(out / "config.yaml")]):
        one_line(runner.invoke(app, ["eval", *args, "--limit", "1", "--out", str(out), "--overwrite", "-q"]),
                 "holds this command's input")
    one_line(runner.invoke(app, ["train", "--config", str(out / "config.yaml"), "--out", str(out), "--overwrite",
                                 "--set", "train.max_steps=1"]), "holds this command's input")
    assert _tree(out) == before
    shutil.copy(out / "in.jsonl", tmp_path / "real.jsonl")  # the neighbour: data outside --out is fine
    result = runner.invoke(app, ["eval", "--model", tiny_model_dir, "--data", str(tmp_path / "real.jsonl"), "--limit",
                                 "1", "--out", str(out), "--overwrite", "-q"])
    assert result.exit_code == 0, result.output
    assert (out / "results.json").is_file() and not (out / "in.jsonl").exists()


def test_data_split_refuses_a_test_split(tmp_path, shared_data):
    """S09: `data split` of MedQA's test file wrote train.jsonl, and `train` accepted it under its new name."""
    out = tmp_path / "s"
    one_line(runner.invoke(app, ["data", "split", str(shared_data / "medqa" / "test.jsonl"), "--train-size", "10",
                                 "--out", str(out)]), "test split", "never trains on test")
    one_line(runner.invoke(app, ["data", "split", "medqa:eval", "--train-size", "10", "--out", str(out)]),
             "is a test split")
    assert not out.exists()
    result = runner.invoke(app, ["data", "split", str(shared_data / "medqa" / "dev.jsonl"), "--train-size", "10",
                                 "--out", str(out)])
    assert result.exit_code == 0 and (out / "train.jsonl").is_file(), result.output


def test_contradicting_or_missing_flags_are_one_line(tmp_path):
    """T16: --resume with --overwrite dropped --overwrite silently. F21: --cop-base 2 was accepted when the data
    was not MedMCQA. K11: `ask -o a -o b` without --question blamed stdin."""
    run = tmp_path / "run"
    (run / "checkpoints").mkdir(parents=True)
    one_line(runner.invoke(app, ["train", "--resume", "--overwrite", "--out", str(run)]), "--resume", "--overwrite")
    for args in (["eval", "--data", "demo", "--out", str(tmp_path / "o")], ["data", "validate", "demo"],
                 ["audit", "--data", "demo", "--out", str(tmp_path / "o")]):
        one_line(runner.invoke(app, [*args, "--cop-base", "2"]), "--cop-base 2: must be 0 (Hub) or 1 (published)")
    one_line(runner.invoke(app, ["ask", "-o", "a", "-o", "b"], input=""), "--question is missing")
    assert not (tmp_path / "o").exists() and os.listdir(run) == ["checkpoints"]


def test_target_module_that_is_not_a_linear_layer_is_one_line(tmp_path, tiny_model_dir):
    """T08: `lora.target_modules=5` matched model.layers.5 (a decoder layer): PEFT's ValueError and a 60-line
    traceback, exit 1."""
    for name in ("1", "mlp"):  # the tiny model has layers 0 and 1
        one_line(runner.invoke(app, ["train", "--out", str(tmp_path / name), "--set", f"model={tiny_model_dir}",
                                     "--set", "data.source=demo", "--set", "train.max_steps=1", "--set",
                                     f"lora.target_modules={name}", "-q"]),
                 "lora.target_modules: a name matches a", "LoRA cannot wrap")
        assert not (tmp_path / name).exists()


def test_an_empty_data_source_is_named_as_empty():
    """D45: `data validate ""` said `.: is a directory`."""
    for args in (["data", "validate", ""], ["data", "show", " "]):
        one_line(runner.invoke(app, args), "the data source is empty")
    one_line(runner.invoke(app, ["eval", "--data", ""]), "source: must not be empty")  # the config's own check


# --- round nine (a fifth fresh probe: 316 cases, 308 clean) ----------------------------------------------------------

@pytest.mark.slow
def test_checkpoint_tensor_of_the_wrong_shape_is_one_line_on_resume(tmp_path, tiny_model_dir):
    """T14: one tensor of the newest checkpoint replaced by a 3 x 3 one: `--resume` ended in a RuntimeError traceback
    from copy_, exit 1."""
    import torch
    from safetensors.torch import load_file, save_file

    argv = ["train", "--set", f"model={tiny_model_dir}", "--set", "device=cpu", "--set", "train.max_steps=2", "--set",
            "train.save_every=1", "--set", "data.train_size=8", "--set", "train.batch_size=4", "--out",
            str(tmp_path / "run"), "--quiet"]
    assert runner.invoke(app, argv).exit_code == 0
    weights = max((tmp_path / "run" / "checkpoints").iterdir()) / "adapter.safetensors"
    tensors = load_file(str(weights))
    first = min(tensors)
    save_file({**tensors, first: torch.zeros(3, 3)}, str(weights))
    one_line(runner.invoke(app, [*argv, "--resume"]), str(weights), f"{first} has shape [3, 3]",
             "resume from the one before")


def test_permute_with_generate_is_said_and_recorded_not_dropped(tmp_path, tiny_model_dir):
    """S15: `--method generate --permute cyclic` dropped the rotations silently and recorded permute "none"."""
    import json

    result = runner.invoke(app, ["eval", "--model", tiny_model_dir, "--data", "demo", "--limit", "1", "--method",
                                 "generate", "--permute", "cyclic", "--set", "eval.max_new_tokens=4", "--out",
                                 str(tmp_path / "o")])
    assert result.exit_code == 0, result.output
    assert "note: --permute cyclic skipped: not applicable: generate decodes" in result.output
    assert json.loads((tmp_path / "o" / "results.json").read_text())["permute"].startswith("not applicable")


def test_eval_source_is_used_with_a_demo_or_preset_source(tmp_path):
    """R31: with data.source demo (or a preset) data.eval_source was ignored, even a file that does not exist, and
    config.yaml recorded it as if used."""
    from medtune.config import load_config
    from medtune.data.prepare import prepare_data

    (tmp_path / "e.jsonl").write_text(ROWS)
    cfg = load_config(None, ["data.source=demo", f"data.eval_source={tmp_path / 'e.jsonl'}"])
    train_items, eval_items, data = prepare_data(cfg, log=lambda *_: None)
    assert [i.question for i in eval_items] == [f"Which {i}?" for i in range(8)] and len(train_items) > 8
    assert data["eval"]["source"] == str(tmp_path / "e.jsonl")
    missing = load_config(None, ["data.source=demo", f"data.eval_source={tmp_path / 'none.jsonl'}"])
    with pytest.raises(MedtuneError, match="none.jsonl"):
        prepare_data(missing, log=lambda *_: None)


def test_a_table_format_medtune_does_not_read_is_named(tmp_path):
    """D60: a .tsv was read as JSON lines: "json: Expecting value" on every line."""
    tsv = tmp_path / "d.tsv"
    tsv.write_text("question\tA\tB\tanswer\nWhich?\ta\tb\tA\n")
    one_line(runner.invoke(app, ["data", "validate", str(tsv)]), "d.tsv: .tsv files are not read", ".csv")


def test_two_predicts_on_one_file_the_second_is_refused(tmp_path, tiny_model_dir):
    """P14: two `predict` runs on the same --out at once both wrote every row (each id twice); a rerun then counted
    the doubled file as done. The file is locked for the command's life, as a run dir is."""
    from medtune.io import out_dir_lock

    out = tmp_path / "p.jsonl"
    args = ["predict", "demo", "--model", tiny_model_dir, "--out", str(out), "--limit", "2", "-q"]
    with out_dir_lock(out):  # another predict holds it
        one_line(runner.invoke(app, args), str(out))
    assert not out.exists()
    assert runner.invoke(app, args).exit_code == 0 and len(out.read_text().splitlines()) == 2


def test_conformal_refuses_the_calibration_items_under_other_ids(tmp_path, tiny_model_dir, shared_data):
    """C12: the calibration file copied under another name and evaluated: its ids (made from the file name) differed,
    so the overlap check passed and a coverage of 0.950 on the calibration items themselves was reported."""
    rows = (shared_data / "medqa" / "dev.jsonl").read_text().splitlines(keepends=True)
    (tmp_path / "cal_dev.jsonl").write_text("".join(rows[:12]))
    (tmp_path / "renamed.jsonl").write_text("".join(rows[:12]))
    (tmp_path / "other.jsonl").write_text("".join(rows[12:24]))
    for name in ("cal_dev", "renamed", "other"):
        result = runner.invoke(app, ["eval", "--model", tiny_model_dir, "--data", str(tmp_path / f"{name}.jsonl"),
                                     "--out", str(tmp_path / name), "-q", "--mode", "exact"])
        assert result.exit_code == 0, result.output
    one_line(runner.invoke(app, ["conformal", str(tmp_path / "cal_dev"), str(tmp_path / "renamed")]),
             "12 of its items", "same questions under other ids")
    assert runner.invoke(app, ["conformal", str(tmp_path / "cal_dev"), str(tmp_path / "other")]).exit_code == 0
