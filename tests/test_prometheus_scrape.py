"""A real Prometheus scrapes a running cptd daemon and serves its metrics back.

Starts `python -m daemon.api --port PORT` (the daemon's HTTP surface, serving
daemon.metrics.REGISTRY) and the `prometheus` binary from the Debian package
`prometheus` on loopback ports, with deploy/prometheus/rules.yaml loaded, then
reads `cptd_` metrics back through Prometheus's HTTP query API. Every wait is a
poll on a condition with a deadline; both processes are stopped at teardown.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
import time
from datetime import datetime
from pathlib import Path

import httpx
import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

from daemon.dev.services import free_port

pytestmark = pytest.mark.slow  # starts a real Prometheus and the API process

ROOT = Path(__file__).resolve().parents[1]
RULES = ROOT / "deploy" / "prometheus" / "rules.yaml"
JOB = "cptd-daemon"
PENDING_ON_A_LONE_API = {"CptdNoLeader"}  # alerts a lone `daemon.api` (no round runner) may hold, with a `for`


def _rfc3339(stamp: str) -> float:
    """Unix time of Prometheus's RFC 3339 timestamps (nanoseconds cut to micro); 0 for none or the zero time."""
    if not stamp.startswith("20"):
        return 0.0
    return datetime.fromisoformat(re.sub(r"(\.\d{6})\d+", r"\1", stamp).replace("Z", "+00:00")).timestamp()


def _wait_for(what: str, check, timeout: float, procs: list[tuple[subprocess.Popen, Path]]):
    """Poll check() until it returns a truthy value; fail (with the logs) on timeout or if a process died."""
    deadline = time.monotonic() + timeout
    last_err: Exception | None = None
    while time.monotonic() < deadline:
        for proc, log in procs:
            if proc.poll() is not None:
                pytest.fail(f"{proc.args[0]} exited with {proc.returncode} while waiting for {what}:\n{log.read_text()[-4000:]}")
        try:
            got = check()
            if got:
                return got
        except (httpx.HTTPError, KeyError, IndexError, ValueError) as e:
            last_err = e
        time.sleep(0.2)
    logs = "\n".join(f"--- {p.args[0]}:\n{log.read_text()[-3000:]}" for p, log in procs)
    pytest.fail(f"timed out after {timeout}s waiting for {what} (last error: {last_err!r})\n{logs}")


def _start(cmd: list[str], log: Path) -> subprocess.Popen:
    fh = log.open("wb")
    try:
        return subprocess.Popen(cmd, cwd=ROOT, stdout=fh, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
    finally:
        fh.close()


def _stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=15)


@pytest.fixture
def daemon(tmp_path):
    port = free_port()
    log = tmp_path / "daemon.log"
    proc = _start([sys.executable, "-m", "daemon.api", "--port", str(port)], log)
    try:
        url = f"http://127.0.0.1:{port}"
        _wait_for("the daemon's /healthz", lambda: httpx.get(f"{url}/healthz", timeout=2).status_code == 200, 60, [(proc, log)])
        yield url, proc, log
    finally:
        _stop(proc)


@pytest.fixture
def prometheus(tmp_path, daemon):
    binary = shutil.which("prometheus")
    if binary is None:
        pytest.fail("prometheus not found on PATH. Install it: apt-get install -y prometheus", pytrace=False)
    daemon_url, daemon_proc, daemon_log = daemon
    port = free_port()
    config = tmp_path / "prometheus.yml"
    config.write_text(
        yaml.safe_dump(
            {
                "global": {"scrape_interval": "1s", "scrape_timeout": "1s", "evaluation_interval": "1s"},
                "rule_files": [str(RULES)],
                "scrape_configs": [{"job_name": JOB, "static_configs": [{"targets": [daemon_url.removeprefix("http://")]}]}],
            }
        )
    )
    log = tmp_path / "prometheus.log"
    proc = _start(
        [
            binary,
            f"--config.file={config}",
            f"--storage.tsdb.path={tmp_path / 'tsdb'}",
            f"--web.listen-address=127.0.0.1:{port}",
            "--log.level=warn",
        ],
        log,
    )
    procs = [(proc, log), (daemon_proc, daemon_log)]
    try:
        url = f"http://127.0.0.1:{port}"
        _wait_for("Prometheus /-/ready", lambda: httpx.get(f"{url}/-/ready", timeout=2).status_code == 200, 60, procs)
        yield url, procs
    finally:
        _stop(proc)


def _query(prom: str, expr: str) -> list[dict]:
    r = httpx.get(f"{prom}/api/v1/query", params={"query": expr}, timeout=5)
    r.raise_for_status()
    body = r.json()
    assert body["status"] == "success", body
    return body["data"]["result"]


def test_prometheus_scrapes_the_daemon_and_serves_cptd_metrics(daemon, prometheus):
    daemon_url = daemon[0]
    prom, procs = prometheus

    # The target is up.
    _wait_for("up{job=cptd-daemon} == 1", lambda: [s for s in _query(prom, f'up{{job="{JOB}"}}') if s["value"][1] == "1"], 60, procs)

    # A cptd_ metric read back through the query API equals what the daemon serves.
    result = _wait_for("cptd_start_time_seconds in Prometheus", lambda: _query(prom, f'cptd_start_time_seconds{{job="{JOB}"}}'), 60, procs)
    assert len(result) == 1
    assert result[0]["metric"]["__name__"] == "cptd_start_time_seconds"
    served = {
        s.name: s.value for fam in text_string_to_metric_families(httpx.get(f"{daemon_url}/metrics", timeout=5).text) for s in fam.samples
    }
    assert float(result[0]["value"][1]) == served["cptd_start_time_seconds"]
    assert served["cptd_start_time_seconds"] > 1.6e9, "the daemon records its start time"

    # Every unlabelled metric of the registry (exported from the start) made it into Prometheus.
    from daemon.metrics import REGISTRY

    expected = set()
    for fam in REGISTRY.collect():
        for s in fam.samples:
            if not s.labels and s.name.startswith("cptd_") and not s.name.endswith("_created"):
                expected.add(s.name)
    assert {"cptd_buffer_docs", "cptd_leader", "cptd_ingest_batches_total"} <= expected

    def names_in_prometheus():
        r = httpx.get(f"{prom}/api/v1/label/__name__/values", params={"match[]": f'{{job="{JOB}"}}'}, timeout=5)
        r.raise_for_status()
        got = set(r.json()["data"])
        return got if expected <= got else None

    got = _wait_for("all unlabelled cptd_ metrics in Prometheus", names_in_prometheus, 30, procs)
    assert expected <= got
    scraped_by = time.time()  # every metric of the registry has a sample in Prometheus from before this instant

    # Every alert rule, evaluated now against what the just-started daemon serves, selects nothing: deterministic,
    # whatever the timing of Prometheus's own rule evaluations. Only a rule with a `for` may hold (pending, not
    # firing) on a daemon this young, and only where this daemon is legitimately so: `python -m daemon.api` never
    # takes the round-runner lease, so CptdNoLeader would fire after its 5 minutes.
    declared_rules = [r for g in yaml.safe_load(RULES.read_text())["groups"] for r in g["rules"]]
    held = {r["alert"]: _query(prom, r["expr"]) for r in declared_rules}
    assert {name for name, series in held.items() if series} <= PENDING_ON_A_LONE_API, held
    assert all("for" in r for r in declared_rules if r["alert"] in PENDING_ON_A_LONE_API)

    # The alert rules load and evaluate in a real Prometheus.
    def rules_evaluated_after_scrape():
        r = httpx.get(f"{prom}/api/v1/rules", timeout=5)
        r.raise_for_status()
        groups = r.json()["data"]["groups"]
        rules = [rule for g in groups for rule in g["rules"]]
        return rules if rules and all(_rfc3339(rule.get("lastEvaluation", "")) > scraped_by for rule in rules) else None

    rules = _wait_for("a rule evaluation over the scraped metrics", rules_evaluated_after_scrape, 30, procs)
    declared = {r["alert"] for r in declared_rules}
    assert {r["name"] for r in rules} == declared
    assert all(r["health"] == "ok" for r in rules), [(r["name"], r.get("lastError")) for r in rules if r["health"] != "ok"]
    # A daemon that just started fires nothing (CptdNoLeader waits 5 minutes before firing).
    alerts = httpx.get(f"{prom}/api/v1/alerts", timeout=5).json()["data"]["alerts"]
    firing = {a["labels"]["alertname"] for a in alerts if a["state"] == "firing"}
    assert not firing, firing
    assert {a["labels"]["alertname"] for a in alerts} <= PENDING_ON_A_LONE_API, alerts
