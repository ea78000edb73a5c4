# make serve: install, build model_store/minilm.mar if missing, start TorchServe, wait until READY.
# make stop:  stop it and wait until every process it started has exited.
# make test:  fresh .venv if missing, install with the test extra, ruff, pytest.
# make bench: the benchmark tables of README.md.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python

.PHONY: install test lint bench serve stop clean

$(VENV)/.installed: pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q -e '.[test]'
	$(PY) -c "import tracer"  # builds the C++ collective ops once (cached in ~/.cache/tpserve)
	touch $@

install: $(VENV)/.installed

MAR := model_store/minilm.mar
$(MAR): | $(VENV)/.installed
	$(PY) -m tracer build --tp-degree 2 --buckets 16,32,64,128 --batch-size 8 --model-name minilm --export-path model_store

serve: install $(MAR)
	$(PY) -m handler.server start --config config.properties --log-dir logs

stop:
	@if [ -x $(PY) ]; then $(PY) -m handler.server stop --log-dir logs; else echo "not installed"; fi

lint: install
	$(VENV)/bin/ruff check .

test: lint
	$(PY) -m pytest -q

bench: install
	$(PY) -m bench.tracer_core
	$(PY) -m bench.offline_tracer
	$(PY) -m bench.serving

clean:
	rm -rf $(VENV) build *.egg-info
