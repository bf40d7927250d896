# Competition pipeline for 4x super-resolution. `make help` lists every target.
# Stages read and write artifacts on disk; make reruns only what is stale.
.DEFAULT_GOAL := help
SHELL := /bin/bash

# the default real-data recipe (pipeline/configs/aerial.yaml); `make demo` uses EXP=demo
EXP ?= aerial
FOLD ?= 0
SEED ?= 0
SEEDS ?= 0
NPROC ?= 1
PYTHON ?= python3

VENV := .venv
PY := $(VENV)/bin/python
SETUP := $(VENV)/.installed
# ../shared beside the checkout holds the real pretrained weights when present
export SR_WEIGHTS_DIR ?= $(abspath ../shared/weights)
# Idle OpenMP threads sleep instead of spinning: the same speed on idle cores, and 5-10x
# faster steps when other jobs share them (make -j, a second experiment, CI neighbours).
export OMP_WAIT_POLICY ?= PASSIVE

PIPE := $(PY) -m pipeline
MANIFEST := data/interim/manifest.csv
DEGRADATION := data/interim/degradation.json
FOLDS_CSV := data/folds.csv
CONFIG := pipeline/configs/$(EXP).yaml
PRED_DIR := data/predictions/$(EXP)
OOF_SUMMARY := models/$(EXP)/oof/summary.json
SUBMISSION_LATEST := submissions/$(EXP)-latest.txt
CKPTS = $(wildcard models/$(EXP)/seed*/fold*/best.pt)
# folds of the experiment, read from its config (lazily: needs the venv)
FOLD_LIST = $(shell $(PY) -c "from pipeline.config import load_config; print(*range(load_config('$(EXP)')['data']['n_folds']))")

.PHONY: help setup demo demo-data unzip folds train train-all oof ensemble submission all \
        predict score test test-all bench weights benchmark-aerial clean

help: ## list every target with one line each
	@awk 'BEGIN {FS = ":.*?## "} /^[a-zA-Z_-]+:.*?## / {printf "  \033[36m%-18s\033[0m %s\n", $$1, $$2}' $(MAKEFILE_LIST)
	@echo "  variables: EXP=$(EXP) FOLD=$(FOLD) SEED=$(SEED) SEEDS='$(SEEDS)' NPROC=$(NPROC)"

setup: $(SETUP) ## create .venv from the pinned requirements.txt (reused while up to date)

$(SETUP): requirements.txt
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install --quiet --disable-pip-version-check -r requirements.txt
	touch $@

demo: $(SETUP) ## build the demo competition and run every stage on it, ending with a scored zip
	$(MAKE) demo-data EXP=demo
	$(MAKE) all EXP=demo
	@zip=submissions/$$(cat submissions/demo-latest.txt); echo "demo submission: $$zip"; \
	  $(PIPE) score --submission $$zip --answers data/demo/answers

demo-data: $(SETUP) ## build data/raw/{train,evaluation}.zip + data/demo/answers from sample images
	$(PIPE) demo-data --exp $(EXP)

unzip: $(MANIFEST) $(DEGRADATION) ## stage 00: validate and extract the zips into data/interim/, then probe the LR kernel

# The zips are inputs, never built: the empty recipe stops make from trying any rule on
# them (a pattern rule could match them), and a missing one reaches the pipeline, which
# says where to put it. A missing config likewise (wildcard).
$(MANIFEST): data/raw/train.zip data/raw/evaluation.zip $(wildcard $(CONFIG)) | $(SETUP)
	$(PIPE) unzip --exp $(EXP)

data/raw/train.zip data/raw/evaluation.zip: ;

# which downscaler made the low-res images (the kernel external data is given)
$(DEGRADATION): $(MANIFEST) | $(SETUP)
	$(PIPE) degradation --exp $(EXP)

folds: $(FOLDS_CSV) ## stage 01: data/folds.csv, K balanced folds

$(FOLDS_CSV): $(MANIFEST) $(wildcard $(CONFIG)) | $(SETUP)
	$(PIPE) folds --exp $(EXP)

train: $(FOLDS_CSV) ## stage 02: train one fold (FOLD=0 SEED=0 EXP=aerial NPROC=1)
ifeq ($(NPROC),1)
	$(PIPE) train --exp $(EXP) --fold $(FOLD) --seed $(SEED)
else
	$(VENV)/bin/torchrun --standalone --nproc_per_node $(NPROC) -m pipeline train --exp $(EXP) --fold $(FOLD) --seed $(SEED)
endif

train-all: $(FOLDS_CSV) ## stage 02: every fold x seed of EXP (`make -j2 train-all` runs two at once)
	$(MAKE) $(foreach s,$(SEEDS),$(foreach f,$(FOLD_LIST),models/$(EXP)/seed$(s)/fold$(f)/.trained))

# A fold's stamp, in its run folder, is touched when stage 02 returns (trained, resumed to
# the end, or found finished): a no-op rerun starts no Python. Stage 02 still decides what
# is on disk: skip, resume, or refuse a changed config.
models/$(EXP)/seed%/.trained: $(FOLDS_CSV) $(wildcard $(CONFIG)) | $(SETUP)
	$(MAKE) train SEED=$(word 1,$(subst /fold, ,$*)) FOLD=$(word 2,$(subst /fold, ,$*))
	touch $@

# Stages 03-05 are file targets: each reruns only when a checkpoint (or its other
# inputs) is newer; submissions/EXP-latest.txt names the newest zip of EXP.
oof: $(OOF_SUMMARY) ## stage 03: out-of-fold SSIM -> models/EXP/oof/{oof.csv,summary.json,oof.png}

$(OOF_SUMMARY): $(CKPTS) $(FOLDS_CSV) $(wildcard $(CONFIG)) | $(SETUP)
	$(PIPE) oof --exp $(EXP) --seeds $(SEEDS)

ensemble: $(PRED_DIR)/ensemble.json ## stage 04: fold x seed ensemble + 8-way TTA on the test set

$(PRED_DIR)/ensemble.json: $(CKPTS) $(MANIFEST) $(wildcard $(CONFIG)) | $(SETUP)
	$(PIPE) ensemble --exp $(EXP) --seeds $(SEEDS)

submission: $(SUBMISSION_LATEST) ## stage 05: check and zip the predictions -> submissions/EXP-<time>.zip

$(SUBMISSION_LATEST): $(PRED_DIR)/ensemble.json | $(SETUP)
	$(PIPE) submission --exp $(EXP)

all: ## stages 00-05 for EXP
	$(MAKE) unzip EXP=$(EXP)
	$(MAKE) folds EXP=$(EXP)
	$(MAKE) train-all EXP=$(EXP)
	$(MAKE) oof EXP=$(EXP)
	$(MAKE) ensemble EXP=$(EXP)
	$(MAKE) submission EXP=$(EXP)

weights: $(SETUP) ## find (SR_WEIGHTS_DIR, models/pretrained) or download and verify pretrained weights
	$(PIPE) weights --fetch all

test: $(SETUP) ## run the test suite (slow end-to-end runs excluded)
	$(PY) -m pytest -q

test-all: $(SETUP) ## run every test, slow end-to-end runs included
	$(PY) -m pytest -q -m ""

bench: $(SETUP) ## speed and memory benchmarks -> bench/results.csv (BENCH_ARGS='--quick', '--rows rlfn')
	$(PIPE) bench $(BENCH_ARGS)

# The aerial benchmark: a competition in the organiser's format built from the real
# 0.3 m tiles in ../shared (seeded 420/120 split, AERIAL_KERNEL x4) in its own work
# folder; the recipe AERIAL_EXP end to end for every seed of SEEDS, the reference rows
# (bicubic, pretrained RLFN, + TTA), fold 0 alone, then each of ABLATIONS (default: every
# pipeline/configs/AERIAL_EXP_*.yaml) on fold 0, then the ablation table. Runs and
# predictions newer than their inputs are skipped, so a rerun (or a rerun after an
# interruption) only does what is missing. AERIAL_JOBS trainings at once, one thread each.
# `make benchmark-aerial ABLATIONS=` gives the main rows only (~50 min on 2 cores).
AERIAL_SOURCE ?= $(abspath ../shared/data/ucmerced_urban)
# the organiser's kernel of the benchmark (any `demo-data --kernel` name); another kernel
# gets its own work folder, data/benchmarks/aerial-<kernel>
AERIAL_KERNEL ?= pil-bicubic
AERIAL_DIR := $(abspath data/benchmarks/aerial$(if $(filter pil-bicubic,$(AERIAL_KERNEL)),,-$(AERIAL_KERNEL)))
AERIAL_EXP ?= aerial
AERIAL_JOBS ?= 2
ABLATIONS ?= $(sort $(basename $(notdir $(wildcard pipeline/configs/$(AERIAL_EXP)_*.yaml))))
AERIAL_MODELS := $(AERIAL_DIR)/models
AERIAL_TEST_LOW := $(AERIAL_DIR)/data/interim/evaluation
AERIAL_PRED := $(AERIAL_DIR)/data/predictions
AERIAL_SEED0 := $(firstword $(SEEDS))
# fresh FILE IN...: FILE exists and none of IN is newer (what FILE marks is up to date);
# predict OUT ARGS...: `pipeline predict` into OUT unless OUT/.done is fresh against INPUTS
AERIAL_RUN := export SR_WORKDIR=$(AERIAL_DIR) && set -e && \
  fresh() { local out=$$1; shift; [ -e "$$out" ] && [ -z "$$(find "$$@" -newer "$$out" 2>/dev/null)" ]; } && \
  predict() { local out=$$1; shift; fresh "$$out/.done" "$${INPUTS[@]}" || { rm -f "$$out/.done"; \
    $(PIPE) predict --input $(AERIAL_TEST_LOW) --output "$$out" "$$@" && touch "$$out/.done"; }; } && \
  export -f fresh predict

benchmark-aerial: $(SETUP) ## the real aerial benchmark (needs ../shared): train AERIAL_EXP, score every row, print the ablation table
	@test -d "$(AERIAL_SOURCE)" || { echo "benchmark-aerial: $(AERIAL_SOURCE) not found: the real tiles live in ../shared/data/ucmerced_urban beside the checkout (not in the repository)" >&2; exit 1; }
	$(PIPE) demo-data --source $(AERIAL_SOURCE) --exp $(AERIAL_EXP) --n-train 420 --n-test 120 --seed 0 --kernel $(AERIAL_KERNEL) --workdir $(AERIAL_DIR)
	$(AERIAL_RUN); $(PIPE) unzip --exp $(AERIAL_EXP); $(PIPE) degradation --exp $(AERIAL_EXP); $(PIPE) folds --exp $(AERIAL_EXP); \
	  folds=$$($(PY) -c "from pipeline.config import load_config; print(*range(load_config('$(AERIAL_EXP)')['data']['n_folds']))"); \
	  for s in $(SEEDS); do for f in $$folds; do echo "$$s $$f"; done; done | OMP_NUM_THREADS=1 xargs -P $(AERIAL_JOBS) -n 2 \
	    sh -c '$(PIPE) train --exp $(AERIAL_EXP) --seed $$0 --fold $$1'; \
	  ckpts=$$(for s in $(SEEDS); do ls $(AERIAL_MODELS)/$(AERIAL_EXP)/seed$$s/fold*/best.pt; done); \
	  fresh $(AERIAL_MODELS)/$(AERIAL_EXP)/oof/summary.json $$ckpts || $(PIPE) oof --exp $(AERIAL_EXP) --seeds $(SEEDS); \
	  fresh $(AERIAL_PRED)/$(AERIAL_EXP)/ensemble.json $$ckpts || $(PIPE) ensemble --exp $(AERIAL_EXP) --seeds $(SEEDS); \
	  fresh $(AERIAL_DIR)/submissions/$(AERIAL_EXP)-latest.txt $(AERIAL_PRED)/$(AERIAL_EXP)/ensemble.json || \
	    $(PIPE) submission --exp $(AERIAL_EXP); \
	  $(PIPE) score --submission $(AERIAL_DIR)/submissions/$$(cat $(AERIAL_DIR)/submissions/$(AERIAL_EXP)-latest.txt) --answers $(AERIAL_DIR)/data/demo/answers
	$(AERIAL_RUN); INPUTS=($(AERIAL_DIR)/data/interim/manifest.csv); \
	  predict $(AERIAL_PRED)/bicubic --model bicubic --tta 1; \
	  predict $(AERIAL_PRED)/pretrained --model rlfn --weights rlfn_x4 --tta 1; \
	  predict $(AERIAL_PRED)/pretrained-tta8 --model rlfn --weights rlfn_x4 --tta 8; \
	  INPUTS=($(AERIAL_MODELS)/$(AERIAL_EXP)/seed$(AERIAL_SEED0)); \
	  for t in 1 8; do predict $(AERIAL_PRED)/$(AERIAL_EXP)-fold0$$([ $$t = 1 ] || echo -tta$$t) \
	    --checkpoint $(AERIAL_MODELS)/$(AERIAL_EXP)/seed$(AERIAL_SEED0)/fold0/best.pt --tta $$t; done; \
	  if [ "$(words $(SEEDS))" -gt 1 ]; then predict $(AERIAL_PRED)/$(AERIAL_EXP)-seed$(AERIAL_SEED0) \
	    --checkpoint $(AERIAL_MODELS)/$(AERIAL_EXP)/seed$(AERIAL_SEED0) --tta 8; fi
	$(AERIAL_RUN); for a in $(ABLATIONS); do echo $$a; done | OMP_NUM_THREADS=1 xargs -P $(AERIAL_JOBS) -I{} bash -c \
	  '$(PIPE) train --exp {} --fold 0 && INPUTS=($(AERIAL_MODELS)/{}/seed0/fold0/best.pt) && \
	   predict $(AERIAL_PRED)/{}-fold0 --checkpoint $(AERIAL_MODELS)/{}/seed0/fold0/best.pt --tta 1'
	$(PY) -m pipeline.ablation --workdir $(AERIAL_DIR) --exp $(AERIAL_EXP)

clean: ## remove generated artifacts (keeps .venv, data/raw and models/pretrained)
	rm -rf data/interim/* data/folds.csv data/predictions submissions/*.zip submissions/*-latest.txt bench
	find models -mindepth 1 -maxdepth 1 -type d ! -name pretrained -exec rm -rf {} +
