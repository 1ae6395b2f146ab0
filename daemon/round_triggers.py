"""APScheduler wiring of the trigger policy: jobs that *ask* for a round, never start one.

Each job calls `request(kind, detail)`; the round engine decides with
policies.round_policy.should_start (one round at a time, minimum gap, minimum size),
so two triggers firing together cost one round. Four jobs at most:

* cron      CronTrigger (crontab(5) weekday meaning, policy time zone) -> request("cron", expr)
* interval  IntervalTrigger(interval_s)                               -> request("interval", ...)
* buffer    every buffer_check_interval_s reads buffer_tokens() and requests ("buffer", ...) at the threshold
* drift     every drift_probe_interval_s runs drift_score() and requests ("drift", ...) at the threshold

`apply` is called at start and on every policy reload. A job whose settings
did not change is kept as it is, so an unrelated edit of the policy file does
not push a daily interval trigger back by a day; changed jobs are replaced and
removed ones dropped, all under one lock. A job that fires while `apply` is
replacing it sees that its settings are no longer current and does nothing.

Jobs never raise into APScheduler: an exception is logged and the job runs
again at its next time.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from typing import Literal
from zoneinfo import ZoneInfo

from apscheduler.schedulers.background import BackgroundScheduler
from apscheduler.triggers.base import BaseTrigger
from apscheduler.triggers.interval import IntervalTrigger

from policies.round_policy import TriggerPolicy, cron_trigger

log = logging.getLogger("cptd.scheduler")

# Seconds late a job may still run (e.g. after the host was suspended). A round
# trigger late by under an hour is still wanted; a late check is simply skipped
# (the next one is seconds away). coalesce=True folds a backlog into one run.
CRON_GRACE_S = 3600
CHECK_GRACE_S = 60

# A job's settings, kind first; a job whose spec is unchanged is kept on reload.
CronSpec = tuple[Literal["cron"], str, str]  # expression, time zone
IntervalSpec = tuple[Literal["interval"], float]  # interval_s
BufferSpec = tuple[Literal["buffer"], int, float]  # threshold tokens, check interval
DriftSpec = tuple[Literal["drift"], float, float]  # threshold score, probe interval
TriggerSpec = CronSpec | IntervalSpec | BufferSpec | DriftSpec


class Scheduler:
    def __init__(self, request: Callable[[str, str], None]):
        self.request = request
        self._lock = threading.Lock()
        self._specs: dict[str, TriggerSpec] = {}
        self._buffer_tokens: Callable[[], int] = lambda: 0
        self._drift_score: Callable[[], float | None] = lambda: None
        self._sched = BackgroundScheduler(timezone=ZoneInfo("UTC"))

    def apply(self, triggers: TriggerPolicy, buffer_tokens: Callable[[], int], drift_score: Callable[[], float | None]) -> None:
        """(Re)build the jobs from `triggers`. Every trigger is built before any job changes, so an error leaves the old jobs."""
        wanted: dict[str, tuple[TriggerSpec, BaseTrigger, dict[str, int]]] = {}
        spec: TriggerSpec
        if triggers.cron is not None:
            spec = ("cron", triggers.cron, triggers.timezone)
            wanted["cron"] = (spec, cron_trigger(triggers.cron, triggers.timezone), {"misfire_grace_time": CRON_GRACE_S})
        if triggers.interval_s is not None:
            spec = ("interval", triggers.interval_s)
            grace = max(1, int(min(triggers.interval_s, CRON_GRACE_S)))
            wanted["interval"] = (spec, IntervalTrigger(seconds=triggers.interval_s), {"misfire_grace_time": grace})
        if triggers.buffer_tokens is not None:
            spec = ("buffer", triggers.buffer_tokens, triggers.buffer_check_interval_s)
            wanted["buffer"] = (spec, IntervalTrigger(seconds=triggers.buffer_check_interval_s), {"misfire_grace_time": CHECK_GRACE_S})
        if triggers.drift_score is not None:
            spec = ("drift", triggers.drift_score, triggers.drift_probe_interval_s)
            wanted["drift"] = (spec, IntervalTrigger(seconds=triggers.drift_probe_interval_s), {"misfire_grace_time": CHECK_GRACE_S})

        with self._lock:
            self._buffer_tokens = buffer_tokens
            self._drift_score = drift_score
            for job_id in list(self._specs):
                if job_id not in wanted or wanted[job_id][0] != self._specs[job_id]:
                    self._sched.remove_job(job_id)
                    del self._specs[job_id]
            for job_id, (spec, trigger, opts) in wanted.items():
                if job_id in self._specs:
                    continue  # unchanged: keep its schedule
                self._specs[job_id] = spec
                self._sched.add_job(
                    self._run,
                    trigger,
                    args=(job_id, spec),
                    id=job_id,
                    name=f"cptd {job_id} trigger",
                    max_instances=1,
                    coalesce=True,
                    replace_existing=True,
                    **opts,
                )
        log.info("triggers applied", extra={"jobs": sorted(self._specs)})

    def _run(self, job_id: str, spec: TriggerSpec) -> None:
        """The one job function: never raises into APScheduler."""
        try:
            with self._lock:
                if self._specs.get(job_id) != spec:
                    return  # replaced by apply() after this run was dispatched
                buffer_tokens, drift_score = self._buffer_tokens, self._drift_score
            if spec[0] == "cron":
                self.request("cron", spec[1])
            elif spec[0] == "interval":
                self.request("interval", f"every {spec[1]:g} s")
            elif spec[0] == "buffer":
                n = buffer_tokens()
                if n >= spec[1]:
                    self.request("buffer", f"buffer holds {n} tokens >= {spec[1]}")
            elif spec[0] == "drift":
                score = drift_score()
                if score is not None and score >= spec[1]:
                    self.request("drift", f"drift score {score:.3f} >= {spec[1]:g}")
        except Exception:
            log.exception("trigger job failed", extra={"job": job_id})

    def start(self) -> None:
        if not self._sched.running:
            self._sched.start()

    def shutdown(self, wait: bool = True) -> None:
        """Stop firing; with `wait`, also wait for a job that is running (a drift probe can take a while)."""
        if self._sched.running:
            self._sched.shutdown(wait=wait)

    def jobs(self) -> list[dict[str, str | None]]:
        """For /status: each job's id, trigger and next run time (ISO 8601, None when not scheduled yet)."""
        out = []
        for job in self._sched.get_jobs():
            nxt = getattr(job, "next_run_time", None)  # unset on jobs added before start()
            out.append({"id": job.id, "trigger": str(job.trigger), "next_run_time": nxt.isoformat() if nxt else None})
        return out
