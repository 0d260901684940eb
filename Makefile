# Two commands do all set-up on a fresh machine:
#   make pretrain   - create .venv, install, pre-train the default config on the embedded data
#   make test       - create .venv, install, run the test suite
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
STAMP := $(VENV)/.installed

.PHONY: setup pretrain test test-fast clean

setup: $(STAMP)

$(STAMP): pyproject.toml constraints.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade -c constraints.txt pip setuptools wheel
	# torch first, pinned: the local CPU build (an unpinned torch pulls GBs of CUDA wheels)
	$(PIP) install -q -c constraints.txt torch==2.13.0
	# deepspeed/fairscale are sdists that import torch while building: build them against it
	$(PIP) install -q --no-build-isolation -c constraints.txt -e ".[dev]"
	touch $(STAMP)

pretrain: setup
	$(PY) launchers/pretrain.py --config configs/default.yaml $(ARGS)

test: setup
	$(PY) -m pytest -q $(ARGS)

test-fast: setup
	$(PY) -m pytest -q -m "not slow and not multiprocess" $(ARGS)

clean:
	rm -rf $(VENV) runs .pytest_cache
