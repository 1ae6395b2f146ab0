"""What every phase of a round shares: the store, the settings, the lease, the serving controller, jobs, writes.

A phase is a function of (context, record). The context owns the state the
daemon keeps across rounds (the lease's fencing token, the serving controller,
the job running now) and the few helpers every phase needs: write the record
under the fence, enter a phase, run a job until it ends, write data files
atomically. Nothing here decides anything about a round.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import redis

from connectors.object_store import ObjectStore
from connectors.redis_store import Fence, RedisStore
from connectors.vllm import ServingError
from daemon import failpoints, round_tracking, round_webhook
from daemon import metrics as M
from daemon.job_launchers import Job, JobStartError, Launcher, launcher_for
from daemon.round_record import CANCEL_CAUSE, PHASES, TERMINAL, PhaseTimes, RoundRecord, RoundState
from daemon.serving import ServingController
from daemon.settings import Settings
from policies.config import Policy

log = logging.getLogger("cptd.rounds")

BASE_VERSION = "base"
ROUND_ID = re.compile(r"[A-Za-z0-9_-]{1,64}")  # what a round id may be when it names a file


class Stop(Exception):
    """The daemon is stopping (SIGTERM) or lost the lease: leave the round where it is, resumable."""


class RoundFailed(Exception):
    """The round ends FAILED with `cause`; its documents go back to the buffer (requeue) or are released."""

    def __init__(self, cause: str, requeue: bool = True):
        super().__init__(cause)
        self.cause, self.requeue = cause, requeue


class Cancelled(RoundFailed):
    """The operator cancelled the round: it ends FAILED with its documents requeued, whatever phase asked."""

    def __init__(self) -> None:
        super().__init__(CANCEL_CAUSE, requeue=True)


def redis_outage(e: BaseException) -> bool:
    """Redis unreachable or not answering (down, restarting, loading its data, failing over): worth waiting out.
    A refused password, a script error or Fenced is not an outage: waiting would not change the answer."""
    return isinstance(e, (redis.ConnectionError, redis.TimeoutError, redis.ReadOnlyError)) and not isinstance(e, redis.AuthenticationError)


@dataclass
class Outage:
    """How long Redis has been failing a round's calls: an outage shorter than `bound_s` is waited out, not a failure."""

    bound_s: Callable[[], float]  # read when an outage starts: the policy in force
    since: float | None = None

    def over(self) -> None:
        if self.since is not None:
            log.info("redis reachable again", extra={"outage_s": round(time.monotonic() - self.since, 1)})
        self.since = None

    def failed(self, e: BaseException, round_id: str | None) -> bool:
        """Note a failed call; True once the outage has lasted as long as the bound (a bound of 0: at the first error)."""
        now = time.monotonic()
        if self.since is None:
            self.since = now
            log.warning("redis unreachable; waiting it out", extra={"round_id": round_id, "error": repr(e), "bound_s": self.bound_s()})
        return now - self.since >= self.bound_s()


def write_atomic(path: Path, blob: bytes) -> None:
    """tmp file + rename: a reader (or a resumed round) sees the old file or the whole new one. The tmp name is the
    writer's own, so daemons writing one file at once (daemon/redis_loss.py's identity) never share a tmp file."""
    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
    tmp.write_bytes(blob)
    os.replace(tmp, path)


def write_jsonl(path: Path, rows: list[dict[str, Any]]) -> str:
    """Atomic write; returns the sha256 of the content (the manifest hash of the lineage)."""
    blob = "".join(json.dumps(r, ensure_ascii=False, sort_keys=True) + "\n" for r in rows).encode()
    write_atomic(path, blob)
    return hashlib.sha256(blob).hexdigest()


def write_texts(path: Path, texts: list[str]) -> str:
    """The JSONL a job reads documents from: one {"text"} per line."""
    return write_jsonl(path, [{"text": t} for t in texts])


@dataclass
class RoundContext:
    store: RedisStore
    settings: Settings
    get_policy: Callable[[], Policy]  # the policy in force now (a running round reads its own copy: policy_of)
    owner: str
    stop: threading.Event = field(default_factory=threading.Event)
    fence: Fence | None = None  # set by the lease loop; None = not the lease holder
    serving: ServingController | None = None
    serving_lock: threading.Lock = field(default_factory=threading.Lock)  # one deploy or rollback at a time
    kube_api_client: Any = None  # the Kubernetes API client (tests point it at a fake API); None = in-cluster/kubeconfig
    launcher: Launcher | None = None  # the job running now
    reconcile_due: bool = False  # a DEPLOYING error may have left replicas on different versions: reconcile first
    tracking: round_tracking.RoundTracking | None = None  # the export of ended rounds (CPTD_MLFLOW_TRACKING_URI), made at first use
    objects: ObjectStore | None = None  # checkpoints on object storage (CPTD_CHECKPOINT_URL), made at first use: rounds/staging.py

    # ------------------------------------------------------------------ the record
    def fenced(self) -> Fence:
        f = self.fence
        if f is None:
            raise Stop("lease lost")
        return f

    def put(self, rec: RoundRecord) -> None:
        rec.updated_at = time.time()
        self.store.put_round(self.fenced(), rec.id, rec.to_store())

    def get_round(self, rid: str) -> RoundRecord | None:
        """The record from Redis, or from its archive once retention moved it out (daemon/rounds/retention.py)."""
        raw = self.store.get_round(rid)
        if raw is None:
            path = self.archived_record_path(rid)
            raw = json.loads(path.read_bytes()) if path is not None and path.exists() else None
        return RoundRecord.model_validate(raw) if raw is not None else None

    def list_rounds(self, limit: int | None = None) -> list[RoundRecord]:
        """The newest `limit` records in Redis (all of them when None; retention bounds them), oldest first."""
        return [RoundRecord.model_validate(r) for r in self.store.list_rounds(limit)]

    def newest_rounds(self, page: int = 20) -> Iterator[RoundRecord]:
        """The records in Redis, newest first, read a page at a time: a search for the latest of a kind reads only
        up to what it finds."""
        ids = self.store.round_ids()[::-1]
        for i in range(0, len(ids), page):
            yield from (RoundRecord.model_validate(r) for r in self.store.get_rounds(ids[i : i + page]) if r is not None)

    def archived_record_path(self, rid: str) -> Path | None:
        """Where a round's archived record lives; None for an id that is no file name (it came from a URL)."""
        if not ROUND_ID.fullmatch(rid):
            return None
        return self.settings.checkpoint_dir / "records" / f"{rid}.json"

    def enter(self, rec: RoundRecord, state: RoundState) -> None:
        now = time.time()
        prev = rec.phases.get(rec.state)
        if prev is not None and prev.finished_at is None:
            prev.finished_at = now
            M.ROUND_PHASE_SECONDS.labels(phase=rec.state.value).observe(now - prev.started_at)
        rec.state = state
        rec.phases.setdefault(state, PhaseTimes(started_at=now))
        self.put(rec)
        for p in PHASES:
            M.ROUND_PHASE.labels(phase=p.value).set(1 if p == state else 0)
        if state in TERMINAL:
            M.ROUNDS.labels(state=state.value).inc()
        log.info("round phase", extra={"round_id": rec.id, "state": state.value})
        if state in TERMINAL and self.settings.round_webhook_url is not None:  # every end passes here, once (after the write)
            serving = self.serving.state.desired_version if self.serving is not None else None
            event = round_webhook.round_ended(rec, self.get_policy().name, serving)
            round_webhook.send(self.settings.round_webhook_url.get_secret_value(), event)
        if state in TERMINAL and self.settings.mlflow_tracking_uri is not None:  # exported by a thread, never holding up the round
            self.tracker().ended(rec)

    def tracker(self) -> round_tracking.RoundTracking:
        if self.tracking is None:
            self.tracking = round_tracking.RoundTracking(self)
        return self.tracking

    @staticmethod
    def policy_of(rec: RoundRecord) -> Policy:
        """The policy the round started under (a reload changes the next round, never this one)."""
        assert rec.policy is not None, f"round {rec.id} has no policy copy"
        return rec.policy

    def round_dir(self, rid: str) -> Path:
        return self.settings.checkpoint_dir / "rounds" / rid

    def served_dtype(self) -> str | None:
        """The dtype vLLM computes in (its --dtype may differ from the checkpoint's); None = the checkpoint's own."""
        if self.serving is None or not self.serving.replicas:
            return None
        try:
            return self.serving.replicas[0].server_info().dtype
        except ServingError as e:
            log.warning("served dtype unknown; scoring in the checkpoint's dtype", extra={"error": str(e)})
            return None

    # ------------------------------------------------------------------ jobs
    def run_job(
        self,
        job: Job,
        rec: RoundRecord | None = None,
        *,
        timeout: float | None = None,
        on_tick: Callable[[], None] | None = None,
        hit: str | None = None,
        phase: str = "",
    ) -> Any:
        """Start `job` where its spec says it runs (launcher_for), follow it to its end, return its result file's content.

        Raises Stop when the daemon stops or loses the lease (a child is stopped and resumes later; a Kubernetes
        workload runs on), Cancelled when the operator cancels `rec`, and RoundFailed, its cause prefixed with
        `phase`, when the job cannot start, runs past `timeout` or fails (with the launcher's cause)."""
        prefix = f"{phase}: " if phase else ""
        try:
            launcher = launcher_for(self.settings, job.spec, self.kube_api_client)
            launcher.start(job)
        except JobStartError as e:
            raise RoundFailed(f"{prefix}{job.module}: {e}") from e
        tracked = rec is not None  # a round's job is stopped with the lease; the drift trigger's probe just ends
        if tracked:
            self.launcher = launcher
        outage = Outage(lambda: self.get_policy().rounds.redis_outage_s)
        try:
            if hit:
                failpoints.hit(hit)
            t0 = time.monotonic()
            while (end := launcher.poll()) is None or not end.ok:
                if self.fence is None or self.stop.is_set():  # the lease loop may have stopped the job already
                    # a round's job is left to the next lease holder to re-attach; nobody re-attaches to the drift
                    # trigger's probe, so a workload of it is deleted, not left running
                    if tracked:
                        launcher.detach()
                    else:
                        launcher.cancel()
                    raise Stop("lease lost" if self.fence is None else "stopping")
                if end is not None:
                    break
                if self.redis_calls(on_tick, rec, outage, prefix):
                    launcher.cancel()
                    raise Cancelled()
                if timeout and time.monotonic() - t0 > timeout:
                    launcher.cancel()
                    raise RoundFailed(f"{prefix}{job.module} ran past {timeout} s")
                self.stop.wait(min(1.0, self.settings.train_poll_s))  # a workload's own poll reads its status less often
        except BaseException:
            launcher.detach()  # whatever ended the loop early (a Fenced write, a bug): no job is left running unfollowed
            raise
        finally:
            if tracked:
                self.launcher = None
        if on_tick:
            on_tick()
        if not end.ok:
            raise RoundFailed(f"{prefix}{end.cause}")
        return job.result()

    def redis_calls(self, on_tick: Callable[[], None] | None, rec: RoundRecord | None, outage: Outage, prefix: str) -> bool:
        """A job poll's Redis calls (its progress into the record, the operator's cancel mark); True when cancelled.

        While Redis is unreachable the job keeps running and the loop keeps polling it: the lease loop ends the
        job if the outage outlasts the lease, and an outage longer than `rounds.redis_outage_s` fails the round."""
        try:
            if on_tick:
                on_tick()
            cancelled = rec is not None and self.store.cancel_requested(rec.id)
        except Exception as e:
            if not redis_outage(e):
                raise
            if outage.failed(e, rec.id if rec else None):
                raise RoundFailed(f"{prefix}Redis unreachable for over {outage.bound_s():g} s: {e}") from e
            return False
        outage.over()
        return cancelled

    def stop_job(self) -> None:
        """Lease lost or daemon stopping: the job running now is stopped or left, as its launcher does."""
        launcher = self.launcher
        if launcher is not None:
            launcher.detach()
