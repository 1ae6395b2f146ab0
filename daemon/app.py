"""The cptd process: builds everything from the policy file and runs until SIGTERM.

Threads: the ingest loop (main thread), the HTTP API, the policy watcher, the
resource gauges (Redis memory, checkpoint volume: daemon/resource_gauges.py), the
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

import redis
import tenacity
import uvicorn

from connectors.kafka import broker_connected, diagnose
from connectors.redis_store import RedisStore, connect
from daemon import metrics as M
from daemon import resource_gauges
from daemon.api import MANIFEST_PAGE, create_app
from daemon.ingest import Ingestor, IngestState
from daemon.policy_watch import PolicyWatcher
from daemon.round_record import TERMINAL, ApprovalResult, CancelResult, RollbackResult, RoundRecord, RoundState, RoundSummary, TriggerResult
from daemon.round_triggers import Scheduler
from daemon.rounds import approval
from daemon.rounds.runner import RoundRunner
from daemon.settings import Settings
from policies.config import Policy, load_policy, policy_hash

log = logging.getLogger("cptd.app")


class Daemon:
    def __init__(self, policy: Policy, settings: Settings):
        self.policy = policy
        self.settings = settings
        self.store = RedisStore(connect(settings.redis_url.get_secret_value(), **settings.redis_options()), policy.name)
        self.kafka = settings.kafka()
        # The Kafka clients are built in run(), after the HTTP server is up, and retried with a capped backoff while the
        # brokers refuse us (TLS, credentials): the process stays up and /readyz says why, instead of a crash loop.
        self.ingestor: Ingestor | None = None
        self.kafka_error: str | None = None
        self.stop = threading.Event()
        self.started = time.time()
        self.watcher = PolicyWatcher(settings.policy, policy, self._apply_policy, settings.policy_refusal)
        self.runner = RoundRunner(self.store, settings, lambda: self.policy)
        self.scheduler = Scheduler(self.runner.request)
        M.UP_SINCE.set(self.started)

    def _apply_policy(self, policy: Policy) -> None:
        """Ingest picks it up at its next batch boundary (the safe point), the scheduler at once, rounds at their next start."""
        self.policy = policy
        if self.ingestor is not None:
            self.ingestor.set_policy(policy)
        self._apply_triggers()

    def _apply_triggers(self) -> None:
        if self.runner.disabled is None:
            self.scheduler.apply(self.policy.triggers, self.runner.buffer_tokens, self.runner.probe_drift)

    # --- the Engine protocol of daemon.api -------------------------------------------
    def status(self) -> dict[str, Any]:
        s = self.ingestor.state if self.ingestor is not None else IngestState(last_error=self.kafka_error)
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
                "last_error": self.scrub(s.last_error),
                "broker_error": self.scrub(s.broker_error),  # set while a broker restart is being waited out
                "kafka": self.kafka.describe(),
                "kafka_error": self.kafka_error,
            },
            "vllm": self.runner.discovery.describe(),  # the replicas found now and their /health (not part of /readyz)
        }
        try:
            out["ingest"]["operator_pause"] = self.store.ingest_pause()  # {by, at}: holds for every daemon
            out["counts"] = ingest_counts(self.store)
            out["buffer"] = self.store.buffer_stats()
            # accepted documents per provenance class (human, unknown, synthetic) and the echo index size
            out["provenance"] = self.store.provenance_counts()
            out["replay"] = {**self.store.replay_stats(), "cap": self.policy.replay.reservoir_docs}
            M.REPLAY_DOCS.set(out["replay"]["replay_docs"])
            M.REPLAY_CAP_DOCS.set(out["replay"]["cap"])
            out["rounds"] = self.runner.status()
            out["rounds"]["triggers"] = self.scheduler.jobs()
            latest = self.runner.list_rounds(limit=1)  # one record read, not all (one round at a time: a waiting one is it)
            shown = {"id", "state", "error", "created_at", "updated_at", "curation", "approval", "shadow"}
            out["rounds"]["latest"] = latest[0].model_dump(mode="json", include=shown) if latest else None
            out["rounds"]["deploy_mode"] = self.policy.deploy.mode  # the next round's; a running round keeps its own
            waiting = latest[0] if latest and latest[0].state == RoundState.AWAITING_APPROVAL else None
            out["rounds"]["awaiting_approval"] = (
                waiting.approval.model_dump(include={"since", "deadline"}) | {"round": waiting.id} if waiting and waiting.approval else None
            )
        except Exception as e:  # noqa: BLE001 - status must answer even when Redis is down
            out["redis_error"] = self.redis_reason(e)
        return out

    def rounds(self, limit: int = 50) -> list[RoundSummary]:
        return [RoundSummary.of(r) for r in self.runner.list_rounds(limit=limit)][::-1]

    def round(self, round_id: str) -> RoundRecord | None:
        rec = self.runner.get_round(round_id)
        if rec is not None:
            rec.policy = None  # the full policy copy is large; its hash is there
        return rec

    def round_manifest(self, round_id: str, offset: int = 0, limit: int = MANIFEST_PAGE) -> list[dict[str, Any]] | None:
        """Lines offset .. offset+limit of the round's manifest; lines before are skipped unparsed, none after is read."""
        import itertools
        import json as _json
        from pathlib import Path

        rec = self.runner.get_round(round_id)
        if rec is None or rec.snapshot is None:
            return None
        p = Path(rec.snapshot.manifest)
        if not p.exists():
            return []
        with p.open("rb") as f:
            return [_json.loads(x) for x in itertools.islice(f, offset, offset + limit)]

    def trigger(self, reason: str, wait_s: float = 5.0) -> TriggerResult:
        if self.runner.disabled:
            raise RuntimeError(f"rounds are disabled: {self.runner.disabled}")
        req = self.runner.request_manual(reason)
        res = self.store.wait_request_result(req, wait_s)
        if res is not None:
            return TriggerResult(request_id=req, **res)
        holder, _ = self.store.lease_holder()
        return TriggerResult(request_id=req, queued=True, lease_holder=holder)

    def trigger_result(self, request_id: str) -> TriggerResult | None:
        res = self.store.request_result(request_id)
        return TriggerResult.model_validate({**res, "request_id": request_id}) if res is not None else None

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

    def decide(self, round_id: str, decision: str, by: str | None, note: str | None) -> ApprovalResult:
        """Any daemon takes it: the decision is kept in Redis, where the lease holder's waiting round reads it."""
        return approval.decide(self.store, self.runner.get_round(round_id), round_id, decision, by, note)

    def rollback(self, to: str | None) -> RollbackResult:
        return self.runner.rollback(to)

    def ready(self) -> tuple[bool, str]:
        """Readiness as docs/kubernetes.md states it: Redis answers a PING and the Kafka consumer is connected to a
        bootstrap broker. The reason names each one down. vLLM is not part of it: a restarting replica must not take
        both daemon pods out of their Service (ingest and the control API work without vLLM; rounds wait for a
        replica). Replica health is in /status (`vllm`) and the cptd_vllm_replicas gauge."""
        down: list[str] = []
        try:
            self.store.ping()
        except Exception as e:  # noqa: BLE001 - any failure means not ready; the message says which
            down.append(self.redis_reason(e))
        try:
            if self.ingestor is None:
                down.append(self.kafka_error or f"kafka {self.kafka.describe()}: connecting")
            elif not broker_connected(self.ingestor.consumer):
                why = diagnose(self.kafka, timeout=2.0) or "no connection to a bootstrap broker"
                down.append(self.scrub(f"kafka {self.kafka.describe()}: {why}") or "")
        except Exception as e:  # noqa: BLE001
            down.append(self.scrub(f"kafka {self.kafka.describe()}: {e}") or "")
        return (False, "; ".join(down)) if down else (True, "ok")

    def reload_policy(self) -> dict[str, Any]:
        changed, msg = self.watcher.check(force=True)
        return {"changed": changed, "message": msg, "policy_hash": policy_hash(self.policy), "error": self.watcher.last_error}

    def pause_ingest(self, paused: bool) -> None:
        """Kept in Redis: every daemon's ingest loop pauses at its next batch boundary, and a restart keeps it."""
        try:
            self.store.set_ingest_pause(self.runner.ctx.owner if paused else None, time.time())
        except redis.RedisError as e:
            raise ConnectionError(f"ingest pause not changed: {self.redis_reason(e)}") from e

    # --- connections --------------------------------------------------------------
    def _secrets(self) -> list[str]:
        from urllib.parse import unquote, urlsplit

        s = self.settings
        vals = [v.get_secret_value() for v in (s.redis_password, s.kafka_sasl_password, s.kafka_key_password, s.vllm_api_key) if v]
        pw = urlsplit(s.redis_url.get_secret_value()).password
        vals += [pw, unquote(pw)] if pw else []
        for f in (s.redis_password_file, s.kafka_sasl_password_file):
            try:
                vals.append(f.read_text().strip()) if f else None
            except OSError:
                pass
        return [v for v in vals if len(v) >= 4]

    def scrub(self, msg: str | None) -> str | None:
        """A message with every configured secret blanked out: errors go to logs, /status and /readyz."""
        if msg:
            for v in self._secrets():
                msg = msg.replace(v, "***")
        return msg

    def redis_reason(self, e: BaseException) -> str:
        """`redis rediss://host:port/db: TLS certificate verify failed: certificate has expired`, and the like."""
        import ssl

        cause: BaseException | None = e
        why = str(e)
        while cause is not None:
            if isinstance(cause, ssl.SSLCertVerificationError):
                why = f"TLS certificate verify failed: {cause.verify_message}"
                break
            if isinstance(cause, ssl.SSLError):
                why = f"TLS handshake failed: {cause.reason or cause}"
                break
            cause = cause.__cause__ or cause.__context__
        else:
            if isinstance(e, redis.AuthenticationError):
                why = f"authentication failed: {e}"
            elif isinstance(e, redis.exceptions.NoPermissionError):
                why = f"ACL refused: {e}"
            elif "CERTIFICATE_VERIFY_FAILED" in why:
                why = "TLS certificate verify failed: " + why.split("certificate verify failed:")[-1].split("(_ssl")[0].strip()
        return self.scrub(f"redis {self.store.where()}: {why}") or ""

    def _connect_kafka(self) -> Ingestor | None:
        """Build the consumer and the dead-letter producer; on failure retry with exponential backoff capped at
        CPTD_KAFKA_RETRY_MAX_S until it works or SIGTERM. Returns None when stopped first."""

        def attempt() -> Ingestor:
            # TCP and TLS first (seconds, with the cause in words), then kafka-python's bootstrap (SASL, metadata)
            why = diagnose(self.kafka)
            if why:
                raise ConnectionError(why)
            return Ingestor(self.policy, self.kafka, self.store, broker_retry_max_s=self.settings.kafka_retry_max_s)

        def failed(rs: tenacity.RetryCallState) -> None:
            e = rs.outcome.exception() if rs.outcome else None
            why = str(e) if isinstance(e, ConnectionError) else diagnose(self.kafka) or f"{type(e).__name__}: {e}"
            self.kafka_error = self.scrub(f"kafka {self.kafka.describe()}: {why}")
            log.warning(
                "kafka connection failed; retrying",
                extra={"error": self.kafka_error, "attempt": rs.attempt_number, "retry_in_s": round(rs.upcoming_sleep, 1)},
            )

        retrying = tenacity.Retrying(
            wait=tenacity.wait_exponential(multiplier=1, min=1, max=self.settings.kafka_retry_max_s),
            stop=tenacity.stop_when_event_set(self.stop),
            sleep=lambda seconds: None if self.stop.wait(seconds) else None,  # SIGTERM cuts the wait short
            before_sleep=failed,
        )
        try:
            ing = retrying(attempt)
        except tenacity.RetryError:
            return None
        self.kafka_error = None
        log.info("kafka connected", extra={"kafka": self.kafka.describe()})
        return ing

    # --- running ---------------------------------------------------------------
    def run(self) -> int:
        signal.signal(signal.SIGTERM, lambda *_: self.stop.set())
        signal.signal(signal.SIGINT, lambda *_: self.stop.set())
        server = uvicorn.Server(
            uvicorn.Config(
                create_app(self, self.settings.token), host=self.settings.http_host, port=self.settings.http_port, log_level="warning"
            )
        )
        # Signals are ours: uvicorn (>= 0.29) installs its handlers only when run on the main thread, and this is not it.
        http = threading.Thread(target=server.run, name="http", daemon=True)
        http.start()
        threading.Thread(target=self.watcher.run, args=(self.stop,), name="policy-watch", daemon=True).start()
        threading.Thread(
            target=resource_gauges.run, args=(self.store, self.settings.checkpoint_dir, self.stop), name="resources", daemon=True
        ).start()
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
                "owner": self.runner.ctx.owner,
            },
        )
        try:
            self.ingestor = self._connect_kafka()
            if self.ingestor is not None:
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
