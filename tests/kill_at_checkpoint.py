"""Kill a training run at its first complete checkpoint: where the trainer's resume tests start from."""

from __future__ import annotations

import json
import signal
import subprocess
from collections.abc import Callable
from pathlib import Path


def kill_at_first_checkpoint(
    cmd: list[str], out_dir: Path | str, env: dict[str, str] | None = None, kill: Callable[[subprocess.Popen], object] | None = None
) -> int:
    """Run `cmd` (the trainer, or torchrun over it), read its JSON progress lines on stdout and, at the first
    `checkpoint` event, call `kill(proc)` (default: SIGKILL to the trainer). Returns the run's exit code.

    Fails if the run ended without reporting a checkpoint, or wrote its result (`out_dir`/result.json) anyway.
    """
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, env=env)
    assert proc.stdout is not None
    killed = False
    with proc.stdout:
        for line in proc.stdout:  # blocks until the trainer reports its first checkpoint
            if line.startswith("{") and json.loads(line).get("event") == "checkpoint":
                (kill or (lambda p: p.send_signal(signal.SIGKILL)))(proc)
                killed = True
                break
    code = proc.wait()
    assert killed, f"the run ended (exit {code}) before it reported a checkpoint: {cmd}"
    assert not (Path(out_dir) / "result.json").exists(), "the trainer finished before it was killed"
    return code
