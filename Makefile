# The whole set-up on a fresh machine is `make test` or `make demo`.
# On a machine without CUDA the CPU build of torch is installed first (TORCH, TORCH_INDEX override it,
# e.g. TORCH_INDEX="--index-url https://download.pytorch.org/whl/cpu" where that index is reachable).
PYTHON ?= python3
VENV ?= .venv
TORCH ?= torch==2.13.0
TORCH_INDEX ?=
BIN := $(VENV)/bin
STAMP := $(VENV)/.edgemeta-installed
DEMO_OUT ?= demo-out

.PHONY: test demo install clean

install: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	if ! command -v nvidia-smi >/dev/null 2>&1; then $(BIN)/python -m pip install -q $(TORCH_INDEX) "$(TORCH)"; fi
	$(BIN)/python -m pip install -q -e ".[dev]"
	touch $@

test: $(STAMP)
	$(BIN)/python -m pytest -q

demo: $(STAMP)
	PATH="$(abspath $(BIN)):$$PATH" bash scripts/demo.sh "$(DEMO_OUT)"

clean:
	rm -rf $(VENV) $(DEMO_OUT) build *.egg-info
