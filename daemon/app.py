"""The cptd process: builds everything from the policy file and runs until SIGTERM.

Threads: the ingest loop (main thread), the HTTP API, the policy watcher, the
APScheduler triggers and the round runner (with its lease renewer). On SIGTERM
it stops taking new work, lets the current ingest batch commit, stops a running
trainer (the round resumes from its checkpoint and persisted phase on the next
start), hands the round lease back, and exits 0.
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
from daemon.round_record import TERMINAL, CancelResult, RollbackResult, RoundRecord, RoundState, RoundSummary, TriggerResult
from daemon.round_runner import RoundRunner
from daemon.round_triggers import Scheduler
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
        self.runner = RoundRunner(self.store, settings, lambda: self.policy)
        self.scheduler = Scheduler(self.runner.request)
        M.UP_SINCE.set(self.started)

    def _apply_policy(self, policy: Policy) -> None:
        """Ingest picks it up at its next batch boundary (the safe point), the scheduler at once, rounds at their next start."""
        self.policy = policy
        self.ingestor.set_policy(policy)
        self._apply_triggers()

    def _apply_triggers(self) -> None:
        if self.runner.disabled is None:
            self.scheduler.apply(self.policy.triggers, self.runner.buffer_tokens, self.runner.probe_drift)

    # --- the Engine protocol of daemon.api -------------------------------------------
    def status(self) -> dict[str, Any]:
        s = self.ingestor.state
        out: dict[str, Any] = {
            "name": self.policy.name,
            "policy_hash": policy_hash(self.policy),
            "policy_error": self.watcher.last_error,
            "uptime_s": round(time.time() - self.started, 1),
            "ingest": {
                "paused": s.paused_cause,
                "assigned": s.assigned,
                "batches": s.batches,
                "last_commit": s.last_commit,
                "last_error": s.last_error,
            },
        }
        try:
            out["counts"] = ingest_counts(self.store)
            out["buffer"] = self.store.buffer_stats()
            out["replay"] = {**self.store.replay_stats(), "cap": self.policy.replay.reservoir_docs}
            M.REPLAY_DOCS.set(out["replay"]["replay_docs"])
            M.REPLAY_CAP_DOCS.set(out["replay"]["cap"])
            out["rounds"] = self.runner.status()
            out["rounds"]["triggers"] = self.scheduler.jobs()
            latest = self.runner.list_rounds()[-1:]
            out["rounds"]["latest"] = (
                latest[0].model_dump(mode="json", include={"id", "state", "error", "created_at", "updated_at"}) if latest else None
            )
        except Exception as e:  # noqa: BLE001 - status must answer even when Redis is down
            out["redis_error"] = str(e)
        return out

    def rounds(self, limit: int = 50) -> list[RoundSummary]:
        return [RoundSummary.of(r) for r in self.runner.list_rounds()[-limit:]][::-1]

    def round(self, round_id: str) -> RoundRecord | None:
        rec = self.runner.get_round(round_id)
        if rec is not None:
            rec.policy = None  # the full policy copy is large; its hash is there
        return rec

    def round_manifest(self, round_id: str) -> list[dict[str, Any]] | None:
        import json as _json
        from pathlib import Path

        rec = self.runner.get_round(round_id)
        if rec is None or rec.snapshot is None:
            return None
        p = Path(rec.snapshot.manifest)
        return [_json.loads(x) for x in p.read_text().splitlines()] if p.exists() else []

    def trigger(self, reason: str, wait_s: float = 5.0) -> TriggerResult:
        if self.runner.disabled:
            raise RuntimeError(f"rounds are disabled: {self.runner.disabled}")
        req = self.runner.request_manual(reason)
        deadline = time.monotonic() + wait_s
        while time.monotonic() < deadline:
            res = self.store.request_result(req)
            if res is not None:
                return TriggerResult(request_id=req, **res)
            time.sleep(0.1)
        holder, _ = self.store.lease_holder()
        return TriggerResult(request_id=req, queued=True, lease_holder=holder)

    def cancel(self, round_id: str) -> CancelResult:
        rec = self.runner.get_round(round_id)
        if rec is None:
            raise KeyError(round_id)
        if rec.state in TERMINAL:
            raise ValueError(f"round {round_id} already ended {rec.state.value}")
        if rec.state == RoundState.DEPLOYING and rec.deploy_wait is None:
            raise ValueError(f"round {round_id} is swapping weights; use rollback after it ends")
        self.store.request_cancel(round_id)
        self.runner.wake.set()
        return CancelResult(round=round_id, cancel_requested=True, state=rec.state)

    def rollback(self, to: str | None) -> RollbackResult:
        return self.runner.rollback(to)

    def ready(self) -> tuple[bool, str]:
        """Readiness as docs/kubernetes.md states it: Redis answers a PING, the Kafka consumer is connected to a
        bootstrap broker, and (when rounds are on) every vLLM replica answers /health. The reason names each one down."""
        import httpx

        down: list[str] = []
        try:
            self.store.ping()
        except Exception as e:  # noqa: BLE001 - any failure means not ready; the message says which
            down.append(f"redis unreachable: {e}")
        try:
            if not self.ingestor.consumer.bootstrap_connected():
                down.append(f"kafka: no connection to a bootstrap broker ({self.settings.kafka_bootstrap})")
        except Exception as e:  # noqa: BLE001
            down.append(f"kafka: {e}")
        if self.runner.disabled is None:
            for url in self.runner.urls:
                try:
                    code = httpx.get(url + "/health", timeout=2.0).status_code
                    if code != 200:
                        down.append(f"vllm {url}: /health answered {code}")
                except httpx.HTTPError as e:
                    down.append(f"vllm {url} unreachable: {e}")
        return (False, "; ".join(down)) if down else (True, "ok")

    def reload_policy(self) -> dict[str, Any]:
        changed, msg = self.watcher.check(force=True)
        return {"changed": changed, "message": msg, "policy_hash": policy_hash(self.policy), "error": self.watcher.last_error}

    def pause_ingest(self, paused: bool) -> None:
        (self.ingestor.operator_paused.set if paused else self.ingestor.operator_paused.clear)()

    # --- running ---------------------------------------------------------------
    def run(self) -> int:
        signal.signal(signal.SIGTERM, lambda *_: self.stop.set())
        signal.signal(signal.SIGINT, lambda *_: self.stop.set())
        server = uvicorn.Server(
            uvicorn.Config(
                create_app(self, self.settings.token()), host=self.settings.http_host, port=self.settings.http_port, log_level="warning"
            )
        )
        server.install_signal_handlers = lambda: None  # signals are ours
        http = threading.Thread(target=server.run, name="http", daemon=True)
        http.start()
        threading.Thread(target=self.watcher.run, args=(self.stop,), name="policy-watch", daemon=True).start()
        rounds = threading.Thread(target=self.runner.run, args=(self.stop,), name="rounds", daemon=True)
        rounds.start()
        self._apply_triggers()
        self.scheduler.start()
        log.info(
            "cptd started",
            extra={
                "policy_hash": policy_hash(self.policy),
                "http_port": self.settings.http_port,
                "rounds": self.runner.disabled or "enabled",
                "owner": self.runner.owner,
            },
        )
        try:
            self.ingestor.run(self.stop)
        finally:
            self.stop.set()
            self.scheduler.shutdown(wait=False)
            rounds.join(timeout=60)
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
