"""PENDING: refuse a round that could not deploy, before it moves a document or trains a step."""

from __future__ import annotations

from daemon.job_launchers import Job
from daemon.jobs.specs import DeviceCheckSpec
from daemon.round_record import RoundRecord, RoundState
from daemon.rounds.context import Cancelled, RoundContext, RoundFailed
from policies.config import Policy


def pending(ctx: RoundContext, rec: RoundRecord) -> None:
    refusal = refusal_of(ctx, ctx.policy_of(rec), rec)
    if refusal:
        raise RoundFailed(f"PENDING: refused before taking any document: {refusal}", requeue=True)
    ctx.enter(rec, RoundState.SNAPSHOT)


def refusal_of(ctx: RoundContext, policy: Policy, rec: RoundRecord) -> str | None:
    """Why this round cannot deploy: an adapter every replica cannot take, or 4-bit that the trainer cannot run."""
    train = policy.train
    if train.mode == "full":
        return None
    assert ctx.serving is not None
    why = ctx.serving.lora_refusal(train.lora_r)
    if why:
        return f"train.mode {train.mode} needs every replica to take a rank-{train.lora_r} adapter: {why}"
    if train.mode == "qlora":
        directory = ctx.round_dir(rec.id)
        directory.mkdir(parents=True, exist_ok=True)
        spec = DeviceCheckSpec(device=train.device, out=str(directory / "device-check.json"))
        try:
            out = ctx.run_job(Job(spec, directory / "device-check-spec.json", directory / "device-check.log"), rec, timeout=300)
        except Cancelled:
            raise
        except RoundFailed as e:
            return f"train.mode qlora: the 4-bit check failed: {e.cause[-300:]}"
        if out["refusal"]:
            return f"train.mode qlora on {out['device']}: {out['refusal']}"
    return None
