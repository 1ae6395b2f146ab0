"""`cptd demo`: the whole product on embedded services, on one machine, with nothing to configure.

Starts a Kafka-compatible broker (tansu) and Redis on free ports, runs
`cptd run` against them as a child process (exactly what an operator runs),
streams a mixed sample into Kafka — good pages, junk, exact and near copies,
malformed messages — and shows what became of every message. Everything it
started is stopped on exit or Ctrl-C.
"""
from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import yaml

from daemon.embedded import Service, create_topics, free_port, kafka_service, redis_service, wait_for


def sample_stream(n: int, seed: int = 0) -> list[bytes]:
    """A day of a messy producer: mostly real prose, some junk, copies and broken messages."""
    from daemon.sample_corpus import english_docs, mixed_corpus

    rng = random.Random(seed)
    good = english_docs(int(n * 0.55), seed=seed)
    junk = mixed_corpus(int(n * 0.25), seed=seed + 1)
    msgs = [json.dumps({"text": t, "source": "demo", "id": f"doc-{i}"}).encode() for i, t in enumerate(good + junk)]
    msgs += [json.dumps({"text": t, "source": "mirror"}).encode() for t in rng.sample(good, int(n * 0.08))]  # exact copies
    for t in rng.sample(good, int(n * 0.07)):  # near copies: one word changed
        w = t.split(" ")
        w[rng.randrange(len(w))] = "changed"
        msgs.append(" ".join(w).encode())
    broken = [b"\xff\xfebad bytes", b'{"text": "cut off', b'{"title": "no text"}', b'{"text": 1}', b" "]
    msgs += [broken[i % len(broken)] for i in range(n - len(msgs))]
    rng.shuffle(msgs)
    return msgs


def _bar(done: int, total: int, width: int = 40) -> str:
    filled = int(width * done / max(total, 1))
    return "[" + "#" * filled + "." * (width - filled) + f"] {done}/{total}"


def run_demo(workdir: str | None = None, docs: int = 3000) -> int:
    root = Path(workdir or tempfile.mkdtemp(prefix="cptd-demo-"))
    root.mkdir(parents=True, exist_ok=True)
    services: list[Service] = []
    daemon: subprocess.Popen | None = None
    try:
        print(f"cptd demo — working in {root}")
        redis = redis_service(root / "redis").start()
        services.append(redis)
        kafka = kafka_service(root / "kafka").start()
        services.append(kafka)
        bootstrap = f"127.0.0.1:{kafka.port}"
        create_topics(bootstrap, {"cptd.documents": 2, "cptd.dead-letter": 1})
        print(f"  redis  127.0.0.1:{redis.port} (AOF on)   kafka (tansu)  {bootstrap}")

        policy = root / "policy.yaml"
        policy.write_text(yaml.safe_dump({
            "name": "demo",
            "ingest": {"session_timeout_ms": 6000, "heartbeat_interval_ms": 500, "batch_max_docs": 200, "batch_max_wait_ms": 200},
        }))
        port = free_port()
        env = dict(os.environ, CPTD_POLICY=str(policy), CPTD_REDIS_URL=f"redis://127.0.0.1:{redis.port}/0",
                   CPTD_KAFKA_BOOTSTRAP=bootstrap, CPTD_HTTP_HOST="127.0.0.1", CPTD_HTTP_PORT=str(port))
        log = open(root / "cptd.log", "ab")
        daemon = subprocess.Popen([sys.executable, "-m", "daemon.cli", "run"], env=env, stdout=log, stderr=subprocess.STDOUT,
                                  start_new_session=True)
        api = f"http://127.0.0.1:{port}"
        status = lambda: httpx.get(api + "/status", timeout=5).json()  # noqa: E731
        print(f"  cptd   {api}  (logs: {root / 'cptd.log'})")
        wait_for(lambda: status()["ingest"]["assigned"], 90, "the daemon to join the consumer group", 0.2, daemon)

        msgs = sample_stream(docs)
        print(f"\nstreaming {len(msgs)} messages into Kafka topic cptd.documents ...")
        from kafka import KafkaProducer

        prod = KafkaProducer(bootstrap_servers=bootstrap, linger_ms=5)
        for m in msgs:
            prod.send("cptd.documents", m)
        prod.flush()
        prod.close()
        t0 = time.monotonic()

        def progress() -> bool:
            done = status().get("counts", {}).get("total", 0)
            print("\r  ingest " + _bar(done, len(msgs)), end="", flush=True)
            return done >= len(msgs)

        wait_for(progress, 300, "the daemon to account for every message", 0.3, daemon)
        took = time.monotonic() - t0
        st = status()
        print(f"\n\nevery message accounted for in {took:.1f} s ({len(msgs) / took:,.0f} msgs/s):\n")
        print(f"  {'outcome:reason':<38} {'messages':>9}")
        for k, n in st["counts"]["by_reason"].items():
            print(f"  {k:<38} {n:>9,}")
        print(f"  {'total':<38} {st['counts']['total']:>9,}   (= messages produced: {st['counts']['total'] == len(msgs)})")
        b = st["buffer"]
        print(f"\nbuffer: {b['buffer_docs']:,} documents, {b['buffer_bytes'] / 1e6:.1f} MB waiting for the next round")
        print("dead-letter topic cptd.dead-letter holds the rejected and malformed originals with reason headers")
        return 0
    except KeyboardInterrupt:
        print("\ninterrupted")
        return 130
    finally:
        if daemon is not None and daemon.poll() is None:
            os.killpg(daemon.pid, signal.SIGTERM)
            try:
                daemon.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(daemon.pid, signal.SIGKILL)
        for s in reversed(services):
            s.stop()
        print("stopped the daemon, Kafka and Redis")
