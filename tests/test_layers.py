"""The layers are a contract a tool checks (DESIGN.md, issue 19): the import-linter contracts in pyproject.toml
(layers, no cycles, data and stats free of torch) pass, and no `_private` name crosses a module — which
import-linter cannot see, so an `ast` walk over src/, tests/ and benchmarks/ checks it here."""

import ast
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SRC = ROOT / "src"


def test_import_contracts_hold():
    lint_imports = Path(sys.executable).parent / "lint-imports"
    result = subprocess.run([str(lint_imports), "--no-cache"], cwd=ROOT, capture_output=True, text=True, check=False)
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-2000:]
    assert "0 broken" in result.stdout


def _private(name: str) -> bool:
    return name.startswith("_") and not (name.startswith("__") and name.endswith("__"))


def _is_module(dotted: str) -> bool:
    path = SRC.joinpath(*dotted.split("."))
    return path.with_suffix(".py").is_file() or (path / "__init__.py").is_file()


def _module_name(path: Path) -> str | None:
    """medtune.x.y for a file under src/; None for tests and benchmarks (every medtune module is another module)."""
    if SRC not in path.parents:
        return None
    parts = path.relative_to(SRC).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def private_crossings(path: Path) -> list[str]:
    """Each place in `path` that imports or reads a `_name` of another medtune module."""
    own = _module_name(path)
    where = path.relative_to(ROOT) if ROOT in path.parents else path
    tree = ast.parse(path.read_text(), filename=str(path))
    aliases: dict[str, str] = {}  # local name -> the medtune module it stands for
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for a in node.names:
                if a.name.split(".")[0] == "medtune":
                    if a.asname:
                        aliases[a.asname] = a.name
                    else:
                        aliases["medtune"] = "medtune"
                    if any(_private(p) for p in a.name.split(".")[1:]) and a.name != own:
                        found.append(f"{where}:{node.lineno}: import {a.name}")
        elif isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "medtune" \
                and node.level == 0:
            for a in node.names:
                target = f"{node.module}.{a.name}"
                if _is_module(target):
                    aliases[a.asname or a.name] = target
                elif _private(a.name) and node.module != own:
                    found.append(f"{where}:{node.lineno}: from {node.module} import {a.name}")
    for node in ast.walk(tree):
        if isinstance(node, ast.Call) and len(node.args) >= 2 and isinstance(node.args[1], ast.Constant) \
                and isinstance(node.args[1].value, str) and _private(node.args[1].value):
            dotted = _dotted(node.args[0], aliases)  # monkeypatch.setattr(module, "_name"), patch.object(...)
            if dotted and _is_module(dotted) and dotted != own:
                found.append(f"{where}:{node.lineno}: {dotted}.{node.args[1].value} (patched)")
        if isinstance(node, ast.Attribute) and _private(node.attr):
            dotted = _dotted(node.value, aliases)
            if dotted and _is_module(dotted) and dotted != own:
                found.append(f"{where}:{node.lineno}: {dotted}.{node.attr}")
    return sorted(set(found), key=lambda line: int(line.split(":")[1]))


def _dotted(node: ast.expr, aliases: dict[str, str]) -> str | None:
    """The medtune module an expression such as `hardware` or `medtune.data.formats` names, if it names one."""
    if isinstance(node, ast.Name):
        return aliases.get(node.id)
    if isinstance(node, ast.Attribute):
        base = _dotted(node.value, aliases)
        return f"{base}.{node.attr}" if base else None
    return None


def test_no_private_name_crosses_a_module():
    files = [p for d in ("src/medtune", "tests", "benchmarks") for p in sorted((ROOT / d).rglob("*.py"))]
    found = [line for p in files for line in private_crossings(p)]
    assert not found, "private names used outside their module (make them public, or move the code):\n" + \
        "\n".join(found)


def test_the_private_check_sees_both_spellings(tmp_path):
    probe = tmp_path / "probe.py"
    probe.write_text("from medtune.hardware import _flash_ok\nfrom medtune import hardware\nimport medtune.stats\n"
                     "hardware._x()\nmedtune.stats._y\nfrom medtune.hardware import detect\n"
                     "monkeypatch.setattr(hardware, '_z', None)\n")
    assert [line.split(": ", 1)[1] for line in private_crossings(probe)] == [
        "from medtune.hardware import _flash_ok", "medtune.hardware._x", "medtune.stats._y",
        "medtune.hardware._z (patched)"]


def test_every_module_is_in_a_layer():
    """A module the layers contract does not name is not checked at all: each new module goes into a layer."""
    import pytest

    tomllib = pytest.importorskip("tomllib")  # Python 3.11+
    layers = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["importlinter"]["contracts"][0]["layers"]
    named = {m.strip() for layer in layers for m in layer.split("|")}
    modules = {_module_name(p) for p in (SRC / "medtune").glob("*.py")} | {"medtune.data"}
    assert modules - named - {"medtune"} == set()
