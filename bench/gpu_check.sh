#!/usr/bin/env bash
# The GPU check (bench/gpu_check.py, bench/README.md "GPU check"), in one call of the device tool.
#
#   bash bench/gpu_check.sh --fetch     # here, first: the wheels the GPU image lacks, into .gpu-wheels/ (~45 MB, in .gitignore)
#   device run: carry [".gpu-wheels"], command "bash bench/gpu_check.sh", timeout_s 600
#
# The device's python3 holds torch, transformers, peft and safetensors; cptd's jobs also import pydantic, apscheduler
# (the policy's cron trigger), tenacity and bitsandbytes, which come from the carried wheels, into a venv that sees
# the image's packages. Nothing there can be fetched. The summary lands in $OUT/gpu_check.json (stdout has it too).
set -euo pipefail
cd "$(dirname "$0")/.."
WHEELS=(pydantic==2.14.4 pydantic-core==2.50.5 annotated-types typing-inspection pydantic-settings python-dotenv
  apscheduler==3.11.3 tzlocal tenacity bitsandbytes==0.50.2)
if [[ "${1:-}" == "--fetch" ]]; then
  python3 -m pip download -q --only-binary :all: --no-deps --python-version 3.12 --implementation cp \
    --platform manylinux_2_24_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
    -d .gpu-wheels "${WHEELS[@]}"
  du -sh .gpu-wheels
  exit 0
fi
test -d .gpu-wheels || { echo "no .gpu-wheels/: run 'bash bench/gpu_check.sh --fetch' here and carry it" >&2; exit 2; }
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
python3 -m venv --system-site-packages /tmp/cptd-gpu
/tmp/cptd-gpu/bin/pip install -q --no-index --find-links .gpu-wheels --no-deps .gpu-wheels/*.whl
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD
timeout 540 /tmp/cptd-gpu/bin/python bench/gpu_check.py --device cuda --config 0.5b --out "${OUT:-/tmp}/gpu_check.json"
