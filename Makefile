# Two commands: `make demo` (the main job: the pretrained MiniLM captured, figures and metrics written
# to attnhooks-demo/) and `make test`. Both create .venv on first use,
# installing the CPU build of torch first so nothing pulls a CUDA build.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.attnhooks-installed

.PHONY: demo test lint bench clean

$(STAMP): pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e ".[dev]" -c constraints.txt
	touch $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/attnhooks demo --out attnhooks-demo

test: $(STAMP)
	$(PY) -m pytest -q -p no:cacheprovider

lint: $(STAMP)
	$(VENV)/bin/ruff check attnhooks tests benchmarks examples
	$(VENV)/bin/mypy

bench: $(STAMP)
	$(PY) benchmarks/capture_overhead.py

clean:
	rm -rf $(VENV) .pytest_cache build *.egg-info
