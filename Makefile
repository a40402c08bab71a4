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

demo: install
	$(BIN)/python -m data_prep synth --config configs/data_prep/synth_demo.yaml out=$(DEMO_DIR)/cohort
	$(BIN)/python -m data_prep ukb --config configs/data_prep/ukb_convert.yaml --src $(DEMO_DIR)/cohort/ukb \
		--tabular $(DEMO_DIR)/cohort/ukb_tabular.csv --out $(DEMO_DIR)/data/ukb
	$(BIN)/python -m data_prep kspace --config configs/data_prep/kspace_convert.yaml --src $(DEMO_DIR)/cohort/kspace \
		--out $(DEMO_DIR)/data/kspace

# a real one-node SLURM (slurm-wlm + munge) for the cluster tests; without root / packages they skip
slurm:
	bash cluster/local_slurm.sh install && bash cluster/local_slurm.sh start \
		|| echo "no local SLURM cluster: the SLURM tests will be skipped"

test: install slurm
	$(BIN)/python -m pytest -q

clean:
	rm -rf $(VENV) runs
