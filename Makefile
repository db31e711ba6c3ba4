# Two commands: `make demo` (the main job: the pretrained MiniLM captured, figures and metrics written
# to attnhooks-demo/) and `make test`. Both create .venv on first use,
# installing the CPU build of torch first so nothing pulls a CUDA build.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.attnhooks-installed

.PHONY: demo test test-compat lock versions lint bench clean

# The venv is installed from the lock (requirements/ci.txt, exact versions: `make lock` rewrites it),
# torch first, then attnhooks itself without resolving anything more.
$(STAMP): pyproject.toml constraints.txt requirements/ci.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -r requirements/ci.txt -c constraints.txt
	$(PY) -m pip install -q --no-deps -e .
	touch $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/attnhooks demo --out attnhooks-demo

test: $(STAMP)
	$(PY) -m pytest -q -p no:cacheprovider

# The main integration tests against the oldest and the newest versions of the declared ranges,
# each in its own venv under .venv-compat/ (see scripts/compat.sh).
test-compat:
	PYTHON=$(PYTHON) bash scripts/compat.sh

# Rewrite requirements/ci.txt from a fresh resolve of pyproject.toml's ranges (see scripts/lock.sh).
lock:
	PYTHON=$(PYTHON) bash scripts/lock.sh

versions: $(STAMP)
	@$(PY) -c "import importlib.metadata as m; print(' '.join(f'{p}=={m.version(p)}' for p in ('torch', 'transformers', 'diffusers', 'peft', 'accelerate', 'zarr', 'h5py', 'numpy')))"

lint: $(STAMP)
	$(VENV)/bin/ruff check attnhooks tests benchmarks examples
	$(VENV)/bin/mypy
	$(VENV)/bin/lint-imports

bench: $(STAMP)
	$(PY) benchmarks/capture_overhead.py

clean:
	rm -rf $(VENV) .venv-lock .pytest_cache build *.egg-info
