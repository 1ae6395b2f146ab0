"""Which vLLM replicas there are now, and whether each answers: resolved again and again, never once at start.

A headless Service (CPTD_VLLM_CONTROL_URL) lists one address per Ready vLLM pod. At the daemon's start there may
be none (vLLM still loading), and a restarted pod comes back on a new address, serving its boot checkpoint. So
the Service is resolved again every CPTD_VLLM_DISCOVERY_S; the round runner adopts the set it finds and
reconciles the replicas that are new (daemon/rounds/serving_upkeep.py). Explicit CPTD_VLLM_URLS are fixed.
Outside Kubernetes, CPTD_VLLM_URLS_FILE plays the Service's part, as Prometheus's file_sd does: whatever starts the
replicas writes their URLs there, and the file is read again at every refresh (the soak moves a replica to a new
port this way, bench/soak.py).

Each replica's /health is read at every refresh too, for /status and the cptd_vllm_replicas gauge: replica
health is reported, never part of the daemon's own readiness (two daemon pods going NotReady because vLLM
restarts would stop ingest and the control API for nothing).
"""

from __future__ import annotations

import logging
import socket
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import httpx

from daemon import metrics as M
from daemon.settings import Settings

log = logging.getLogger("cptd.replicas")

Resolver = Callable[[str, int], list[str]]  # (host, port) -> addresses


def resolve_addresses(host: str, port: int) -> list[str]:
    """Every address DNS gives for `host` now (a headless Service: one per Ready pod); socket.gaierror when none."""
    return sorted({str(a[4][0]) for a in socket.getaddrinfo(host, port, proto=socket.IPPROTO_TCP)})


def file_urls(path: Path) -> list[str]:
    """The replica URLs listed in `path`: one per line, blank lines and # comments skipped."""
    lines = (ln.split("#", 1)[0].strip() for ln in path.read_text(encoding="utf-8").splitlines())
    return sorted({ln.rstrip("/") for ln in lines if ln})


def service_urls(control_url: str, resolve: Resolver = resolve_addresses) -> list[str]:
    """One URL per address the control URL's host resolves to, with its scheme and port."""
    u = urlsplit(control_url)
    port = u.port or (443 if u.scheme == "https" else 80)
    return [f"{u.scheme}://{f'[{a}]' if ':' in a else a}:{port}" for a in resolve(u.hostname or "", port)]


class ReplicaDiscovery:
    """The replica URLs as last resolved, and the health of each; `refresh()` looks again.

    A failed resolution keeps the last set (a DNS blip must not drop every replica from the serving state)
    and is reported in `error`. Before the first successful one the set is empty: rounds wait, nothing crashes.
    """

    def __init__(self, settings: Settings, resolve: Resolver = resolve_addresses):
        self.settings = settings
        self.resolve = resolve
        self.fixed = [u.strip().rstrip("/") for u in settings.vllm_urls.split(",") if u.strip()]
        self.urls_file = None if self.fixed else settings.vllm_urls_file
        self.control_url = None if self.fixed or self.urls_file else settings.vllm_control_url
        self.urls: list[str] = list(self.fixed)
        self.health: dict[str, str] = {}  # url -> "ready" | "unreachable: why"
        self.error: str | None = None
        self.resolved_at: float | None = None

    def configured(self) -> bool:
        return bool(self.fixed or self.urls_file or self.control_url)

    def refresh(self, probe: bool = True) -> list[str]:
        """Resolve the control URL (or read the URLs file) again; explicit URLs stay as they are. Then read each /health."""
        if self.urls_file:
            try:
                urls = file_urls(self.urls_file)
                self.error = None
            except (OSError, UnicodeDecodeError) as e:  # being rewritten, or gone: keep the last set, as for a DNS blip
                urls, self.error = self.urls, f"{self.urls_file}: {type(e).__name__}: {e}"
            if urls != self.urls:
                log.info("vLLM replica set changed", extra={"before": self.urls, "after": urls})
            self.urls = urls
            self.resolved_at = time.time()
        elif self.control_url:
            try:
                urls = service_urls(self.control_url, self.resolve)
                self.error = None
            except OSError as e:  # socket.gaierror: no Ready pod behind the headless Service, or DNS down
                urls, self.error = self.urls, f"{self.control_url}: {e}"
            if urls != self.urls:
                log.info("vLLM replica set changed", extra={"before": self.urls, "after": urls})
            self.urls = urls
            self.resolved_at = time.time()
        if probe and self.configured():
            self.health = {u: self._health(u) for u in self.urls}
            ready = sum(v == "ready" for v in self.health.values())
            M.VLLM_REPLICAS.labels(state="ready").set(ready)
            M.VLLM_REPLICAS.labels(state="unreachable").set(len(self.health) - ready)
        return self.urls

    def _health(self, url: str) -> str:
        try:
            code = httpx.get(url + "/health", timeout=2.0, verify=self.settings.vllm_verify()).status_code
        except httpx.HTTPError as e:
            return f"unreachable: {type(e).__name__}: {e}"
        return "ready" if code == 200 else f"unreachable: /health answered {code}"

    def waiting(self) -> str | None:
        """Why rounds cannot start now for want of a replica: none found, or none answered /health at the last look."""
        if not self.urls:
            return f"no vLLM replica ready: {self.error or f'{self.urls_file or self.control_url} lists no replica'}"
        if self.health and "ready" not in self.health.values():
            return "no vLLM replica ready: " + "; ".join(f"{u} {why}" for u, why in self.health.items())
        return None

    def describe(self) -> dict[str, Any]:
        """For /status: where the set comes from, the replicas and their health, the last resolution error."""
        return {
            "source": "CPTD_VLLM_URLS"
            if self.fixed
            else f"CPTD_VLLM_URLS_FILE {self.urls_file}"
            if self.urls_file
            else f"CPTD_VLLM_CONTROL_URL {self.control_url}",
            "urls": self.urls,
            "health": dict(self.health),
            "resolved_at": self.resolved_at,
            "error": self.error,
            "waiting": self.waiting(),
        }
