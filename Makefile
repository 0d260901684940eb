# Two commands do all set-up on a fresh machine:
#   make pretrain   - create .venv, install, pre-train the default config on the embedded data
#                     (2 ranks, deepspeed launcher, ZeRO-2; NPROC=, DS_CONFIG=, ARGS="--set k=v" to change)
#   make test       - create .venv, install, run the test suite (tests/suite.py)
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
STAMP := $(VENV)/.installed
# System libraries the optional ffcv extra builds against, and libaio for ZeRO-Infinity (NVMe offload).
APT_PKGS := libopencv-dev libturbojpeg0-dev pkg-config libaio-dev
# Optional too: Chromium, for the test that renders TensorBoard's landing page (it skips without).
BROWSER_PKGS := chromium

.PHONY: setup apt pretrain test test-fast gpu-check gpu-wheels clean

setup: $(STAMP)

$(STAMP): pyproject.toml constraints.txt tools/install_deepspeed.sh
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade -c constraints.txt pip setuptools wheel
	# torch first, pinned: the local CPU build (an unpinned torch pulls GBs of CUDA wheels)
	$(PIP) install -q -c constraints.txt torch==2.13.0
	# system libraries: FFCV builds against OpenCV and turbojpeg, DeepSpeed's NVMe offload against libaio
	$(MAKE) --no-print-directory apt || echo "warning: $(APT_PKGS) did not install; FFCV and ZeRO-Infinity may not"
	# deepspeed is an sdist that imports torch while building: built against torch, with its NVMe-offload
	# ops compiled in once per machine and kept in ~/.cache/revcol-dist (each new .venv reuses the wheel)
	bash tools/install_deepspeed.sh $(PY) constraints.txt
	$(PIP) install -q --no-build-isolation -c constraints.txt -e ".[dev]"
	# FFCV (optional: without it the data pipelines fall back to a torch DataLoader)
	$(MAKE) --no-print-directory apt && $(PIP) install -q --no-build-isolation -c constraints.txt -e ".[dev,ffcv]" \
	  || echo "warning: the ffcv extra did not install; data loading will use the torch DataLoader fallback"
	# DeepSpeed's NVMe-offload ops (ZeRO-Infinity) load here: compiled into its wheel above, or, where
	# that failed, compiled now on first use (~3 minutes on two cores, again for every new .venv)
	$(PY) -c "from deepspeed.ops.op_builder import AsyncIOBuilder, PinMemoryBuilder as P; \
	  [b.load() for b in (P(), AsyncIOBuilder()) if b.is_compatible(verbose=False)]" >/dev/null 2>&1 \
	  || echo "warning: DeepSpeed's async_io op did not build (libaio-dev missing?); its tests will skip"
	$(MAKE) --no-print-directory apt APT_PKGS="$(BROWSER_PKGS)" \
	  || echo "warning: chromium did not install; the TensorBoard landing-page test will skip"
	touch $(STAMP)

apt:
	@if ! command -v apt-get >/dev/null 2>&1; then \
	  echo "no apt-get here: install $(APT_PKGS) with your package manager"; exit 1; fi; \
	missing=$$(for p in $(APT_PKGS); do dpkg -s $$p >/dev/null 2>&1 || echo $$p; done); \
	if [ -n "$$missing" ]; then \
	  sudo=$$( [ "$$(id -u)" -eq 0 ] || echo sudo ); \
	  $$sudo apt-get update -qq && DEBIAN_FRONTEND=noninteractive $$sudo apt-get install -y -qq $$missing; \
	fi

# The main job: 2 ranks (CPU processes here, GPUs where present) under the deepspeed launcher, ZeRO-2.
NPROC ?= 2
DS_CONFIG ?= ds_configs/zero2.json
pretrain: setup
	OMP_NUM_THREADS=$${OMP_NUM_THREADS:-1} $(VENV)/bin/deepspeed --num_gpus $(NPROC) launchers/pretrain.py \
	  --deepspeed_config $(DS_CONFIG) --config configs/default.yaml $(ARGS)

# The whole suite (CI's command): in-process tests on two pytest-xdist workers at idle priority,
# beside the launching ones one at a time (tests/suite.py; docs/testing.md).
test: setup
	$(PY) tests/suite.py $(ARGS)

# The GPU check (benchmarks/gpu_check.py, at most 10 minutes on one GPU, one JSON line; a reduced
# mode on CPUs). The .venv holds the CPU build of torch pinned for CI: on a GPU node point
# GPU_PY at a Python with a CUDA build (GPU_PY=python3 make gpu-check).
GPU_PY ?= $(PY)
gpu-check:
	$(GPU_PY) benchmarks/gpu_check.py $(ARGS)

# DeepSpeed and its needs as wheels in .gpu/whl (git ignores it), for a GPU machine without a
# package registry: carry .gpu there and run benchmarks/gpu_session.sh (../shared/gpu/README.md).
GPU_WHEELS := hjson pydantic pydantic_core annotated-types typing-inspection
gpu-wheels: setup
	mkdir -p .gpu/whl
	$(PY) -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
	  --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d .gpu/whl \
	  $$(for p in $(GPU_WHEELS); do grep -i "^$$p==" constraints.txt; done)
	$(PY) -m pip download -q --no-deps --no-binary=:all: -d .gpu/sdist $$(grep -i '^deepspeed==' constraints.txt)
	$(PY) -m pip wheel -q --no-deps --no-build-isolation .gpu/sdist/deepspeed-*.tar.gz -w .gpu/whl
	ls .gpu/whl

test-fast: setup
	$(PY) -m pytest -q -n 2 -m "not slow and not multiprocess" $(ARGS)

clean:
	rm -rf $(VENV) runs .pytest_cache
