"""Failpoints for crash tests: `CPTD_FAILPOINTS="snapshot.taken=kill,deploy.reload_weights=sleep:5"`.

A crash test must kill the daemon at an exact point (between moving documents
and writing the round's files, with a vLLM replica paused mid-swap), which no
outside timer can hit reliably. Like etcd's gofail, the daemon names those
points and the environment says what happens there: `kill` (SIGKILL itself),
`sleep:S`, or `error` (raise). `kill-if:TEXT` and `error-if:TEXT` act only when the
subject passed to `hit` contains TEXT (one poison message among many). Unset, every
point is a no-op.
"""

from __future__ import annotations

import logging
import os
import signal
import time

log = logging.getLogger("cptd.failpoints")


def _actions() -> dict[str, str]:
    raw = os.environ.get("CPTD_FAILPOINTS", "")
    return dict(p.strip().split("=", 1) for p in raw.split(",") if "=" in p)


def hit(name: str, subject: bytes | None = None) -> None:
    action = _actions().get(name)
    if not action:
        return
    if action.startswith(("kill-if:", "error-if:")):
        action, _, needle = action.partition("-if:")
        if subject is None or needle.encode() not in subject:
            return
    log.warning("failpoint hit", extra={"failpoint": name, "action": action})
    if action == "kill":
        for h in logging.getLogger().handlers:
            h.flush()
        os.kill(os.getpid(), signal.SIGKILL)
    elif action.startswith("sleep:"):
        time.sleep(float(action.split(":", 1)[1]))
    elif action == "error":
        raise RuntimeError(f"failpoint {name}")
