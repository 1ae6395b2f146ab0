"""The drift probe job (daemon/jobs/drift_probe.py), at SNAPSHOT and for the drift trigger's periodic probe.

Both score new documents against the replay reservoir under the serving
model, as a job on the trainer's device; the statistics become a score in
policies/drift.py. An unmeasured drift is not an error: the round goes on with
the weak-shift defaults, and the record says why.
"""

from __future__ import annotations

import logging
from dataclasses import fields
from pathlib import Path
from typing import Any

from daemon import metrics as M
from daemon.job_launchers import Job
from daemon.jobs.specs import DriftSpec
from daemon.round_record import RoundRecord
from daemon.rounds.context import Cancelled, RoundContext, RoundFailed, Stop, write_texts
from policies.drift import DriftStats, drift_score

log = logging.getLogger("cptd.rounds")


def drift_stats(result: dict[str, Any]) -> DriftStats:
    """The probe's result -> DriftStats (its derived figures and where it ran are recomputed or not kept)."""
    return DriftStats(**{f.name: result[f.name] for f in fields(DriftStats) if f.name in result})


def measure_for_round(ctx: RoundContext, rec: RoundRecord, new: Path, ref: Path) -> DriftStats | None:
    """Under the parent checkpoint; no reference set or a failed probe = unmeasured (rec.drift_error says why)."""
    parent = rec.parent.checkpoint
    if not parent or ref.stat().st_size == 0 or new.stat().st_size == 0:
        return None
    policy = ctx.policy_of(rec)
    directory = ctx.round_dir(rec.id)
    spec = DriftSpec(
        model=parent,
        new_path=str(new),
        ref_path=str(ref),
        out=str(directory / "drift.json"),
        max_docs=policy.drift.probe_docs,
        max_len=policy.drift.probe_max_len,
        seed=rec.number,
        device=policy.train.device,
        dtype=ctx.served_dtype(),
    )
    try:
        return drift_stats(
            ctx.run_job(Job(spec, directory / "drift-spec.json", directory / "drift.log", round_id=rec.id), rec, timeout=1800)
        )
    except Cancelled:
        raise
    except RoundFailed as e:
        rec.drift_error = f"drift probe: {e.cause}"[:800]
        return None


def probe_serving(ctx: RoundContext, busy: bool) -> float | None:
    """The drift trigger's probe: buffered documents vs the replay reservoir under the serving model."""
    if ctx.fence is None or ctx.serving is None or busy:
        return None
    policy = ctx.get_policy()
    live = ctx.serving.state.desired_version
    known = ctx.serving.state.versions.get(live or "")
    new = ctx.store.get_docs(ctx.store.buffer_keys(policy.drift.probe_docs))
    ref = ctx.store.get_docs(sorted(ctx.store.replay_keys())[: policy.drift.probe_docs])
    if known is None or not new or not ref:
        return None
    directory = ctx.settings.checkpoint_dir / "probe"
    directory.mkdir(parents=True, exist_ok=True)
    write_texts(directory / "new.jsonl", [d.text for d in new])
    write_texts(directory / "ref.jsonl", [d.text for d in ref])
    spec = DriftSpec(
        model=known.checkpoint,
        new_path=str(directory / "new.jsonl"),
        ref_path=str(directory / "ref.jsonl"),
        out=str(directory / "drift.json"),
        max_docs=policy.drift.probe_docs,
        max_len=policy.drift.probe_max_len,
        device=policy.train.device,
        dtype=ctx.served_dtype(),
    )
    spec.result_file.unlink(missing_ok=True)
    try:
        result = ctx.run_job(Job(spec, directory / "drift-spec.json", directory / "drift.log"), timeout=1800)
    except (RoundFailed, Stop) as e:
        log.warning("drift probe failed", extra={"error": str(e)[-500:]})
        return None
    score = drift_score(drift_stats(result), policy.drift)
    M.DRIFT_SCORE.labels(statistic="probe_score").set(score)
    return score
