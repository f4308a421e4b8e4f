"""What `pip install medtune` brings: every imported package declared, no test or lint tool, pins that match pyproject.

The fast tests read the checkout (pyproject, the wheel metadata setuptools builds from it, requirements/*.txt, the
imports in src/medtune); the slow one installs the checkout into a fresh venv from the package registry.
"""

from __future__ import annotations

import ast
import email
import importlib.metadata
import re
import shutil
import subprocess
import sys
import venv
from pathlib import Path

import pytest
from packaging.requirements import Requirement

try:
    import tomllib
except ImportError:  # Python 3.10: pytest depends on tomli there
    import tomli as tomllib

ROOT = Path(__file__).resolve().parents[1]
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())
PROJECT = PYPROJECT["project"]
# never pulled by `pip install medtune`: test and lint tools, and ROUGE's old dependencies (medtune.rouge replaced them)
TEST_ONLY = ("pytest", "ruff", "playwright", "hypothesis", "import-linter", "gradio-client", "rouge-score", "nltk")
# imports that need an extra: the feature's module -> the extra it names in its error message
EXTRA_IMPORTS = {"gradio": "serve", "starlette": "serve", "bitsandbytes": "qlora"}
# imported only inside try/except, as probes of what the machine already has; none is needed by any command
PROBES = {"pynvml": "NVIDIA energy counter (nvidia-ml-py), read by `medtune cost` when present",
          "amdsmi": "AMD energy counter, ships with ROCm",
          "flash_attn": "flash-attn 2 kernels, used when they import on a GPU; built against the local torch"}


def canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def copy_checkout(dest: Path) -> Path:
    """The files a build reads, without local state (egg-info, caches), so building never writes into the checkout."""
    for name in ("pyproject.toml", "README.md", "LICENSE"):
        shutil.copy(ROOT / name, dest / name)
    shutil.copytree(ROOT / "src", dest / "src", ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
    return dest


@pytest.fixture(scope="module")
def wheel_metadata(tmp_path_factory) -> email.message.Message:
    """METADATA of the wheel `pip install .` would build, from setuptools' own hook (no install, no network)."""
    tree = copy_checkout(tmp_path_factory.mktemp("checkout"))
    out = tmp_path_factory.mktemp("metadata")
    code = f"from setuptools import build_meta; print(build_meta.prepare_metadata_for_build_wheel({str(out)!r}))"
    done = subprocess.run([sys.executable, "-c", code], cwd=tree, capture_output=True, text=True, check=True)
    dist_info = done.stdout.strip().splitlines()[-1]
    return email.message_from_string((out / dist_info / "METADATA").read_text())


def test_install_requires_no_test_or_lint_tool(wheel_metadata):
    requires = [Requirement(r) for r in wheel_metadata.get_all("Requires-Dist")]
    unconditional = {canonical(r.name) for r in requires if not r.marker}
    assert not unconditional & set(TEST_ONLY), f"install requirements name {unconditional & set(TEST_ONLY)}"
    test_extra = {canonical(r.name) for r in requires if r.marker and r.marker.evaluate({"extra": "test"})}
    assert {"pytest", "ruff", "import-linter"} <= test_extra  # make test / make lint get them from the extra


def test_license_is_declared_and_shipped(wheel_metadata):
    assert wheel_metadata["License-Expression"] == "Apache-2.0"
    assert wheel_metadata.get_all("License-File") == ["LICENSE"]
    assert "Apache License" in (ROOT / "LICENSE").read_text()
    # PEP 639's SPDX string and license-files: setuptools 77 is the first to accept them
    [backend] = PYPROJECT["build-system"]["requires"]
    assert Requirement(backend).name == "setuptools" and not Requirement(backend).specifier.contains("76.9")


def top_level_imports() -> dict[str, set[str]]:
    """{top-level module: files importing it} for every absolute import in src/medtune."""
    found: dict[str, set[str]] = {}
    for path in (ROOT / "src" / "medtune").rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names = [node.module]
            else:
                continue
            for name in names:
                found.setdefault(name.split(".")[0], set()).add(path.name)
    return found


def test_every_imported_package_is_declared():
    declared = {canonical(Requirement(r).name) for r in PROJECT["dependencies"]}
    extras = {extra: {canonical(Requirement(r).name) for r in reqs}
              for extra, reqs in PROJECT["optional-dependencies"].items()}
    distributions = importlib.metadata.packages_distributions()
    problems = []
    for module, files in sorted(top_level_imports().items()):
        if module in sys.stdlib_module_names or module == "medtune" or module in PROBES:
            continue
        dists = {canonical(d) for d in distributions.get(module, [])}
        if not dists:
            problems.append(f"{module} (in {sorted(files)}) is not installed: declare it or add it to PROBES")
            continue
        wanted = extras[EXTRA_IMPORTS[module]] if module in EXTRA_IMPORTS else declared
        if not dists & wanted:
            where = f"the {EXTRA_IMPORTS[module]} extra" if module in EXTRA_IMPORTS else "dependencies"
            problems.append(f"{module} (distribution {sorted(dists)}, in {sorted(files)}) is not in {where}")
    assert not problems, "\n".join(problems)


def pins(name: str) -> dict[str, str]:
    lines = (ROOT / "requirements" / f"{name}.txt").read_text().splitlines()
    return {canonical(n): v for n, v in (line.split("==") for line in lines if line and not line.startswith("#"))}


@pytest.mark.parametrize("extra", ["", "serve", "qlora", "test"])
def test_pins_satisfy_pyproject(extra):
    """Each requirement of pyproject (or of an extra) is pinned, in runtime.txt or the extra's file, within its range.
    A failure here means pyproject changed without `.venv/bin/python requirements/pin.py`."""
    runtime = pins("runtime")
    pinned = runtime | (pins(extra) if extra else {})
    requirements = PROJECT["optional-dependencies"][extra] if extra else PROJECT["dependencies"]
    for req in map(Requirement, requirements):
        name = canonical(req.name)
        if name == "torch":  # installed first, from the device's wheel index (Makefile, Dockerfiles)
            assert name not in pinned
            continue
        assert name in pinned, f"{req} is not pinned in requirements/{extra or 'runtime'}.txt"
        assert req.specifier.contains(pinned[name], prereleases=True), f"{name}=={pinned[name]} is outside {req}"
    if extra:
        overlap = {n for n in pins(extra) if n in runtime}
        assert not overlap, f"{extra}.txt repeats runtime.txt pins: {overlap}"


def makefile_torch() -> str:
    return re.search(r"^TORCH_VERSION \?= (\S+)", (ROOT / "Makefile").read_text(), re.MULTILINE).group(1)


# pip's words when the index is out of reach (it retries, then says no version was found)
NETWORK_ERRORS = ("NewConnectionError", "Max retries exceeded", "Temporary failure in name resolution",
                  "Network is unreachable", "ConnectTimeoutError", "ProxyError")


@pytest.mark.slow
def test_fresh_venv_install_pulls_no_test_tool(tmp_path):
    """The acceptance check itself: a fresh venv, torch first with --no-deps (as the Makefile does), then `pip install
    <checkout>` from the registry; `pip list` then has none of the test and lint tools. About two minutes."""
    (tmp_path / "checkout").mkdir()
    tree = copy_checkout(tmp_path / "checkout")
    venv.create(tmp_path / "venv", with_pip=True)
    pip = [str(tmp_path / "venv" / "bin" / "python"), "-m", "pip", "--disable-pip-version-check"]
    torch = f"torch=={makefile_torch()}"
    local = subprocess.run([*pip, "install", "-q", "--no-index", "--no-deps", torch], check=False, capture_output=True)
    steps = [] if local.returncode == 0 else [[*pip, "install", "-q", "--no-deps", torch,
                                               "--index-url", "https://download.pytorch.org/whl/cpu"]]
    for command in [*steps, [*pip, "install", "-q", str(tree)]]:
        done = subprocess.run(command, check=False, capture_output=True, text=True, timeout=600)
        if done.returncode and any(e in done.stderr for e in NETWORK_ERRORS):
            pytest.skip(f"pip cannot reach the package index: {done.stderr.strip().splitlines()[-1]}")
        assert done.returncode == 0, done.stderr[-3000:]
    listed = subprocess.run([*pip, "list", "--format=freeze"], capture_output=True, text=True, check=True).stdout
    installed = {canonical(line.split("==")[0]) for line in listed.splitlines()}
    assert "medtune" in installed and "torch" in installed
    assert not installed & set(TEST_ONLY), f"pip install . pulled {sorted(installed & set(TEST_ONLY))}"
