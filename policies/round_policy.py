"""When a round starts, how big it is, and when and whether its checkpoint may be swapped in.

Triggers (TriggerPolicy) are the operator's answer to "how often do we pay for a
round": a crontab time, a fixed interval, a volume of new data, or a measured
drift. Whatever fires, `should_start` applies the same rules, so a round never
starts while another runs or on an empty buffer, and automatic triggers keep a
minimum gap between round starts so that two triggers firing together (cron
and buffer volume, say) cost one round, not two. A manual trigger is an
operator's explicit request and skips the gap and the minimum size.

Blackout windows are crontab expressions too: every minute one of them
matches is a minute in which no checkpoint may be swapped into serving (a
launch, a peak hour). Training may run during a blackout; only the swap waits
for `next_swap_allowed`.

Crontab semantics. APScheduler 3.x's `CronTrigger.from_crontab` numbers
weekdays from Monday = 0, while crontab(5) numbers them from Sunday = 0 (the
project's issue 286; fixed only in APScheduler 4). An operator who writes
"* 9-17 * * 1-5" means Monday to Friday, so `cron_trigger` rewrites the
day-of-week field into weekday names before APScheduler sees it. crontab(5)
also ORs a restricted day-of-month with a restricted day-of-week where
APScheduler ANDs them; rather than pick one meaning silently, an expression
restricting both is refused (write two expressions instead).

Whether an accepted candidate is swapped in at all is the deploy mode
(DeployPolicy): `auto` deploys it, `shadow` stops short of serving and records
what it would have deployed, `approve` waits for an operator's decision, and
one not given within `approval_timeout_s` counts as a rejection.

All functions here are pure: `now` is passed in, nothing is read from a clock.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from functools import lru_cache
from pathlib import PurePath
from typing import Literal
from zoneinfo import ZoneInfo

from apscheduler.triggers.cron import CronTrigger
from pydantic import Field, field_validator

from policies.base import Section

TRIGGER_KINDS = ("manual", "cron", "interval", "buffer", "drift")

_STD_WEEKDAYS = ("sun", "mon", "tue", "wed", "thu", "fri", "sat")  # crontab(5): 0 (and 7) = Sunday


def _weekday_number(token: str, expr: str) -> int:
    t = token.strip().lower()
    if t.isdigit():
        n = int(t)
        if not 0 <= n <= 7:
            raise ValueError(f"day-of-week {token!r} out of range 0-7 in {expr!r}")
        return n
    if t in _STD_WEEKDAYS:
        return _STD_WEEKDAYS.index(t)
    raise ValueError(f"unknown day-of-week {token!r} in {expr!r}")


def _crontab_weekdays(field: str, expr: str) -> str:
    """A crontab(5) day-of-week field (0/7 = Sunday) as an APScheduler list of weekday names."""
    if field == "*":
        return field
    days: set[int] = set()
    for item in field.split(","):
        base, _, step_s = item.partition("/")
        step = 1
        if step_s:
            if not step_s.isdigit() or int(step_s) < 1:
                raise ValueError(f"bad day-of-week step {item!r} in {expr!r}")
            step = int(step_s)
        if base == "*":
            lo, hi = 0, 6
        elif "-" in base:
            a, _, b = base.partition("-")
            lo, hi = _weekday_number(a, expr), _weekday_number(b, expr)
            if lo > hi:
                raise ValueError(f"day-of-week range {base!r} runs backwards in {expr!r}")
        else:
            lo = _weekday_number(base, expr)
            hi = 7 if step_s else lo  # "N/S" means N through the end, stepping S (vixie cron)
        days.update(d % 7 for d in range(lo, hi + 1, step))
    return ",".join(_STD_WEEKDAYS[d] for d in sorted(days))


def cron_trigger(expr: str, tz: str | timezone | ZoneInfo = "UTC") -> CronTrigger:
    """A CronTrigger for a 5-field crontab expression with crontab(5) meaning (see the module doc).

    Raises ValueError naming the expression when it is not valid.
    """
    fields = expr.split()
    if len(fields) != 5:
        raise ValueError(f"cron expression {expr!r} has {len(fields)} fields, expected 5 (minute hour day month weekday)")
    minute, hour, day, month, dow = fields
    if day != "*" and dow != "*":
        raise ValueError(
            f"cron expression {expr!r} restricts both day-of-month and day-of-week, which crontab ORs "
            "and APScheduler ANDs; write two expressions instead"
        )
    zone = ZoneInfo(tz) if isinstance(tz, str) else tz
    try:
        return CronTrigger(minute=minute, hour=hour, day=day, month=month, day_of_week=_crontab_weekdays(dow, expr), timezone=zone)
    except ValueError as e:
        if repr(expr) in str(e):
            raise
        raise ValueError(f"invalid cron expression {expr!r}: {e}") from e


@lru_cache(maxsize=256)
def _cached_trigger(expr: str, tz: str) -> CronTrigger:
    return cron_trigger(expr, tz)


def _check_cron(expr: str) -> str:
    cron_trigger(expr)  # raises ValueError naming the expression
    return expr


def is_harness_task(path: str | PurePath) -> bool:
    """A suite value naming an lm-eval task YAML (else it is a multiple-choice JSONL)."""
    return PurePath(path).suffix.lower() in (".yaml", ".yml")


class TriggerPolicy(Section):
    """What may start a round. Every trigger left unset (None) is off; with all off, only manual rounds run."""

    cron: str | None = Field(
        default=None,
        description='5-field crontab expression (crontab(5) meaning, weekday 0 = Sunday) that starts a round, e.g. "0 3 * * *"',
    )
    interval_s: float | None = Field(default=None, gt=0, description="start a round every this many seconds")
    buffer_tokens: int | None = Field(
        default=None, ge=1, description="start a round when at least this many estimated tokens wait in the buffer"
    )
    drift_score: float | None = Field(
        default=None, gt=0, le=1, description="start a round when a periodic probe's drift score reaches this"
    )
    drift_probe_interval_s: float = Field(
        default=600, ge=10, description="how often the drift trigger probes the buffer against the replay set (a probe costs GPU time)"
    )
    buffer_check_interval_s: float = Field(default=10, ge=0.5, description="how often the buffer trigger reads the buffer size")
    min_gap_s: float = Field(
        default=3600,
        ge=0,
        description="least time between the start of one round and the start of the next, for automatic triggers; "
        "manual triggers ignore it",
    )
    blackout: list[str] = Field(
        default=[],
        description="crontab expressions; any minute one of them matches is a blackout minute in which no checkpoint swap may happen",
    )
    timezone: str = Field(default="UTC", description="IANA time zone in which cron and blackout expressions are read")

    @field_validator("cron")
    @classmethod
    def _valid_cron(cls, v: str | None) -> str | None:
        return None if v is None else _check_cron(v)

    @field_validator("blackout")
    @classmethod
    def _valid_blackout(cls, v: list[str]) -> list[str]:
        for expr in v:
            _check_cron(expr)
        return v

    @field_validator("timezone")
    @classmethod
    def _valid_timezone(cls, v: str) -> str:
        try:
            ZoneInfo(v)
        except Exception as e:  # ZoneInfoNotFoundError, or ValueError for malformed keys
            raise ValueError(f"unknown time zone {v!r}") from e
        return v


class RoundsPolicy(Section):
    """The shape of a round: how much data it takes, what it holds out, what it keeps afterwards."""

    budget_tokens: int = Field(default=2_000_000, ge=1, description="most estimated tokens of new data one round takes from the buffer")
    min_tokens: int = Field(default=1, ge=1, description="automatic triggers do not start a round with fewer estimated tokens waiting")
    bytes_per_token: float = Field(
        default=4.0, gt=0, description="tokens are estimated as bytes / bytes_per_token, as in the cptd_buffer_tokens_estimate metric"
    )
    heldout_frac: float = Field(
        default=0.05, ge=0, lt=0.5, description="fraction of the round's new documents held out for evaluation, never trained on"
    )
    heldout_max_docs: int = Field(default=256, ge=0, description="cap on the held-out new documents")
    replay_heldout_docs: int = Field(default=256, ge=0, description="replay documents held out for the forgetting eval")
    eval_checkpoints: int = Field(
        default=2, ge=0, description="newest mid-round checkpoints scored besides the final one (measures the stability gap)"
    )
    keep_rounds: int = Field(
        default=3,
        ge=1,
        description="finished round directories kept on disk (newest, whatever their end state), besides the live version's, its "
        "rollback target's and a kept adapter's, which are never deleted",
    )
    keep_records: int = Field(
        default=200,
        ge=1,
        description="finished round records kept in Redis (newest); older ones are archived as JSON under "
        "$CPTD_CHECKPOINT_DIR/records/ and still served by GET /rounds/{id}",
    )
    min_free_gb: float | None = Field(
        default=None,
        ge=0,
        description="free space (GB) the checkpoint volume must have for a round to start; default (unset): estimated "
        "from the parent checkpoint's size, the train mode and train.keep_checkpoints (round_disk_bytes)",
    )
    watch_s: float = Field(
        default=0, ge=0, le=3600, description="post-deploy watch window in seconds before a round counts as settled (0: none)"
    )
    lease_ttl_s: float = Field(
        default=30, ge=3, le=600, description="time to live of the round lease; a daemon that stops renewing it loses the round to another"
    )
    redis_outage_s: float = Field(
        default=120,
        ge=0,
        le=3600,
        description="how long a round waits out Redis being unreachable inside a phase (retried with back-off) before it fails; "
        "0: the first such error fails the round; the lease still ends after 0.8 lease_ttl_s without Redis (docs/architecture.md §3)",
    )
    reconcile_interval_s: float = Field(
        default=60,
        ge=1,
        le=86400,
        description="between deploys, how often the lease holder reads each replica's weight label and adapters; one that "
        "is out of step (a restarted server serves its boot checkpoint) is reconciled back to the deployed version",
    )
    suites: dict[str, str] = Field(
        default={},
        description="regression suite name -> a multiple-choice JSONL path, or an lm-evaluation-harness task YAML (.yaml/.yml) "
        "scored by lm-eval itself",
    )
    canaries: str | None = Field(default=None, description="JSONL path of canary prompts checked after a swap")


DEPLOY_MODES = ("auto", "shadow", "approve")


class DeployPolicy(Section):
    """What happens to a candidate the gate accepted (docs/round-engine.md, Deploy modes)."""

    mode: Literal["auto", "shadow", "approve"] = Field(
        default="auto",
        description="auto: deploy every accepted candidate; shadow: run every phase but DEPLOYING and record what would have "
        "been deployed (the round ends SHADOWED, no replica is touched); approve: wait in AWAITING_APPROVAL for "
        "`cptd approve ID` or `cptd reject ID` (or POST /rounds/ID/approve|reject)",
    )
    approval_timeout_s: float = Field(
        default=86400,
        ge=1,
        le=30 * 86400,
        description="approve mode: a round waiting longer than this for a decision is rejected (ends REJECTED, its documents "
        "released as after a gate rejection)",
    )


def estimate_tokens(nbytes: int, policy: RoundsPolicy) -> int:
    """Estimated tokens in `nbytes` of UTF-8 text: floor(bytes / bytes_per_token), cheap enough to keep per document."""
    return math.floor(nbytes / policy.bytes_per_token)


def _minute_utc(now: datetime) -> datetime:
    if now.tzinfo is None or now.utcoffset() is None:
        raise ValueError("now must be timezone-aware (a naive datetime has no minute in the policy's time zone)")
    return now.astimezone(timezone.utc).replace(second=0, microsecond=0)


def _blackout_at(minute_utc: datetime, policy: TriggerPolicy) -> str | None:
    local = minute_utc.astimezone(ZoneInfo(policy.timezone))
    for expr in policy.blackout:
        if _cached_trigger(expr, policy.timezone).get_next_fire_time(None, local) == local:
            return expr
    return None


def blackout_match(now: datetime, policy: TriggerPolicy) -> str | None:
    """The first blackout expression matching the minute of `now` (read in policy.timezone), or None.

    `now` must be timezone-aware.
    """
    return _blackout_at(_minute_utc(now), policy)


def next_swap_allowed(now: datetime, policy: TriggerPolicy, horizon_minutes: int = 7 * 24 * 60) -> datetime | None:
    """When a swap may next happen: `now` itself when its minute is outside every blackout,
    else the start of the first later minute that is; None when none is within `horizon_minutes`.

    Steps in UTC minutes, so daylight-saving changes neither skip nor repeat a minute.
    The answer is in `now`'s time zone.
    """
    m = _minute_utc(now)
    if _blackout_at(m, policy) is None:
        return now
    for i in range(1, horizon_minutes + 1):
        cand = m + timedelta(minutes=i)
        if _blackout_at(cand, policy) is None:
            return cand.astimezone(now.tzinfo)
    return None


@dataclass(frozen=True)
class TriggerCheck:
    start: bool
    reason: str  # shown to operators (status, logs, the trigger API's answer)


def should_start(
    kind: str,
    now: float,
    last_round_start: float | None,
    round_active: bool,
    buffer_tokens: int,
    policy_rounds: RoundsPolicy,
    policy_triggers: TriggerPolicy,
) -> TriggerCheck:
    """Whether a trigger of `kind` starts a round now. `now` and `last_round_start` are Unix seconds.

    Checked in order: one round at a time; never on an empty buffer; a manual
    trigger then starts. Automatic triggers also need min_tokens waiting, a
    buffer trigger its threshold (re-checked: the buffer may have changed since
    the job looked), and min_gap_s since the last round started.
    """
    if kind not in TRIGGER_KINDS:
        raise ValueError(f"unknown trigger kind {kind!r}; expected one of {', '.join(TRIGGER_KINDS)}")
    if round_active:
        return TriggerCheck(False, "a round is already running")
    if buffer_tokens <= 0:
        return TriggerCheck(False, "buffer is empty")
    if kind == "manual":
        return TriggerCheck(True, f"manual trigger ({buffer_tokens} tokens in the buffer)")
    if buffer_tokens < policy_rounds.min_tokens:
        return TriggerCheck(False, f"buffer holds {buffer_tokens} tokens < min_tokens {policy_rounds.min_tokens}")
    threshold = policy_triggers.buffer_tokens
    if kind == "buffer" and threshold is not None and buffer_tokens < threshold:
        return TriggerCheck(False, f"buffer holds {buffer_tokens} tokens < trigger threshold {threshold}")
    if last_round_start is not None:
        since = now - last_round_start
        if since < policy_triggers.min_gap_s:
            remaining = math.ceil(policy_triggers.min_gap_s - since)
            return TriggerCheck(
                False, f"last round started {since:.0f} s ago; {remaining} s of the {policy_triggers.min_gap_s:g} s minimum gap remain"
            )
    if kind == "buffer":
        if threshold is None:
            return TriggerCheck(True, f"buffer trigger ({buffer_tokens} tokens in the buffer)")
        return TriggerCheck(True, f"buffer holds {buffer_tokens} tokens >= {threshold}")
    if kind == "drift":
        return TriggerCheck(True, f"drift trigger (score reached {policy_triggers.drift_score})")
    if kind == "cron":
        return TriggerCheck(True, f"cron trigger ({policy_triggers.cron})")
    return TriggerCheck(
        True, f"interval trigger (every {policy_triggers.interval_s:g} s)" if policy_triggers.interval_s else "interval trigger"
    )


def _rank(seed: str, key: str) -> bytes:
    # NUL between seed and key, so ("ab", "c") and ("a", "bc") rank differently.
    return hashlib.blake2b(f"{seed}\x00{key}".encode(), digest_size=16).digest()


def split_heldout(keys: Sequence[str], frac: float, max_docs: int, seed: str) -> tuple[list[str], list[str]]:
    """Split `keys` into (train, heldout), deterministically for a given seed.

    The held-out keys are the min(max_docs, floor(frac * n)) with the smallest
    blake2b(seed, key) digests: a stable pseudo-random sample that does not
    depend on arrival order, so a resumed round holds out the same documents.
    With n >= 2, frac > 0 and max_docs > 0 at least one key is held out and at
    least one is left to train on. Both lists keep the input order.
    """
    if not 0 <= frac < 1:
        raise ValueError(f"heldout frac must be in [0, 1), got {frac}")
    if max_docs < 0:
        raise ValueError(f"heldout max_docs must be >= 0, got {max_docs}")
    n = len(keys)
    k = min(max_docs, math.floor(frac * n + 1e-9))
    if n >= 2 and frac > 0 and max_docs > 0:
        k = min(max(k, 1), n - 1)
    else:
        k = min(k, max(n - 1, 0))
    if k == 0:
        return list(keys), []
    ranked = sorted(range(n), key=lambda i: (_rank(seed, keys[i]), i))
    held = set(ranked[:k])
    train = [keys[i] for i in range(n) if i not in held]
    heldout = [keys[i] for i in range(n) if i in held]
    return train, heldout


def prune_rounds(finished: Sequence[str], protected: set[str], keep: int) -> list[str]:
    """Round ids (oldest first in `finished`) whose directories (or records) may go: all but the newest
    `keep`, never one in `protected` (the live round, its rollback target, what a replica still serves)."""
    if keep < 0:
        raise ValueError(f"keep must be >= 0, got {keep}")
    old = finished[: max(len(finished) - keep, 0)]
    return [r for r in old if r not in protected]


# Bytes per parameter of AdamW's state and of fp32 master weights, as the trainer writes them in a checkpoint
# (daemon/jobs/trainer.py: two fp32 moments per trainable parameter; masters when the parent is not fp32).
ADAM_STATE_BYTES = 8
MASTER_BYTES = 4
GB = 10**9  # rounds.min_free_gb is in these


def round_disk_bytes(
    parent_bytes: int,
    param_bytes: int,
    mode: str,
    keep_checkpoints: int,
    mainline: bool,
    data_bytes: int = 0,
    adapter_fraction: float = 1.0,
    staged: bool = False,
) -> int:
    """What a round writes to the checkpoint volume at its peak, from the sizes the daemon measured.

    As the trainer writes them (daemon/jobs/trainer.py `checkpoint`): a resumable checkpoint holds the weights in the
    parent's dtype (`parent_bytes`), the fp32 masters when that dtype is narrower (`param_bytes` < 4) and, for the
    newest only, AdamW's two fp32 moments. The peak is while a checkpoint is written: the newest and the new one with
    their moments, `keep_checkpoints` - 1 older ones without, then `final/` (the weights) and, on the infinite
    schedule, `mainline/` (a resumable state that keeps its moments: the next round continues from it). An adapter
    round writes the same shape of files for its adapter only: `adapter_fraction` is the adapter's parameters over
    the base's (about 2 r / hidden for square projections). `data_bytes` covers the round's data files. `staged`: checkpoints
    on object storage, where the volume is local scratch that also holds the copies the trainer reads, the parent's
    weights and, on the infinite schedule, the main line (the published candidate is uploaded from the round's own
    files, so it costs no more scratch).
    """
    if parent_bytes < 0 or param_bytes <= 0 or keep_checkpoints < 1 or not 0 < adapter_fraction <= 1:
        raise ValueError(f"bad sizes: parent {parent_bytes} B, {param_bytes} B/param, keep {keep_checkpoints}, adapter {adapter_fraction}")
    weights, masters, moments = _checkpoint_parts(parent_bytes, param_bytes, mode, adapter_fraction)
    checkpoint = weights + masters + moments
    total = 2 * checkpoint + (keep_checkpoints - 1) * (weights + masters) + weights + (checkpoint if mainline else 0)
    if staged:
        total += parent_bytes + (checkpoint if mainline else 0)
    return math.ceil(total) + max(data_bytes, 0)


def _checkpoint_parts(parent_bytes: int, param_bytes: int, mode: str, adapter_fraction: float) -> tuple[float, float, float]:
    """(weights, fp32 masters, AdamW moments) of one resumable checkpoint, in bytes."""
    params = parent_bytes / param_bytes
    if mode == "full":
        return float(parent_bytes), params * MASTER_BYTES if param_bytes < MASTER_BYTES else 0.0, params * ADAM_STATE_BYTES
    # lora / qlora: fp32 adapter weights (they are their own masters) and their AdamW state; the base is never written
    return params * adapter_fraction * MASTER_BYTES, 0.0, params * adapter_fraction * ADAM_STATE_BYTES


def volume_bytes(
    parent_bytes: int,
    param_bytes: int,
    mode: str,
    keep_checkpoints: int,
    mainline: bool,
    keep_rounds: int,
    data_bytes: int = 0,
    adapter_fraction: float = 1.0,
) -> int:
    """The checkpoint volume a deployment needs in its steady state, to size the volume by (docs/kubernetes.md).

    The base model, the running round at its peak (`round_disk_bytes`), and the finished rounds retention keeps:
    the newest `keep_rounds` plus the live version's and its rollback target's when they are older (two more at
    most). A finished round keeps its candidate's weights and, on the infinite schedule, its `mainline/` state;
    its other checkpoints are shed when it ends (daemon/rounds/retention.py `shed_checkpoints`).
    """
    running = round_disk_bytes(parent_bytes, param_bytes, mode, keep_checkpoints, mainline, data_bytes, adapter_fraction)
    weights, masters, moments = _checkpoint_parts(parent_bytes, param_bytes, mode, adapter_fraction)
    finished = weights + (weights + masters + moments if mainline else 0) + max(data_bytes, 0)
    return math.ceil(parent_bytes + running + (keep_rounds + 2) * finished)


def disk_refusal(free_bytes: int, needed_bytes: int) -> str | None:
    """Why a round may not start on this volume: it would fill it mid-training (a round that fails late wastes the
    hours before and can leave a half-written checkpoint). None when the space is there."""
    if free_bytes >= needed_bytes:
        return None
    return (
        f"the checkpoint volume has {free_bytes:,} bytes free ({free_bytes / GB:.2f} GB) but the round needs "
        f"{needed_bytes:,} bytes ({needed_bytes / GB:.2f} GB); free space (a lower rounds.keep_rounds, old files) "
        "or set rounds.min_free_gb"
    )
