"""Redis memory and checkpoint-volume space as gauges, read every few seconds by a thread of the daemon.

Why: a noeviction Redis at its maxmemory refuses writes (ingest stops) and a full checkpoint volume fails every
round. Both build up over weeks, so they are exported for the alerts CptdRedisMemoryNearMax, CptdRedisMaxmemoryUnset
and CptdCheckpointDiskLow (deploy/prometheus/rules.yaml) to warn before either happens. The gauges read 0 until the
first read; the alerts treat 0 totals as "not read yet".
"""

from __future__ import annotations

import logging
import shutil
import threading
import time
from pathlib import Path

from connectors.redis_store import RedisStore
from daemon import metrics as M

log = logging.getLogger("cptd.resources")

INTERVAL_S = 15.0


def read_redis_memory(store: RedisStore) -> bool:
    """Export Redis's used_memory and maxmemory; False (and a counted Redis error) when Redis does not answer."""
    try:
        mem = store.memory_info()
    except Exception as e:  # noqa: BLE001 - a gauge read must not stop the daemon; the last values stay
        M.REDIS_ERRORS.labels("memory_info").inc()
        log.debug("redis memory unavailable", extra={"redis": store.where(), "error": f"{type(e).__name__}: {e}"})
        return False
    M.REDIS_USED_MEMORY.set(int(mem["used_memory"]))
    M.REDIS_MAXMEMORY.set(int(mem["maxmemory"]))
    M.REDIS_MEMORY_READ_AT.set(time.time())
    return True


def read_checkpoint_disk(checkpoint_dir: Path) -> bool:
    """Export free and total bytes of the volume holding `checkpoint_dir` (its nearest existing ancestor before the
    first round creates it); False when the path cannot be read."""
    path = checkpoint_dir
    while not path.exists() and path != path.parent:
        path = path.parent
    try:
        usage = shutil.disk_usage(path)
    except OSError as e:
        log.warning("checkpoint volume unreadable", extra={"path": str(checkpoint_dir), "error": f"{type(e).__name__}: {e}"})
        return False
    M.CHECKPOINT_DISK_FREE.set(usage.free)
    M.CHECKPOINT_DISK_TOTAL.set(usage.total)
    return True


def run(store: RedisStore, checkpoint_dir: Path, stop: threading.Event, interval_s: float = INTERVAL_S) -> None:
    """Read both at once, then every `interval_s` until `stop` is set."""
    while True:
        read_redis_memory(store)
        read_checkpoint_disk(checkpoint_dir)
        if stop.wait(interval_s):
            return
