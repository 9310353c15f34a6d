# ctcvr: the two commands a newcomer needs are `make demo` and `make test`.
# Both set up the virtual environment first if it is missing or out of date.

VENV      ?= .venv
PY        := $(VENV)/bin/python
TORCHRUN  := $(VENV)/bin/torchrun
STAMP     := $(VENV)/.ctcvr-installed
DEMO_DIR  ?= runs/demo
DEMO_ROWS ?= 400000
NPROC     ?= 2

.PHONY: setup demo simulate train export-model serve-demo serve lint test image-test clean help

help:
	@echo "make demo   - set up, simulate a data set, train with $(NPROC) processes, print the evaluation,"
	@echo "              export the model, serve it and score a few impressions over HTTP"
	@echo "make serve  - serve the demo model on 127.0.0.1:8000 (python -m serving)"
	@echo "make test   - set up, lint (ruff check, ruff format --check) and run the test suite"
	@echo "make image-test - build the container image (buildah, as root) and check that it serves"
	@echo "              a freshly trained model (deploy/image_test.sh)"
	@echo "make setup  - install the pinned stack into $(VENV) (deploy/install.sh)"
	@echo "make clean  - remove $(DEMO_DIR)"

$(STAMP): pyproject.toml deploy/install.sh serving/_int8_rows.c
	VENV=$(VENV) bash deploy/install.sh
	@touch $@

setup: $(STAMP)

simulate: setup
	$(PY) -m trainer.data simulate --rows $(DEMO_ROWS) --out $(DEMO_DIR)/data --seed 0 --overwrite

train: setup
	$(TORCHRUN) --standalone --nproc_per_node=$(NPROC) -m trainer.train \
		--config trainer/configs/demo.yaml output_dir=$(DEMO_DIR)/run data.train=$(DEMO_DIR)/data/train \
		data.test=$(DEMO_DIR)/data/test

export-model: setup
	$(PY) -m trainer.export --run $(DEMO_DIR)/run --out $(DEMO_DIR)/model --force

serve-demo: setup
	$(PY) -m serving.demo --model-dir $(DEMO_DIR)/model --data $(DEMO_DIR)/data/test --rows 5

serve: setup
	$(PY) -m serving --model-dir $(DEMO_DIR)/model

demo: simulate
	rm -rf $(DEMO_DIR)/run
	$(MAKE) --no-print-directory train
	$(MAKE) --no-print-directory export-model
	$(MAKE) --no-print-directory serve-demo

lint: setup
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

test: lint
	$(PY) -m pytest

image-test: setup
	PY=$(PY) bash deploy/image_test.sh

clean:
	rm -rf $(DEMO_DIR)
