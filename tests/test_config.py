"""Strict configuration: every enum-valued key and every numeric range is checked when the config loads, with one
error line that names the key and what is allowed; the CLI exits 2 before any model is loaded."""

import itertools

import pytest
from typer.testing import CliRunner

from medtune.cli import app
from medtune.config import CHOICES, RANGES, SCHEDULERS, load_config
from medtune.errors import MedtuneError

# key -> (a misspelled value, a valid value other than the default where there is one)
BAD_ENUM = {
    "prompt_style": ("harnes", "chat"),
    "device": ("gpu", "cuda:1"),
    "data.select": ("frist", "first"),
    "lora.quantize": ("4-bit", "4bit"),
    "train.scheduler": ("cosin", "linear"),
    "train.target": ("answers", "answer"),
    "train.loss_on": ("everything", "all"),
    "train.dtype": ("bf16", "bfloat16"),
    "train.attn_implementation": ("flash", "sdpa"),
    "train.report_to": ("tensorbord", "tensorboard"),
    "train.keep": ("bestt", "last"),  # best alone is refused: it needs train.eval_every (test_best_checkpoint.py)
    "train.eval_method": ("letters", "answer"),
    "eval.method": ("answers", "answer"),
    "eval.mode": ("fsat", "exact"),
    "eval.permute": ("cycl", "cyclic"),
    "eval.extra_methods": ("letters", "answer"),
}
# key -> (out-of-range values, an in-range edge value)
BAD_RANGE = {
    "data.train_size": ([0, -3], 1), "data.eval_size": ([0], 1), "data.limit": ([0, -1], 1),
    "data.cop_base": ([2, -1], 0), "data.holdout": ([0, 1, 1.5], 0.05),
    "lora.r": ([0, 4097, 10**9], 4096), "lora.alpha": ([0, -16], 1), "lora.dropout": ([-0.1, 1], 0.0),
    "train.epochs": ([0, -1], 0.5), "train.max_steps": ([0], 1), "train.batch_size": ([0], 1),
    "train.grad_accum": ([0], 1), "train.lr": ([0, -1e-4], 1e-6), "train.warmup": ([-0.1, 1], 0.0),
    "train.weight_decay": ([-0.01], 0.0), "train.max_length": ([15, 0], 16), "train.save_every": ([-1], 0),
    "train.log_every": ([0], 1), "train.seed": ([-1, 2**32], 2**32 - 1), "data.seed": ([-1, 2**32], 0),
    "eval.batch_size": ([0], 1), "eval.margin": ([-0.5], 0.0),
    "eval.max_new_tokens": ([0], 1), "eval.conformal_alpha": ([0, 1, -0.1], 0.5),
    "data.validation": ([0, -0.5, 1.5], 1), "train.eval_every": ([-1], 0), "train.patience": ([-1], 0),
}


def test_tables_cover_every_key():
    assert set(BAD_ENUM) == set(CHOICES) and set(BAD_RANGE) == set(RANGES)


@pytest.mark.parametrize("key", sorted(BAD_ENUM))
def test_enum_key_rejects_misspelling_and_lists_valid_values(key):
    bad, good = BAD_ENUM[key]
    with pytest.raises(MedtuneError) as e:
        load_config(None, [f"{key}={bad}"])
    message = str(e.value)
    assert "\n" not in message and key in message and repr(bad) in message
    assert all(v in message for v in CHOICES[key])
    cfg = load_config(None, [f"{key}={good}"])
    node = cfg
    for part in key.split("."):
        node = getattr(node, part)
    assert node == good or node == [good]


@pytest.mark.parametrize("key", sorted(BAD_RANGE))
def test_numeric_key_range(key):
    bads, edge = BAD_RANGE[key]
    for bad in bads:
        with pytest.raises(MedtuneError, match=f"{key} .* out of range; must be"):
            load_config(None, [f"{key}={bad}"])
    load_config(None, [f"{key}={edge}"])


def test_yaml_file_is_checked_too(tmp_path):
    path = tmp_path / "r.yaml"
    path.write_text("eval:\n  mode: fsat\n")
    with pytest.raises(MedtuneError, match=f"{path}: eval.mode 'fsat' is not valid; choose one of: fast, exact"):
        load_config(path)


def test_value_lists_agree_with_their_sources():
    from accelerate.utils import LoggerType
    from transformers import get_scheduler

    from medtune.prompts import STYLES
    from medtune.scoring import METHODS, MODES

    assert CHOICES["prompt_style"] == STYLES
    assert CHOICES["eval.method"] == METHODS and CHOICES["eval.mode"] == MODES
    assert set(CHOICES["train.report_to"]) == {t.value for t in LoggerType}
    import torch

    for name in SCHEDULERS:  # each one runs with the arguments train.py passes
        opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.1)
        sched = get_scheduler(name, opt, num_warmup_steps=1, num_training_steps=4)
        opt.step()
        sched.step()


@pytest.mark.parametrize("args, named", [
    (["--method", "answers"], "eval.method 'answers' is not valid; choose one of: letter, answer, generate"),
    (["--mode", "fsat"], "eval.mode 'fsat' is not valid; choose one of: fast, exact"),
    (["--permute", "cycl"], "eval.permute 'cycl' is not valid; choose one of: none, cyclic"),
    (["--limit", "0"], "data.limit 0 is out of range; must be >= 1"),
])
def test_cli_bad_value_exits_2_with_one_line(tmp_path, args, named):
    result = CliRunner().invoke(app, ["eval", "--data", "demo", "--out", str(tmp_path / "o"), *args])
    assert result.exit_code == 2
    assert result.output.strip() == f"error: config: {named}"
    assert not (tmp_path / "o").exists()


def test_readme_names_the_commands_that_take_config():
    """README: "The commands that run a model — `eval`, `train` and `run` — take `--config` ... and `--set`"."""
    import re
    from pathlib import Path

    import typer.main

    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    named = re.search(r"The commands that run a model — (.*?) — take `--config", readme).group(1)
    commands = re.findall(r"`(\w+)`", named)
    assert commands == ["eval", "train", "run"]
    group = typer.main.get_command(app)
    for name in commands:
        options = {o for p in group.commands[name].params for o in p.opts}
        assert {"--config", "--set"} <= options, name


# --- hostile recipes: bounded work, one line (issue 18) -------------------------------------------------------------

def _bomb(levels: int = 9) -> str:
    """The billion laughs: 9 aliases of 9 aliases ..., a few hundred bytes that expand to 9**levels values."""
    text = "a: &a [lol, lol, lol, lol, lol, lol, lol, lol, lol]\n"
    for prev, name in itertools.pairwise("abcdefghij"[:levels]):
        text += f"{name}: &{name} [{', '.join([f'*{prev}'] * 9)}]\n"
    return text


@pytest.mark.parametrize("key", ["lora:\n  target_modules", "model"])
def test_yaml_alias_bomb_is_refused_at_once(tmp_path, key):
    import time

    path = tmp_path / "bomb.yaml"
    path.write_text(_bomb() + f"{key}: *i\n")
    started = time.time()
    with pytest.raises(MedtuneError, match=r"bomb.yaml:\d+: aliases expand this to over \d+ values") as e:
        load_config(path)
    assert time.time() - started < 2 and "\n" not in str(e.value)
    path.write_text("shared: &m [q_proj, v_proj]\n")  # a small alias is fine (then refused as an unknown key only)
    with pytest.raises(MedtuneError, match="unknown key"):
        load_config(path)


def test_yaml_recursive_alias_and_deep_nesting_are_one_line(tmp_path):
    (tmp_path / "rec.yaml").write_text("lora: &a\n  x: *a\n")
    with pytest.raises(MedtuneError, match=r"rec.yaml:1: an alias refers to its own anchor"):
        load_config(tmp_path / "rec.yaml")
    (tmp_path / "deep.yaml").write_text("[" * 100_000 + "]" * 100_000)
    with pytest.raises(MedtuneError, match=r"deep.yaml: nested too deeply"):
        load_config(tmp_path / "deep.yaml")


def test_yaml_duplicate_key_names_file_line_and_key(tmp_path):
    path = tmp_path / "dup.yaml"
    path.write_text("train:\n  lr: 0.1\n  epochs: 1\n  lr: 0.2\n")
    with pytest.raises(MedtuneError, match=r"dup.yaml:4: duplicate key 'lr' \(first at line 2\)"):
        load_config(path)
    path.write_text("model: a\nmodel: b\n")
    with pytest.raises(MedtuneError, match=r"dup.yaml:2: duplicate key 'model'"):
        load_config(path)


FLOAT_KEYS = ["train.lr", "train.weight_decay", "train.warmup", "train.epochs", "lora.dropout", "eval.margin",
              "data.holdout", "data.validation", "eval.conformal_alpha"]


@pytest.mark.parametrize("key", FLOAT_KEYS)
@pytest.mark.parametrize("value", [".inf", "-.inf", ".nan", "inf", "1" + "0" * 400])
def test_every_float_setting_refuses_inf_and_nan(key, value):
    with pytest.raises(MedtuneError, match="must be a finite number") as e:
        load_config(None, [f"{key}={value}"])
    assert len(str(e.value)) < 200


def test_every_float_key_is_in_the_list():
    import dataclasses
    import typing

    from medtune.config import Config

    found = []
    for name, section in typing.get_type_hints(Config).items():
        hints = typing.get_type_hints(section) if dataclasses.is_dataclass(section) else {}
        found += [f"{name}.{k}" for k, h in hints.items() if float in (h, *typing.get_args(h))]
    assert sorted(found) == sorted(FLOAT_KEYS)


def test_cli_inf_lr_and_huge_rank_are_one_line(tmp_path):
    (tmp_path / "r.yaml").write_text("train:\n  lr: .inf\n")
    for argv, named in ((["-c", str(tmp_path / "r.yaml")], "train: lr: must be a finite number"),
                        (["--set", "lora.r=1000000000"], "lora.r 1000000000 is out of range"),
                        (["--set", "lora.r=1e9"], "lora: r: expected int, got '1e9'"),
                        (["--set", "train.seed=4294967296"], "train.seed 4294967296 is out of range"),
                        (["--set", "model=["], "--set 'model=[': not valid YAML")):
        result = CliRunner().invoke(app, ["train", *argv, "--out", str(tmp_path / "o")])
        assert result.exit_code == 2 and result.output.count("\n") == 1 and named in result.output, result.output
        assert not (tmp_path / "o").exists()
