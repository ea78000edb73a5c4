# make test: fresh .venv if missing, install with the test extra, ruff, pytest.
# make bench: the benchmark table of README.md.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python

.PHONY: install test lint bench clean

$(VENV)/.installed: pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q -e '.[test]'
	$(PY) -c "import tracer"  # builds the C++ collective ops once (cached in ~/.cache/tpserve)
	touch $@

install: $(VENV)/.installed

lint: install
	$(VENV)/bin/ruff check .

test: lint
	$(PY) -m pytest -q

bench: install
	$(PY) -m bench.tracer_core
	$(PY) -m bench.offline_tracer

clean:
	rm -rf $(VENV) build *.egg-info
