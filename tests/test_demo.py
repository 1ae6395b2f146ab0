"""`cptd demo` end to end, as a user runs it: a child process, real services, the report at the end."""
from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def _alive(pids: list[int]) -> list[int]:
    out = []
    for p in pids:
        try:
            os.kill(p, 0)
            out.append(p)
        except ProcessLookupError:
            pass
    return out


def test_demo_deploys_a_round_and_stops_everything(tmp_path: Path):
    work = tmp_path / "demo"
    r = subprocess.run([sys.executable, "-m", "daemon.cli", "demo", "--workdir", str(work), "--docs", "500", "--pretrain-steps", "150",
                        "--round-steps", "40"], cwd=REPO, capture_output=True, text=True, timeout=900)
    out = r.stdout
    assert r.returncode == 0, out[-3000:] + r.stderr[-3000:]
    assert re.search(r"REPORT  round r00001: DEPLOYED", out), out[-3000:]
    assert re.search(r"messages\s+\d+ produced, (\d+) accounted for", out)
    produced, accounted = map(int, re.search(r"messages\s+(\d+) produced, (\d+) accounted for", out).groups())
    assert produced == accounted
    for line in ("drift ", "replay ratio", "LR schedule", "train loss", "gate           ACCEPTED", "swap           ok", "before", "after"):
        assert line in out, line
    before = re.search(r"before\s+(.*)", out).group(1)
    after = re.search(r"after\s+(.*)", out).group(1)
    assert before != after  # the deployed round changed what vLLM answers
    assert "stopped the daemon, vLLM, Kafka and Redis" in out
    # Nothing it started is left running: the pid files/ports are gone with their processes.
    leftovers = subprocess.run(["pgrep", "-f", str(work)], capture_output=True, text=True).stdout.split()
    assert not _alive([int(p) for p in leftovers]), leftovers
