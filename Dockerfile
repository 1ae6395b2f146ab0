# syntax=docker/dockerfile:1
#
# cptd daemon + trainer image (the same image runs `cptd run` and the torchrun
# training Job). vLLM is NOT in this image: it runs as its own Deployment from
# the official vllm/vllm-openai image (deploy/k8s/base/vllm.yaml).
#
# torch 2.13.0 on PyPI is built against CUDA 13 (it depends on the
# nvidia-*-cu13 wheels), so the base is a CUDA 13.0 runtime image; the host
# driver must support CUDA 13 (R580 or newer). To build for another CUDA line,
# pass a matching pair: --build-arg CUDA_IMAGE=... --build-arg TORCH_VERSION=...
# and a constraints/image.lock resolved for that torch: the committed lock pins
# torch 2.13.0 and its CUDA 13 wheels, so another TORCH_VERSION cannot resolve.
#
# Stage 1 builds a self-contained Python (uv-managed CPython) and a venv in
# /opt; stage 2 copies only those two directories onto a clean CUDA runtime
# image: no compiler, no package manager caches, no uv, no apt lists.

ARG CUDA_IMAGE=nvidia/cuda:13.0.1-runtime-ubuntu24.04
ARG UV_IMAGE=ghcr.io/astral-sh/uv:0.9.5

FROM ${UV_IMAGE} AS uv

FROM ${CUDA_IMAGE} AS builder
ARG PYTHON_VERSION=3.12
ARG TORCH_VERSION=2.13.0
# cptd's extras in the image: train (the trainer and every model job), launcher (the Kubernetes client). Add
# harness for regression suites given as lm-eval task YAMLs (it pulls datasets, scikit-learn, nltk, pandas).
ARG EXTRAS=train,launcher,s3
ENV UV_PYTHON_INSTALL_DIR=/opt/python \
    UV_PYTHON_PREFERENCE=only-managed \
    UV_COMPILE_BYTECODE=1 \
    UV_LINK_MODE=copy \
    UV_NO_CACHE=1
COPY --from=uv /uv /usr/local/bin/uv
RUN uv python install "${PYTHON_VERSION}" \
 && uv venv --python "${PYTHON_VERSION}" /opt/venv
WORKDIR /src
# Dependencies first (better layer reuse), then the package itself.
COPY pyproject.toml README.md ./
COPY constraints/ constraints/
COPY daemon/ daemon/
COPY connectors/ connectors/
COPY policies/ policies/
# torch is pinned explicitly: PyPI's torch==2.13.0 Linux wheel is the CUDA 13
# build that matches the base image. No vllm extra: vLLM has its own image.
# Every version comes from constraints/image.lock (`make lock`): the same as the suite's wherever they overlap.
RUN uv pip install --python /opt/venv/bin/python -c constraints/image.lock "torch==${TORCH_VERSION}" \
 && uv pip install --python /opt/venv/bin/python -c constraints/image.lock "torch==${TORCH_VERSION}" ".[${EXTRAS}]" \
 && /opt/venv/bin/python -c "import torch, daemon.metrics; print('torch', torch.__version__, 'cuda', torch.version.cuda)"

FROM ${CUDA_IMAGE} AS runtime
LABEL org.opencontainers.image.title="cptd" \
      org.opencontainers.image.description="Continual pre-training daemon and trainer (CUDA)" \
      org.opencontainers.image.licenses="Apache-2.0"
RUN useradd --uid 10001 --user-group --create-home --home-dir /home/cptd --shell /usr/sbin/nologin cptd \
 && mkdir -p /etc/cptd /checkpoints \
 && chown cptd:cptd /checkpoints
COPY --from=builder /opt/python /opt/python
COPY --from=builder /opt/venv /opt/venv
ENV PATH=/opt/venv/bin:${PATH} \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    HOME=/home/cptd \
    TRITON_CACHE_DIR=/tmp/triton \
    TORCHINDUCTOR_CACHE_DIR=/tmp/torchinductor \
    HF_HUB_OFFLINE=1
USER 10001:10001
WORKDIR /home/cptd
EXPOSE 8080
# /healthz answers 200 while the process is alive; readiness (/readyz) is for
# the orchestrator's probes, not for the container health status.
HEALTHCHECK --interval=30s --timeout=5s --start-period=60s --retries=3 \
  CMD ["python", "-c", "import sys, urllib.request; sys.exit(0 if urllib.request.urlopen('http://127.0.0.1:8080/healthz', timeout=4).status == 200 else 1)"]
ENTRYPOINT ["cptd"]
CMD ["run", "--policy", "/etc/cptd/policy.yaml"]
