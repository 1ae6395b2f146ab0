"""`cptd demo` end to end, as a user runs it: a child process, real services, the report at the end."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent

pytestmark = pytest.mark.slow  # the whole product: broker, Redis, vLLM, pre-training and one round (5-9 min)


def _alive(pids: list[int]) -> list[int]:
    out = []
    for p in pids:
        try:
            os.kill(p, 0)
            out.append(p)
        except ProcessLookupError:
            pass
    return out


# 507 s measured on the 2-core dev box at load average 6-8 (other work on its cores); the budget leaves room for a
# busier one (vLLM's start is the slow part).
DEMO_TIMEOUT_S = 1500


@pytest.mark.timeout(DEMO_TIMEOUT_S + 180)
def test_demo_deploys_a_round_and_stops_everything(tmp_path: Path):
    work = tmp_path / "demo"
    # stdout and stderr are pipes, as in `cptd demo | tee demo.log` or a CI log.
    p = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "daemon.cli",
            "demo",
            "--workdir",
            str(work),
            "--docs",
            "500",
            "--pretrain-steps",
            "150",
            "--round-steps",
            "40",
        ],
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        out, err = p.communicate(timeout=DEMO_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        p.terminate()  # the demo stops what it started on SIGTERM, as on Ctrl-C
        out, err = p.communicate(timeout=150)
        pytest.fail(f"cptd demo took over {DEMO_TIMEOUT_S} s\n" + out[-3000:] + err[-3000:])
    r = subprocess.CompletedProcess(p.args, p.returncode, out, err)
    assert r.returncode == 0, out[-3000:] + r.stderr[-3000:]
    assert re.search(r"REPORT  round r00001: DEPLOYED", out), out[-3000:]
    assert re.search(r"messages\s+\d+ produced, (\d+) accounted for", out)
    produced, accounted = map(int, re.search(r"messages\s+(\d+) produced, (\d+) accounted for", out).groups())
    assert produced == accounted
    for line in ("drift ", "replay ratio", "LR schedule", "train loss", "gate           ACCEPTED", "swap           ok", "before", "after"):
        assert line in out, line
    # The report's two completion lines ("  before       '...'"), not the first "before"/"after" anywhere in the output.
    before = re.search(r"^  before\s+(.*)$", out, re.M).group(1)
    after = re.search(r"^  after\s+(.*)$", out, re.M).group(1)
    assert before != after  # the deployed round changed what vLLM answers
    caught, back = map(int, re.search(r"echoes: (\d+) of the (\d+) documents the served model wrote were caught", out).groups())
    assert back == 40 and caught >= 0.9 * back, out[-3000:]  # its own outputs came back and were recognised
    assert re.search(r"curation\s+\d+ of \d+ candidates chosen; \d+ scored by the served model", out), out[-3000:]
    assert "stopped the daemon, vLLM, Kafka and Redis" in out
    # Piped, progress comes as plain lines, one per update worth showing: no carriage returns, no bar redrawn in place.
    assert "\r" not in out and "\r" not in r.stderr
    lines = out.splitlines()
    for label in ("pre-train", "ingest", "TRAINING"):
        shown = [ln for ln in lines if re.match(rf"\s+{label}\s+\d+%", ln)]
        assert len(shown) >= 2, (label, out[-3000:])
    assert any(re.match(r"\s+pre-train\s+100%\s+step 150/150", ln) for ln in lines), out[-3000:]
    # The swap line counts the completions the demo sent to vLLM while the round was swapped in: some, none failed.
    m = re.search(r"(\d+) requests during the swap \(([\d.]+) s\), (\d+) failed.*; (\d+) in the \d+ s around it, (\d+) failed", out)
    assert m, out[-3000:]
    during, swap_s, failed, sent, sent_failed = int(m[1]), float(m[2]), int(m[3]), int(m[4]), int(m[5])
    assert during > 0 and failed == 0 and sent >= during, m.group(0)
    # Away from the swap and its 3 s watch the daemon does not touch vLLM, yet the demo keeps it busy for as long as the
    # evaluator and the gate take: 14017 requests over 144 s on a loaded CI machine (stop 33), one of which failed, its
    # cause not recorded then. The report now prints each failure's time and error; none may fall near the swap, and
    # away from it at most one in a thousand.
    shown = [(ln, f) for ln in lines if (f := re.match(r"\s+sent ([-+][\d.]+) s, failed ([-+][\d.]+) s: ", ln))]
    assert len(shown) == min(sent_failed, 20), m.group(0)  # every failure's time is printed (up to the report's 20)
    near = [ln for ln, f in shown if float(f[1]) <= swap_s + 5 and float(f[2]) >= -1]
    assert not near and sent_failed <= sent // 1000, m.group(0) + "\n" + "\n".join(near)
    assert "no dropped request" not in out  # the report states measurements, not promises
    # Nothing it started is left running: the pid files/ports are gone with their processes.
    leftovers = subprocess.run(["pgrep", "-f", str(work)], capture_output=True, text=True).stdout.split()
    assert not _alive([int(p) for p in leftovers]), leftovers
