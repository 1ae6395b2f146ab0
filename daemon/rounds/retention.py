"""Retention: what finished rounds leave behind stays bounded, whichever way they ended.

`tidy` runs at every terminal state (DEPLOYED, REJECTED, FAILED, ROLLED_BACK, SHADOWED, the operator's rollback
included), with the policy in force, so lowering a cap frees space at the next round's end:

* round directories (and, on object storage, the round's objects under CHECKPOINT_URL/rounds/ID/, listed and
  deleted by prefix): the newest `rounds.keep_rounds` finished ones stay, whatever their end state (a failed or
  rejected round's directory holds its logs and eval report, which is what an operator reads about it; its
  weights are useless, but the newest few are the ones asked about). Never deleted: an unfinished round's, the
  live version's, its rollback target's, any version a replica reports, a round whose adapter is still loaded or
  kept, and a directory whose round neither Redis nor the archive knows (Redis may have lost it: not ours to judge).
* resumable checkpoints of finished rounds (`checkpoints/step-*`) are shed as soon as the round ends: nothing
  trains from them again (a next round continues from `mainline/` or from the deployed weights). The one the gate
  chose stays (it is, or may become by `cptd rollback`, a served version), as does any directory serving state
  names. So a finished full-weights round keeps about its weights, not `keep_checkpoints` copies of weights,
  fp32 masters and moments (policies/round_policy.py `volume_bytes` sizes the volume by this).
* round records: the newest `rounds.keep_records` stay in Redis; older finished ones are written whole to
  `$CPTD_CHECKPOINT_DIR/records/<id>.json` and removed from Redis. `GET /rounds/{id}` reads the archive
  (`RoundContext.get_round`). The archive is not the round's directory: that is deleted long before
  (keep_rounds is far below keep_records), and one small file per round is all it costs.
* cancel marks and approval decisions of rounds that ended are removed (they only matter while their round runs).

A failure here (a lost lease included) is logged and never fails a round or a rollback: the next round's end
tries again.
"""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path
from typing import Any

from connectors.redis_store import Fenced, round_number
from daemon.round_record import TERMINAL, RoundRecord
from daemon.rounds import staging
from daemon.rounds.context import RoundContext, Stop, write_atomic
from policies.round_policy import prune_rounds

log = logging.getLogger("cptd.rounds")


def tidy(ctx: RoundContext) -> None:
    """Prune directories, archive old records, forget the cancel marks and decisions of ended rounds (module doc)."""
    rounds = ctx.get_policy().rounds
    try:
        prune_directories(ctx, rounds.keep_rounds)
        shed_checkpoints(ctx)
        archive_records(ctx, rounds.keep_records)
        marks = ctx.store.cancel_marks()
        ctx.store.clear_cancel([rid for rid, raw in zip(marks, ctx.store.get_rounds(marks), strict=True) if not unfinished(raw)])
        decided = ctx.store.approval_marks()
        ctx.store.clear_approvals([rid for rid, raw in zip(decided, ctx.store.get_rounds(decided), strict=True) if not unfinished(raw)])
    except (Stop, Fenced) as e:  # the round has ended already; the next lease holder tidies at its next round's end
        log.warning("retention skipped: lease lost", extra={"reason": str(e)})
    except Exception:  # noqa: BLE001 - retention never fails a round (nor an operator's rollback); the next end retries
        log.exception("retention failed")


def unfinished(raw: dict[str, Any] | None) -> bool:
    return raw is not None and RoundRecord.model_validate(raw).state not in TERMINAL


def protected(ctx: RoundContext) -> set[str]:
    """Rounds whose files serving may still need: live, rollback target, what any replica reports, kept adapters."""
    assert ctx.serving is not None
    state = ctx.serving.state
    out = {v for v in (state.desired_version, state.previous_version) if v}
    out |= {r.version for r in state.replicas.values() if r.version}
    prefix = ctx.serving.lora_name("")  # adapters are named prefix + round id
    out |= {n.removeprefix(prefix) for n in (*state.lora_versions, state.lora_active) if n and n.startswith(prefix)}
    root = ctx.settings.checkpoint_dir / "rounds"
    for path in state.lora_paths.values():
        p = Path(path)
        if p.is_relative_to(root) and p != root:
            out.add(p.relative_to(root).parts[0])
    return out


def prune_directories(ctx: RoundContext, keep: int) -> list[str]:
    """Delete finished round directories beyond the newest `keep`; returns the ids deleted."""
    if ctx.serving is None:  # not knowing what is served, nothing can be called safe to delete
        return []
    root = ctx.settings.checkpoint_dir / "rounds"
    local = {p.name for p in root.iterdir() if p.is_dir()} if root.is_dir() else set()
    stored = set(staging.stored_rounds(ctx))  # on object storage: the rounds with published objects too
    ids = sorted(local | stored, key=round_number)
    finished = [rid for rid, raw in zip(ids, ctx.store.get_rounds(ids), strict=True) if ended(ctx, rid, raw)]
    gone = prune_rounds(finished, protected(ctx), keep)
    for rid in gone:
        shutil.rmtree(root / rid, ignore_errors=True)
        objects = staging.delete_round(ctx, rid) if rid in stored else 0
        ctx.serving.state.versions.pop(rid, None)  # no rollback to a version whose files are gone
        log.info("pruned round directory", extra={"round_id": rid, "objects_deleted": objects})
    if ctx.settings.checkpoint_url is not None:  # staged copies of versions no longer kept leave scratch
        staging.drop_stale_cache(ctx, {v.checkpoint for v in ctx.serving.state.versions.values()})
    return gone


def shed_checkpoints(ctx: RoundContext) -> list[Path]:
    """Delete finished rounds' resumable checkpoints but the gate's choice and what serving names; returns them."""
    if ctx.serving is None:  # not knowing what is served, nothing can be called safe to delete
        return []
    root = ctx.settings.checkpoint_dir / "rounds"
    ids = sorted((p.name for p in root.iterdir() if p.is_dir()), key=round_number) if root.is_dir() else []
    state = ctx.serving.state
    keep = {Path(v.checkpoint) for v in state.versions.values()} | {Path(p) for p in state.lora_paths.values()}
    gone: list[Path] = []
    for rid, raw in zip(ids, ctx.store.get_rounds(ids), strict=True):
        if raw is None:  # archived (long finished, shed then) or unknown to Redis: not ours to judge
            continue
        rec = RoundRecord.model_validate(raw)
        out = Path(rec.train.out_dir) if rec.train is not None and rec.train.out_dir else None
        if rec.state not in TERMINAL or out is None or not out.is_relative_to(root / rid):
            continue
        held = keep | ({Path(rec.candidate)} if rec.candidate else set())
        for step in sorted((out / "checkpoints").glob("step-*")):
            if any(p == step or p.is_relative_to(step) for p in held):
                continue
            shutil.rmtree(step, ignore_errors=True)
            gone.append(step)
    if gone:
        log.info("shed finished rounds' resumable checkpoints", extra={"paths": [str(p) for p in gone]})
    return gone


def ended(ctx: RoundContext, rid: str, raw: dict[str, Any] | None) -> bool:
    """The round finished: its record says so, or it was archived (only finished records are)."""
    if raw is not None:
        return RoundRecord.model_validate(raw).state in TERMINAL
    path = ctx.archived_record_path(rid)
    return path is not None and path.exists()


def archive_records(ctx: RoundContext, keep: int) -> list[str]:
    """Move finished records beyond the newest `keep` out of Redis into the archive; returns the ids moved.

    Reads only the records beyond the cap (one per round in the steady state), never the whole hash."""
    ids = ctx.store.round_ids()
    old = ids[: max(len(ids) - keep, 0)]
    keep_ids = protected(ctx) if ctx.serving is not None else set()
    moved = []
    for rid, raw in zip(old, ctx.store.get_rounds(old), strict=True):
        path = ctx.archived_record_path(rid)
        if raw is None or path is None or rid in keep_ids or unfinished(raw):
            continue
        path.parent.mkdir(parents=True, exist_ok=True)
        write_atomic(path, json.dumps(raw, sort_keys=True).encode())
        moved.append(rid)
    ctx.store.delete_rounds(ctx.fenced(), moved)
    if moved:
        log.info("archived round records", extra={"rounds": moved, "archive": str(ctx.settings.checkpoint_dir / "records")})
    return moved
