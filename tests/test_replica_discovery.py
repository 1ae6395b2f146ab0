"""Replicas discovered continuously, a restarted one brought back to the deployed version, readiness without vLLM.

A vLLM pod restarted by Kubernetes comes back on a new address serving its boot checkpoint, labelled "default";
at the daemon's start there may be no Ready pod at all. The replica tests run the real round runner against the
shared vLLM CPU server; "a new address" is the same server under another host name (`localhost` instead of
`127.0.0.1`), answered by the resolver the runner is given in place of DNS.
"""

from __future__ import annotations

import socket
import threading
from urllib.parse import urlsplit

import httpx

from connectors.redis_store import RedisStore
from connectors.vllm import Replica
from daemon.dev.services import create_topics, free_port, wait_for
from daemon.replica_discovery import ReplicaDiscovery, service_urls
from daemon.rounds.runner import RoundRunner
from daemon.serving import ServingState
from daemon.settings import Settings
from policies.config import Policy
from policies.round_policy import RoundsPolicy
from tests.conftest import make_policy
from tests.vllm_fixtures import TinyModels, reset_to_base


def test_service_urls_keep_scheme_and_port_and_bracket_ipv6():
    addrs = {"vllm.cptd.svc": ["10.0.0.7", "fd00::3"]}
    assert service_urls("https://vllm.cptd.svc:8443/v1", lambda host, port: addrs[host]) == [
        "https://10.0.0.7:8443",
        "https://[fd00::3]:8443",
    ]
    assert service_urls("http://vllm.cptd.svc", lambda host, port: [f"10.0.0.{port - 79}"]) == ["http://10.0.0.1:80"]


def test_a_urls_file_is_read_again_at_every_refresh_and_an_unreadable_one_keeps_the_last_set(tmp_path):
    """CPTD_VLLM_URLS_FILE: what starts the replicas outside Kubernetes rewrites it; the daemon follows."""
    f = tmp_path / "replicas"
    f.write_text("# the replicas\nhttp://127.0.0.1:8001/\n\nhttp://127.0.0.1:8000  # first\n")
    d = ReplicaDiscovery(Settings(vllm_urls_file=f, vllm_control_url="http://ignored:8000"))
    assert d.configured() and d.control_url is None
    assert d.refresh(probe=False) == ["http://127.0.0.1:8000", "http://127.0.0.1:8001"]
    f.write_text("http://127.0.0.1:9001\n")  # one replica restarted on a new port, the other gone
    assert d.refresh(probe=False) == ["http://127.0.0.1:9001"] and d.error is None
    f.unlink()
    assert d.refresh(probe=False) == ["http://127.0.0.1:9001"]
    assert d.error and "FileNotFoundError" in d.error and d.describe()["source"] == f"CPTD_VLLM_URLS_FILE {f}"
    f.write_text("")
    assert d.refresh(probe=False) == [] and "lists no replica" in (d.waiting() or "")


def test_with_no_replica_resolvable_at_start_rounds_stay_enabled_and_wait(redis_client, tmp_path):
    """A headless Service with no Ready pod yet (a name that resolves to nothing): no crash, rounds are not disabled,
    the lease holder takes the lease but adopts nothing, and says why it waits."""
    settings = Settings(checkpoint_dir=tmp_path, vllm_control_url="http://cptd-vllm.invalid:8000", vllm_discovery_s=0.1)
    runner = RoundRunner(RedisStore(redis_client, "nowhere"), settings, Policy, owner="wait-test")
    assert runner.disabled is None
    stop = threading.Event()
    thread = threading.Thread(target=runner.run, args=(stop,), daemon=True)
    thread.start()
    try:
        wait_for(runner.leader, 30, "the round lease")
        first = runner.discovery.resolved_at
        wait_for(lambda: runner.discovery.resolved_at != first, 30, "another resolution while leading")
        status = runner.status()
        assert status["enabled"] and status["leader"] and status["disabled_reason"] is None
        assert status["waiting"].startswith("no vLLM replica ready: http://cptd-vllm.invalid:8000: ")
        assert runner.ctx.serving is None and runner.ctx.store.get_serving() is None and runner.taken_over_epoch == 0
    finally:
        stop.set()
        thread.join(timeout=30)


def _restart(url: str, base) -> None:
    """What a restarted vLLM pod serves: its boot checkpoint, labelled "default", no runtime adapters."""
    reset_to_base(url, base)
    r = Replica(url)
    try:
        r.set_weight_version("default")
    finally:
        r.close()


def _serves(runner: RoundRunner, url: str, version: str) -> bool:
    raw = runner.ctx.store.get_serving()
    state = ServingState.from_json(raw) if raw else ServingState()
    if set(state.replicas) != {url} or state.replicas[url].version != version:
        return False
    r = Replica(url)
    try:
        return r.weight_version() == version and r.fingerprint() == state.versions[version].fingerprint
    finally:
        r.close()


def test_replicas_found_late_and_restarted_on_a_new_address_are_brought_to_the_deployed_version(
    vllm_server, tiny_models: TinyModels, redis_client, tmp_path
):
    reset_to_base(vllm_server.url, tiny_models.base)
    port = urlsplit(vllm_server.url).port
    first, moved = f"http://127.0.0.1:{port}", f"http://localhost:{port}"
    answer: list[str] = []  # what "DNS" says the headless Service has now: no Ready pod yet

    def resolve(host: str, p: int) -> list[str]:
        assert (host, p) == ("vllm-headless.cptd.svc", port)
        if not answer:
            raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")
        return list(answer)

    settings = Settings(
        checkpoint_dir=tmp_path,
        base_checkpoint=tiny_models.base,
        vllm_control_url=f"http://vllm-headless.cptd.svc:{port}",
        vllm_discovery_s=0.2,
    )
    policy = Policy(rounds=RoundsPolicy(reconcile_interval_s=1))
    runner = RoundRunner(RedisStore(redis_client, "disc"), settings, lambda: policy, owner="disc-test", resolve=resolve)
    stop = threading.Event()
    thread = threading.Thread(target=runner.run, args=(stop,), daemon=True)
    thread.start()
    try:
        # No replica at start: rounds stay enabled and wait; nothing is adopted.
        assert runner.disabled is None
        wait_for(runner.leader, 30, "the round lease")
        status = runner.status()
        assert status["enabled"] and "no vLLM replica ready" in status["waiting"] and "Name or service not known" in status["waiting"]
        assert runner.ctx.serving is None and runner.ctx.store.get_serving() is None

        answer[:] = ["127.0.0.1"]  # the pod is Ready: found, adopted as the base version
        wait_for(lambda: _serves(runner, first, "base"), 60, "the replica adopted once it resolves")
        assert runner.status()["waiting"] is None
        with runner.ctx.serving_lock:  # a deployed round, as DEPLOYING leaves it
            assert runner.ctx.serving is not None
            assert runner.ctx.serving.deploy(tiny_models.other, "r00001").ok

        _restart(vllm_server.url, tiny_models.base)  # the pod restarts and comes back on a new address
        answer[:] = ["localhost"]
        wait_for(lambda: _serves(runner, moved, "r00001"), 60, "the restarted replica, at its new address, on r00001")

        _restart(vllm_server.url, tiny_models.base)  # restarted again, same address: the periodic check finds it
        wait_for(lambda: _serves(runner, moved, "r00001"), 60, "the restarted replica back on r00001 by the periodic reconcile")
    finally:
        stop.set()
        thread.join(timeout=30)
        if runner.ctx.serving is not None:
            runner.ctx.serving.close()
        reset_to_base(vllm_server.url, tiny_models.base)


def test_the_daemon_is_ready_without_vllm_and_waits_for_a_replica(tmp_path, topics, bootstrap, redis_url, ingest_procs):
    """No vLLM replica answers (an explicit URL down), or none resolves (a headless Service with no Ready pod):
    the daemon starts, /readyz is 200 (Redis and Kafka only), /status reports the replicas, rounds wait."""
    create_topics(bootstrap, {topics["docs"]: 1, topics["dlq"]: 1})
    policy = make_policy(tmp_path, topics)
    (tmp_path / "ckpt").mkdir()
    down = f"http://127.0.0.1:{free_port()}"
    dead = ingest_procs(policy, redis_url, bootstrap, {"CPTD_VLLM_URLS": down, "CPTD_CHECKPOINT_DIR": str(tmp_path / "ckpt")})
    none = ingest_procs(
        policy,
        redis_url,
        bootstrap,
        {
            "CPTD_VLLM_CONTROL_URL": "http://cptd-vllm.invalid:8000",
            "CPTD_CHECKPOINT_DIR": str(tmp_path / "ckpt"),
            "CPTD_VLLM_DISCOVERY_S": "1",
        },
    )

    def ready(proc) -> bool:
        try:
            return httpx.get(f"http://127.0.0.1:{proc.port}/readyz", timeout=10).status_code == 200
        except httpx.HTTPError:
            return False

    for proc in (dead, none):
        wait_for(lambda proc=proc: ready(proc), 90, f"/readyz 200 (log {proc.log})", 0.2, proc.proc)
    wait_for(lambda: dead.status()["vllm"]["health"], 30, "a replica health read", 0.2, dead.proc)
    vllm = dead.status()["vllm"]
    assert vllm["urls"] == [down] and vllm["health"][down].startswith("unreachable: ConnectError")
    wait_for(lambda: dead.status()["rounds"]["waiting"], 30, "rounds waiting for a replica that answers", 0.2, dead.proc)
    assert dead.status()["rounds"]["waiting"].startswith(f"no vLLM replica ready: {down} unreachable: ConnectError")
    status = none.status()
    assert status["vllm"]["urls"] == [] and "cptd-vllm.invalid" in status["vllm"]["error"]
    assert status["rounds"]["enabled"] and "no vLLM replica ready" in status["rounds"]["waiting"]
    metrics = httpx.get(f"http://127.0.0.1:{dead.port}/metrics", timeout=10).text
    assert 'cptd_vllm_replicas{state="unreachable"} 1.0' in metrics and 'cptd_vllm_replicas{state="ready"} 0.0' in metrics
