# Two commands on a fresh machine: `make demo` and `make test`. Both create .venv and install first.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
# torch is pinned and installed first: on the project's CPU machines this exact version is a local CPU wheel
# (an unpinned torch would pull a 5 GB CUDA build); on a GPU cluster the same pin resolves to the CUDA build.
TORCH_PIN := torch==2.13.0
STAMP  := $(VENV)/.installed-stamp
DEMO_DIR ?= runs/demo

.PHONY: install demo test clean help slurm
help:
	@echo "make demo   - run the main job on the bundled synthetic cohort ($(DEMO_DIR))"
	@echo "make test   - run the test suite"
	@echo "make clean  - remove .venv and runs/"

$(STAMP): pyproject.toml constraints.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --disable-pip-version-check "$(TORCH_PIN)"
	$(BIN)/python -m pip install -q --disable-pip-version-check -c constraints.txt -e ".[dev]"
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
TRAIN := DS_ACCELERATOR=cpu OMP_NUM_THREADS=1 $(BIN)/python -m torch.distributed.run --standalone \
	--nproc_per_node=2 -m pretrain train
FINETUNE := $(BIN)/python -m finetune train --config configs/finetune/demo.yaml data.dataset=$(D)/data/ukb \
	encoder=$(D)/stage2

demo: install $(D)/report.md
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

$(D)/finetune/phenotypes/comparison.json: $(D)/stage2/encoder.safetensors
	$(BIN)/python -m finetune compare --config configs/finetune/demo.yaml data.dataset=$(D)/data/ukb \
		out=$(D)/finetune/phenotypes optim.epochs=40 $(FINETUNE_ARGS) \
		--method vita=$(D)/stage2 --method mae=$(D)/stage1 --baselines mean_guess,vit_scratch

$(D)/finetune/diseases/metrics.json: $(D)/stage2/encoder.safetensors
	$(FINETUNE) task.name=diseases optim.epochs=10 out=$(D)/finetune/diseases $(FINETUNE_ARGS)

$(D)/finetune/segmentation/metrics.json: $(D)/stage2/encoder.safetensors
	$(FINETUNE) task.name=segmentation optim.epochs=12 optim.lr=3e-3 data.batch_size=2 out=$(D)/finetune/segmentation \
		$(FINETUNE_ARGS)

$(D)/finetune/modality_view/metrics.json: $(D)/metaclip/encoder.safetensors
	$(BIN)/python -m finetune train --config configs/finetune/demo.yaml task.name=modality_view \
		data.dataset=$(D)/data/kspace encoder=$(D)/metaclip protocol.kind=probe_finetune protocol.probe_epochs=5 \
		optim.epochs=15 out=$(D)/finetune/modality_view $(FINETUNE_ARGS)

$(D)/report.md: $(D)/finetune/phenotypes/comparison.json $(D)/finetune/diseases/metrics.json \
		$(D)/finetune/segmentation/metrics.json $(D)/finetune/modality_view/metrics.json
	$(BIN)/python -m finetune demo-report --demo $(D)

# a real one-node SLURM (slurm-wlm + munge) for the cluster tests; without root / packages they skip
slurm:
	bash cluster/local_slurm.sh install && bash cluster/local_slurm.sh start \
		|| echo "no local SLURM cluster: the SLURM tests will be skipped"

# CMRFM_SLURM_TIMELIMIT=1: also the ~3 min test of a job that reaches its real SLURM time limit
test: install slurm
	CMRFM_SLURM_TIMELIMIT=1 $(BIN)/python -m pytest -q

clean:
	rm -rf $(VENV) runs
