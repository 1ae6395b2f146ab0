"""The cptd process: builds everything from the policy file and runs until SIGTERM.

Today it runs the ingest loop and the HTTP API; the scheduler and round runner
join here as they land. On SIGTERM it stops taking new work, lets the current
ingest batch commit, and exits 0.
"""
from __future__ import annotations

import logging
import signal
import threading
import time
from typing import Any

import uvicorn

from connectors.redis_store import RedisStore
from daemon import metrics as M
from daemon.api import create_app
from daemon.ingest import Ingestor
from daemon.policy_watch import PolicyWatcher
from daemon.settings import Settings
from policies.config import Policy, load_policy, policy_hash

log = logging.getLogger("cptd.app")


class Daemon:
    def __init__(self, policy: Policy, settings: Settings):
        self.policy = policy
        self.settings = settings
        self.store = RedisStore.from_url(settings.redis_url.get_secret_value(), policy.name)
        self.ingestor = Ingestor(policy, settings.kafka_bootstrap, self.store)
        self.stop = threading.Event()
        self.started = time.time()
        self.watcher = PolicyWatcher(settings.policy, policy, self._apply_policy)
        M.UP_SINCE.set(self.started)

    def _apply_policy(self, policy: Policy) -> None:
        """Ingest picks it up at its next batch boundary (the safe point)."""
        self.policy = policy
        self.ingestor.set_policy(policy)

    # --- the Engine protocol of daemon.api -------------------------------------------
    def status(self) -> dict[str, Any]:
        s = self.ingestor.state
        out: dict[str, Any] = {
            "name": self.policy.name,
            "policy_hash": policy_hash(self.policy),
            "policy_error": self.watcher.last_error,
            "uptime_s": round(time.time() - self.started, 1),
            "ingest": {"paused": s.paused_cause, "assigned": s.assigned, "batches": s.batches, "last_commit": s.last_commit, "last_error": s.last_error},
        }
        try:
            out["counts"] = ingest_counts(self.store)
            out["buffer"] = self.store.buffer_stats()
            out["replay"] = {**self.store.replay_stats(), "cap": self.policy.replay.reservoir_docs}
            M.REPLAY_DOCS.set(out["replay"]["replay_docs"])
            M.REPLAY_CAP_DOCS.set(out["replay"]["cap"])
        except Exception as e:  # noqa: BLE001 - status must answer even when Redis is down
            out["redis_error"] = str(e)
        return out

    def ready(self) -> tuple[bool, str]:
        try:
            self.store.ping()
        except Exception as e:  # noqa: BLE001
            return False, f"redis unreachable: {e}"
        return True, "ok"

    def reload_policy(self) -> dict[str, Any]:
        changed, msg = self.watcher.check(force=True)
        return {"changed": changed, "message": msg, "policy_hash": policy_hash(self.policy), "error": self.watcher.last_error}

    def pause_ingest(self, paused: bool) -> None:
        (self.ingestor.operator_paused.set if paused else self.ingestor.operator_paused.clear)()

    # --- running ---------------------------------------------------------------
    def run(self) -> int:
        signal.signal(signal.SIGTERM, lambda *_: self.stop.set())
        signal.signal(signal.SIGINT, lambda *_: self.stop.set())
        server = uvicorn.Server(uvicorn.Config(
            create_app(self, self.settings.token()), host=self.settings.http_host, port=self.settings.http_port, log_level="warning"
        ))
        server.install_signal_handlers = lambda: None  # signals are ours
        http = threading.Thread(target=server.run, name="http", daemon=True)
        http.start()
        threading.Thread(target=self.watcher.run, args=(self.stop,), name="policy-watch", daemon=True).start()
        log.info("cptd started", extra={"policy_hash": policy_hash(self.policy), "http_port": self.settings.http_port})
        try:
            self.ingestor.run(self.stop)
        finally:
            server.should_exit = True
            http.join(timeout=5)
        log.info("cptd stopped")
        return 0


def ingest_counts(store: RedisStore) -> dict[str, Any]:
    """Redis's exact totals: by outcome, by outcome+reason, and the sum (= offsets accounted for)."""
    counters = store.counters()
    by_reason = {f"{o}:{r}" if r else o: n for (o, r), n in sorted(counters.items())}
    by_outcome: dict[str, int] = {}
    for (o, _r), n in counters.items():
        by_outcome[o] = by_outcome.get(o, 0) + n
    return {"total": sum(by_outcome.values()), "by_outcome": by_outcome, "by_reason": by_reason}


def run(settings: Settings) -> int:
    policy = load_policy(settings.policy)
    return Daemon(policy, settings).run()
