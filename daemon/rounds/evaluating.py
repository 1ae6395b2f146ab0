"""EVALUATING: the evaluator job scores the parent and the candidates on the same data; the gate decides.

Candidates are the newest `rounds.eval_checkpoints` mid-round checkpoints and
`final`. LoRA/QLoRA candidates are adapters, scored on the served base against
what clients get now (the base + the active adapter). Everything is scored in
the dtype vLLM serves in. The gate (policies/gates.py) accepts the best passing
checkpoint or rejects with every reason; what follows an acceptance is the
deploy mode's (daemon/rounds/approval.py); a report already written is not
scored again on resume. Once the gate has decided, the round's checkpoints
drop their optimizer state (most of their bytes).
"""

from __future__ import annotations

import time
from dataclasses import asdict
from pathlib import Path

from daemon import metrics as M
from daemon.job_launchers import Job, JsonlFollower
from daemon.jobs.specs import EvalReport, EvalSpec, drop_optimizer_state
from daemon.round_record import CandidateScores, EvalProgress, EvalSummary, GateRecord, ModelLosses, RoundRecord, RoundState
from daemon.rounds import staging
from daemon.rounds.approval import after_gate
from daemon.rounds.context import RoundContext
from daemon.rounds.document_fate import release
from policies.gates import GateDecision, gate_round


def evaluating(ctx: RoundContext, rec: RoundRecord) -> None:
    policy = ctx.policy_of(rec)
    directory = ctx.round_dir(rec.id)
    assert rec.train is not None and rec.train.result is not None and rec.parent.checkpoint is not None
    out = Path(rec.train.out_dir)
    steps = sorted(p for p in (out / "checkpoints").glob("step-*") if not p.name.endswith(".tmp"))
    last = rec.train.result.steps
    keep = policy.rounds.eval_checkpoints
    mids = [p for p in steps if int(p.name.split("-")[1]) != last][-keep:] if keep else []
    candidates = [[p.name, str(p)] for p in mids] + [["final", str(out / "final")]]
    adapters = policy.train.mode != "full"
    spec = EvalSpec(
        round_id=rec.id,
        # lora/qlora: what clients get now (the served base + the active adapter) vs each adapter on that base
        serving=(rec.parent.adapter_path or rec.parent.checkpoint) if adapters else staging.local_copy(ctx, rec.parent.checkpoint),
        base=rec.parent.checkpoint if adapters else None,
        device=policy.train.device,
        dtype=ctx.served_dtype(),
        candidates=candidates,
        new_path=str(directory / "data/heldout_new.jsonl"),
        replay_path=str(directory / "data/heldout_replay.jsonl"),
        suites=dict(policy.rounds.suites),
        canaries=policy.rounds.canaries,
        max_len=policy.train.seq_len,
        out=str(directory / "eval_report.json"),
    )
    if not spec.result_file.exists():
        progress = JsonlFollower(spec.progress_path)
        last_put = [0.0]

        def follow() -> None:
            events = progress.new()
            if events and time.monotonic() - last_put[0] > 2.0:
                rec.eval_progress = EvalProgress.model_validate(events[-1])
                last_put[0] = time.monotonic()
                ctx.put(rec)

        job = Job(spec, directory / "eval-spec.json", directory / "eval.log", round_id=rec.id)
        ctx.run_job(job, rec, on_tick=follow, hit="evaluating.child_started", phase="EVALUATING")
    report = EvalReport.from_json(spec.result_file.read_text())
    serving, scored = report.gate_inputs()
    decision = gate_round(policy.gates, serving, scored)
    record_eval_metrics(report, decision)
    rec.eval = EvalSummary(
        report=str(spec.result_file),
        serving=ModelLosses(new_nll=report.serving.new.mean_nll, replay_nll=report.serving.replay.mean_nll),
        candidates=[
            CandidateScores(
                name=c.name, new_nll=c.new.mean_nll, replay_nll=c.replay.mean_nll, suites={k: v.accuracy for k, v in c.suites.items()}
            )
            for c in report.candidates
        ],
    )
    rec.gate = GateRecord.model_validate(asdict(decision))
    # Evaluated: the round trains no more, so its checkpoints need no optimizer state (their weights stay: the chosen
    # one is deployed as it is). The main line keeps its own: the next round continues from it.
    for ckpt in steps:
        drop_optimizer_state(ckpt)
    if not decision.accepted:
        rec.docs = release(ctx, rec)
        ctx.enter(rec, RoundState.REJECTED)
        return
    assert decision.chosen is not None  # an accepting gate names its checkpoint
    rec.candidate = dict(candidates)[decision.chosen]
    if ctx.settings.checkpoint_url is not None:  # what the deploy, a rollback and the next round read: on the store
        rec.candidate = staging.publish(ctx, rec.id, rec.candidate, "candidate")
        if rec.train.result.mainline:
            staging.publish(ctx, rec.id, rec.train.result.mainline, "mainline")
    after_gate(ctx, rec)  # deploy.mode: DEPLOYING, AWAITING_APPROVAL, or SHADOWED


def record_eval_metrics(report: EvalReport, decision: GateDecision) -> None:
    """Export the chosen checkpoint's losses and the decision (metrics are defined in daemon/metrics.py)."""
    M.EVAL_LOSS.labels(split="new", model="serving").set(report.serving.new.mean_nll)
    M.EVAL_LOSS.labels(split="replay", model="serving").set(report.serving.replay.mean_nll)
    shown = next((c for c in report.candidates if c.name == decision.chosen), report.candidates[-1] if report.candidates else None)
    if shown is not None:
        M.EVAL_LOSS.labels(split="new", model="candidate").set(shown.new.mean_nll)
        M.EVAL_LOSS.labels(split="replay", model="candidate").set(shown.replay.mean_nll)
        M.EVAL_FORGETTING.set(shown.replay.mean_nll - report.serving.replay.mean_nll)
        M.EVAL_ADAPTATION.set(report.serving.new.mean_nll - shown.new.mean_nll)
    # The label is the first reason's code (policies.gates.REASONS): a small, fixed set of label values.
    reason = "" if decision.accepted else decision.reasons[0].code if decision.reasons else "none"
    M.GATE_DECISIONS.labels(decision="accept" if decision.accepted else "reject", reason=reason).inc()
