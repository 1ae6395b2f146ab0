"""Secure connections (issue 17): Kafka over TLS with client certificates, Redis over TLS with a least-privilege ACL
user, https vLLM replicas with a private CA; and the failure modes (wrong password, unknown CA, expired
certificate) each named in /readyz while the process stays up and keeps its secrets out of logs and /status.

All servers are real (tests/tls_fixtures.py). What is not exercised against a broker: SASL (tansu 0.6 cannot
be given a first user), so the SASL settings are checked as the client configuration they produce.
"""

# ruff: noqa: F811 - test functions take the imported fixtures as arguments

from __future__ import annotations

import contextlib
import http.server
import re
import signal
import ssl
import threading
from collections import Counter
from pathlib import Path

import httpx
import pytest
import redis as redis_lib

from connectors.kafka import FileTokenProvider, KafkaConnection, kafka_client_config
from connectors.redis_store import ACL_COMMANDS, RedisStore, acl_rule, connect
from connectors.vllm import Replica, ServingConfig
from daemon.dev.services import create_topics, wait_for
from daemon.settings import Settings
from policies.config import load_policy
from tests.conftest import make_policy
from tests.streams import expected_counts, mixed_stream
from tests.tls_fixtures import (  # noqa: F401 - pki, tls_kafka and tls_redis are fixtures
    Pki,
    TlsKafka,
    pki,
    produce_tls,
    redis_admin,
    redis_env,
    redis_tls_url,
    tls_kafka,
    tls_redis,
    tls_redis_service,
    tls_terminator,
)

REPO = Path(__file__).resolve().parent.parent
PASSWORD = "Sup3r-Secret-cptd-pw"  # grep target: must never be in a log line or /status


# --------------------------------------------------------------------------- client configuration (no servers)


def test_one_client_config_for_every_protocol(tmp_path: Path):
    assert kafka_client_config("h:9092") == {"bootstrap_servers": "h:9092", "security_protocol": "PLAINTEXT"}
    ca, crt, key = tmp_path / "ca", tmp_path / "crt", tmp_path / "key"
    cfg = kafka_client_config(KafkaConnection("h:9093", "SSL", ssl_cafile=ca, ssl_certfile=crt, ssl_keyfile=key, ssl_check_hostname=False))
    assert cfg == {
        "bootstrap_servers": "h:9093",
        "security_protocol": "SSL",
        "ssl_check_hostname": False,
        "ssl_cafile": str(ca),
        "ssl_certfile": str(crt),
        "ssl_keyfile": str(key),
    }
    pw = tmp_path / "pw"
    pw.write_text(PASSWORD + "\n")
    conn = KafkaConnection("h:9093", "SASL_SSL", sasl_mechanism="SCRAM-SHA-512", sasl_username="cptd", sasl_password_file=pw)
    cfg = kafka_client_config(conn)
    assert (cfg["sasl_mechanism"], cfg["sasl_plain_username"], cfg["sasl_plain_password"]) == ("SCRAM-SHA-512", "cptd", PASSWORD)
    assert cfg["ssl_check_hostname"] is True
    assert PASSWORD not in repr(conn) and PASSWORD not in conn.describe()
    assert conn.describe() == "SASL_SSL/SCRAM-SHA-512 h:9093"
    # the refusals name what is missing
    with pytest.raises(ValueError, match="SASL mechanism"):
        KafkaConnection("h:1", "SASL_PLAINTEXT")
    with pytest.raises(ValueError, match="username and a password"):
        KafkaConnection("h:1", "SASL_SSL", sasl_mechanism="PLAIN", sasl_username="u")
    with pytest.raises(ValueError, match="token file"):
        KafkaConnection("h:1", "SASL_SSL", sasl_mechanism="OAUTHBEARER")
    with pytest.raises(ValueError, match="both a client certificate and its key"):
        KafkaConnection("h:1", "SSL", ssl_certfile=crt)


def test_oauth_token_is_reread_when_the_mounted_file_changes(tmp_path: Path):
    tok = tmp_path / "token"
    tok.write_text("first\n")
    cfg = kafka_client_config(KafkaConnection("h:1", "SASL_SSL", sasl_mechanism="OAUTHBEARER", sasl_oauth_token_file=tok))
    provider = cfg["sasl_oauth_token_provider"]
    assert isinstance(provider, FileTokenProvider) and provider.token() == "first"
    # Kubernetes updates a projected token by swapping a symlink: a new file, a new inode
    new = tmp_path / "token.new"
    new.write_text("second")
    new.replace(tok)
    assert provider.token() == "second"
    assert "second" not in repr(provider)


def test_settings_from_env_keep_secrets_masked(monkeypatch, tmp_path: Path, pki: Pki):
    env = {
        "CPTD_KAFKA_BOOTSTRAP": "kafka:9093",
        "CPTD_KAFKA_SECURITY_PROTOCOL": "SASL_SSL",
        "CPTD_KAFKA_SASL_MECHANISM": "SCRAM-SHA-512",
        "CPTD_KAFKA_SASL_USERNAME": "cptd",
        "CPTD_KAFKA_SASL_PASSWORD": PASSWORD,
        "CPTD_KAFKA_CA_FILE": str(tmp_path / "ca.crt"),
        "CPTD_REDIS_URL": f"rediss://cptd:{PASSWORD}@redis:6379/0",
        "CPTD_REDIS_CA_FILE": str(tmp_path / "ca.crt"),
        "CPTD_VLLM_CA_FILE": str(tmp_path / "ca.crt"),
    }
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    s = Settings()
    assert PASSWORD not in repr(s) and PASSWORD not in str(s.model_dump())
    k = s.kafka()
    assert k.security_protocol == "SASL_SSL" and k.ssl_cafile == tmp_path / "ca.crt" and k.password() == PASSWORD
    (tmp_path / "ca.crt").write_bytes(pki.ca.read_bytes())
    assert isinstance(s.vllm_verify(), ssl.SSLContext)
    store = RedisStore(connect(s.redis_url.get_secret_value(), **s.redis_options()), "n")
    assert store.where() == "rediss://redis:6379/0"
    assert s.vllm_ca_file == tmp_path / "ca.crt"  # the round runner hands it to ServingConfig(ca_file=...)
    monkeypatch.setenv("CPTD_KAFKA_SECURITY_PROTOCOL", "TLS")
    with pytest.raises(ValueError, match="kafka_security_protocol"):
        Settings()
    monkeypatch.setenv("CPTD_KAFKA_SECURITY_PROTOCOL", "SASL_SSL")
    monkeypatch.delenv("CPTD_KAFKA_SASL_MECHANISM")
    with pytest.raises(ValueError, match="needs a SASL mechanism"):
        Settings()


def test_a_failed_client_construction_leaves_no_thread_behind():
    """The daemon retries building its Kafka clients; kafka-python's IO thread of a failed attempt must not pile up."""
    import socket

    from connectors.kafka import KafkaConsumer, KafkaProducer, _closing_on_failure

    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen(16)
    srv.settimeout(0.2)
    stop = threading.Event()

    def refuse() -> None:  # accepts TCP, speaks no Kafka: the bootstrap times out
        while not stop.is_set():
            try:
                srv.accept()[0].close()
            except OSError:
                pass

    t = threading.Thread(target=refuse, daemon=True)
    t.start()
    before = {x.ident for x in threading.enumerate()}
    try:
        for cls in (KafkaConsumer, KafkaProducer):
            with pytest.raises(Exception, match="bootstrap"):
                _closing_on_failure(cls, bootstrap_servers=f"127.0.0.1:{srv.getsockname()[1]}", bootstrap_timeout_ms=800)

        def left_behind() -> list[str]:
            return [x.name for x in threading.enumerate() if x.ident not in before]

        with contextlib.suppress(TimeoutError):  # the threads of the failed attempts end; the assertion names any that do not
            wait_for(lambda: not left_behind(), 30, "the failed clients' threads to end")
        assert left_behind() == []
    finally:
        stop.set()
        t.join()
        srv.close()


def test_the_acl_names_every_command_cptd_sends():
    """ACL_COMMANDS (what docs/kubernetes.md gives the Redis user) covers the Lua scripts and the client calls."""
    lua = "".join(p.read_text() for p in (REPO / "connectors" / "lua").glob("*.lua"))
    used = {c.lower() for c in re.findall(r"redis\.call\(\s*['\"](\w+)['\"]", lua)}
    src = (REPO / "connectors" / "redis_store.py").read_text()
    alias = {"delete": "del", "pipeline": "multi", "incr": "incrby"}  # redis-py's incr() sends INCRBY
    used |= {alias.get(m, m) for m in re.findall(r"(?:self\.r|pipe)\.(\w+)\(", src)} - {"execute", "register_script"}
    assert used - set(ACL_COMMANDS) == set()


# --------------------------------------------------------------------------- Redis: TLS and least privilege


def test_acl_user_is_confined_to_its_key_prefix(tls_redis, pki: Pki):
    admin = redis_admin(tls_redis, pki)
    admin.execute_command("ACL", "SETUSER", "cptd", "on", f">{PASSWORD}", *acl_rule("alpha").split())
    admin.set("cptd:{beta}:lease", "someone-else")
    url = redis_tls_url(tls_redis)
    tls = {"ssl_ca_file": pki.ca, "ssl_cert_file": pki.client_cert, "ssl_key_file": pki.client_key}
    store = RedisStore(connect(url, username="cptd", password=PASSWORD, **tls), "alpha")
    assert store.ping()
    assert store.lease_acquire("me", 5.0) is not None  # a Lua script over its own keys
    assert store.next_round_number() == 1
    other = RedisStore(connect(url, username="cptd", password=PASSWORD, **tls), "beta")
    with pytest.raises(redis_lib.exceptions.NoPermissionError):
        other.lease_acquire("me", 5.0)
    with pytest.raises(redis_lib.exceptions.NoPermissionError):
        other.r.get("cptd:{beta}:lease")
    for cmd in (("SET", "unrelated", "1"), ("KEYS", "*"), ("FLUSHALL",), ("CONFIG", "GET", "*"), ("ACL", "LIST")):
        with pytest.raises(redis_lib.exceptions.NoPermissionError):
            store.r.execute_command(*cmd)
    assert admin.get("cptd:{beta}:lease") == b"someone-else"
    # without the client certificate the server refuses the handshake
    with pytest.raises(redis_lib.ConnectionError):
        connect(url, username="cptd", password=PASSWORD, ssl_ca_file=pki.ca).ping()


# --------------------------------------------------------------------------- vLLM over https


def test_replica_https_with_private_ca(pki: Pki):
    class H(http.server.BaseHTTPRequestHandler):
        def do_GET(self):  # noqa: N802
            self.send_response(200 if self.headers.get("Authorization") == "Bearer k3y" else 401)
            self.end_headers()

        def log_message(self, *a):
            pass

    srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), H)
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(pki.server_cert, pki.server_key)
    srv.socket = ctx.wrap_socket(srv.socket, server_side=True)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    url = f"https://127.0.0.1:{srv.server_address[1]}"
    try:
        ok = Replica(url, ServingConfig(api_key="k3y", ca_file=str(pki.ca)))
        assert ok._http.get("/health").status_code == 200
        ok.close()
        bad = Replica(url, ServingConfig(api_key="k3y", ca_file=str(pki.other_ca)))
        with pytest.raises(httpx.ConnectError, match="CERTIFICATE_VERIFY_FAILED"):
            bad._http.get("/health")
        bad.close()
    finally:
        srv.shutdown()


# --------------------------------------------------------------------------- the daemon end to end


def _acl_user(tls_redis, pki: Pki, name: str) -> redis_lib.Redis:
    admin = redis_admin(tls_redis, pki)
    admin.execute_command("ACL", "SETUSER", "cptd", "on", f">{PASSWORD}", *acl_rule(name).split())
    return admin


def _no_secret(proc, *secrets: str) -> None:
    text = proc.log.read_text(errors="replace")
    status = httpx.get(f"http://127.0.0.1:{proc.port}/status", timeout=10).text
    ready = httpx.get(f"http://127.0.0.1:{proc.port}/readyz", timeout=10).text
    for s in secrets:
        assert s not in text, f"secret in the log {proc.log}"
        assert s not in status and s not in ready


def _readyz(proc) -> tuple[int, str]:
    r = httpx.get(f"http://127.0.0.1:{proc.port}/readyz", timeout=10)
    return r.status_code, r.json()["reason"]


@pytest.mark.slow
def test_ingest_end_to_end_over_tls_with_acl_user(tmp_path: Path, tls_kafka: TlsKafka, tls_redis, pki: Pki, ingest_procs):
    tag = tmp_path.name[-8:].replace("_", "").replace("-", "") or "x"
    topics = {"docs": f"sdocs-{tag}", "dlq": f"sdlq-{tag}", "group": f"sgroup-{tag}", "name": f"s{tag}"}
    conn = tls_kafka.connection()
    create_topics("", {topics["docs"]: 2, topics["dlq"]: 1}, connection=conn)
    policy_path = make_policy(tmp_path, topics, ingest={"max_message_bytes": 65536})
    policy = load_policy(policy_path)
    admin = _acl_user(tls_redis, pki, policy.name)
    pw_file = tmp_path / "redis-password"
    pw_file.write_text(PASSWORD + "\n")
    # the ACL user from separate settings here (the password from a mounted file); the failure test uses URL userinfo
    env = {**redis_env(pki, redis_tls_url(tls_redis), CPTD_REDIS_USERNAME="cptd", CPTD_REDIS_PASSWORD_FILE=str(pw_file)), **tls_kafka.env()}
    url, bootstrap = env.pop("CPTD_REDIS_URL"), env.pop("CPTD_KAFKA_BOOTSTRAP")  # IngestProcess sets these two itself
    proc = ingest_procs(policy_path, url, bootstrap, env)
    store = RedisStore(admin, policy.name)  # the admin looks; the daemon writes as the ACL user

    first, copies = mixed_stream(policy, n_good=120)
    msgs = first + copies
    for batch in (first, copies):  # the originals first, as in tests/test_ingest.py, so "which copy is accepted" is fixed
        produce_tls(conn, topics["docs"], [m.value for m in batch])
        n = len(first) + (len(copies) if batch is copies else 0)
        wait_for(lambda n=n: sum(store.counters().values()) >= n, 180, f"{n} offsets accounted (log {proc.log})", 0.2, proc.proc)
    assert sum(store.counters().values()) == len(msgs)
    assert Counter(store.counters()) == expected_counts(msgs)
    assert set(store.buffer_keys()) == {m.key for m in msgs if m.outcome == "accepted"}
    # the dead letters went out through the same TLS connection settings
    from kafka import KafkaConsumer

    c = KafkaConsumer(topics["dlq"], **kafka_client_config(conn), auto_offset_reset="earliest", enable_auto_commit=False, group_id=None)
    got: list = []
    n_dead = sum(m.outcome in ("dead_lettered", "rejected") for m in msgs)
    wait_for(lambda: got.extend(r for rs in c.poll(500).values() for r in rs) or len(got) >= n_dead, 60, "dead letters over TLS")
    c.close()
    assert len(got) == n_dead
    # every key the daemon wrote is under its prefix (the ACL would have refused anything else)
    assert all(k.startswith(f"cptd:{{{policy.name}}}:".encode()) for k in admin.keys("*"))
    code, why = _readyz(proc)
    assert (code, why) == (200, "ok")
    status = proc.status()
    assert status["counts"]["total"] == len(msgs) and status["ingest"]["kafka"] == f"SSL {bootstrap}"
    # the operator's pause reaches the ingest loop built after the HTTP server started
    auth = {"Authorization": "Bearer test-token"}
    assert httpx.post(f"http://127.0.0.1:{proc.port}/ingest/pause", headers=auth, timeout=10).status_code == 200
    wait_for(lambda: proc.status()["ingest"]["paused"] == "operator", 30, "ingest paused by the operator", 0.2, proc.proc)
    assert httpx.post(f"http://127.0.0.1:{proc.port}/ingest/resume", headers=auth, timeout=10).status_code == 200
    wait_for(lambda: proc.status()["ingest"]["paused"] is None, 30, "ingest resumed", 0.2, proc.proc)
    _no_secret(proc, PASSWORD)
    assert proc.kill(signal.SIGTERM) == 0


@pytest.mark.slow
def test_failures_are_named_retried_and_keep_secrets(tmp_path: Path, tls_kafka: TlsKafka, tls_redis, pki: Pki, ingest_procs):
    """Wrong password, unknown CA, expired certificate: /readyz false with the connection and the cause, the process
    stays up (capped backoff, no crash loop), no secret in the log or /status, and SIGTERM still stops it cleanly."""
    topics = {"docs": "fdocs", "dlq": "fdlq", "group": "fgroup", "name": "fail"}
    create_topics("", {"fdocs": 1, "fdlq": 1}, connection=tls_kafka.connection())
    _acl_user(tls_redis, pki, "fail")
    expired_redis = tls_redis_service(tmp_path / "redis-expired", pki, which="expired").start()
    unknown_redis = tls_redis_service(tmp_path / "redis-unknown", pki, which="unknown").start()
    expired_kafka = tls_terminator(tmp_path / "kafka-expired", pki, tls_kafka.broker.port, which="expired").start()
    try:
        fast = {"CPTD_KAFKA_RETRY_MAX_S": "1"}
        cases = {
            # wrong Redis password (in the URL) + Kafka's CA unknown to the client
            "password+ca": (
                redis_tls_url(tls_redis, "cptd", "wrong-" + PASSWORD),
                {**redis_env(pki, ""), **tls_kafka.env(CPTD_KAFKA_CA_FILE=str(pki.other_ca)), **fast},
                [r"redis rediss://127\.0\.0\.1:\d+/0: authentication failed", r"kafka SSL 127\.0\.0\.1:\d+: TLS certificate verify failed"],
            ),
            # both servers present expired certificates
            "expired": (
                redis_tls_url(expired_redis, "admin", "x"),
                {**redis_env(pki, ""), **tls_kafka.env(CPTD_KAFKA_BOOTSTRAP=f"127.0.0.1:{expired_kafka.port}"), **fast},
                [
                    r"redis rediss://127\.0\.0\.1:\d+/0: TLS certificate verify failed: certificate has expired",
                    r"kafka SSL 127\.0\.0\.1:\d+: TLS certificate verify failed: certificate has expired",
                ],
            ),
            # Redis's certificate is from a CA the daemon does not trust; Kafka is fine
            "unknown-redis": (
                redis_tls_url(unknown_redis, "cptd", PASSWORD),
                {**redis_env(pki, ""), **tls_kafka.env(), **fast},
                [r"redis rediss://127\.0\.0\.1:\d+/0: TLS certificate verify failed"],
            ),
        }
        procs = {}
        for name, (url, env, _) in cases.items():
            env = dict(env)
            env.pop("CPTD_REDIS_URL")
            bootstrap = env.pop("CPTD_KAFKA_BOOTSTRAP")
            (tmp_path / name).mkdir()
            policy_path = make_policy(tmp_path / name, topics)
            procs[name] = ingest_procs(policy_path, url, bootstrap, env)
        for name, (_, _, patterns) in cases.items():
            proc = procs[name]

            def named(proc=proc, patterns=patterns):
                try:
                    code, why = _readyz(proc)
                except httpx.HTTPError:
                    return False
                return code == 503 and all(re.search(p, why) for p in patterns)

            wait_for(named, 60, f"{name}: /readyz names {patterns} (log {proc.log})", 0.5, proc.proc)

        def kafka_attempts(proc) -> int:
            return max((int(m) for m in re.findall(r'"attempt": (\d+)', proc.log.read_text())), default=0)

        # Several capped retries later (both cases whose Kafka refuses: CPTD_KAFKA_RETRY_MAX_S=1) ...
        for name in ("password+ca", "expired"):
            wait_for(lambda n=name: kafka_attempts(procs[n]) >= 3, 120, f"{name}: three Kafka attempts", 0.2, procs[name].proc)
        for name, proc in procs.items():  # ... every daemon is still up, still not ready, still keeping the secret
            assert proc.proc.poll() is None, f"{name}: the daemon exited"
            assert _readyz(proc)[0] == 503
            _no_secret(proc, PASSWORD)
        assert kafka_attempts(procs["password+ca"]) >= 3, "kafka connection retried"
        assert "kafka connection failed; retrying" in procs["password+ca"].log.read_text()
        for name, proc in procs.items():
            assert proc.kill(signal.SIGTERM) == 0, f"{name}: SIGTERM while retrying must exit 0"
    finally:
        expired_redis.kill()
        unknown_redis.kill()
        expired_kafka.kill()
