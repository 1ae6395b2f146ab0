"""Redis as the manifests run it: TLS only, cptd's ACL user, a maxmemory below the container's memory limit, and no
password on any command line (the rendered container started under a real redis-server)."""

from __future__ import annotations

import contextlib
import re
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import redis as redis_lib

from tests.manifest_tools import DEPLOY, OVERLAYS, ROOT, build, by_kind, pod_specs


def test_redis_is_tls_only_with_cptd_acl_user():
    """Redis listens on TLS only, and the ACL user the daemon logs in as has exactly acl_rule(policy name)."""
    from connectors.redis_store import acl_rule
    from policies.config import load_policy

    docs = build("single-gpu")
    conf = next(c for n, c in by_kind(docs, "ConfigMap").items() if n.startswith("cptd-redis"))["data"]["redis.conf"]  # name-hashed
    directives = dict(ln.split(None, 1) for ln in conf.splitlines() if ln.strip() and not ln.startswith("#"))
    assert directives["port"] == "0" and directives["tls-port"] == "6379"
    assert {"tls-cert-file", "tls-key-file", "tls-ca-cert-file"} <= set(directives)
    redis = by_kind(docs, "StatefulSet")["cptd-redis"]["spec"]["template"]["spec"]
    container = redis["containers"][0]
    assert container["command"] == ["/bin/sh", "/etc/redis/redis-start.sh"]
    script = next(c for n, c in by_kind(docs, "ConfigMap").items() if n.startswith("cptd-redis"))["data"]["redis-start.sh"]
    assert "printf 'user cptd on >%s' \"$CPTD_REDIS_PASSWORD\"" in script  # the start script's user line
    name = load_policy(DEPLOY / "policy.example.yaml").name
    assert container["args"] == acl_rule(name).split()  # ... followed by these rules
    assert "--tls" in redis["containers"][0]["readinessProbe"]["exec"]["command"]
    daemon = by_kind(docs, "Deployment")["cptd-daemon"]["spec"]["template"]["spec"]["containers"][0]
    env = {e["name"]: e for e in daemon["env"]}
    assert env["CPTD_REDIS_USERNAME"]["value"] == "cptd"
    assert env["CPTD_REDIS_PASSWORD"]["valueFrom"]["secretKeyRef"]["key"] == "CPTD_REDIS_PASSWORD"
    assert env["CPTD_REDIS_CA_FILE"]["value"].startswith("/var/run/secrets/redis-tls/")
    assert 'CPTD_REDIS_URL="rediss://' in (ROOT / "docs" / "kubernetes.md").read_text()


# ---- Redis's start script (redis-start.sh, one for both jobs): a maxmemory below the container's memory limit, so
# noeviction refuses writes before the OOM killer acts; and no password on any command line or in Redis's environment.
REDIS_SECRET_VALUES = {"REDIS_PASSWORD": "admin-pw-3f9a", "CPTD_REDIS_PASSWORD": "cptd-pw-7c21"}  # the Secret's keys


def _k8s_expand(s: str, env: dict[str, str]) -> str:
    """Kubernetes' $(VAR) expansion of command/args: defined names are replaced, `$$` is a literal `$`, the rest stays."""
    return re.sub(r"\$\$|\$\(([A-Za-z_][A-Za-z0-9_]*)\)", lambda m: "$" if m.group(0) == "$$" else env.get(m.group(1), m.group(0)), s)


@dataclass
class RenderedRedis:
    """A real redis-server started by the rendered Redis container's command, args and env, as the kubelet would."""

    proc: subprocess.Popen
    argv: list[str]  # what the container runs (its command and args, expanded)
    env: dict[str, str]  # the container's env as the kubelet resolves it
    limit: int  # resources.limits.memory, bytes
    mounts: dict[str, Path]  # volume name -> the local directory standing in for its mount
    exec_argv: list[str]  # what redis-server was exec'd with (recorded before Redis rewrites its process title)
    exec_environ: bytes
    client: redis_lib.Redis  # the default user, with REDIS_PASSWORD, on a unix socket


@contextlib.contextmanager
def _run_rendered_redis(overlay: str, tmp_path: Path) -> Iterator[RenderedRedis]:
    """Start the overlay's Redis container command under a real redis-server: the downward API's memory limit, the
    Secret's keys as fixed words, every volume mount as a local directory (the ConfigMap's files written there with
    mount paths mapped), TLS swapped for a unix socket. A shim in front of redis-server records the argv and environ
    it is exec'd with: Redis overwrites both in /proc with its process title, which would hide what `ps` showed."""
    from kubernetes.utils import parse_quantity

    from daemon.dev.services import redis_server_binary, wait_for

    docs = build(overlay)
    pod = by_kind(docs, "StatefulSet")["cptd-redis"]["spec"]["template"]["spec"]
    (c,) = pod["containers"]
    limit = int(parse_quantity(c["resources"]["limits"]["memory"]))
    env: dict[str, str] = {}
    for e in c["env"]:
        ref = e.get("valueFrom", {})
        if "value" in e:
            env[e["name"]] = e["value"]
        elif "resourceFieldRef" in ref:
            field = ref["resourceFieldRef"]
            assert field.get("containerName", c["name"]) == c["name"] and field["resource"] == "limits.memory", e
            divisor = int(parse_quantity(field.get("divisor", "1")))
            env[e["name"]] = str(-(-limit // divisor))  # the kubelet rounds up
        else:
            env[e["name"]] = REDIS_SECRET_VALUES[ref["secretKeyRef"]["key"]]  # REDISCLI_AUTH too: the same key
    mounts = {m["name"]: tmp_path / f"vol-{m['name']}" for m in c["volumeMounts"]}
    paths = sorted(((m["mountPath"], mounts[m["name"]]) for m in c["volumeMounts"]), key=lambda p: -len(p[0]))

    def local(text: str) -> str:
        for mount_path, d in paths:
            text = text.replace(mount_path, str(d))
        return text

    for d in mounts.values():
        d.mkdir()
    cm_name = next(v for v in pod["volumes"] if v["name"] == "conf")["configMap"]["name"]
    data = by_kind(docs, "ConfigMap")[cm_name]["data"]
    sock = tmp_path / "redis.sock"
    conf_lines = [ln for ln in data["redis.conf"].splitlines() if not ln.startswith(("tls-", "bind "))]
    for name, text in data.items():
        extra = [f"unixsocket {sock}", ""] if name == "redis.conf" else []
        (mounts["conf"] / name).write_text(local("\n".join([*conf_lines, *extra]) if name == "redis.conf" else text))
    record = tmp_path / "exec"
    record.mkdir()
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    shim = bin_dir / "redis-server"
    shim_lines = [
        "#!/bin/sh",
        f"printf '%s\\0' \"$@\" > {record}/argv",
        f"cat /proc/$$/environ > {record}/environ",
        f'exec {redis_server_binary()} "$@"',
    ]
    shim.write_text("\n".join([*shim_lines, ""]))
    shim.chmod(0o755)
    argv = [local(_k8s_expand(a, env)) for a in [*c.get("command", []), *c.get("args", [])]]
    log_path = tmp_path / "redis.log"
    with log_path.open("wb") as log_file:
        proc = subprocess.Popen(argv, env={"PATH": f"{bin_dir}:/usr/bin:/bin", **env}, stdout=log_file, stderr=subprocess.STDOUT)
    try:
        client = redis_lib.Redis(unix_socket_path=str(sock), password=env["REDIS_PASSWORD"], decode_responses=True)
        wait_for(client.ping, 30, "redis-server started by the rendered command", proc=proc, log_path=log_path)
        yield RenderedRedis(
            proc=proc,
            argv=argv,
            env=env,
            limit=limit,
            mounts=mounts,
            exec_argv=(record / "argv").read_bytes().decode().split("\0")[:-1],
            exec_environ=(record / "environ").read_bytes(),
            client=client,
        )
    finally:
        proc.terminate()
        proc.wait(timeout=30)


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_redis_gets_a_maxmemory_below_its_container_memory_limit(overlay, tmp_path):
    """Run the rendered Redis container's command (its start script, with the downward API's value of the memory limit)
    under a real redis-server and read back maxmemory and maxmemory-policy from the running server."""
    with _run_rendered_redis(overlay, tmp_path) as r:
        maxmemory = int(r.client.config_get("maxmemory")["maxmemory"])
        policy = r.client.config_get("maxmemory-policy")["maxmemory-policy"]
    assert policy == "noeviction"
    # Below the limit with room for fragmentation, client buffers and the AOF-rewrite fork; not so low it wastes the pod.
    assert 0.6 * r.limit <= maxmemory <= 0.8 * r.limit, (maxmemory, r.limit)


def _secret_env_names(container: dict) -> set[str]:
    """Env names of a container whose value is secret: read from a Secret, or named like a secret."""
    secretish = re.compile(r"PASSWORD|PASSWD|SECRET|CREDENTIAL|SASL|(^|_)(TOKEN|KEY|AUTH)(_|$)")
    return {e["name"] for e in container.get("env") or [] if "secretKeyRef" in (e.get("valueFrom") or {}) or secretish.search(e["name"])}


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_no_secret_reaches_a_command_line(overlay):
    """`ps` shows every process's arguments to anyone on the node: no container's command or args names a secret."""
    checked = 0
    for where, pod in pod_specs(build(overlay)).items():
        for c in [*pod.get("initContainers", []), *pod["containers"]]:
            argv = " ".join([*c.get("command", []), *c.get("args", [])])
            for name in _secret_env_names(c):
                checked += 1
                assert f"$({name})" not in argv, f"{where} container {c['name']} puts {name} on its command line"
            assert "--requirepass" not in argv and "--pass " not in argv and not re.search(r"(^| )-a ", argv), where
    assert checked >= 3  # Redis's two passwords at least: the check is not vacuous


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_redis_start_script_keeps_passwords_off_every_command_line(overlay, tmp_path):
    """The rendered container, run against a real redis-server: neither the start script's nor redis-server's arguments
    nor redis-server's environment hold a password, the written secrets.conf is 0600, the default user needs
    REDIS_PASSWORD, and user cptd logs in with its own and stays in its prefix."""
    with _run_rendered_redis(overlay, tmp_path) as r:
        sock = r.client.connection_pool.connection_kwargs["path"]
        cptd = redis_lib.Redis(unix_socket_path=sock, username="cptd", password=REDIS_SECRET_VALUES["CPTD_REDIS_PASSWORD"])
        assert cptd.ping()
        assert "--include" in r.exec_argv and "--maxmemory" in r.exec_argv  # the recording saw the real exec
        running_argv = Path(f"/proc/{r.proc.pid}/cmdline").read_bytes()
        running_environ = Path(f"/proc/{r.proc.pid}/environ").read_bytes()
        for pw in REDIS_SECRET_VALUES.values():
            assert not any(pw in a for a in r.argv), "the container's command line holds a password"
            assert not any(pw in a for a in r.exec_argv), "redis-server was exec'd with a password argument"
            assert pw.encode() not in r.exec_environ, "redis-server was exec'd with a password in its environment"
            assert pw.encode() not in running_argv and pw.encode() not in running_environ
        assert cptd.set("cptd:{default}:k", "1")
        with pytest.raises(redis_lib.exceptions.NoPermissionError):
            cptd.set("other", "1")
        with pytest.raises(redis_lib.exceptions.AuthenticationError):
            redis_lib.Redis(unix_socket_path=sock).ping()
        assert r.client.ping()
        secrets_conf = r.mounts["secrets-conf"] / "secrets.conf"
        assert secrets_conf.stat().st_mode & 0o077 == 0  # only Redis's user reads the written file
