"""TRAINING: write the round's TrainSpec once, run the trainer job where the launcher says, follow its progress.

The spec goes into the record before the job starts (with its digest and the
launcher), so a resumed round runs the same spec and the trainer resumes from
its newest checkpoint in the same directory. Progress comes from the trainer's
progress.jsonl, into metrics every tick and into the record every few seconds;
the record's loss curve is downsampled to at most CURVE_POINTS points
(TrainRecord.add_curve_point), while progress.jsonl keeps every step.
"""

from __future__ import annotations

import hashlib
import time

from daemon import metrics as M
from daemon.job_launchers import Job, JsonlFollower
from daemon.jobs.specs import TrainEval, TrainResult, TrainSpec
from daemon.round_record import RoundRecord, RoundState, TrainRecord
from daemon.rounds import staging
from daemon.rounds.context import BASE_VERSION, RoundContext, RoundFailed


def training(ctx: RoundContext, rec: RoundRecord) -> None:
    if rec.train is None:
        spec = train_spec(ctx, rec)
        rec.train = TrainRecord(spec=spec, spec_digest=spec.digest(), out_dir=spec.out_dir, launcher=ctx.settings.train_launcher)
        ctx.put(rec)
    train = rec.train
    stage_inputs(ctx, rec)
    directory = ctx.round_dir(rec.id)
    job = Job(train.spec, directory / "train-spec.json", directory / "train.log", round_id=rec.id)
    follow = ProgressRecorder(ctx, rec)
    try:
        result = ctx.run_job(job, rec, on_tick=follow.tick, phase="TRAINING")
    finally:
        follow.tick(final=True)
    train.result = TrainResult.model_validate(result)
    ctx.enter(rec, RoundState.EVALUATING)


def train_spec(ctx: RoundContext, rec: RoundRecord) -> TrainSpec:
    """The trainer's whole input: the round's data files, the drift-adjusted schedule, the policy's train section."""
    policy = ctx.policy_of(rec)
    directory = ctx.round_dir(rec.id)
    seed = int(hashlib.sha256(f"{policy.train.seed}:{rec.id}".encode()).hexdigest()[:8], 16)
    mainline = mainline_of(ctx, rec)
    parent = rec.parent.checkpoint  # lora/qlora: the base vLLM serves, which the adapter goes on
    if parent is None:
        raise RoundFailed("TRAINING: the serving version has no known checkpoint to train from")
    return TrainSpec(
        parent_dir=staging.local_copy(ctx, parent),
        out_dir=str(directory / "train"),
        new_path=str(directory / "data/new.jsonl"),
        replay_path=str(directory / "data/replay.jsonl"),
        heldout_new_path=str(directory / "data/heldout_new.jsonl"),
        heldout_replay_path=str(directory / "data/heldout_replay.jsonl"),
        replay_ratio=rec.replay_ratio or 0.0,
        schedule=rec.schedule or policy.schedule,
        train=policy.train,
        mainline_in=staging.local_copy(ctx, mainline) if mainline else None,
        adapter_in=rec.parent.adapter_path if policy.train.mode != "full" else None,
        data_seed=seed,
        init_seed=seed + 1,
        round_id=rec.id,
        cpu_threads=ctx.settings.train_cpu_threads,
    )


def mainline_of(ctx: RoundContext, rec: RoundRecord) -> str | None:
    """The infinite schedule's main line the round continues: the parent round's (its published copy on object
    storage); None on other schedules or from the base."""
    if ctx.policy_of(rec).schedule.kind != "infinite" or rec.parent.version in (None, BASE_VERSION):
        return None
    if ctx.settings.checkpoint_url is not None:
        return staging.published_mainline(ctx, rec.parent.version)
    previous = ctx.get_round(rec.parent.version)
    result = previous.train.result if previous and previous.train else None
    return result.mainline if result else None


def stage_inputs(ctx: RoundContext, rec: RoundRecord) -> None:
    """On object storage: the parent and main line in scratch again (a restarted pod's scratch is empty); the
    spec names their staged paths, which depend only on their URLs."""
    if ctx.settings.checkpoint_url is None or rec.parent.checkpoint is None:
        return
    staging.local_copy(ctx, rec.parent.checkpoint)
    mainline = mainline_of(ctx, rec)
    if mainline:
        staging.local_copy(ctx, mainline)


class ProgressRecorder:
    """The trainer's progress.jsonl as it grows: metrics every tick, the record every few seconds."""

    def __init__(self, ctx: RoundContext, rec: RoundRecord):
        assert rec.train is not None
        self.ctx, self.rec, self.train = ctx, rec, rec.train
        self.events = JsonlFollower(rec.train.spec.progress_file)
        self.last_put, self.last_tokens = 0.0, 0

    def tick(self, final: bool = False) -> None:
        progress, train = self.train.progress, self.train
        for ev in self.events.new():
            if ev["event"] == "start":
                progress.total_steps, progress.main_steps, progress.resumed_at = ev["total_steps"], ev["main_steps"], ev["resumed_at"]
                progress.init_from, progress.new_tokens, progress.replay_tokens = ev["init_from"], ev["new_tokens"], ev["replay_tokens"]
            elif ev["event"] == "step":
                progress.step, progress.loss, progress.lr = ev["step"], ev["loss"], ev["lr"]
                progress.tokens, progress.tokens_per_s = ev["tokens"], ev["tokens_per_s"]
                train.add_curve_point((ev["step"], round(ev["loss"], 4), ev["lr"]))
                M.TRAIN_LOSS.set(ev["loss"])
                M.TRAIN_LR.set(ev["lr"])
                M.TRAIN_STEP.set(ev["step"])
                M.TRAIN_TOKENS_PER_SECOND.set(ev["tokens_per_s"])
                if ev["tokens"] > self.last_tokens:
                    M.TRAIN_TOKENS.inc(ev["tokens"] - self.last_tokens)
                self.last_tokens = ev["tokens"]
            elif ev["event"] == "eval":
                point = TrainEval.model_validate({k: v for k, v in ev.items() if k not in ("event", "time")})
                train.evals = [e for e in train.evals if e.step != point.step] + [point]
        if final or time.monotonic() - self.last_put > 2.0:
            self.last_put = time.monotonic()
            self.ctx.put(self.rec)
