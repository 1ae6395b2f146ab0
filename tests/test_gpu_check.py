"""bench/gpu_check.py, the script kept for the day a GPU is lent, run here on its CPU path so it cannot rot.

On the CPU it runs every check but the compiled run and the device peak: the production round's train settings
on a bf16 parent, the memory plan beside the measured peak, the candidate's validation, and 4-bit NF4 (bitsandbytes
runs it on a CPU too).
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_the_gpu_check_runs_every_check_on_the_production_settings(tmp_path):
    out = tmp_path / "gpu_check.json"
    cmd = [sys.executable, "bench/gpu_check.py", "--device", "cpu", "--config", "tiny", "--steps", "3", "--warmup-steps", "1"]
    done = subprocess.run([*cmd, "--out", str(out)], cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    r = json.loads(out.read_text())
    # The round's settings are the shipped policy's, not the bench's own: accumulation as a round runs it.
    assert r["train"]["grad_accum"] == 4 and r["train"]["precision"] == "auto"
    assert r["eager"]["dtype"] == "bfloat16" and r["eager"]["precision"] == "bf16-mixed"
    assert r["eager"]["tokens_per_s"] > 0 and math.isfinite(r["eager"]["loss_last"])
    assert r["candidate"] == {"validated": True, "problem": None, "tensor_dtypes": ["BF16"]}
    assert r["plan"]["peak_mb"] > r["plan"]["activations_mb"] > 0
    assert r["plan"]["measured_kind"] == "rss" and r["plan"]["measured_over_plan"] is None  # RSS is not the plan's quantity
    assert r["nf4"]["refusal"] is None and math.isfinite(r["nf4"]["loss_last"])
