"""Checkpoints on object storage (CPTD_CHECKPOINT_URL): what a job reads is copied into scratch, what a round
publishes is copied out.

Jobs read and write local directories only (their spec names paths, and they get no credentials). So on object
storage the daemon stages: before TRAINING, EVALUATING or a drift probe, `local_copy` brings a checkpoint the job
reads (the parent, the main line) into `CHECKPOINT_DIR/cache/`; when the gate accepts, `publish` copies the chosen
candidate (and the infinite schedule's main line) to `CHECKPOINT_URL/rounds/ID/`, and the deploy, a rollback and
the next round name it by that URL. vLLM streams it from there (`--load-format runai_streamer`). Without a
checkpoint URL every function here returns the local path it was given: nothing moves.
"""

from __future__ import annotations

import hashlib
import logging
import shutil
import time
from pathlib import Path

from connectors.object_store import COMPLETE, ObjectStore, is_object_url, join
from daemon.rounds.context import RoundContext

log = logging.getLogger("cptd.rounds")

CACHE = "cache"  # CHECKPOINT_DIR/cache/<hash of the URL>: staged copies of checkpoints on the store


def objects(ctx: RoundContext) -> ObjectStore | None:
    """The object store of this daemon (made at first use), or None without CPTD_CHECKPOINT_URL."""
    if ctx.settings.checkpoint_url is None:
        return None
    if ctx.objects is None:
        ctx.objects = ObjectStore.connect()
    return ctx.objects


def round_url(ctx: RoundContext, rid: str) -> str | None:
    url = ctx.settings.checkpoint_url
    return join(url, "rounds", rid) if url is not None else None


def cache_dir(ctx: RoundContext, ref: str) -> Path:
    return ctx.settings.checkpoint_dir / CACHE / hashlib.sha256(ref.rstrip("/").encode()).hexdigest()[:16]


def local_copy(ctx: RoundContext, ref: str) -> str:
    """A local directory holding checkpoint `ref`: `ref` itself when it is a path, else its staged copy (downloaded
    once; the path is a function of the URL, so a spec written before a restart names the same place)."""
    if not is_object_url(ref):
        return ref
    store = objects(ctx)
    assert store is not None, f"{ref}: an s3:// checkpoint but no CPTD_CHECKPOINT_URL"
    dst = cache_dir(ctx, ref)
    if not dst.is_dir():
        t0 = time.monotonic()
        dst.parent.mkdir(parents=True, exist_ok=True)
        store.download_dir(ref, dst)
        log.info("staged checkpoint", extra={"url": ref, "path": str(dst), "seconds": round(time.monotonic() - t0, 2)})
    return str(dst)


def publish(ctx: RoundContext, rid: str, local: str, name: str) -> str:
    """Copy a round's local checkpoint to CHECKPOINT_URL/rounds/ID/NAME and return that URL; without a checkpoint
    URL, `local` unchanged. Idempotent: a copy cut short (no completion marker) is finished by the next call."""
    url = round_url(ctx, rid)
    store = objects(ctx)
    if url is None or store is None:
        return local
    target = join(url, name)
    if not store.complete(target):
        t0 = time.monotonic()
        sent = store.upload_dir(local, target)
        log.info("published checkpoint", extra={"round_id": rid, "url": target, "bytes": sent, "seconds": round(time.monotonic() - t0, 2)})
    return target


def published_mainline(ctx: RoundContext, rid: str) -> str | None:
    """The main line a deployed round published (infinite schedule), or None when it has none there."""
    url, store = round_url(ctx, rid), objects(ctx)
    if url is None or store is None:
        return None
    target = join(url, "mainline")
    return target if store.complete(target) else None


def stored_rounds(ctx: RoundContext) -> list[str]:
    """Round ids with objects under CHECKPOINT_URL/rounds/ (empty without a checkpoint URL)."""
    url, store = ctx.settings.checkpoint_url, objects(ctx)
    return store.children(join(url, "rounds")) if url is not None and store is not None else []


def delete_round(ctx: RoundContext, rid: str) -> int:
    """Delete a round's objects (its published candidate and main line); returns how many. Its staged copies in
    the cache go too."""
    url, store = round_url(ctx, rid), objects(ctx)
    if url is None or store is None:
        return 0
    for name in ("final", "mainline"):
        shutil.rmtree(cache_dir(ctx, join(url, name)), ignore_errors=True)
    return store.delete_prefix(url)


def drop_stale_cache(ctx: RoundContext, keep: set[str]) -> None:
    """Remove staged copies of checkpoints other than `keep` (URLs): scratch holds what the next round reads."""
    root = ctx.settings.checkpoint_dir / CACHE
    if not root.is_dir():
        return
    wanted = {cache_dir(ctx, u).name for u in keep}
    for d in root.iterdir():
        if d.name not in wanted and not d.name.endswith(".tmp"):
            shutil.rmtree(d, ignore_errors=True)


__all__ = ["COMPLETE", "delete_round", "drop_stale_cache", "local_copy", "objects", "publish", "published_mainline", "round_url"]
