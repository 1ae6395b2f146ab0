"""Experiment tracking: each ended round as a run in the team's tracker (MLflow), its candidate as a model version.

Optional and off by default (CPTD_MLFLOW_TRACKING_URI). Called from one place, `RoundContext.enter` at every
terminal state, and built from one source, the round record (plus the trainer's progress.jsonl for every step):
nothing else in the daemon knows a tracker exists. A round's run is exported in one go after it ended, so a
restart, a new lease holder or a server that was down changes nothing: the round's id stays in the Redis set of
rounds to export until an export succeeded, every export is idempotent (the run is found again by its
`cptd.round_id` tag; params, metrics at fixed timestamps and the model version are not duplicated), and the
lease holder's worker thread retries the set every RETRY_S. A round that ends twice (DEPLOYED, then
ROLLED_BACK) is exported twice into the same run: its state tags move on.

A tracker that is down or slow never fails, delays or blocks a round: the export runs in the worker thread,
each request is bounded by CPTD_MLFLOW_TIMEOUT_S and no retry waits inside an export. A failed one is logged
with the round id and counted (cptd_tracking_exports_total{outcome="failed"}); what is still to export is the
set (cptd_tracking_pending_rounds).

`Tracker` is the whole interface a tracker implements (W&B or TensorBoard could sit behind it): one `export` of
a `RoundRun`, the tracker-neutral content of a round's run.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol
from urllib.parse import urlsplit

from connectors.mlflow_rest import Metric, MlflowClient
from daemon import metrics as M
from daemon.job_launchers import JsonlFollower
from daemon.round_record import RoundRecord, RoundState

if TYPE_CHECKING:
    from daemon.rounds.context import RoundContext
    from daemon.settings import Settings

log = logging.getLogger("cptd.rounds")

RETRY_S = 60.0  # the worker's pass over the rounds still to export, besides the one each round's end asks for
MAX_STEPS = 5000  # training steps sent per round at most (evenly spread, the last kept): a bounded export
STEP_METRICS = ("loss", "lr", "grad_norm", "tokens_per_s", "tokens")  # of the trainer's "step" events
EVAL_METRICS = ("loss_heldout_new", "loss_heldout_replay")  # of its "eval" events


@dataclass
class RoundRun:
    """What a round's run holds, for any tracker: params (fixed once the round trained), tags (lineage and outcome,
    may move on), metrics (per step; evaluation and gate figures at the last step), and the candidate to register."""

    round_id: str
    status: str  # FINISHED | FAILED | KILLED (an operator's cancel)
    start_ms: int
    end_ms: int
    params: dict[str, str] = field(default_factory=dict)
    tags: dict[str, str] = field(default_factory=dict)
    metrics: list[Metric] = field(default_factory=list)
    candidate: str | None = None  # the checkpoint directory the gate chose (a path, or a URI)
    candidate_tags: dict[str, str] = field(default_factory=dict)


class Tracker(Protocol):
    where: str  # the tracker's address for logs, never its credentials

    def export(self, run: RoundRun) -> str:
        """Create or update the round's run; returns where it is (for the log). Raises on any failure."""
        ...

    def close(self) -> None: ...


def tracker_for(settings: Settings, default_model: str) -> Tracker | None:
    """The tracker the settings name, or None when tracking is off (the one place a second tracker would be chosen)."""
    if settings.mlflow_tracking_uri is None:
        return None
    return MlflowTracker(settings, settings.mlflow_model_name or default_model)


# ---------------------------------------------------------------------- the run, from the record
def round_run(rec: RoundRecord) -> RoundRun:
    """The round's run from its record, and every step from the trainer's progress.jsonl when it is still there
    (retention may have pruned the round's directory: then the record's curve, at most CURVE_POINTS steps)."""
    status = "KILLED" if rec.cancelled else "FAILED" if rec.state == RoundState.FAILED else "FINISHED"
    run = RoundRun(rec.id, status, int(rec.created_at * 1000), int(rec.updated_at * 1000), candidate=rec.candidate)
    run.params = _params(rec)
    run.tags = _lineage(rec)
    at = _settled_ms(rec)
    run.metrics = _train_metrics(rec, at)
    last = max((m.step for m in run.metrics), default=0)
    run.metrics += [Metric(k, v, last, at) for k, v in _eval_figures(rec).items()]
    run.candidate_tags = {k: v for k, v in run.tags.items() if k.startswith(("cptd.round", "cptd.parent", "cptd.manifest", "cptd.policy"))}
    run.candidate_tags["cptd.candidate"] = rec.candidate or ""
    run.candidate_tags["cptd.state"] = rec.state.value
    return run


def _settled_ms(rec: RoundRecord) -> int:
    """When the round's figures were final: the end of EVALUATING, else of TRAINING, else its creation. It never
    moves once the round first ended, so a second export (DEPLOYED, then ROLLED_BACK) logs the same points."""
    for state in (RoundState.EVALUATING, RoundState.TRAINING):
        phase = rec.phases.get(state)
        if phase is not None and phase.finished_at is not None:
            return int(phase.finished_at * 1000)
    return int(rec.created_at * 1000)


def _params(rec: RoundRecord) -> dict[str, str]:
    out: dict[str, str] = {}
    if rec.policy is not None:
        _flatten("policy", rec.policy.model_dump(mode="json"), out)
    if rec.schedule is not None:  # the LR schedule after the round's drift adjustments
        _flatten("schedule", rec.schedule.model_dump(mode="json"), out)
    if rec.drift is not None:
        _flatten("drift", rec.drift.model_dump(mode="json", exclude={"stats"}), out)
    if rec.replay_ratio is not None:
        out["replay.ratio"] = str(rec.replay_ratio)
    if rec.snapshot is not None:
        s = rec.snapshot
        for k in ("docs", "train_docs", "heldout_docs", "bytes", "tokens_estimate", "replay_docs", "replay_heldout_docs"):
            out[f"snapshot.{k}"] = str(getattr(s, k))
    if rec.train is not None:
        t = rec.train
        out["train.launcher"] = t.launcher
        for k in ("total_steps", "main_steps", "new_tokens", "replay_tokens", "init_from"):
            if (v := getattr(t.progress, k)) is not None:
                out[f"train.{k}"] = str(v)
    return out


def _flatten(prefix: str, v: Any, out: dict[str, str]) -> None:
    if isinstance(v, dict) and v:
        for k, x in v.items():
            _flatten(f"{prefix}.{_key(str(k))}", x, out)
    elif v is not None:
        out[prefix] = v if isinstance(v, str) else json.dumps(v)


def _key(k: str) -> str:
    """MLflow keys take letters, digits, _ - . space and /; anything else in a policy key (a domain name) becomes _."""
    return "".join(c if c.isalnum() or c in "_-. /" else "_" for c in k)


def _lineage(rec: RoundRecord) -> dict[str, str]:
    tags = {
        "cptd.round_id": rec.id,
        "cptd.round_number": str(rec.number),
        "cptd.state": rec.state.value,
        "cptd.trigger": rec.trigger.kind,
        "cptd.policy_hash": rec.policy_hash,
        "cptd.parent.version": rec.parent.version or "",
        "cptd.parent.checkpoint": rec.parent.checkpoint or "",
        "cptd.candidate": rec.candidate or "",
    }
    if rec.policy is not None:
        tags["cptd.deployment"] = rec.policy.name
    if rec.parent.adapter:
        tags["cptd.parent.adapter"] = rec.parent.adapter
    if rec.snapshot is not None:
        tags["cptd.manifest_sha256"] = rec.snapshot.manifest_sha256
        tags["cptd.manifest"] = rec.snapshot.manifest
        offsets = {k: f"{r.first}-{r.last}" for k, r in sorted(rec.snapshot.kafka_offsets.items())}
        tags["cptd.kafka_offsets"] = json.dumps(offsets)  # "topic|partition" -> first-last
    if rec.train is not None:
        tags["cptd.train.spec_digest"] = rec.train.spec_digest
        tags["cptd.train.out_dir"] = rec.train.out_dir
    if rec.gate is not None:
        tags["cptd.gate.accepted"] = str(rec.gate.accepted).lower()
        tags["cptd.gate.reasons"] = ",".join(r.code for r in rec.gate.reasons)
        tags["cptd.gate.chosen"] = rec.gate.chosen or ""
    if rec.error:
        tags["cptd.error"] = rec.error
    if rec.deployed_at is not None:
        tags["cptd.deployed_at"] = str(rec.deployed_at)
    if rec.rollback is not None:
        tags["cptd.rollback.trigger"] = rec.rollback.trigger
        tags["cptd.rollback.to"] = rec.rollback.to or ""
    return tags


def _train_metrics(rec: RoundRecord, at: int) -> list[Metric]:
    if rec.train is None:
        return []
    events = JsonlFollower(Path(rec.train.spec.progress_file)).new()
    steps = {e["step"]: e for e in events if e.get("event") == "step"}  # a resumed trainer repeats steps: the last wins
    evals = {e["step"]: e for e in events if e.get("event") == "eval"}
    if not steps:  # the round's directory is gone: the record's curve and evals
        out = [Metric(f"train.{k}", v, s, at) for s, loss, lr in rec.train.curve for k, v in (("loss", loss), ("lr", lr))]
        out += [Metric(f"train.{k}", getattr(e, k), e.step, at) for e in rec.train.evals for k in EVAL_METRICS if getattr(e, k) is not None]
        return out
    kept = sorted(steps)
    if len(kept) > MAX_STEPS:
        stride = -(-len(kept) // MAX_STEPS)
        kept = kept[::stride] + ([kept[-1]] if (len(kept) - 1) % stride else [])
    out = []
    for s in kept:
        e = steps[s]
        out += [Metric(f"train.{k}", float(e[k]), s, int(e["time"] * 1000)) for k in STEP_METRICS if e.get(k) is not None]
    for s, e in sorted(evals.items()):
        out += [Metric(f"train.{k}", float(e[k]), s, int(e["time"] * 1000)) for k in EVAL_METRICS if e.get(k) is not None]
    return out


def _eval_figures(rec: RoundRecord) -> dict[str, float]:
    out: dict[str, float] = {}
    if rec.drift is not None and rec.drift.stats is not None:
        for k, v in rec.drift.stats.model_dump().items():
            if isinstance(v, (int, float)):
                out[f"drift.{k}"] = float(v)
    if rec.eval is not None:
        for who, losses in [("serving", rec.eval.serving), *((c.name, c) for c in rec.eval.candidates)]:
            for k in ("new_nll", "replay_nll"):
                if (v := getattr(losses, k)) is not None:
                    out[f"eval.{_key(who)}.{k}"] = v
        for c in rec.eval.candidates:
            out.update({f"eval.{_key(c.name)}.suite.{_key(s)}": v for s, v in c.suites.items() if v is not None})
    if rec.gate is not None:
        out["gate.accepted"] = 1.0 if rec.gate.accepted else 0.0
        for verdict in rec.gate.verdicts:
            for k in ("adaptation", "forgetting"):
                if (v := getattr(verdict, k)) is not None:
                    out[f"gate.{_key(verdict.name)}.{k}"] = v
    return out


# ---------------------------------------------------------------------- MLflow
class MlflowTracker:
    """A round's run in an MLflow experiment; its candidate as a version of a registered model.

    The version's source is `runs:/<run>/candidate`, where a small candidate.json names the checkpoint directory
    (uploaded when the server proxies artifacts), and the version's tags carry the path and the lineage: the server
    refuses a local path as a source, and the weights stay on the checkpoint volume (never uploaded). A candidate
    that is already a remote URI (s3://...) is the source itself."""

    def __init__(self, settings: Settings, model_name: str):
        assert settings.mlflow_tracking_uri is not None
        token = settings.mlflow_tracking_token.get_secret_value() if settings.mlflow_tracking_token else None
        self.client = MlflowClient(settings.mlflow_tracking_uri.get_secret_value(), token, settings.mlflow_timeout_s)
        self.experiment, self.model_name, self.where = settings.mlflow_experiment, model_name, self.client.where

    def export(self, run: RoundRun) -> str:
        c = self.client
        eid = c.experiment_id(self.experiment)
        handle = c.find_run(eid, "cptd.round_id", run.round_id) or c.create_run(
            eid, run.round_id, run.start_ms, {"cptd.round_id": run.round_id}
        )
        c.log(handle, run.params, run.tags, run.metrics)
        if run.candidate:
            remote = urlsplit(run.candidate).scheme not in ("", "file")
            pointer = {"round_id": run.round_id, "candidate": run.candidate}
            if not remote:
                c.put_artifact(handle, "candidate/candidate.json", json.dumps(pointer, indent=1).encode())
            source = run.candidate if remote else f"runs:/{handle.run_id}/candidate"
            version = c.register(self.model_name, source, handle, run.candidate_tags, f"cptd round {run.round_id}: {run.candidate}")
            c.log(handle, {}, {"cptd.model_version": f"{self.model_name}/{version}"}, [])
        c.end_run(handle, run.status, run.end_ms)  # last: a run marked ended is a whole export
        return f"{c.where} experiment {eid} run {handle.run_id}"

    def close(self) -> None:
        self.client.close()


# ---------------------------------------------------------------------- when: the worker
class RoundTracking:
    """The rounds still to export (a Redis set, so a new lease holder carries on) and the one thread exporting them."""

    def __init__(self, ctx: RoundContext):
        self.ctx = ctx
        self.wake = threading.Event()
        self.thread: threading.Thread | None = None
        self.lock = threading.Lock()
        self.unsaved: set[str] = set()  # ended while Redis refused the set's write: exported from memory

    def ended(self, rec: RoundRecord) -> None:
        """A round reached a terminal state (its record is written): note it, wake the worker. Never raises."""
        try:
            self.ctx.store.add_tracking_pending(rec.id)
        except Exception as e:  # noqa: BLE001 - Redis down right after the record's write: kept here instead
            log.warning("tracking: round not noted in Redis; kept in memory", extra={"round_id": rec.id, "error": repr(e)})
            self.unsaved.add(rec.id)
        self.kick()

    def kick(self) -> None:
        """Export what is pending now (starting the worker thread the first time)."""
        with self.lock:
            if self.thread is None or not self.thread.is_alive():
                self.thread = threading.Thread(target=self._loop, name="round-tracking", daemon=True)
                self.thread.start()
        self.wake.set()

    def _loop(self) -> None:
        while not self.ctx.stop.is_set():
            self.wake.wait(RETRY_S)
            self.wake.clear()
            if self.ctx.fence is None:  # the lease holder's job: two daemons exporting one round could race
                continue
            try:
                self.export_pending()
            except Exception:  # noqa: BLE001 - a bug here must not end the thread: the next pass tries again
                log.exception("tracking: pass failed")

    def export_pending(self) -> int:
        """One pass over the rounds still to export; returns how many are left (-1: Redis did not answer). Stops at
        the first failed export (the tracker is down or refusing: the next pass tries again)."""
        store = self.ctx.store
        tracker = tracker_for(self.ctx.settings, self.ctx.get_policy().name)
        if tracker is None:
            return 0
        try:
            pending = sorted(set(store.tracking_pending()) | self.unsaved)
        except Exception as e:  # noqa: BLE001 - Redis down: the next pass reads the set again
            log.warning("tracking: pending rounds not read", extra={"error": repr(e)})
            tracker.close()
            return -1
        M.TRACKING_PENDING.set(len(pending))
        try:
            for rid in list(pending):
                rec = self.ctx.get_round(rid)
                if rec is not None and rec.state.terminal:
                    t0 = time.monotonic()
                    try:
                        where = tracker.export(round_run(rec))
                    except Exception as e:  # noqa: BLE001 - a tracker never fails a round: logged, counted, retried
                        M.TRACKING_EXPORTS.labels(outcome="failed").inc()
                        log.warning("tracking: round not exported", extra={"round_id": rid, "host": tracker.where, "error": str(e)})
                        break
                    M.TRACKING_EXPORTS.labels(outcome="exported").inc()
                    log.info("tracking: round exported", extra={"round_id": rid, "run": where, "seconds": round(time.monotonic() - t0, 2)})
                else:
                    log.warning("tracking: round has no ended record; not exported", extra={"round_id": rid})
                store.clear_tracking_pending(rid)
                self.unsaved.discard(rid)
                pending.remove(rid)
        except Exception as e:  # noqa: BLE001 - Redis failed mid-pass: what is left stays pending
            log.warning("tracking: pass stopped", extra={"error": repr(e)})
        finally:
            tracker.close()
        M.TRACKING_PENDING.set(len(pending))
        return len(pending)
