# trimformer: every target works alone on a fresh clone (each depends on `install`).
#
#   make demo              the built-in edge recipe end to end (MiniLM + tweets -> 3-layer pruned int8 bundle)
#   make test [FAST=1]     the tests (FAST=1 skips the slow end-to-end ones; CI runs them all)
#   make lint              ruff check, ruff format --check, mypy, lint-imports (the layer contracts)
#   make lm                the built-in causal LM (tokenizer + small Llama, trained here, cached)
#   make lm-demo           that LM as a verified int4 bundle (recipes/lm-int4.toml), and where the bundle is
#   make bench             every variant side by side in one run -> docs/BENCHMARKS.md
#                          (trains the teacher and, for the pruning check, a second one with seed 1)
#   make pipeline RECIPE=recipes/int8.toml
#   make serve [BUNDLE=dist/model.tar.gz] [PORT=8000]   a bundle over HTTP (default: the demo's bundle)
#   make bench-serve       the server on the int8 tweets teacher: overhead, batching, a mixed load
#   make export|distill|prune|quantize|validate|package MODEL=dir OUT=dir [DATA=..] [ARGS="..."]

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

.PHONY: install test lint format demo teacher teacher2 lm lm-demo bench bench-decoder bench-peers bench-load bench-serve clean pipeline fuse serve

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
	$(VENV)/bin/ruff check trimformer tests bench
	$(VENV)/bin/ruff format --check trimformer tests bench
	$(VENV)/bin/mypy trimformer
	$(VENV)/bin/lint-imports

format: $(STAMP)
	$(VENV)/bin/ruff check --fix trimformer tests bench
	$(VENV)/bin/ruff format trimformer tests bench

# --- the built-in example --------------------------------------------------------------------
# The edge recipe: fine-tune MiniLM on the tweets, distill to 3 layers, export, prune, int8,
# validate against the teacher, package. Cached per stage: a rerun takes seconds.
demo: $(STAMP)
	$(TF) run recipes/edge-cpu.toml --workdir $(DEMO)/edge
	@echo "report: $(DEMO)/edge/report/report.html"

# The built-in causal LM trained, exported, quantized to weight-only int4 (accuracy level chosen by
# token parity), validated against its PyTorch model and packaged (docs/DECODERS.md).
LM_DEMO := $(WORK)/lm-int4
lm-demo: $(STAMP)
	$(TF) run recipes/lm-int4.toml --workdir $(LM_DEMO)
	@bundle=$$(ls $(LM_DEMO)/stages/package-*/out/bundle.tar.gz 2>/dev/null | head -n 1); \
	test -n "$$bundle" || { echo "make lm-demo: the run wrote no bundle"; exit 1; }; \
	echo "bundle: $$bundle"; \
	echo "try:    $(TF) generate $$bundle --prompt 'the weather today is'"

# --- serving: a bundle over HTTP (docs/SERVING.md) --------------------------------------------
BUNDLE ?= $(firstword $(wildcard $(DEMO)/edge/stages/package-*/out/bundle.tar.gz))
PORT ?= 8000
serve: $(STAMP)
	@test -n "$(BUNDLE)" || { echo "make serve: no BUNDLE given and no demo bundle yet (make demo, or BUNDLE=path)"; exit 2; }
	$(TF) serve $(BUNDLE) --port $(PORT) $(ARGS)

# --- recipes: the whole pipeline, cached and resumable by `trimformer run` -------------------
pipeline: RECIPE ?= recipes/edge-cpu.toml
pipeline: $(STAMP)
	$(TF) run $(RECIPE) --workdir $(or $(WORKDIR),$(WORK)/runs/$(basename $(notdir $(RECIPE)))) \
		$(if $(FROM),--from $(FROM)) $(if $(UNTIL),--until $(UNTIL)) $(if $(FORCE),--force)

# --- the teacher the benchmark and the int8/prune recipes start from -------------------------
TEACHER := $(DEMO)/teacher
TEACHER_ONNX := $(DEMO)/teacher-onnx

teacher: $(TEACHER_ONNX)/model.onnx

$(TEACHER)/trimformer_train.json: | $(STAMP)
	$(TF) train --model builtin:minilm --data builtin:tweets --out $(TEACHER) --overwrite \
		--steps 500 --batch-size 32 --max-length 64 --lr 1e-4 --eval-every 125

$(TEACHER_ONNX)/model.onnx: $(TEACHER)/trimformer_train.json
	$(TF) export $(TEACHER) --out $(TEACHER_ONNX) --overwrite

# A second teacher trained the same way with another seed: pruning must hold on both (bench.prune).
TEACHER2 := $(DEMO)/teacher-seed1
TEACHER2_ONNX := $(DEMO)/teacher-seed1-onnx

teacher2: $(TEACHER2_ONNX)/model.onnx

$(TEACHER2)/trimformer_train.json: | $(STAMP)
	$(TF) train --model builtin:minilm --data builtin:tweets --out $(TEACHER2) --overwrite \
		--steps 500 --batch-size 32 --max-length 64 --lr 1e-4 --eval-every 125 --seed 1

$(TEACHER2_ONNX)/model.onnx: $(TEACHER2)/trimformer_train.json
	$(TF) export $(TEACHER2) --out $(TEACHER2_ONNX) --overwrite

# --- the built-in causal language model (no hub here: trained on the tweets' train split) -----
# A byte-level BPE tokenizer and a 3.9 M-parameter Llama-layout model with grouped-query
# attention; cached (a rerun returns at once), resumable when interrupted. 7 minutes on a 2-core Zen 2.
LM := $(WORK)/lm

lm: $(LM)/trimformer_train.json

$(LM)/trimformer_train.json: | $(STAMP)
	$(TF) train --task causal-lm --data builtin:tweets --out $(LM) --overwrite \
		--steps 700 --batch-size 16 --max-length 128 --lr 1e-3 --eval-every 100

# --- benchmark: every variant side by side in one run (docs/BENCHMARKS.md) --------------
# Peers get their own virtual environments: Optimum needs transformers<4.58. A peer that does not
# install leaves its rows marked "skipped" with the reason.
PEERS := optimum olive genai

bench-peers: $(foreach p,$(PEERS),bench/.venvs/$(p)/.installed)

bench/.venvs/%/.installed: bench/peers/%.txt constraints-peers.txt
	$(PYTHON) -m venv bench/.venvs/$*
	bench/.venvs/$*/bin/pip install -q -r bench/peers/$*.txt || echo "peer $* did not install; its rows will be skipped"
	touch $@

bench: $(TEACHER_ONNX)/model.onnx $(TEACHER2_ONNX)/model.onnx bench-peers
	$(PY) -m bench.run
	$(PY) -m bench.quantize --model $(TEACHER_ONNX)
	$(PY) -m bench.prune --teacher $(TEACHER) --teacher-onnx $(TEACHER_ONNX) \
		--second-teacher $(TEACHER2) --second-teacher-onnx $(TEACHER2_ONNX)
	$(PY) -m bench.distill --reuse
	$(PY) -m bench.qat --reuse --steps 1000
	$(PY) -m bench.holdout
	$(MAKE) bench-decoder
	$(MAKE) bench-load

# The decoder table (docs/BENCHMARKS.md): the built-in LM's quality and the SmolLM-135M shape's speed,
# trimformer's variants beside PyTorch and onnxruntime-genai's model builder (its own venv).
SMOL := $(WORK)/bench-decoder/smollm-hf
bench-decoder: $(LM)/trimformer_train.json bench/.venvs/genai/.installed
	$(TF) export $(LM) --out $(WORK)/lm-onnx --prompts builtin:tweets --overwrite
	$(PY) -m bench.weight_only --model $(WORK)/lm-onnx
	$(PY) -m bench.decoder_table --lm $(LM) --smollm
	$(PY) -m bench.decoder_ab --spec $(SMOL)/trimformer-fp32 int4-head4=$(SMOL)/trimformer-int4-rtn-head4 \
		builder-int4=$(SMOL)/builder-int4 --genai builder-int4=$(SMOL)/builder-int4 \
		int4-head4=$(SMOL)/trimformer-int4-rtn-head4 --repeats 5
	$(PY) -m bench.decoder_ab --spec $(SMOL)/trimformer-fp32 fused=$(SMOL)/trimformer-fused \
		builder-fp32=$(SMOL)/builder-fp32 --genai builder-fp32=$(SMOL)/builder-fp32 \
		fused=$(SMOL)/trimformer-fused --repeats 5

$(WORK)/package/teacher/manifest.json: $(TEACHER_ONNX)/model.onnx
	$(TF) package $(TEACHER_ONNX) --out $(WORK)/package/teacher --overwrite

bench-load: $(WORK)/package/teacher/manifest.json
	$(PY) -m bench.load --bundle $(WORK)/package/teacher.tar.gz

# The serving bench (docs/SERVING.md) on the int8 tweets teacher: trained, exported, quantized, packaged.
TEACHER_INT8 := $(WORK)/teacher-int8

$(TEACHER_INT8)/model.onnx: $(TEACHER_ONNX)/model.onnx
	$(TF) quantize $(TEACHER_ONNX) --calibration builtin:tweets --out $(TEACHER_INT8) --overwrite

$(WORK)/package/teacher-int8/manifest.json: $(TEACHER_INT8)/model.onnx
	$(TF) package $(TEACHER_INT8) --out $(WORK)/package/teacher-int8 --overwrite

bench-serve: $(WORK)/package/teacher-int8/manifest.json
	$(PY) -m bench.serve --bundle $(WORK)/package/teacher-int8.tar.gz

fuse: $(STAMP)
	$(TF) fuse $(MODEL) --out $(OUT) --overwrite

# --- one target per stage: make export MODEL=dir OUT=dir [DATA=..] [ARGS="..."] -------------
# File rules on a file only that stage writes: make skips a stage whose output is newer than
# its inputs (MODEL's files, DATA).
STAGES := train distill export prune quantize validate package
STAGE_GOALS := $(filter $(STAGES),$(MAKECMDGOALS))
ifneq ($(STAGE_GOALS),)
ifeq ($(OUT),)
$(error make $(STAGE_GOALS) needs OUT=folder (and MODEL=, DATA= as the stage takes them))
endif
ifeq ($(MODEL),)
$(error make $(STAGE_GOALS) needs MODEL=folder (the stage's input))
endif
endif
STAGE_INPUTS = $(if $(filter builtin:%,$(MODEL)),,$(shell find $(MODEL) -type f -not -path '*/report/*' -not -name '.*' 2>/dev/null)) \
	$(if $(filter builtin:%,$(DATA)),,$(DATA)) $(REFERENCE_FILES) $(REPORT)
REFERENCE_FILES = $(if $(REFERENCE),$(shell find $(REFERENCE) -type f -not -path '*/report/*' 2>/dev/null))
.PHONY: $(STAGES)
ifneq ($(STAGE_GOALS),)
train: $(OUT)/trimformer_train.json
$(OUT)/trimformer_train.json: $(STAGE_INPUTS) | $(STAMP)
	$(TF) train --model $(MODEL) --data $(DATA) --out $(OUT) --overwrite $(ARGS)
distill: $(OUT)/trimformer_distill.json
$(OUT)/trimformer_distill.json: $(STAGE_INPUTS) | $(STAMP)
	$(TF) distill --teacher $(MODEL) --data $(DATA) --out $(OUT) --overwrite $(ARGS)
export: $(OUT)/model.onnx
$(OUT)/model.onnx: $(STAGE_INPUTS) | $(STAMP)
	$(TF) export $(MODEL) --out $(OUT) --overwrite $(ARGS)
prune: $(OUT)/pruning_record.json
$(OUT)/pruning_record.json: $(STAGE_INPUTS) | $(STAMP)
	$(TF) prune $(MODEL) --out $(OUT) --overwrite $(if $(DATA),--calibration $(DATA)) \
		$(if $(SOURCE),--source $(SOURCE)) $(or $(ARGS),--flops 0.5)
quantize: $(OUT)/quantization_report.json
$(OUT)/quantization_report.json: $(STAGE_INPUTS) | $(STAMP)
	$(TF) quantize $(MODEL) --out $(OUT) --overwrite $(if $(DATA),--calibration $(DATA)) $(ARGS)
# A failed gate keeps the report but dates it to 1970 so the next `make validate` reruns.
validate: $(OUT)/report.json
$(OUT)/report.json: $(STAGE_INPUTS) | $(STAMP)
	$(TF) validate $(MODEL) --data $(DATA) --out $(OUT) $(if $(REFERENCE),--reference $(REFERENCE)) $(ARGS) \
		|| { rc=$$?; touch -d @0 $@ 2>/dev/null; exit $$rc; }
package: $(OUT)/manifest.json
$(OUT)/manifest.json: $(STAGE_INPUTS) | $(STAMP)
	$(TF) package $(MODEL) --out $(OUT) --overwrite $(if $(REPORT),--report $(REPORT)) $(ARGS)
endif

clean:
	rm -rf $(WORK) .pytest_cache .mypy_cache .ruff_cache
