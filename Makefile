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
# GPUs the training jobs claim, one job per GPU (pipeline/gpus.py): default every GPU
# nvidia-smi lists, none on a CPU machine; GPUS="0 0" lets two jobs share GPU 0 on purpose
GPUS ?= $(shell nvidia-smi --query-gpu=index --format=csv,noheader 2>/dev/null | grep -E '^[0-9]+$$')

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
FOLD_LIST = $(shell $(PY) -c "from pipeline.core.config import load_config; print(*range(load_config('$(EXP)')['data']['n_folds']))")

.PHONY: help setup demo demo-data unzip folds train train-all oof ensemble submission all \
        predict score test test-all bench weights benchmark-aerial benchmark-aerial-x5 report lb clean FORCE \
        blend blend-submission default

help: ## list every target with one line each
	@awk 'BEGIN {FS = ":.*?## "} /^[a-zA-Z_-]+:.*?## / {printf "  \033[36m%-18s\033[0m %s\n", $$1, $$2}' $(MAKEFILE_LIST)
	@echo "  variables: EXP=$(EXP) FOLD=$(FOLD) SEED=$(SEED) SEEDS='$(SEEDS)' NPROC=$(NPROC) GPUS='$(strip $(GPUS))' ARGS='$(ARGS)'"

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

folds: $(FOLDS_CSV) ## stage 01: data/folds.csv, K balanced folds (data/raw/groups.csv: groups kept whole)

$(FOLDS_CSV): $(MANIFEST) $(wildcard $(CONFIG)) $(wildcard data/raw/groups.csv) | $(SETUP)
	$(PIPE) folds --exp $(EXP)

# With GPUS, a training job first claims NPROC free GPUs of them (waiting while none is
# free) and runs on those alone (CUDA_VISIBLE_DEVICES); the claim ends with the job.
GPU_CLAIM = $(if $(strip $(GPUS)),$(PY) -m pipeline.train.gpus --gpus "$(strip $(GPUS))" --count $(NPROC) --)

train: $(FOLDS_CSV) ## stage 02: train one fold (FOLD=0 SEED=0 EXP=aerial NPROC=1 GPUS= ARGS=)
ifeq ($(NPROC),1)
	$(GPU_CLAIM) $(PIPE) train --exp $(EXP) --fold $(FOLD) --seed $(SEED) $(ARGS)
else
	$(GPU_CLAIM) $(VENV)/bin/torchrun --standalone --nproc_per_node $(NPROC) -m pipeline train --exp $(EXP) --fold $(FOLD) --seed $(SEED) $(ARGS)
endif

train-all: $(FOLDS_CSV) ## stage 02: every fold x seed of EXP (`make -j4 train-all GPUS="0 1 2 3"`: one per GPU)
	$(MAKE) $(foreach s,$(SEEDS),$(foreach f,$(FOLD_LIST),models/$(EXP)/seed$(s)/fold$(f)/.trained))

# A fold's stamp, in its run folder, is touched when stage 02 returns (trained, resumed to
# the end, or found finished): a no-op rerun starts no Python. Stage 02 still decides what
# is on disk: skip, resume, or refuse a changed config. With ARGS the config is not the
# file's alone: stage 02 always runs and the stamp is removed, so a later run without
# them asks stage 02 again (which refuses a run trained with other overrides).
# make -jN: each of the N jobs gets cores/N CPU threads unless OMP_NUM_THREADS is set.
MAKE_JOBS = $(patsubst -j%,%,$(filter -j%,$(MAKEFLAGS)))
JOB_THREADS = $(if $(MAKE_JOBS),$(shell n=$$(( $$(nproc 2>/dev/null || getconf _NPROCESSORS_ONLN) / $(MAKE_JOBS) )); \
  echo $$(( n > 0 ? n : 1 ))))
models/$(EXP)/seed%/.trained: $(FOLDS_CSV) $(wildcard $(CONFIG)) $(if $(strip $(ARGS)),FORCE) | $(SETUP)
	$(if $(JOB_THREADS),OMP_NUM_THREADS=$${OMP_NUM_THREADS:-$(JOB_THREADS)} )$(MAKE) train SEED=$(word 1,$(subst /fold, ,$*)) FOLD=$(word 2,$(subst /fold, ,$*))
	$(if $(strip $(ARGS)),rm -f $@,touch $@)

FORCE:

# Stages 03-05 are file targets: each reruns only when a checkpoint (or its other
# inputs) is newer; submissions/EXP-latest.txt names the newest zip of EXP.
oof: $(OOF_SUMMARY) ## stage 03: out-of-fold SSIM -> models/EXP/oof/{oof.csv,summary.json,oof.png}

$(OOF_SUMMARY): $(CKPTS) $(FOLDS_CSV) $(wildcard $(CONFIG)) $(if $(strip $(ARGS)),FORCE) | $(SETUP)
	$(PIPE) oof --exp $(EXP) --seeds $(SEEDS) $(ARGS)

ensemble: $(PRED_DIR)/ensemble.json ## stage 04: fold x seed ensemble + 8-way TTA on the test set

$(PRED_DIR)/ensemble.json: $(CKPTS) $(MANIFEST) $(wildcard $(CONFIG)) $(if $(strip $(ARGS)),FORCE) | $(SETUP)
	$(PIPE) ensemble --exp $(EXP) --seeds $(SEEDS) $(ARGS)

submission: $(SUBMISSION_LATEST) ## stage 05: check and zip the predictions -> submissions/EXP-<time>.zip

$(SUBMISSION_LATEST): $(PRED_DIR)/ensemble.json | $(SETUP)
	$(PIPE) submission --exp $(EXP)

# A blend of experiments (pipeline/blend.py): weights fitted on their stage-03 out-of-fold
# predictions, then stages 04-05 from every member's checkpoints, weighted.
EXPS ?= aerial aerial_rfdn aerial_safmn
BLEND ?= blend
blend: | $(SETUP) ## fit blend weights on EXPS' out-of-fold predictions -> models/blends/BLEND/blend.json
	$(PIPE) blend --exps $(EXPS) --name $(BLEND)

blend-submission: | $(SETUP) ## stages 04-05 from the blend BLEND -> submissions/BLEND-<time>.zip
	$(PIPE) ensemble --blend $(BLEND)
	$(PIPE) submission --blend $(BLEND)

all: ## stages 00-05 for EXP
	$(MAKE) unzip EXP=$(EXP)
	$(MAKE) folds EXP=$(EXP)
	$(MAKE) train-all EXP=$(EXP)
	$(MAKE) oof EXP=$(EXP)
	$(MAKE) ensemble EXP=$(EXP)
	$(MAKE) submission EXP=$(EXP)

# The default submission: the candidate with the best grouped CV among those whose training
# fits 2.5 h on the 2-core machine, on the aerial benchmark's location-held-out split (README,
# "On the location-held-out split"; `benchmark-aerial` chooses it again from its own runs).
# One experiment: stages 00-05 of it. Several: each trained on every fold with stage 03, then
# their blend fitted out of fold (DEFAULT_BLEND) and stages 04-05 from it.
DEFAULT_EXPS ?= aerial_patch48_steps2000 aerial_rfdn_steps2000
DEFAULT_BLEND ?= default
default: | $(SETUP) ## stages 00-05 of the default submission (DEFAULT_EXPS; their blend when several)
ifeq ($(words $(DEFAULT_EXPS)),1)
	$(MAKE) all EXP=$(DEFAULT_EXPS)
else
	$(MAKE) unzip EXP=$(firstword $(DEFAULT_EXPS))
	$(MAKE) folds EXP=$(firstword $(DEFAULT_EXPS))
	$(foreach e,$(DEFAULT_EXPS),$(MAKE) train-all EXP=$(e) && $(MAKE) oof EXP=$(e) &&) true
	$(MAKE) blend EXPS="$(DEFAULT_EXPS)" BLEND=$(DEFAULT_BLEND)
	$(MAKE) blend-submission BLEND=$(DEFAULT_BLEND)
endif

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

bench: $(SETUP) ## speed and memory benchmarks -> bench/results.csv (BENCH_ARGS='--quick', '--rows rlfn')
	$(PIPE) bench $(BENCH_ARGS)

# The aerial benchmark: a competition in the organiser's format built from the real
# 0.3 m tiles in ../shared (held out by place: tile numbers 00-29 of every class train,
# 30-44 test; data/raw/groups.csv keeps places in one fold; AERIAL_KERNEL x4) in its own work
# folder; the recipe AERIAL_EXP end to end for every seed of SEEDS, and each of AERIAL_KFOLD
# (other nets and schedules) on every fold with stage 03 and 04; the blends of all of them
# (fitted and equal weights); AERIAL_EXP again with random folds (AERIAL_RANDOM_FOLDS=1, in
# the sibling folder <work folder>-random-folds, groups.csv left out) to show how far each CV
# is from the test; the reference rows (bicubic, pretrained RLFN, + TTA), fold 0 alone, each
# of ABLATIONS (default: every pipeline/configs/AERIAL_EXP_*.yaml) on fold 0; then the table,
# the default submission (best grouped CV within 2.5 h of training) written to
# <work folder>/default-submission.txt and checked: `predict $$(cat that file)` must give
# stage 04's files byte for byte. Runs and predictions newer than their inputs are skipped,
# so a rerun (or a rerun after an interruption) only does what is missing. AERIAL_JOBS
# trainings at once, one thread each. Everything: ~7 h on 2 cores (3.4 h of it the k-fold training); `make benchmark-aerial
# ABLATIONS= AERIAL_KFOLD= AERIAL_RANDOM_FOLDS=0` gives the main rows only (~35 min).
AERIAL_SOURCE ?= $(abspath ../shared/data/ucmerced_urban)
# the organiser's kernel of the benchmark (any `demo-data --kernel` name); another kernel
# gets its own work folder, data/benchmarks/aerial-<kernel>
AERIAL_KERNEL ?= pil-bicubic
AERIAL_DIR := $(abspath data/benchmarks/aerial$(if $(filter pil-bicubic,$(AERIAL_KERNEL)),,-$(AERIAL_KERNEL)))
AERIAL_EXP ?= aerial
AERIAL_JOBS ?= 2
# recipes trained on every fold beside AERIAL_EXP: the schedule study (1000, 2000 steps; 48 LR
# patches at 2000) and the blends' other net family (RFDN at 500 and 2000 steps), each a
# candidate for the default (AERIAL_KFOLD="aerial_rfdn" keeps to the 500-step pair)
AERIAL_KFOLD ?= $(addprefix $(AERIAL_EXP)_,rfdn steps1000 steps2000 rfdn_steps2000 patch48_steps2000)
# blends fitted beside the one of every k-fold recipe, TAG:member,member,... -> <exp>-blend-TAG
# (pairs whose training fits the default's budget when the blend of all does not); a blend
# with a member that has no stage 03 (not in AERIAL_KFOLD) is skipped
AERIAL_BLENDS ?= steps2000:$(AERIAL_EXP)_steps2000,$(AERIAL_EXP)_rfdn_steps2000 \
  patch48_steps2000:$(AERIAL_EXP)_patch48_steps2000,$(AERIAL_EXP)_rfdn_steps2000
AERIAL_RANDOM_FOLDS ?= 1
AERIAL_RANDOM_DIR := $(AERIAL_DIR)-random-folds
# (<exp>_x5*: the x5 experiment, another scale and competition: benchmark-aerial-x5)
ABLATIONS ?= $(filter-out $(AERIAL_EXP)_x5%,$(sort $(basename $(notdir $(wildcard pipeline/configs/$(AERIAL_EXP)_*.yaml)))))
AERIAL_MODELS := $(AERIAL_DIR)/models
AERIAL_TEST_LOW := $(AERIAL_DIR)/data/interim/evaluation
AERIAL_PRED := $(AERIAL_DIR)/data/predictions
AERIAL_SEED0 := $(firstword $(SEEDS))
AERIAL_DATA = $(PIPE) demo-data --source $(AERIAL_SOURCE) --exp $(AERIAL_EXP) --test-numbers 30-44 --seed 0 --kernel $(AERIAL_KERNEL)
# fresh FILE IN...: FILE exists and none of IN is newer (what FILE marks is up to date);
# predict OUT ARGS...: `pipeline predict` into OUT unless OUT/.done is fresh against INPUTS;
# scored EXP: stage 03 and 04 of EXP unless they are newer than its checkpoints
AERIAL_RUN := export SR_WORKDIR=$(AERIAL_DIR) && set -e && \
  fresh() { local out=$$1; shift; [ -e "$$out" ] && [ -z "$$(find "$$@" -newer "$$out" 2>/dev/null)" ]; } && \
  predict() { local out=$$1; shift; fresh "$$out/.done" "$${INPUTS[@]}" || { rm -f "$$out/.done"; \
    $(PIPE) predict --input $(AERIAL_TEST_LOW) --output "$$out" "$$@" && touch "$$out/.done"; }; } && \
  scored() { local ckpts=$$(ls $$SR_WORKDIR/models/$$1/seed*/fold*/best.pt); \
    fresh $$SR_WORKDIR/models/$$1/oof/summary.json $$ckpts || $(PIPE) oof --exp $$1; \
    fresh $$SR_WORKDIR/data/predictions/$$1/ensemble.json $$ckpts || $(PIPE) ensemble --exp $$1; } && \
  export -f fresh predict scored

benchmark-aerial: $(SETUP) ## the real aerial benchmark (needs ../shared): train AERIAL_EXP, score every row, print the ablation table
	@test -d "$(AERIAL_SOURCE)" || { echo "benchmark-aerial: $(AERIAL_SOURCE) not found: the real tiles live in ../shared/data/ucmerced_urban beside the checkout (not in the repository)" >&2; exit 1; }
	$(AERIAL_DATA) --workdir $(AERIAL_DIR)
	$(AERIAL_RUN); $(PIPE) unzip --exp $(AERIAL_EXP); $(PIPE) degradation --exp $(AERIAL_EXP); $(PIPE) folds --exp $(AERIAL_EXP); \
	  folds=$$($(PY) -c "from pipeline.core.config import load_config; print(*range(load_config('$(AERIAL_EXP)')['data']['n_folds']))"); \
	  { for s in $(SEEDS); do for f in $$folds; do echo "$(AERIAL_EXP) $$s $$f"; done; done; \
	    for e in $(AERIAL_KFOLD); do for f in $$folds; do echo "$$e $(AERIAL_SEED0) $$f"; done; done; } | \
	    OMP_NUM_THREADS=1 xargs -P $(AERIAL_JOBS) -n 3 sh -c '$(PIPE) train --exp $$0 --seed $$1 --fold $$2'; \
	  ckpts=$$(for s in $(SEEDS); do ls $(AERIAL_MODELS)/$(AERIAL_EXP)/seed$$s/fold*/best.pt; done); \
	  fresh $(AERIAL_MODELS)/$(AERIAL_EXP)/oof/summary.json $$ckpts || $(PIPE) oof --exp $(AERIAL_EXP) --seeds $(SEEDS); \
	  fresh $(AERIAL_PRED)/$(AERIAL_EXP)/ensemble.json $$ckpts || $(PIPE) ensemble --exp $(AERIAL_EXP) --seeds $(SEEDS); \
	  fresh $(AERIAL_DIR)/submissions/$(AERIAL_EXP)-latest.txt $(AERIAL_PRED)/$(AERIAL_EXP)/ensemble.json || \
	    $(PIPE) submission --exp $(AERIAL_EXP); \
	  $(PIPE) score --submission $(AERIAL_DIR)/submissions/$$(cat $(AERIAL_DIR)/submissions/$(AERIAL_EXP)-latest.txt) --answers $(AERIAL_DIR)/data/demo/answers; \
	  for e in $(AERIAL_KFOLD); do scored $$e; done
	$(AERIAL_RUN); if [ -n "$(strip $(AERIAL_KFOLD))" ]; then \
	  summaries=$$(for e in $(AERIAL_EXP) $(AERIAL_KFOLD); do echo $(AERIAL_MODELS)/$$e/oof/summary.json; done); \
	  for w in fit equal; do b=$(AERIAL_EXP)-blend$$([ $$w = fit ] || echo -equal); \
	    fresh $(AERIAL_MODELS)/blends/$$b/blend.json $$summaries || $(PIPE) blend --exps $(AERIAL_EXP) $(AERIAL_KFOLD) --name $$b --weights $$w; \
	    fresh $(AERIAL_PRED)/$$b/ensemble.json $(AERIAL_MODELS)/blends/$$b/blend.json || $(PIPE) ensemble --blend $$b; done; \
	  for spec in $(AERIAL_BLENDS); do b=$(AERIAL_EXP)-blend-$${spec%%:*}; members=$${spec#*:}; members=$${members//,/ }; \
	    summaries=$$(for e in $$members; do echo $(AERIAL_MODELS)/$$e/oof/summary.json; done); \
	    ls $$summaries >/dev/null 2>&1 || continue; \
	    fresh $(AERIAL_MODELS)/blends/$$b/blend.json $$summaries || $(PIPE) blend --exps $$members --name $$b; \
	    fresh $(AERIAL_PRED)/$$b/ensemble.json $(AERIAL_MODELS)/blends/$$b/blend.json || $(PIPE) ensemble --blend $$b; done; fi
	if [ "$(AERIAL_RANDOM_FOLDS)" = 1 ]; then $(AERIAL_DATA) --workdir $(AERIAL_RANDOM_DIR) && rm -f $(AERIAL_RANDOM_DIR)/data/raw/groups.csv && \
	  $(AERIAL_RUN) && export SR_WORKDIR=$(AERIAL_RANDOM_DIR) && $(PIPE) unzip --exp $(AERIAL_EXP) && $(PIPE) folds --exp $(AERIAL_EXP) && \
	  folds=$$($(PY) -c "from pipeline.core.config import load_config; print(*range(load_config('$(AERIAL_EXP)')['data']['n_folds']))") && \
	  for f in $$folds; do echo $$f; done | OMP_NUM_THREADS=1 xargs -P $(AERIAL_JOBS) -I{} $(PIPE) train --exp $(AERIAL_EXP) --seed $(AERIAL_SEED0) --fold {} && \
	  scored $(AERIAL_EXP); fi
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
	$(PY) -m pipeline.tools.ablation --workdir $(AERIAL_DIR) --exp $(AERIAL_EXP) --write-default
	$(AERIAL_RUN); INPUTS=($(AERIAL_DIR)/default-submission.txt); predict $(AERIAL_PRED)/default-submission $$(cat $(AERIAL_DIR)/default-submission.txt); \
	  $(PY) -m pipeline.tools.ablation --workdir $(AERIAL_DIR) --exp $(AERIAL_EXP) --check-default $(AERIAL_PRED)/default-submission
	SR_WORKDIR=$(AERIAL_DIR) $(PIPE) report

# x5 (issue 14): the same tiles built at x5 (255x255 -> 51x51), fold 0 of aerial_x5 (rlfn_x4
# carried to x5, upsampler re-initialised) and aerial_x5_scratch (the same net from a
# random init, same steps), both scored on the 120 test answers with bicubic x5.
AERIAL_X5_DIR := $(abspath data/benchmarks/aerial_x5)
benchmark-aerial-x5: $(SETUP) ## x5 on the real aerial tiles: rlfn_x4 carried to x5 vs the same net from scratch vs bicubic (fold 0, ~15 min)
	@test -d "$(AERIAL_SOURCE)" || { echo "benchmark-aerial-x5: $(AERIAL_SOURCE) not found" >&2; exit 1; }
	export SR_WORKDIR=$(AERIAL_X5_DIR) && set -e && \
	  $(PIPE) demo-data --source $(AERIAL_SOURCE) --exp aerial_x5 --n-train 420 --n-test 120 --seed 0 --workdir $(AERIAL_X5_DIR) && \
	  $(PIPE) unzip --exp aerial_x5 && $(PIPE) folds --exp aerial_x5 && \
	  printf '%s\n' aerial_x5 aerial_x5_scratch | OMP_NUM_THREADS=1 xargs -P $(AERIAL_JOBS) -I{} $(PIPE) train --exp {} --fold 0 && \
	  $(PIPE) predict --model bicubic --scale 5 --tta 1 --input $(AERIAL_X5_DIR)/data/interim/evaluation --output $(AERIAL_X5_DIR)/data/predictions/bicubic && \
	  for e in aerial_x5 aerial_x5_scratch; do $(PIPE) predict --checkpoint $(AERIAL_X5_DIR)/models/$$e/seed0/fold0/best.pt \
	    --tta 1 --input $(AERIAL_X5_DIR)/data/interim/evaluation --output $(AERIAL_X5_DIR)/data/predictions/$$e-fold0; done && \
	  $(PY) -m pipeline.tools.ablation --workdir $(AERIAL_X5_DIR) --exp aerial_x5

clean: ## remove generated artifacts (keeps .venv, data/raw and models/pretrained)
	rm -rf data/interim/* data/folds.csv data/predictions submissions/*.zip submissions/*-latest.txt bench reports/index.html reports/img reports/cache
	find models -mindepth 1 -maxdepth 1 -type d ! -name pretrained -exec rm -rf {} +
