"""The resource gauges behind the memory and disk alerts, read from a real Redis and a real filesystem."""

from __future__ import annotations

import shutil
import threading
import time
from pathlib import Path

import httpx
import redis as redis_lib
from prometheus_client.parser import text_string_to_metric_families

from connectors.redis_store import RedisStore, acl_rule, connect
from daemon import resource_gauges
from daemon.dev.services import create_topics, free_port, wait_for
from daemon.metrics import REGISTRY
from tests.conftest import make_policy


def _value(name: str, labels: dict[str, str] | None = None) -> float:
    v = REGISTRY.get_sample_value(name, labels or {})
    assert v is not None, name
    return v


def _acl_store(redis_client: redis_lib.Redis, redis_url: str) -> RedisStore:
    """A store logged in as the ACL user the manifests create: the gauges must work with exactly its commands."""
    redis_client.execute_command("ACL", "SETUSER", "cptd", "on", ">pw-for-tests", *acl_rule("gauges").split())
    return RedisStore(connect(redis_url, username="cptd", password="pw-for-tests"), "gauges")


def test_redis_memory_gauges_follow_info_memory_as_the_acl_user(redis_client, redis_url):
    redis_client.config_set("maxmemory", 64 * 1024 * 1024)
    redis_client.config_set("maxmemory-policy", "noeviction")
    store = _acl_store(redis_client, redis_url)
    before = time.time()
    assert resource_gauges.read_redis_memory(store)
    assert _value("cptd_redis_maxmemory_bytes") == 64 * 1024 * 1024
    used = _value("cptd_redis_used_memory_bytes")
    assert 0 < used < 64 * 1024 * 1024
    assert _value("cptd_redis_memory_read_timestamp_seconds") >= before
    assert store.memory_info()["maxmemory_policy"] == "noeviction"
    # 4 MB more data: the next read shows it.
    store.r.set("cptd:{gauges}:ballast", b"x" * 4_000_000)
    assert resource_gauges.read_redis_memory(store)
    assert _value("cptd_redis_used_memory_bytes") >= used + 4_000_000


def test_redis_down_counts_an_error_and_keeps_the_last_reading(redis_client, redis_url):
    store = _acl_store(redis_client, redis_url)
    assert resource_gauges.read_redis_memory(store)
    kept = _value("cptd_redis_maxmemory_bytes"), _value("cptd_redis_memory_read_timestamp_seconds")
    errors = REGISTRY.get_sample_value("cptd_redis_errors_total", {"op": "memory_info"}) or 0.0
    down = RedisStore(connect(f"redis://127.0.0.1:{free_port()}/0", socket_connect_timeout=1), "gauges")
    assert not resource_gauges.read_redis_memory(down)
    assert _value("cptd_redis_errors_total", {"op": "memory_info"}) == errors + 1
    assert (_value("cptd_redis_maxmemory_bytes"), _value("cptd_redis_memory_read_timestamp_seconds")) == kept


def test_checkpoint_disk_gauges_read_the_volume_even_before_the_directory_exists(tmp_path: Path):
    checkpoints = tmp_path / "not-yet" / "checkpoints"
    assert resource_gauges.read_checkpoint_disk(checkpoints)
    usage = shutil.disk_usage(tmp_path)
    assert _value("cptd_checkpoint_disk_total_bytes") == usage.total
    assert 0 < _value("cptd_checkpoint_disk_free_bytes") <= usage.total
    checkpoints.mkdir(parents=True)
    assert resource_gauges.read_checkpoint_disk(checkpoints)
    assert _value("cptd_checkpoint_disk_total_bytes") == shutil.disk_usage(checkpoints).total


def test_the_refresh_thread_reads_at_once_and_stops_on_request(redis_client, redis_url, tmp_path: Path):
    store = _acl_store(redis_client, redis_url)
    start = time.time()
    stop = threading.Event()
    t = threading.Thread(target=resource_gauges.run, args=(store, tmp_path, stop, 3600.0))
    t.start()
    try:
        wait_for(lambda: _value("cptd_redis_memory_read_timestamp_seconds") >= start, 10, "the first Redis memory read")
        assert _value("cptd_checkpoint_disk_total_bytes") == shutil.disk_usage(tmp_path).total
    finally:
        stop.set()
        t.join(timeout=10)
    assert not t.is_alive()


def test_a_running_daemon_exports_redis_memory_and_checkpoint_space(tmp_path, topics, bootstrap, redis_client, redis_url, ingest_procs):
    """`cptd run` starts the refresh thread: its /metrics carry Redis's maxmemory and the checkpoint volume's size."""
    create_topics(bootstrap, {topics["docs"]: 1, topics["dlq"]: 1})
    redis_client.config_set("maxmemory", 96 * 1024 * 1024)
    checkpoints = tmp_path / "checkpoints"
    proc = ingest_procs(make_policy(tmp_path, topics), redis_url, bootstrap, {"CPTD_CHECKPOINT_DIR": str(checkpoints)})

    def scraped() -> dict[str, float]:
        text = httpx.get(f"http://127.0.0.1:{proc.port}/metrics", timeout=5).text
        return {s.name: s.value for f in text_string_to_metric_families(text) for s in f.samples if s.name.startswith("cptd_")}

    def read() -> dict[str, float] | None:
        m = scraped()
        return m if m["cptd_redis_memory_read_timestamp_seconds"] > 0 else None

    got = wait_for(read, 60, "the daemon's first resource read", 0.2, proc.proc)
    assert got["cptd_redis_maxmemory_bytes"] == 96 * 1024 * 1024
    assert 0 < got["cptd_redis_used_memory_bytes"] < 96 * 1024 * 1024
    assert got["cptd_checkpoint_disk_total_bytes"] == shutil.disk_usage(tmp_path).total
    assert 0 < got["cptd_checkpoint_disk_free_bytes"] <= got["cptd_checkpoint_disk_total_bytes"]
