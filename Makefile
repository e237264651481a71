# The whole set-up on a fresh machine is `make test` or `make demo`.
# On a machine without CUDA the CPU build of torch is installed first (TORCH, TORCH_INDEX override it,
# e.g. TORCH_INDEX="--index-url https://download.pytorch.org/whl/cpu" where that index is reachable).
PYTHON ?= python3
VENV ?= .venv
DEVICE_VENV ?= .venv-device
TORCH ?= torch==2.13.0
TORCH_INDEX ?=
BIN := $(VENV)/bin
STAMP := $(VENV)/.edgemeta-installed
DEMO_OUT ?= demo-out
SHIPPED_CKPT := checkpoints/omniglot-conv4-protonet.safetensors
DEVICE_BUNDLE := build/device-test-bundle
# tests that need only the runtime and the tiny bundle (tests/tiny_bundle): `make test-fast` runs them
# with the rest, `make test-device` runs them again where torch and onnx are not installed
DEVICE_SIDE_TESTS := test_hostile_store.py test_variant_choice.py test_outputs.py test_prediction.py test_cli_fast.py

.PHONY: test test-fast test-main test-device lint demo install clean

install: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	if ! command -v nvidia-smi >/dev/null 2>&1; then $(BIN)/python -m pip install -q $(TORCH_INDEX) "$(TORCH)"; fi
	$(BIN)/python -m pip install -q -e ".[dev]" -c constraints/dev.txt
	touch $@

test: lint test-main test-device

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/mypy

test-main: $(STAMP)
	$(BIN)/python -m pytest -q

# The edit loop: no training, export or multi-process tests (`slow`, see tests/conftest.py).
test-fast: $(STAMP)
	$(BIN)/python -m pytest -q -m "not slow"

# A second environment as on a device: the wheel, built as docs/jetson.md says, installed with no
# extras (no torch, no onnx) under the JetPack 6 constraints (numpy < 2).
test-device: $(STAMP)
	rm -rf $(DEVICE_VENV) build/dist
	$(BIN)/python -m pip wheel -q --no-deps -w build/dist .
	$(PYTHON) -m venv $(DEVICE_VENV)
	$(DEVICE_VENV)/bin/python -m pip install -q -c constraints/jetpack6.txt build/dist/edgemeta-*.whl pytest
	rm -rf build/lib build/bdist*
	$(BIN)/edgemeta export $(SHIPPED_CKPT) --out $(DEVICE_BUNDLE) --overwrite \
		--calib-data data/omniglot/images_background_small2.zip
	cd tests/device_env && EDGEMETA_TEST_BUNDLE="$(abspath $(DEVICE_BUNDLE))" \
		EDGEMETA_TEST_DATA="$(abspath data/omniglot/images_background_small2.zip)" \
		"$(abspath $(DEVICE_VENV))/bin/python" -m pytest -q -p no:cacheprovider -o addopts="" --confcutdir=. .
	# the runtime's own tests on the checked-in tiny bundle, in the torch-free environment
	cd tests && "$(abspath $(DEVICE_VENV))/bin/python" -m pytest -q -p no:cacheprovider -o addopts="" \
		$(DEVICE_SIDE_TESTS)

demo: $(STAMP)
	PATH="$(abspath $(BIN)):$$PATH" bash scripts/demo.sh "$(DEMO_OUT)"

clean:
	rm -rf $(VENV) $(DEVICE_VENV) $(DEMO_OUT) build *.egg-info
