"""Every shipped recipe loads into the config schema; every README command names real commands and options."""

import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
import typer

from medtune.cli import app
from medtune.config import load_config

ROOT = Path(__file__).resolve().parents[1]
RECIPES = sorted((ROOT / "recipes").glob("*.yaml"))


@pytest.mark.parametrize("path", RECIPES, ids=[p.name for p in RECIPES])
def test_recipe_loads_and_names_its_command(path):
    cfg = load_config(path)
    header = [line for line in path.read_text().splitlines() if line.startswith("#")]
    assert any(f"--config recipes/{path.name}" in line for line in header), "the header gives the exact command"
    assert cfg.prompt_style in ("harness", "chat", "seed")


def test_seed_reproduction_recipe_is_the_seed_settings():
    cfg = load_config(ROOT / "recipes" / "seed-reproduction.yaml")
    assert (cfg.lora.r, cfg.lora.alpha, cfg.lora.dropout, cfg.lora.target_modules) == (8, 16, 0.05, ["q_proj", "v_proj"])
    assert (cfg.train.max_length, cfg.train.epochs, cfg.train.batch_size, cfg.train.grad_accum) == (256, 2, 4, 4)
    assert (cfg.train.lr, cfg.train.scheduler, cfg.train.warmup, cfg.train.gradient_checkpointing) == \
        (2e-4, "cosine", 0.05, True)
    assert (cfg.data.select, cfg.data.holdout, cfg.data.seed, cfg.data.train_size) == ("first", 0.05, 42, 2000)
    assert (cfg.train.loss_on, cfg.train.add_eos, cfg.prompt_style) == ("all", False, "seed")


def test_set_overrides_and_errors(tmp_path):
    cfg = load_config(ROOT / "recipes" / "demo.yaml", ["lora.r=4", "train.lr=1e-3", "lora.target_modules=q_proj"])
    assert cfg.lora.r == 4 and cfg.train.lr == 1e-3 and cfg.lora.target_modules == ["q_proj"]
    from medtune.errors import MedtuneError

    with pytest.raises(MedtuneError, match="valid keys: r, alpha, dropout, target_modules"):
        load_config(None, ["lora.rank=4"])
    with pytest.raises(MedtuneError, match="expected int"):
        load_config(None, ["lora.r=four"])


def _readme_commands() -> list[list[str]]:
    text = (ROOT / "README.md").read_text()
    blocks = re.findall(r"```bash\n(.*?)```", text, re.DOTALL)
    lines = [line.split("#")[0].strip() for b in blocks for line in b.splitlines()]
    return [shlex.split(line) for line in lines if line.startswith("medtune ")]


def test_readme_commands_exist():
    """Each README `medtune ...` line names a real command and only options that command declares."""
    root = typer.main.get_command(app)
    commands = _readme_commands()
    assert len(commands) >= 10
    for argv in commands:
        cmd, rest = root, argv[1:]
        while hasattr(cmd, "commands") and rest and rest[0] in cmd.commands:
            cmd, rest = cmd.commands[rest[0]], rest[1:]
        assert not hasattr(cmd, "commands"), f"{argv}: no such command"
        declared = {o for p in cmd.params for o in p.opts + p.secondary_opts}
        flags = [a.split("=")[0] for a in rest if a.startswith("--")]
        assert set(flags) <= declared, f"{argv}: unknown options {set(flags) - declared}"


def test_readme_make_targets_exist():
    makefile = (ROOT / "Makefile").read_text()
    for target in ("demo", "test"):
        assert re.search(rf"^{target}:", makefile, re.MULTILINE)
    assert "make test" in (ROOT / ".ci" / "run").read_text()


def test_hub_preset_offline_says_it_needs_a_network():
    env = {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "PATH": "/usr/bin:/bin"}
    r = subprocess.run([sys.executable, "-m", "medtune", "eval", "--data", "medqa", "--limit", "2"],
                       capture_output=True, text=True, env=env, timeout=120, check=False)
    assert r.returncode == 2 and "presets need a network" in r.stderr and "Traceback" not in r.stderr
