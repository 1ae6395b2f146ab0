"""Start, kill and restart the processes of a local deployment: the daemon, Redis, the broker's port, a vLLM replica.

Shared by `cptd demo`, the soak harness (bench/soak.py) and its CI-sized test (tests/test_soak.py), so a fault
is injected the same way wherever it runs:

* `DaemonProcess`: `cptd run` as a child in its own process group, SIGKILLed like an OOM kill or a node loss.
* `restart_service`: Redis (or any `Service`) killed hard and started again on the same port and data directory.
* `TcpProxy`: the address clients use for the broker. tansu keeps its log in memory only, so killing it would be a
  data loss, not a restart; a Kafka broker with a disk restarts with its log. Stopping the proxy is what clients see
  of such a restart: every connection reset, the port refusing, then the same broker and log again.
* `relaunch_on_new_port`: a vLLM replica killed and started on another port, as a restarted pod comes back with a
  new IP, serving its boot model.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

from daemon.dev.services import Service, free_port, wait_for
from daemon.dev.vllm_server import VLLMServer

REPO = Path(__file__).resolve().parents[2]


def daemon_env(
    *,
    policy: Path,
    redis_url: str,
    bootstrap: str,
    port: int,
    token: str,
    vllm_urls: list[str],
    checkpoint_dir: Path,
    base_checkpoint: Path,
    **extra: str,
) -> dict[str, str]:
    """The environment of a local `cptd run`: every service on loopback, one torch thread per job.

    One thread: on 2 cores shared with vLLM and anything else, a second OpenMP thread waiting for a busy core made
    the evaluator 7x slower (docs/round-engine.md, Training on a CPU).
    """
    return dict(
        os.environ,
        CPTD_POLICY=str(policy.resolve()),  # the daemon runs in the repository root
        CPTD_REDIS_URL=redis_url,
        CPTD_KAFKA_BOOTSTRAP=bootstrap,
        CPTD_HTTP_HOST="127.0.0.1",
        CPTD_HTTP_PORT=str(port),
        CPTD_API_TOKEN=token,
        CPTD_VLLM_URLS=",".join(vllm_urls),
        CPTD_CHECKPOINT_DIR=str(checkpoint_dir.resolve()),
        CPTD_BASE_CHECKPOINT=str(base_checkpoint.resolve()),
        CPTD_TRAIN_CPU_THREADS="1",
        **extra,
    )


@dataclass
class DaemonProcess:
    """One `cptd run` child; `env` from `daemon_env` (its CPTD_HTTP_PORT is the API's port)."""

    env: dict[str, str]
    log_path: Path
    proc: subprocess.Popen | None = field(default=None, repr=False)
    starts: int = 0

    @property
    def port(self) -> int:
        return int(self.env["CPTD_HTTP_PORT"])

    @property
    def api(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.alive() and self.proc is not None else None

    def start(self) -> DaemonProcess:
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "daemon.cli", "run"],
                env=self.env,
                stdout=log,
                stderr=subprocess.STDOUT,
                cwd=REPO,
                start_new_session=True,
            )
        self.starts += 1
        return self

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def status(self) -> dict[str, Any]:
        return httpx.get(self.api + "/status", timeout=5).json()

    def wait_up(self, timeout: float = 120) -> dict[str, Any]:
        """Until /status answers with Redis reachable (the round runner's part of it is there)."""

        def up() -> dict[str, Any] | None:
            st = self.status()
            return st if "rounds" in st else None

        st = wait_for(up, timeout, f"the daemon at {self.api}", 0.2, self.proc, self.log_path)
        assert st is not None  # wait_for returns a truthy value or raises
        return st

    def is_leader(self) -> bool:
        try:
            return bool(self.status().get("rounds", {}).get("leader"))
        except (httpx.HTTPError, ValueError):
            return False

    def kill(self, sig: int = signal.SIGKILL) -> int | None:
        """Signal the whole process group (the daemon and its jobs) and reap it."""
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            try:
                os.killpg(self.proc.pid, sig)
            except ProcessLookupError:
                pass
        try:
            return self.proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            return self.proc.wait(timeout=10)

    def stop(self) -> None:
        """SIGTERM: the daemon hands its lease back and stops its jobs."""
        self.kill(signal.SIGTERM)

    def restart(self) -> DaemonProcess:
        self.kill()
        return self.start()

    def rss_bytes(self) -> int | None:
        """Resident memory of the daemon process itself (not its jobs), from /proc."""
        pid = self.pid
        if pid is None:
            return None
        try:
            for line in Path(f"/proc/{pid}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) * 1024
        except OSError:
            return None
        return None


def restart_service(svc: Service, down_s: float = 0.0) -> Service:
    """SIGKILL the service's process group, stay down `down_s` seconds (an outage), start it again on its port."""
    svc.kill()
    if down_s > 0:
        time.sleep(down_s)  # the outage itself: how long clients find nothing on the port
    return svc.start()


class TcpProxy:
    """A loopback TCP forwarder to `target_port`, listening on `port`; stop() resets every connection."""

    def __init__(self, target_port: int, port: int | None = None):
        self.target_port, self.port = target_port, port or free_port()
        self._listener: socket.socket | None = None
        self._conns: set[socket.socket] = set()
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> TcpProxy:
        ls = socket.socket()
        ls.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        ls.bind(("127.0.0.1", self.port))
        ls.listen(64)
        ls.settimeout(0.2)  # the accept loop looks at the stop flag this often
        self._listener, self._stop = ls, threading.Event()
        self._thread = threading.Thread(target=self._accept, args=(ls, self._stop), name=f"proxy-{self.port}", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
        if self._listener is not None:
            self._listener.close()
        with self._lock:
            conns, self._conns = self._conns, set()
        for c in conns:
            try:
                c.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")  # RST, not FIN
                c.close()
            except OSError:
                pass

    def _accept(self, ls: socket.socket, stop: threading.Event) -> None:
        while not stop.is_set():
            try:
                client, _ = ls.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            try:
                upstream = socket.create_connection(("127.0.0.1", self.target_port), timeout=5)
            except OSError:
                client.close()
                continue
            upstream.settimeout(None)
            client.settimeout(None)
            with self._lock:
                self._conns |= {client, upstream}
            for a, b in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pump, args=(a, b), daemon=True).start()

    def _pump(self, src: socket.socket, dst: socket.socket) -> None:
        try:
            while data := src.recv(65536):
                dst.sendall(data)
        except OSError:
            pass
        for s in (src, dst):
            try:
                s.close()
            except OSError:
                pass
        with self._lock:
            self._conns -= {src, dst}


def relaunch_on_new_port(server: VLLMServer, timeout: float = 300.0) -> str:
    """SIGKILL the replica and start it again, with its boot model, on another free port; returns the new URL."""
    server.kill()
    server.port = free_port()
    server.launch()
    server.wait_healthy(timeout)
    return server.url
