"""Hot-reload of the policy file: a valid edit takes effect, an invalid one is refused and the old policy stays.

Kubernetes updates a mounted ConfigMap by swapping a `..data` symlink, so the
file's own mtime and inode can stay put while its content changes; the watcher
therefore compares a hash of the bytes it reads (through every symlink) on a
short poll, which sees plain edits, renames and symlink swaps alike.
"""

from __future__ import annotations

import hashlib
import logging
import threading
from collections.abc import Callable
from pathlib import Path

from daemon import metrics as M
from policies.config import Policy, PolicyError, load_policy, policy_hash
from policies.round_policy import DEPLOY_MODES

log = logging.getLogger("cptd.policy")


def export(policy: Policy) -> None:
    """The policy in force as metrics: its hash, the synthetic cap's alert threshold, the deploy mode."""
    M.POLICY_INFO.info({"hash": policy_hash(policy), "name": policy.name})
    M.SYNTHETIC_CAP_ALERT_ROUNDS.set(policy.collapse.cap_alert_rounds)
    for mode in DEPLOY_MODES:
        M.DEPLOY_MODE.labels(mode=mode).set(1 if mode == policy.deploy.mode else 0)


class PolicyWatcher:
    def __init__(
        self,
        path: str | Path,
        current: Policy,
        on_change: Callable[[Policy], None],
        refusal: Callable[[Policy], str | None] = lambda _p: None,
    ):
        """`refusal`: what the deployment cannot run in a valid policy (Settings.policy_refusal), refused like an
        invalid file."""
        self.path = Path(path)
        self.current = current
        self.on_change = on_change
        self.refusal = refusal
        self.last_error: str | None = None
        self._seen = self._digest()
        export(current)

    def _digest(self) -> str | None:
        try:
            return hashlib.sha256(self.path.read_bytes()).hexdigest()
        except OSError:
            return None

    def check(self, force: bool = False) -> tuple[bool, str]:
        """Reload if the file's bytes changed (or `force`); returns (policy changed, message)."""
        digest = self._digest()
        if not force and digest == self._seen:
            return False, "unchanged"
        self._seen = digest
        try:
            new = load_policy(self.path)
            if (why := self.refusal(new)) is not None:
                raise PolicyError(f"{self.path}: {why}")
        except PolicyError as e:
            self.last_error = str(e)
            M.POLICY_RELOAD_ERRORS.inc()
            log.error("policy refused; the old policy stays in force", extra={"error": str(e), "policy_hash": policy_hash(self.current)})
            return False, str(e)
        self.last_error = None
        old_hash, new_hash = policy_hash(self.current), policy_hash(new)
        if new_hash == old_hash:
            return False, "same policy (only formatting changed)"
        if (
            new.name != self.current.name
            or new.ingest.topics != self.current.ingest.topics
            or new.ingest.group_id != self.current.ingest.group_id
        ):
            log.warning("name, topics and group_id change only on restart", extra={"policy_hash": new_hash})
        self.current = new
        self.on_change(new)
        M.POLICY_RELOADS.inc()
        export(new)
        log.info("policy reloaded", extra={"old_hash": old_hash, "policy_hash": new_hash})
        return True, new_hash

    def run(self, stop: threading.Event, interval: float = 2.0) -> None:
        while not stop.wait(interval):
            try:
                self.check()
            except Exception:  # noqa: BLE001 - the watcher must outlive any one bad read
                log.exception("policy check failed")
