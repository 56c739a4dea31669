# trimformer: every target works alone on a fresh clone (each depends on `install`).
# Stage targets take MODEL=, DATA=, OUT= variables; `make demo` runs the built-in example.

PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
TF := $(VENV)/bin/trimformer
STAMP := $(VENV)/.installed
WORK ?= work
DEMO := $(WORK)/demo
PYTEST_FLAGS ?=
ifdef FAST
PYTEST_FLAGS += -m "not slow"
endif

export TOKENIZERS_PARALLELISM := false

.PHONY: install test lint format demo bench bench-peers clean train export validate

install: $(STAMP)

$(STAMP): pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install -q --upgrade pip
	# torch first, pinned, so pip takes the local CPU wheel instead of a CUDA build.
	$(VENV)/bin/pip install -q -c constraints.txt torch==2.13.0
	$(VENV)/bin/pip install -q -c constraints.txt -e '.[dev,examples]'
	touch $@

test: $(STAMP)
	$(PY) -m pytest -q $(PYTEST_FLAGS)

lint: $(STAMP)
	$(VENV)/bin/ruff check trimformer tests
	$(VENV)/bin/ruff format --check trimformer tests
	$(VENV)/bin/mypy trimformer

format: $(STAMP)
	$(VENV)/bin/ruff check --fix trimformer tests
	$(VENV)/bin/ruff format trimformer tests

# --- the built-in example: MiniLM fine-tuned on the tweets, exported and validated ----------
TEACHER := $(DEMO)/teacher
TEACHER_ONNX := $(DEMO)/teacher-onnx

$(TEACHER)/trimformer_train.json: | $(STAMP)
	$(TF) train --model builtin:minilm --data builtin:tweets --out $(TEACHER) --overwrite \
		--steps 500 --batch-size 32 --max-length 64 --lr 1e-4 --eval-every 125

$(TEACHER_ONNX)/model.onnx: $(TEACHER)/trimformer_train.json
	$(TF) export $(TEACHER) --out $(TEACHER_ONNX) --overwrite

demo: $(TEACHER_ONNX)/model.onnx
	$(TF) validate $(TEACHER_ONNX) --data builtin:tweets --reference $(TEACHER) --out $(DEMO)/report

# --- benchmark: every variant side by side in one run (docs/BENCHMARKS.md) --------------
# Peers get their own virtual environments: Optimum needs transformers<4.58. A peer that does not
# install leaves its rows marked "skipped" with the reason.
PEERS := optimum olive

bench-peers: $(foreach p,$(PEERS),bench/.venvs/$(p)/.installed)

bench/.venvs/%/.installed: bench/peers/%.txt constraints-peers.txt
	$(PYTHON) -m venv bench/.venvs/$*
	bench/.venvs/$*/bin/pip install -q -r bench/peers/$*.txt || echo "peer $* did not install; its rows will be skipped"
	touch $@

bench: $(TEACHER_ONNX)/model.onnx bench-peers
	$(PY) -m bench.run

# --- one target per stage, for build scripts: make export MODEL=dir OUT=dir ---------------
train: $(STAMP)
	$(TF) train --model $(MODEL) --data $(DATA) --out $(OUT)

export: $(STAMP)
	$(TF) export $(MODEL) --out $(OUT) --overwrite

validate: $(STAMP)
	$(TF) validate $(MODEL) --data $(DATA) $(if $(REFERENCE),--reference $(REFERENCE)) $(if $(OUT),--out $(OUT))

clean:
	rm -rf $(WORK) .pytest_cache .mypy_cache .ruff_cache
