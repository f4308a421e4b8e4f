"""Strict configuration: every enum-valued key and every numeric range is checked when the config loads, with one
error line that names the key and what is allowed; the CLI exits 2 before any model is loaded."""

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
    "eval.method": ("answers", "answer"),
    "eval.mode": ("fsat", "exact"),
    "eval.permute": ("cycl", "cyclic"),
    "eval.extra_methods": ("letters", "answer"),
}
# key -> (out-of-range values, an in-range edge value)
BAD_RANGE = {
    "data.train_size": ([0, -3], 1), "data.eval_size": ([0], 1), "data.limit": ([0, -1], 1),
    "data.cop_base": ([2, -1], 0), "data.holdout": ([0, 1, 1.5], 0.05),
    "lora.r": ([0], 1), "lora.alpha": ([0, -16], 1), "lora.dropout": ([-0.1, 1], 0.0),
    "train.epochs": ([0, -1], 0.5), "train.max_steps": ([0], 1), "train.batch_size": ([0], 1),
    "train.grad_accum": ([0], 1), "train.lr": ([0, -1e-4], 1e-6), "train.warmup": ([-0.1, 1], 0.0),
    "train.weight_decay": ([-0.01], 0.0), "train.max_length": ([15, 0], 16), "train.save_every": ([-1], 0),
    "train.log_every": ([0], 1), "eval.batch_size": ([0], 1), "eval.margin": ([-0.5], 0.0),
    "eval.max_new_tokens": ([0], 1),
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
