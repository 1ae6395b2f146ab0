"""Redis data loss: what Redis remembers of this deployment, checked against what the checkpoint volume remembers.

Redis holds the deployment's history: the round ids handed out (`round_seq`), the round records, what every replica
serves (the ServingState) and the accounted Kafka offsets. It can lose some or all of it: a restart with
`appendfsync everysec` loses the last second, a FLUSHALL or a new empty volume loses everything. Going on as if
nothing happened would repeat round ids (reusing old round directories) and, with the serving state gone, label
whatever the replicas serve as `base`. So the checkpoint volume ($CPTD_CHECKPOINT_DIR, which every daemon and
vLLM mount) keeps three witnesses that Redis must agree with:

* `redis-identity.json`: the identity (uuid, creation time) the first daemon wrote into an empty namespace, in
  Redis (`identity`) and here. Redis without it, or with another, lost its data or is another deployment's.
* `rounds/rNNNNN/`: a round directory numbered above Redis's `round_seq` is a round Redis forgot.
* `serving-state.json`: a copy of the ServingState, written after every save to Redis. A volume copy with no state
  in Redis means the serving state was lost.

While they disagree the round runner refuses rounds and take-over (nothing is adopted as `base`), sets
`cptd_redis_data_loss`, logs the cause and shows it in /status with what to do; ingest goes on (its offsets are
checked per batch, docs/ingest.md). After checking, the operator runs `cptd accept-redis-reset`, which makes
Redis agree again: identity re-marked, `round_seq` above every round directory, the serving state restored from
the volume's copy. Round numbers also stay above every directory without it (`RedisStore.next_round_number`).
"""

from __future__ import annotations

import os
import re
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

from pydantic import BaseModel

from connectors.redis_store import Fence, RedisStore
from daemon.rounds.context import write_atomic

IDENTITY_FILE = "redis-identity.json"
SERVING_FILE = "serving-state.json"
_ROUND_DIR = re.compile(r"r(\d+)")

ACTION = (
    "rounds and take-over are refused until an operator checks what was lost: compare `cptd rounds` and what the "
    "replicas serve with the round directories on the checkpoint volume; then run `cptd accept-redis-reset` in a daemon "
    "pod to see what it would change, and `cptd accept-redis-reset --yes` to re-mark Redis (identity, round_seq above "
    "every round directory, the serving state saved on the volume). Runbook: docs/monitoring.md#cptdredisdataloss"
)


class Identity(BaseModel):
    """One deployment's Redis history; `reset_accepted_at`: when an operator last accepted a Redis that lost data."""

    id: str
    created_at: float
    reset_accepted_at: float | None = None


def volume_identity(checkpoint_dir: Path) -> Identity | None:
    p = checkpoint_dir / IDENTITY_FILE
    return Identity.model_validate_json(p.read_text(encoding="utf-8")) if p.exists() else None


def highest_round_on_disk(checkpoint_dir: Path) -> int:
    """The number of the highest round directory (`rounds/rNNNNN`) on the volume; 0 when there is none."""
    rounds = checkpoint_dir / "rounds"
    if not rounds.is_dir():
        return 0
    return max((int(m.group(1)) for e in os.scandir(rounds) if (m := _ROUND_DIR.fullmatch(e.name))), default=0)


def saved_serving(checkpoint_dir: Path) -> str | None:
    """The ServingState JSON last saved on the volume, None when there is none."""
    p = checkpoint_dir / SERVING_FILE
    return p.read_text(encoding="utf-8") if p.exists() else None


def put_serving(store: RedisStore, fence: Fence, checkpoint_dir: Path, serving: str) -> None:
    """Save the ServingState in Redis under the fence, then its copy on the volume (only once Redis took it, so a
    fenced-out daemon writes no copy). The copy can be one save behind after a crash in between: reconcile, which
    runs at every take-over, reads the truth from the replicas."""
    store.put_serving(fence, serving)
    checkpoint_dir.mkdir(parents=True, exist_ok=True)
    write_atomic(checkpoint_dir / SERVING_FILE, serving.encode())


def check(store: RedisStore, checkpoint_dir: Path) -> str | None:
    """None when Redis's history agrees with the volume's, else the cause (each disagreement, in words).

    A namespace and volume with no identity and no round Redis does not know (a new deployment, or one from before
    identities) are marked, Redis first (only where none exists: two daemons starting together agree on one);
    a volume without the identity Redis holds gets it (a new volume, or a daemon that died between the two writes).
    """
    vol, raw = volume_identity(checkpoint_dir), store.identity()
    red = Identity.model_validate_json(raw) if raw else None
    seq, top = store.round_seq(), highest_round_on_disk(checkpoint_dir)
    causes = []
    if red is None and vol is None and top <= seq:
        red = Identity.model_validate_json(store.set_identity(Identity(id=uuid.uuid4().hex, created_at=time.time()).model_dump_json()))
    if red is not None and vol is None:
        checkpoint_dir.mkdir(parents=True, exist_ok=True)
        write_atomic(checkpoint_dir / IDENTITY_FILE, red.model_dump_json().encode())
    elif vol is not None and red is None:
        causes.append(f"Redis has no identity but the checkpoint volume has {vol.id}: Redis was emptied or replaced")
    elif vol is not None and red is not None and vol.id != red.id:
        causes.append(f"Redis holds identity {red.id}, the checkpoint volume {vol.id}: this Redis holds another history")
    if top > seq:
        causes.append(f"round directory r{top:05d} is on the checkpoint volume but Redis's last round number is {seq}: Redis lost rounds")
    if store.get_serving() is None and saved_serving(checkpoint_dir) is not None:
        causes.append("the checkpoint volume has a saved serving state but Redis has none: Redis lost what the replicas serve")
    return "; ".join(causes) or None


@dataclass
class ResetPlan:
    """What `cptd accept-redis-reset` changes (or changed, once applied), in words, and the identity it keeps."""

    cause: str | None
    changes: list[str]
    identity: Identity
    todo: list[str] = field(default_factory=list)  # what the operator still has to do that this cannot


def accept_reset(store: RedisStore, checkpoint_dir: Path, apply: bool) -> ResetPlan:
    """Make Redis agree with the volume again, after an operator checked what was lost.

    The volume's identity is kept (the history goes on) and written into Redis; `round_seq` is raised to the
    highest round directory; the serving state saved on the volume is put back where Redis has none, so the next
    take-over reconciles the replicas to it instead of adopting them as `base`. Round records and buffered
    documents Redis lost are not brought back: Kafka still has the messages until its retention (docs/monitoring.md).
    With `apply` False nothing is written.
    """
    cause = check(store, checkpoint_dir)
    vol, raw = volume_identity(checkpoint_dir), store.identity()
    keep = vol or (Identity.model_validate_json(raw) if raw else Identity(id=uuid.uuid4().hex, created_at=time.time()))
    keep = keep.model_copy(update={"reset_accepted_at": time.time()})
    changes = []
    if cause is None:
        return ResetPlan(None, [], keep)
    changes.append(f"write identity {keep.id} into Redis and onto the checkpoint volume")
    seq, top = store.round_seq(), highest_round_on_disk(checkpoint_dir)
    if top > seq:
        changes.append(f"raise round_seq from {seq} to {top} (the next round is r{top + 1:05d})")
    saved = saved_serving(checkpoint_dir) if store.get_serving() is None else None
    if saved is not None:
        changes.append(f"restore the serving state saved on the checkpoint volume ({checkpoint_dir / SERVING_FILE})")
    todo = []
    if store.replay_stats()["replay_docs"] == 0:  # lost with the rest: every round's gate would reject (heldout_empty)
        todo.append(
            "the replay reservoir is empty: re-seed it with `cptd seed-replay FILE.jsonl` (a sample of the original "
            "pre-training mix); until then every round is rejected, forgetting cannot be measured"
        )
    if apply:
        store.set_identity(keep.model_dump_json(), replace=True)
        write_atomic(checkpoint_dir / IDENTITY_FILE, keep.model_dump_json().encode())
        if top > seq:
            store.set_round_seq(top)
        if saved is not None:
            store.restore_serving(saved)
    return ResetPlan(cause, changes, keep, todo)
