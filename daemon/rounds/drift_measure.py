"""Drift of new documents against the replay reservoir under the served model, at SNAPSHOT and for the drift
trigger's periodic probe; the statistics become a score in policies/drift.py.

Both measure the model that serves now (at SNAPSHOT the round's parent is it), so they ask vLLM first
(`served_drift`): prompt logprobs for the losses, `/tokenize` for the token histograms, no model loaded anywhere.
Where no replica can answer (none serves that version, or the replicas run with --enable-lora, where prompt
logprobs crash vLLM 0.32) the drift probe job (daemon/jobs/drift_probe.py) loads the checkpoint on the trainer's
device instead (daemon/job_launchers.py launcher_for). The two agree but for one thing: vLLM scores each document's
first `probe_max_len` tokens with the tokenizer's own special tokens, where the job prepends BOS and scores every
window of the document. An unmeasured drift is not an error: the round goes on with the weak-shift defaults, and
the record says why.
"""

from __future__ import annotations

import logging
import math
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import fields
from pathlib import Path
from typing import Any

from connectors.vllm import Replica, ServingError
from daemon import metrics as M
from daemon.job_launchers import Job
from daemon.jobs.specs import DriftSpec, read_texts
from daemon.round_record import RoundRecord
from daemon.rounds import staging
from daemon.rounds.context import Cancelled, RoundContext, RoundFailed, Stop, write_texts
from policies.drift import DriftPolicy, DriftStats, drift_score, measured_stats, probe_sample

log = logging.getLogger("cptd.rounds")


def drift_stats(result: dict[str, Any]) -> DriftStats:
    """The probe's result -> DriftStats (its derived figures and where it ran are recomputed or not kept)."""
    return DriftStats(**{f.name: result[f.name] for f in fields(DriftStats) if f.name in result})


def served_drift(replica: Replica, model: str, new: Sequence[str], ref: Sequence[str], policy: DriftPolicy, seed: int = 0) -> DriftStats:
    """The probe's statistics under `model` as `replica` serves it: the same samples as the job, each document's
    first `probe_max_len` tokens scored by prompt logprobs, whole documents tokenized for the histograms."""
    samples = probe_sample(new, policy.probe_docs, seed), probe_sample(ref, policy.probe_docs, seed + 1)
    losses, scored, counts = [], [], []
    for texts in samples:
        docs = replica.prompt_logprobs(list(texts), model=model, max_tokens_per_doc=policy.probe_max_len)
        n = sum(d.tokens for d in docs)
        losses.append(-math.fsum(d.logprob_sum for d in docs) / n if n else math.nan)
        scored.append(n)
        hist: Counter[int] = Counter()
        for t in texts:
            hist.update(replica.tokenize(t, model))
        counts.append(hist)
    return measured_stats((losses[0], losses[1]), (scored[0], scored[1]), (counts[0], counts[1]), *samples)


def serving_replica(ctx: RoundContext, version: str | None) -> tuple[Replica, str] | None:
    """A replica that serves `version` now and may be asked prompt logprobs, with the base model's name; None (and
    why, logged) when the probe must load the checkpoint on the trainer's device instead."""
    serving = ctx.serving
    if serving is None or version is None:
        return None
    live = [r for r in serving.replicas if (st := serving.state.replicas.get(r.url)) and st.version == version and st.status == "serving"]
    if not live:
        log.info("no replica serves the measured version; the drift probe job loads it", extra={"version": version})
        return None
    try:
        refusal = live[0].prompt_logprobs_refusal()
        if refusal is None:
            return live[0], serving.base_model_name()
    except ServingError as e:
        refusal = str(e)
    log.info("drift not measured through vLLM; the drift probe job loads the model", extra={"version": version, "why": refusal[:300]})
    return None


def measured_by_replica(ctx: RoundContext, version: str | None, new: Path, ref: Path, policy: DriftPolicy, seed: int) -> DriftStats | None:
    """The statistics through vLLM, or None when no replica can give them (the job runs instead)."""
    served = serving_replica(ctx, version)
    if served is None:
        return None
    t0 = time.monotonic()
    try:
        stats = served_drift(*served, read_texts(new), read_texts(ref), policy, seed)
    except ServingError as e:
        log.warning("drift through vLLM failed; the drift probe job loads the model", extra={"error": str(e)[:500]})
        return None
    log.info("drift measured through vLLM", extra={"replica": served[0].url, "seconds": round(time.monotonic() - t0, 3)})
    return stats


def measure_for_round(ctx: RoundContext, rec: RoundRecord, new: Path, ref: Path) -> DriftStats | None:
    """Under the parent (what serves now): through vLLM when a replica can, else the job on the trainer's device;
    no reference set or a failed probe = unmeasured (rec.drift_error says why)."""
    parent = rec.parent.checkpoint
    if not parent or ref.stat().st_size == 0 or new.stat().st_size == 0:
        return None
    policy = ctx.policy_of(rec)
    served = measured_by_replica(ctx, rec.parent.version, new, ref, policy.drift, rec.number)
    if served is not None:
        return served
    directory = ctx.round_dir(rec.id)
    spec = DriftSpec(
        model=staging.local_copy(ctx, parent),
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
    stats = measured_by_replica(ctx, live, directory / "new.jsonl", directory / "ref.jsonl", policy.drift, 0)
    if stats is not None:
        return record_probe(stats, policy.drift)
    spec = DriftSpec(
        model=staging.local_copy(ctx, known.checkpoint),
        new_path=str(directory / "new.jsonl"),
        ref_path=str(directory / "ref.jsonl"),
        out=str(directory / "drift.json"),
        max_docs=policy.drift.probe_docs,
        max_len=policy.drift.probe_max_len,
        device=policy.train.device,
        dtype=ctx.served_dtype(),
    )
    spec.result_file.unlink(missing_ok=True)
    # no round: a name of its own per run (a Kubernetes workload of a failed probe stays until its TTL)
    job = Job(spec, directory / "drift-spec.json", directory / "drift.log", round_id=f"probe-{int(time.time())}")
    try:
        result = ctx.run_job(job, timeout=1800)
    except (RoundFailed, Stop) as e:
        log.warning("drift probe failed", extra={"error": str(e)[-500:]})
        return None
    return record_probe(drift_stats(result), policy.drift)


def record_probe(stats: DriftStats, policy: DriftPolicy) -> float:
    score = drift_score(stats, policy)
    M.DRIFT_SCORE.labels(statistic="probe_score").set(score)
    return score
