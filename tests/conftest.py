"""Real services for integration tests, on free loopback ports, stopped after.

Redis (AOF on, fsync always, in a temp dir, so crash tests can restart it) and
the tansu Kafka-compatible broker. No mocks of either anywhere.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import uuid
from pathlib import Path

import pytest
import redis as redis_lib
import yaml

from daemon.dev.services import Service, create_topics, free_port, kafka_service, redis_service, wait_for

REPO = Path(__file__).resolve().parent.parent

# Session fixtures registered once here, so that every module shares one instance of each (a fixture imported into
# two test modules is two fixtures, built twice): english_model / english_vllm (a small Llama that knows some English,
# served) for the curation and collapse-guard tests; tiny_models and the vLLM servers on them for the serving and
# scoring tests.
pytest_plugins = ["tests.curation_fixtures", "tests.vllm_fixtures"]

# Test tiers: `pytest -m "not slow"` is the quick loop (pure policies and units, Redis-only tests: a Redis starts
# in milliseconds). A test is slow when it needs the Kafka broker (a consumer group takes ~10 s to join), a vLLM
# server or the tiny models built for it, or ingest processes; whole modules that train or score models mark
# themselves with `pytestmark = pytest.mark.slow`. `make test` runs both tiers.
SLOW_FIXTURES = {
    "kafka_broker", "bootstrap", "topics", "ingest_procs", "tiny_models", "vllm_server", "vllm_crash_server",
    "english_model", "english_vllm",
}  # fmt: skip


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for item in items:
        if SLOW_FIXTURES & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.slow)


@pytest.fixture
def redis_server(tmp_path: Path):
    svc = redis_service(tmp_path / "redis").start()
    yield svc
    svc.kill()


@pytest.fixture
def redis_url(redis_server: Service) -> str:
    return f"redis://127.0.0.1:{redis_server.port}/0"


@pytest.fixture
def redis_client(redis_url: str) -> redis_lib.Redis:
    return redis_lib.Redis.from_url(redis_url)


@pytest.fixture(scope="session")
def kafka_broker(tmp_path_factory):
    svc = kafka_service(tmp_path_factory.mktemp("kafka")).start()
    yield svc
    svc.kill()


@pytest.fixture(scope="session")
def bootstrap(kafka_broker: Service) -> str:
    return f"127.0.0.1:{kafka_broker.port}"


@pytest.fixture
def topics(bootstrap: str):
    """Fresh topic names per test (the broker is shared by the session)."""
    tag = uuid.uuid4().hex[:8]
    names = {"docs": f"docs-{tag}", "dlq": f"dlq-{tag}", "group": f"group-{tag}", "name": f"t{tag}"}
    return names


def make_policy(tmp_path: Path, topics: dict, partitions: int = 2, **overrides) -> Path:
    """A policy file for tests: fast group joins, small batches; `overrides` are section dicts merged in."""
    data = {
        "name": topics["name"],
        "ingest": {
            "topics": [topics["docs"]],
            "group_id": topics["group"],
            "dead_letter_topic": topics["dlq"],
            "batch_max_docs": 100,
            "batch_max_wait_ms": 200,
            "session_timeout_ms": 6000,
            "heartbeat_interval_ms": 500,
            "max_poll_interval_ms": 30000,
            "redis_retry_max_s": 1.0,
        },
    }
    for section, values in overrides.items():
        data.setdefault(section, {}).update(values)
    path = tmp_path / "policy.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


class IngestProcess:
    """`cptd run` as a child process, so tests can SIGKILL it like Kubernetes would."""

    def __init__(self, policy: Path, redis_url: str, bootstrap: str, log: Path, extra_env: dict[str, str] | None = None):
        self.port = free_port()
        env = dict(
            os.environ,
            CPTD_POLICY=str(policy),
            CPTD_REDIS_URL=redis_url,
            CPTD_KAFKA_BOOTSTRAP=bootstrap,
            CPTD_HTTP_HOST="127.0.0.1",
            CPTD_HTTP_PORT=str(self.port),
            CPTD_API_TOKEN="test-token",
            **(extra_env or {}),
        )
        self.log = log
        with open(log, "ab") as f:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "daemon.cli", "run"], env=env, stdout=f, stderr=subprocess.STDOUT, cwd=REPO, start_new_session=True
            )

    def status(self) -> dict:
        import httpx

        return httpx.get(f"http://127.0.0.1:{self.port}/status", timeout=5).json()

    def wait_assigned(self, timeout: float = 60) -> list[str]:
        return wait_for(lambda: self.status()["ingest"]["assigned"], timeout, f"partition assignment (log {self.log})", 0.2, self.proc)

    def kill(self, sig=signal.SIGKILL) -> int:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, sig)
        return self.proc.wait(timeout=60)


@pytest.fixture
def ingest_procs(tmp_path: Path):
    started: list[IngestProcess] = []

    def start(policy: Path, redis_url: str, bootstrap: str, extra_env: dict[str, str] | None = None) -> IngestProcess:
        p = IngestProcess(policy, redis_url, bootstrap, tmp_path / f"ingest-{len(started)}.log", extra_env)
        started.append(p)
        return p

    yield start
    for p in started:
        p.kill()


__all__ = ["make_policy", "create_topics", "wait_for", "json"]
