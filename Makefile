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
# extra arguments of the train, oof and ensemble commands: ARGS="--set train.steps=2000 --set loss.sobel=0.1"
ARGS ?=
# GPUs the GPU jobs (train, oof, ensemble) claim, one job per GPU (pipeline/train/gpus.py):
# default the CUDA_VISIBLE_DEVICES a scheduler set, else every GPU nvidia-smi lists, none on
# a CPU machine; GPUS="0 0" lets two jobs share GPU 0 on purpose
comma := ,
GPUS ?= $(if $(CUDA_VISIBLE_DEVICES),$(subst $(comma), ,$(CUDA_VISIBLE_DEVICES)),$(shell nvidia-smi --query-gpu=index --format=csv,noheader 2>/dev/null | grep -E '^[0-9]+$$'))
# arguments of the benchmarks: BENCH_ARGS='--quick' or '--rows rlfn'; AERIAL_ARGS='--main-rows'
BENCH_ARGS ?=
AERIAL_ARGS ?=

# Which torch `make setup` installs: the pins of requirements.txt (default); TORCH=system, a
# venv that sees the machine's own torch and torchvision (Kaggle, Colab, NGC containers) with
# the other pins beside them; TORCH_INDEX=URL, torch and torchvision from that index
# (https://download.pytorch.org/whl/cu118: older drivers, Pascal cards). docs/gpu.md.
TORCH ?= pinned
TORCH_INDEX ?=
VENV := .venv
PY := $(VENV)/bin/python
SETUP := $(VENV)/.installed
PIP := $(VENV)/bin/pip install --quiet --disable-pip-version-check
# ../shared beside the checkout holds the real pretrained weights when present
export SR_WEIGHTS_DIR ?= $(abspath ../shared/weights)
# Idle OpenMP threads sleep instead of spinning: the same speed on idle cores, and far
# faster steps when other jobs share them (make -j, a second experiment).
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
# stage 04 may also use the full-data fits (`make train FOLD=all`, infer.models)
FULL_CKPTS = $(wildcard models/$(EXP)/seed*/full/best.pt)
# folds of the experiment, read from its config (lazily: needs the venv)
FOLD_LIST = $(shell $(PY) -c "from pipeline.core.config import load_config; print(*range(load_config('$(EXP)')['data']['n_folds']))")
# With GPUS, a job first claims N free GPUs of them (training: NPROC; waiting while none is
# free) and runs on those alone (CUDA_VISIBLE_DEVICES); the claim ends with the job.
GPU_CLAIM = $(if $(strip $(GPUS)),$(PY) -m pipeline.train.gpus --gpus "$(strip $(GPUS))" --count $(1) --)
TRAIN = $(if $(filter 1,$(NPROC)),$(PIPE),$(VENV)/bin/torchrun --standalone --nproc_per_node $(NPROC) -m pipeline)
# make -jN: each of the N jobs gets cores/N CPU threads unless OMP_NUM_THREADS is set
MAKE_JOBS = $(patsubst -j%,%,$(filter -j%,$(MAKEFLAGS)))
JOB_THREADS = $(if $(MAKE_JOBS),$(shell n=$$(( $$(nproc) / $(MAKE_JOBS) )); echo $$(( n > 0 ? n : 1 ))))
# A blend of experiments (pipeline/infer/blend.py) and the default submission (docs/recipes.md)
EXPS ?= aerial aerial_rfdn aerial_safmn
BLEND ?= blend
DEFAULT_EXPS ?= aerial_patch48_steps2000 aerial_rfdn_steps2000
DEFAULT_BLEND ?= default

.PHONY: help setup demo demo-data unzip folds train train-all oof ensemble submission all \
        predict score test test-all bench gpu-check weights benchmark-aerial benchmark-aerial-x5 report lb clean FORCE \
        blend blend-submission default

help: ## list every target with one line each
	@awk 'BEGIN {FS = ":.*?## "} /^[a-zA-Z0-9_-]+:.*?## / {printf "  \033[36m%-20s\033[0m %s\n", $$1, $$2}' $(MAKEFILE_LIST)
	@echo "  variables: EXP=$(EXP) FOLD=$(FOLD) SEED=$(SEED) SEEDS='$(SEEDS)' NPROC=$(NPROC) GPUS='$(strip $(GPUS))' ARGS='$(ARGS)'"

setup: $(SETUP) ## create .venv from requirements.txt (TORCH=system or TORCH_INDEX=URL on GPU machines; docs/gpu.md)
$(SETUP): requirements.txt
	$(PYTHON) -m venv $(if $(filter system,$(TORCH)),--system-site-packages )$(VENV) && grep -vE '^torch(vision)?==' requirements.txt > $(VENV)/requirements-without-torch.txt
	$(if $(filter system,$(TORCH)),,$(PIP) $(if $(TORCH_INDEX),--index-url $(TORCH_INDEX) torch torchvision,$$(grep -E '^torch(vision)?==' requirements.txt)) && )$(PIP) -r $(VENV)/requirements-without-torch.txt && $(PY) -m pipeline.core.torch_check && touch $@

demo: $(SETUP) ## build the demo competition and run every stage on it, ending with a scored zip
	$(MAKE) demo-data EXP=demo && $(MAKE) all EXP=demo
	$(PIPE) score --submission submissions/$$(cat submissions/demo-latest.txt) --answers data/demo/answers

demo-data: $(SETUP) ## build data/raw/{train,evaluation}.zip + data/demo/answers from sample images
	$(PIPE) demo-data --exp $(EXP)

# The zips and a missing config are inputs, never built: the empty recipe stops make from
# trying a rule on them, and the pipeline says where to put them.
data/raw/train.zip data/raw/evaluation.zip: ;

unzip: $(MANIFEST) $(DEGRADATION) ## stage 00: validate and extract the zips into data/interim/, then probe the LR kernel
$(MANIFEST): data/raw/train.zip data/raw/evaluation.zip $(wildcard $(CONFIG)) | $(SETUP)
	$(PIPE) unzip --exp $(EXP)
$(DEGRADATION): $(MANIFEST) | $(SETUP)
	$(PIPE) degradation --exp $(EXP)

folds: $(FOLDS_CSV) ## stage 01: data/folds.csv, K balanced folds (data/raw/groups.csv: groups kept whole)
$(FOLDS_CSV): $(MANIFEST) $(wildcard $(CONFIG)) $(wildcard data/raw/groups.csv) | $(SETUP)
	$(PIPE) folds --exp $(EXP)

train: $(FOLDS_CSV) ## stage 02: train one fold (FOLD=0; FOLD=all: every training scene; SEED=0 EXP=aerial NPROC=1 GPUS= ARGS=)
	$(call GPU_CLAIM,$(NPROC)) $(TRAIN) train --exp $(EXP) --fold $(FOLD) --seed $(SEED) $(ARGS)

train-all: $(FOLDS_CSV) ## stage 02: every fold x seed of EXP (`make -j4 train-all GPUS="0 1 2 3"`: one per GPU)
	$(MAKE) $(foreach s,$(SEEDS),$(foreach f,$(FOLD_LIST),models/$(EXP)/seed$(s)/fold$(f)/.trained))

# A fold's stamp is touched when stage 02 returns (trained, resumed to the end, or found
# finished): a no-op rerun starts no Python. With ARGS the config is not the file's alone:
# stage 02 always runs and the stamp is removed (stage 02 refuses a run trained otherwise).
# (Lines that run $(MAKE) run even under `make -n`: a plain command gets a line of its own.)
models/$(EXP)/seed%/.trained: $(FOLDS_CSV) $(wildcard $(CONFIG)) $(if $(strip $(ARGS)),FORCE) | $(SETUP)
	$(if $(JOB_THREADS),OMP_NUM_THREADS=$${OMP_NUM_THREADS:-$(JOB_THREADS)} )$(MAKE) train SEED=$(word 1,$(subst /fold, ,$*)) FOLD=$(word 2,$(subst /fold, ,$*))
	$(if $(strip $(ARGS)),rm -f $@,touch $@)

FORCE:

# Stages 03-05 are file targets: each reruns only when a checkpoint (or another input) is newer.
oof: $(OOF_SUMMARY) ## stage 03: out-of-fold SSIM -> models/EXP/oof/{oof.csv,summary.json,oof.png}
$(OOF_SUMMARY): $(CKPTS) $(FOLDS_CSV) $(wildcard $(CONFIG)) $(if $(strip $(ARGS)),FORCE) | $(SETUP)
	$(call GPU_CLAIM,1) $(PIPE) oof --exp $(EXP) --seeds $(SEEDS) $(ARGS)

ensemble: $(PRED_DIR)/ensemble.json ## stage 04: fold x seed ensemble + 8-way TTA on the test set
$(PRED_DIR)/ensemble.json: $(CKPTS) $(FULL_CKPTS) $(MANIFEST) $(wildcard $(CONFIG)) $(if $(strip $(ARGS)),FORCE) | $(SETUP)
	$(call GPU_CLAIM,1) $(PIPE) ensemble --exp $(EXP) --seeds $(SEEDS) $(ARGS)

submission: $(SUBMISSION_LATEST) ## stage 05: check and zip the predictions -> submissions/EXP-<time>.zip
$(SUBMISSION_LATEST): $(PRED_DIR)/ensemble.json | $(SETUP)
	$(PIPE) submission --exp $(EXP)

blend: | $(SETUP) ## fit blend weights on EXPS' out-of-fold predictions -> models/blends/BLEND/blend.json
	$(PIPE) blend --exps $(EXPS) --name $(BLEND)

blend-submission: | $(SETUP) ## stages 04-05 from the blend BLEND -> submissions/BLEND-<time>.zip
	$(call GPU_CLAIM,1) $(PIPE) ensemble --blend $(BLEND)
	$(PIPE) submission --blend $(BLEND)

all: ## stages 00-05 for EXP
	$(MAKE) unzip EXP=$(EXP) && $(MAKE) folds EXP=$(EXP) && $(MAKE) train-all EXP=$(EXP) && $(MAKE) oof EXP=$(EXP) && $(MAKE) ensemble EXP=$(EXP) && $(MAKE) submission EXP=$(EXP)

# One experiment: its stages 00-05. Several: each on every fold with stage 03, their blend, stages 04-05 of it.
default: | $(SETUP) ## stages 00-05 of the default submission (DEFAULT_EXPS; their blend when several)
	$(if $(word 2,$(DEFAULT_EXPS)),$(MAKE) unzip folds EXP=$(firstword $(DEFAULT_EXPS)) && $(foreach e,$(DEFAULT_EXPS),$(MAKE) train-all oof EXP=$(e) &&) $(MAKE) blend EXPS="$(DEFAULT_EXPS)" BLEND=$(DEFAULT_BLEND) && $(MAKE) blend-submission BLEND=$(DEFAULT_BLEND),$(MAKE) all EXP=$(DEFAULT_EXPS))

report: $(SETUP) ## static HTML report of every experiment, scene and submission -> reports/index.html (offline)
	$(PIPE) report

lb: $(SETUP) ## print the submissions ledger; `make lb ZIP=submissions/x.zip SCORE=0.81` records a public LB score
	$(PIPE) lb $(ZIP) $(SCORE)

weights: $(SETUP) ## find (SR_WEIGHTS_DIR, models/pretrained) or download and verify pretrained weights
	$(PIPE) weights --fetch all

test: $(SETUP) ## run the test suite (slow end-to-end runs excluded)
	$(PY) -m pytest -q

test-all: $(SETUP) ## run every test, slow end-to-end runs included
	$(PY) -m pytest -q -m ""

bench: $(SETUP) ## speed and memory benchmarks -> bench/results.{csv,md} (BENCH_ARGS='--quick', '--rows rlfn')
	$(PIPE) bench $(BENCH_ARGS)

gpu-check: $(SETUP) ## prove a GPU machine in minutes: training vs CPU, resume, torchrun, stages 03-04, speed -> bench/gpu-check.md
	$(PIPE) gpu-check

benchmark-aerial: $(SETUP) ## the real aerial benchmark (needs ../shared): every row, the table, the default (AERIAL_ARGS='--main-rows')
	$(PIPE) benchmark-aerial $(AERIAL_ARGS)

benchmark-aerial-x5: $(SETUP) ## x5 on the real aerial tiles: rlfn_x4 carried to x5 vs the same net from scratch vs bicubic
	$(PIPE) benchmark-aerial --x5 $(AERIAL_ARGS)

clean: ## remove generated artifacts (keeps .venv, data/raw and models/pretrained)
	rm -rf data/interim/* data/folds.csv data/predictions submissions/*.zip submissions/*-latest.txt bench reports/index.html reports/img reports/cache && find models -mindepth 1 -maxdepth 1 -type d ! -name pretrained -exec rm -rf {} +
