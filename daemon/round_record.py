"""The round record: what a round is, as stored in Redis, served by the API and printed by the CLI.

One pydantic model per part of a round's lineage (docs/architecture.md §3), so
the runner, the API (OpenAPI shows these schemas), the CLI and the demo read
the same fields by name. The record is written before each phase starts and
read back after a restart, so every field a later phase needs is optional
until the phase that fills it has run. Unknown fields are ignored on read, so
a daemon reads records written by an older version.
"""

from __future__ import annotations

from enum import Enum
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from daemon.jobs.specs import TrainEval, TrainResult, TrainSpec
from policies.config import Policy
from policies.lr_schedule import SchedulePolicy


class RoundState(str, Enum):
    PENDING = "PENDING"
    SNAPSHOT = "SNAPSHOT"
    TRAINING = "TRAINING"
    EVALUATING = "EVALUATING"
    AWAITING_APPROVAL = "AWAITING_APPROVAL"  # deploy.mode approve: the gate accepted; an operator decides
    DEPLOYING = "DEPLOYING"
    DEPLOYED = "DEPLOYED"
    REJECTED = "REJECTED"
    FAILED = "FAILED"
    ROLLED_BACK = "ROLLED_BACK"
    SHADOWED = "SHADOWED"  # deploy.mode shadow: the gate accepted; not deployed, `shadow` says what would have been

    @property
    def terminal(self) -> bool:
        return self in TERMINAL


PHASES = (
    RoundState.PENDING,
    RoundState.SNAPSHOT,
    RoundState.TRAINING,
    RoundState.EVALUATING,
    RoundState.AWAITING_APPROVAL,
    RoundState.DEPLOYING,
)
TERMINAL = frozenset({RoundState.DEPLOYED, RoundState.REJECTED, RoundState.FAILED, RoundState.ROLLED_BACK, RoundState.SHADOWED})

# The cause every cancelled round ends FAILED with (its error starts with it): how `cptd round --wait` and the
# round-end webhook tell an operator's cancel from a failure without a state of its own.
CANCEL_CAUSE = "cancelled by operator"


class Part(BaseModel):
    model_config = ConfigDict(extra="ignore")


class Trigger(Part):
    kind: str  # cron | interval | buffer | drift | manual
    reason: str = ""
    request_id: str | None = None


class Parent(Part):
    version: str | None = None  # the version serving when the round was created ("base" or a round id)
    checkpoint: str | None = None
    adapter: str | None = None  # the LoRA adapter clients were routed to (lora/qlora rounds continue it)
    adapter_path: str | None = None


class PhaseTimes(Part):
    started_at: float
    finished_at: float | None = None


class OffsetRange(Part):
    first: int
    last: int
    docs: int


class Snapshot(Part):
    docs: int
    train_docs: int
    heldout_docs: int
    bytes: int
    tokens_estimate: int
    manifest: str  # path of manifest.jsonl (content key, Kafka topic/partition/offset, held out or not)
    manifest_sha256: str
    kafka_offsets: dict[str, OffsetRange] = Field(default_factory=dict)  # "topic|partition" -> range
    replay_docs: int = 0
    replay_heldout_docs: int = 0


class DriftStatsRecord(Part):
    loss_new: float
    loss_ref: float
    js_distance: float
    tokens_new: int
    tokens_ref: int
    ppl_gap: float | None = None
    text_tokens_new: int = 0
    text_tokens_ref: int = 0
    chars_new: int = 0
    chars_ref: int = 0
    words_new: int = 0
    words_ref: int = 0
    fertility_new: float | None = None  # tokens per character
    fertility_ref: float | None = None
    fertility_ratio: float | None = None
    tokens_per_word_new: float | None = None
    tokens_per_word_ref: float | None = None


class DriftRecord(Part):
    stats: DriftStatsRecord | None = None
    score: float | None = None
    level: str  # none | weak | strong | unmeasured
    replay_ratio: float
    peak_lr: float
    warmup_frac: float


class LanguageMixRecord(Part):
    """Byte shares per language (detected at ingest; "unknown" where the language rule did not run)."""

    targets: dict[str, float] = Field(default_factory=dict)  # policy language_mix.targets (share of the mixture)
    new: dict[str, float] = Field(default_factory=dict)  # the round's new training documents
    replay_available: dict[str, float] = Field(default_factory=dict)  # the replay reservoir's training half
    replay_wanted: dict[str, float] = Field(default_factory=dict)  # what the targets asked of the replay draw ("*": the rest)
    replay: dict[str, float] = Field(default_factory=dict)  # what the trainer's replay file holds
    mixture: dict[str, float] = Field(default_factory=dict)  # estimated shares of the training tokens, new + replay
    replay_docs: int = 0


class RatingSpread(Part):
    """One criterion's ratings over a set of documents (1..curation.rater.scale)."""

    mean: float
    q1: float
    median: float
    q3: float


class RatedSet(Part):
    """The ratings of one side of the selection (chosen, or waiting): per criterion, and documents per rater domain."""

    docs: int = 0  # rated documents in the set
    criteria: dict[str, RatingSpread] = Field(default_factory=dict)
    domains: dict[str, int] = Field(default_factory=dict)


class RaterRecord(Part):
    """How the candidate pool was rated (policies/rating.py; daemon/rounds/doc_rating.py)."""

    backend: str
    rated_docs: int = 0
    unrated: dict[str, int] = Field(default_factory=dict)  # reason -> documents the rater gave no rating
    seconds: float | None = None
    docs_per_s: float | None = None  # rated documents per second
    error: str | None = None  # the rater as a whole failed or was refused (the round went on)
    chosen: RatedSet | None = None
    waiting: RatedSet | None = None


class CurationRecord(Part):
    """How the round's new documents were chosen from the buffer (policies/curation.py, policies/collapse.py)."""

    pool_docs: int = 0  # candidates considered: the oldest buffered documents up to curation.pool_factor x budget
    scored_docs: int = 0  # scored by the served model (per-document perplexity)
    scoring_seconds: float | None = None
    scoring_docs_per_s: float | None = None
    scoring_tokens_per_s: float | None = None
    scoring_error: str | None = None  # scoring failed: the round went on unscored
    median_nll: float | None = None
    mad_nll: float | None = None
    chosen_docs: int = 0
    waiting: dict[str, int] = Field(default_factory=dict)  # reason -> documents left in the buffer for a later round
    dropped: dict[str, int] = Field(default_factory=dict)  # reason -> documents removed (listed in data/dropped.jsonl)
    domain_targets: dict[str, float] = Field(default_factory=dict)
    domains: dict[str, float] = Field(default_factory=dict)  # achieved byte shares of the new documents per domain
    provenance: dict[str, float] = Field(default_factory=dict)  # byte shares of the new documents per class
    synthetic_share: float = 0.0  # synthetic or suspected share of the new documents
    synthetic_cap: float = 0.15  # collapse.effective_cap
    cap_binding: bool = False  # synthetic documents waited because of the cap
    cap_binding_rounds: int = 0  # rounds in a row, this one included, in which the cap bound
    real_share: float | None = None  # human + unknown share of new + replay tokens
    real_floor: float = 0.5
    rater: RaterRecord | None = None  # curation.rater.backend is not off


class TrainProgress(Part):
    total_steps: int | None = None
    main_steps: int | None = None
    resumed_at: int | None = None
    init_from: str | None = None
    new_tokens: int | None = None
    replay_tokens: int | None = None
    step: int | None = None
    loss: float | None = None
    lr: float | None = None
    tokens: int | None = None
    tokens_per_s: float | None = None


# Most points of the loss/LR curve a record keeps; the trainer's progress.jsonl keeps every step.
CURVE_POINTS = 512


class TrainRecord(Part):
    spec: TrainSpec  # as written for the trainer (daemon/jobs/specs.py): typed policy sections inside
    spec_digest: str
    out_dir: str
    launcher: str
    progress: TrainProgress = Field(default_factory=TrainProgress)
    curve: list[tuple[int, float, float]] = Field(default_factory=list)  # (step, loss, lr), at most CURVE_POINTS
    curve_stride: int = 1  # the curve keeps the steps first + k * stride, and the newest step
    evals: list[TrainEval] = Field(default_factory=list)  # held-out losses at eval steps, as the trainer logged them
    result: TrainResult | None = None  # the trainer's result.json

    def add_curve_point(self, point: tuple[int, float, float], max_points: int = CURVE_POINTS) -> None:
        """Append a step's (step, loss, lr), keeping the curve evenly spread over the whole run in at most `max_points`.

        A record is rewritten every few seconds and read by /rounds: one point per step would grow it without bound
        over a long round. Points sit on a stride from the first step; when the curve is full the stride doubles
        and every other point goes. The newest step is always kept (the curve ends where training is), and a
        resumed trainer's repeated steps replace the ones it repeats."""
        curve = [c for c in self.curve if c[0] < point[0]]
        if len(curve) >= 2 and not self._on_stride(curve, curve[-1]):
            curve.pop()  # kept only as the newest step until now
        curve.append(point)
        while len(curve) > max_points:
            self.curve_stride *= 2
            curve = [c for i, c in enumerate(curve) if i == len(curve) - 1 or self._on_stride(curve, c)]
        self.curve = curve

    def _on_stride(self, curve: list[tuple[int, float, float]], c: tuple[int, float, float]) -> bool:
        return (c[0] - curve[0][0]) % self.curve_stride == 0


class EvalProgress(Part):
    scored: int
    total: int
    model: str = ""
    time: float | None = None


class ModelLosses(Part):
    new_nll: float | None
    replay_nll: float | None


class CandidateScores(ModelLosses):
    name: str
    suites: dict[str, float | None] = Field(default_factory=dict)


class EvalSummary(Part):
    report: str  # path of the full EvalReport JSON
    serving: ModelLosses
    candidates: list[CandidateScores] = Field(default_factory=list)


class GateReasonRecord(Part):
    code: str  # a key of policies.gates.REASONS
    message: str
    checkpoint: str | None = None


class VerdictRecord(Part):
    name: str
    passed: bool
    reasons: list[GateReasonRecord] = Field(default_factory=list)
    adaptation: float | None
    forgetting: float | None


class GateRecord(Part):
    accepted: bool
    reasons: list[GateReasonRecord] = Field(default_factory=list)
    chosen: str | None = None
    verdicts: list[VerdictRecord] = Field(default_factory=list)


class DeployWait(Part):
    blackout: str
    until: str | None = None


class ReplicaOutcome(Part):
    replica: str
    ok: bool
    pause_seconds: float | None = None
    error: dict[str, str] | None = None


class DeploySummary(Part):
    ok: bool
    kind: str  # deploy | rollback | lora | lora_rollback
    route_model: str | None = None  # lora: the model name clients send to reach this round's adapter
    version: str
    checkpoint: str
    error: dict[str, str] | None = None
    rejected: list[str] = Field(default_factory=list)
    started_at: float | None = None
    finished_at: float | None = None
    pause_seconds_max: float | None = None
    replicas: list[ReplicaOutcome] = Field(default_factory=list)
    rolled_back: list[ReplicaOutcome] = Field(default_factory=list)


class WatchRecord(Part):
    window_s: float
    probes: int
    regression: str | None = None


class RollbackRecord(Part):
    at: float
    trigger: str  # operator | watch
    to: str | None = None
    ok: bool
    reason: str | None = None


class ApprovalRecord(Part):
    """deploy.mode approve: the wait for an operator's decision and how it ended."""

    since: float  # when the round began to wait
    deadline: float  # since + deploy.approval_timeout_s of the round's policy: past it, the round is rejected
    decision: str | None = None  # approved | rejected | timed_out
    by: str | None = None  # who decided (the CLI's user@host, or what the API caller said)
    note: str | None = None
    at: float | None = None


class ShadowRecord(Part):
    """deploy.mode shadow: what the round would have deployed, had the mode been auto. No replica was touched."""

    version: str  # the version the replicas would have served (the round id)
    kind: str  # deploy (full weights) | lora (an adapter under `route_model`)
    candidate: str  # the checkpoint (or adapter) directory, validated against the served one as a deploy would
    route_model: str | None = None
    replicas: list[str] = Field(default_factory=list)  # the replicas it would have been swapped into
    serving_version: str | None = None  # what they served, and still serve


class DocsFate(Part):
    fate: str  # requeued (back to the buffer) | released (offered to replay, left the buffer)
    docs: int
    replay_placed: int | None = None


class RoundRecord(Part):
    id: str
    number: int
    state: RoundState
    created_at: float
    updated_at: float
    trigger: Trigger
    owner: str
    policy_hash: str
    policy: Policy | None = Field(default=None, description="the policy the round started under (omitted by the API)")
    parent: Parent = Field(default_factory=Parent)
    phases: dict[RoundState, PhaseTimes] = Field(default_factory=dict)
    error: str | None = None
    snapshot: Snapshot | None = None
    drift: DriftRecord | None = None
    drift_error: str | None = None
    replay_ratio: float | None = None
    language_mix: LanguageMixRecord | None = None
    curation: CurationRecord | None = None
    schedule: SchedulePolicy | None = None  # after drift adjustments
    train: TrainRecord | None = None
    eval_progress: EvalProgress | None = None
    eval: EvalSummary | None = None
    gate: GateRecord | None = None
    candidate: str | None = None  # checkpoint directory the gate chose
    approval: ApprovalRecord | None = None  # deploy.mode approve
    shadow: ShadowRecord | None = None  # deploy.mode shadow
    deploy_wait: DeployWait | None = None
    deploy: DeploySummary | None = None
    watch: WatchRecord | None = None
    rollback: RollbackRecord | None = None
    deployed_at: float | None = None
    docs: DocsFate | None = None

    @property
    def cancelled(self) -> bool:
        return self.state == RoundState.FAILED and (self.error or "").startswith(CANCEL_CAUSE)

    def to_store(self) -> dict[str, Any]:
        return self.model_dump(mode="json")


class RoundSummary(BaseModel):
    """One line of `GET /rounds` and `cptd rounds`."""

    id: str
    state: RoundState
    trigger: str
    created_at: float
    updated_at: float
    docs: int | None = None
    tokens_estimate: int | None = None
    drift_score: float | None = None
    replay_ratio: float | None = None
    step: int | None = None
    total_steps: int | None = None
    gate: bool | None = None
    chosen: str | None = None
    deployed_at: float | None = None
    error: str | None = None

    @classmethod
    def of(cls, rec: RoundRecord) -> RoundSummary:
        prog = rec.train.progress if rec.train else TrainProgress()
        return cls(
            id=rec.id,
            state=rec.state,
            trigger=rec.trigger.kind,
            created_at=rec.created_at,
            updated_at=rec.updated_at,
            docs=rec.snapshot.docs if rec.snapshot else None,
            tokens_estimate=rec.snapshot.tokens_estimate if rec.snapshot else None,
            drift_score=rec.drift.score if rec.drift else None,
            replay_ratio=rec.replay_ratio,
            step=prog.step,
            total_steps=prog.total_steps,
            gate=rec.gate.accepted if rec.gate else None,
            chosen=rec.gate.chosen if rec.gate else None,
            deployed_at=rec.deployed_at,
            error=rec.error,
        )


class TriggerResult(BaseModel):
    """Answer to `POST /rounds`: the round started, or why not, or queued for the lease holder."""

    request_id: str
    round: str | None = None
    refused: str | None = None
    note: str | None = None
    queued: bool = False
    lease_holder: str | None = None


class CancelResult(BaseModel):
    round: str
    cancel_requested: bool
    state: RoundState


class ApprovalResult(BaseModel):
    """Answer to `POST /rounds/{id}/approve|reject` and `cptd approve|reject`: the decision is kept in Redis; the lease
    holder's round, waiting in AWAITING_APPROVAL, acts on it within a second."""

    round: str
    decision: str  # approved | rejected
    state: RoundState


class RollbackResult(BaseModel):
    """Answer to `POST /rollback` and `cptd rollback`: done (ok or not), or queued for the lease holder.

    Sent to a daemon that does not hold the lease, the rollback is carried out by the holder (`request_id`,
    `lease_holder`); `queued` means the holder had not answered within the wait, and `record` is then absent."""

    model_config = ConfigDict(populate_by_name=True)

    ok: bool
    from_version: str | None = Field(default=None, alias="from")
    to: str
    error: dict[str, str] | None = None
    record: DeploySummary | None = None
    queued: bool = False
    request_id: str | None = None
    lease_holder: str | None = None
