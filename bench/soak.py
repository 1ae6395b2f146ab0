"""Many rounds under faults: the real daemon, tansu, Redis and vLLM CPU replicas, a drifting stream, a seeded fault schedule.

    python -m bench.soak --rounds 5 --faults daemon_kill,broker_restart,leader_change,redis_kill

Each round's batch comes from the stream's current domain (Python prose, ML-library docs, the Debian handbook in
German: the stream drifts through them in order), with a few broken messages for the dead-letter topic. A buffer
trigger starts the round; the faults scheduled for it fire when its record first shows their phase. After each
round the harness records what every replica serves, whether one is paused, Redis memory and keys, disk use,
the daemon's RSS and the held-out loss per domain; at the end it checks the invariants (bench/soak_report.py) and
writes soak-report.json and soak-report.png. A broken invariant is a finding, reported, never hidden.

Each fault is one small function in FAULTS (name -> phases it may fire in, what it does). `--faults` picks them,
a name may repeat, `kind@PHASE` pins the phase instead of drawing it; DEFAULT_FAULTS are the four that cost
seconds (the CI soak's). The replicas are found through a URLs file (CPTD_VLLM_URLS_FILE) that `vllm_new_port`
rewrites; `redis_flush` waits for the daemon to refuse, then runs `cptd accept-redis-reset --yes` as the runbook
says; `disk_full` sets the policy's `rounds.min_free_gb` a few GB under the free space at start and crosses it.
"""

from __future__ import annotations

import argparse
import json
import random
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from connectors.redis_store import RedisStore
from daemon.dev.process_control import DaemonProcess, TcpProxy, daemon_env, relaunch_on_new_port, restart_service
from daemon.dev.services import Service, create_topics, free_port, kafka_service, redis_service, wait_for
from daemon.dev.vllm_server import VLLMServer
from daemon.round_record import TERMINAL

DOCS_TOPIC, DLQ_TOPIC = "cptd.documents", "cptd.dead-letter"
TOKEN = "soak-token"
SERVED_NAME = "soak"
# BEFORE: ahead of the batch; END: the round is terminal
ORDER = ("BEFORE", "PENDING", "SNAPSHOT", "TRAINING", "EVALUATING", "DEPLOYING", "END")
DEFAULT_FAULTS = ("daemon_kill", "leader_change", "redis_kill", "broker_restart")  # kinds the current code survives (bench/README.md)
BROKEN = (b'{"text": "cut off', b'{"title": "no text"}')  # invalid_json, missing_text: two dead letters per batch


@dataclass
class SoakConfig:
    rounds: int = 5
    faults: list[str] = field(default_factory=lambda: list(DEFAULT_FAULTS))
    seed: int = 0
    replicas: int = 2
    docs_per_round: int = 40
    round_steps: int = 12
    heldout_docs: int = 12  # per domain, never produced: the forgetting curve
    outage_s: float = 60.0  # redis_outage
    broker_down_s: float = 5.0  # broker_restart
    disk_headroom_gb: float = 3.0  # disk_full: the policy's floor this far under the free space at start
    round_timeout_s: float = 900.0
    workdir: Path | None = None
    png: bool = True


@dataclass
class Stack:
    """Everything the soak started, and the handles the faults act on."""

    cfg: SoakConfig
    root: Path
    redis: Service
    kafka: Service
    proxy: TcpProxy
    vllms: list[VLLMServer]
    daemons: list[DaemonProcess]
    store: RedisStore
    policy_path: Path
    ckpt: Path
    min_tokens: int
    produced: dict[tuple[int, int], float] = field(default_factory=dict)  # (partition, offset) -> produced at (time.time)
    ends: dict[int, int] = field(default_factory=dict)  # partition -> next offset after what was produced
    exits: list[dict[str, Any]] = field(default_factory=list)  # daemons that exited on their own (no fault killed them)
    records: dict[str, dict[str, Any]] = field(default_factory=dict)  # "id@created_at" -> the round record as last read
    urls_file: Path | None = None  # CPTD_VLLM_URLS_FILE: the replicas' URLs, rewritten when one moves
    min_free_bytes: int | None = None  # the policy's rounds.min_free_gb, set when disk_full is scheduled
    # redis_flush: what Redis counted and stored before it was emptied (accounting adds it), and when
    flushed_counts: list[dict[str, Any]] = field(default_factory=list)
    offset_floor: dict[int, int] = field(default_factory=dict)  # partition -> stored next offset before a flush
    flushed_at: list[float] = field(default_factory=list)

    @property
    def bootstrap(self) -> str:
        return f"127.0.0.1:{self.proxy.port}"

    def leader(self) -> DaemonProcess:
        """The daemon holding the round lease (the first alive one when none says so yet)."""
        for d in self.daemons:
            if d.alive() and d.is_leader():
                return d
        return next((d for d in self.daemons if d.alive()), self.daemons[0])

    def stop(self) -> None:
        for d in self.daemons:
            d.stop()
        for v in self.vllms:
            v.stop()
        self.proxy.stop()
        self.kafka.kill()
        self.redis.kill()


# --------------------------------------------------------------------------- faults


@dataclass
class Fault:
    phases: tuple[str, ...]  # where the schedule may place it (the seeded draw picks one)
    fire: Callable[[Stack], str]  # does it; returns what it did, for the report
    needs_daemons: int = 1


def daemon_kill(s: Stack) -> str:
    d = s.leader()
    pid = d.pid
    d.kill()
    d.start().wait_up()
    return f"SIGKILL of the leading daemon (pid {pid}) and its jobs; restarted"


def leader_change(s: Stack) -> str:
    d = s.leader()
    pid = d.pid
    d.kill()
    t0 = time.monotonic()
    new = wait_for(lambda: next((o for o in s.daemons if o is not d and o.alive() and o.is_leader()), None), 120, "a new leader", 0.2)
    took = time.monotonic() - t0
    assert new is not None
    d.start().wait_up()
    return f"SIGKILL of the leader (pid {pid}); daemon on :{new.port} took the lease after {took:.1f} s; the old one restarted"


def redis_kill(s: Stack) -> str:
    restart_service(s.redis)
    return "SIGKILL of Redis (appendfsync everysec: the last second may be lost); restarted on its port and AOF"


def redis_flush(s: Stack) -> str:
    """Emptied Redis must be noticed and refused (nothing deployed on a forgotten history) until the operator accepts
    it: the soak waits for the daemon to say so, then does what the runbook says (`cptd accept-redis-reset --yes`)."""
    from daemon.app import ingest_counts

    s.flushed_counts.append(ingest_counts(s.store))
    for (topic, partition), off in s.store.stored_offsets().items():
        if topic == DOCS_TOPIC:
            s.offset_floor[partition] = max(s.offset_floor.get(partition, 0), off)
    s.flushed_at.append(time.time())
    s.store.r.flushall()
    t0 = time.monotonic()

    def loss() -> Any:
        d = s.leader()
        return d.alive() and ((d.status().get("rounds") or {}).get("redis_loss") or None)

    seen = wait_for(loss, 120, "the daemon to report the Redis data loss", 0.5)
    took = time.monotonic() - t0
    d = s.leader()
    out = cli(d, "accept-redis-reset", "--yes", "--json")
    changes, todo = out.get("changes") or [], out.get("todo") or []
    then = "nothing more"
    if any("seed-replay" in t for t in todo):  # the runbook's last step: the reservoir went with the rest
        cli(d, "seed-replay", str(s.root / "seed-replay.jsonl"))
        then = "seed-replay (the reservoir was empty)"
    return f"FLUSHALL; refused after {took:.1f} s ({seen['cause'][:80]}); accept-redis-reset --yes: {len(changes)} changes; then {then}"


def cli(d: DaemonProcess, *args: str) -> dict[str, Any]:
    """A `cptd` command run as an operator would in the daemon's pod (its environment); its JSON answer, or {}."""
    r = subprocess.run([sys.executable, "-m", "daemon.cli", *args], env=d.env, capture_output=True, text=True, timeout=300)
    if r.returncode != 0:
        raise RuntimeError(f"cptd {args[0]} exited {r.returncode}: {r.stdout[-500:]} {r.stderr[-500:]}")
    last = r.stdout.strip().splitlines()[-1:] if "--json" in args else []
    return json.loads(last[0]) if last else {}


def redis_outage(s: Stack) -> str:
    restart_service(s.redis, down_s=s.cfg.outage_s)
    return f"Redis down for {s.cfg.outage_s:.0f} s (SIGKILL, then restarted on its port and AOF)"


def broker_restart(s: Stack) -> str:
    s.proxy.stop()
    time.sleep(s.cfg.broker_down_s)  # the restart's length: every connection reset, the port refusing meanwhile
    s.proxy.start()
    return f"broker restart: connections reset, port closed {s.cfg.broker_down_s:.0f} s, then the same broker and log"


def vllm_new_port(s: Stack) -> str:
    """A restarted pod on a new address, serving its boot weights: discovery (the URLs file, re-read every 2 s here)
    must find it and the periodic reconcile bring it to the deployed version."""
    v = s.vllms[-1]
    old = v.url
    new = relaunch_on_new_port(v)
    write_urls(s)
    return f"replica {old} SIGKILLed and started on {new} with its boot model; the URLs file now lists {new}"


def write_urls(s: Stack) -> None:
    assert s.urls_file is not None
    tmp = s.urls_file.with_suffix(".tmp")
    tmp.write_text("".join(v.url + "\n" for v in s.vllms))
    tmp.replace(s.urls_file)  # whole or not at all, as a config-management tool writes it


def disk_full(s: Stack) -> str:
    """The volume nearly full before a round: a filler that takes the free space 1 GB below the policy's floor.

    Without a loop device the volume is the machine's disk (tens of GB free), so the soak's policy sets
    `rounds.min_free_gb` a few GB under the free space at start, and the filler is sized at fire time to cross it.
    The round must be refused at PENDING, naming free vs needed, and give its documents back; the filler goes
    after the batch, and the next round takes them."""
    import os
    import shutil

    assert s.min_free_bytes is not None, "disk_full needs the floor set at start (start_stack)"
    free = shutil.disk_usage(s.ckpt).free
    size = max(1 << 20, free - s.min_free_bytes + 10**9)
    filler = s.ckpt / ".soak-filler"
    with open(filler, "wb") as f:
        os.posix_fallocate(f.fileno(), 0, size)
    left = shutil.disk_usage(s.ckpt).free
    return f"{size >> 20} MiB filler: {left / 1e9:.2f} GB free under the {s.min_free_bytes / 1e9:.2f} GB floor; removed after the batch"


FAULTS: dict[str, Fault] = {
    "daemon_kill": Fault(("SNAPSHOT", "TRAINING", "EVALUATING", "DEPLOYING"), daemon_kill),
    "leader_change": Fault(("TRAINING", "EVALUATING"), leader_change, needs_daemons=2),
    "redis_kill": Fault(("SNAPSHOT", "TRAINING", "EVALUATING", "END"), redis_kill),
    "redis_flush": Fault(("TRAINING", "END"), redis_flush),
    "redis_outage": Fault(("TRAINING",), redis_outage),
    "broker_restart": Fault(("PENDING", "TRAINING", "END"), broker_restart),
    "vllm_new_port": Fault(("TRAINING", "END"), vllm_new_port),
    "disk_full": Fault(("BEFORE",), disk_full),
}


@dataclass
class Planned:
    kind: str
    round: int  # index of the batch whose round it hits
    phase: str
    fired_in: str | None = None  # the phase the round was in when it fired (a short phase can be missed)
    note: str = ""
    at: float | None = None


def schedule(faults: list[str], rounds: int, seed: int) -> list[Planned]:
    """Seeded: faults spread over the rounds (at most ceil(F/R) per round), each at a phase its kind allows."""
    kinds = [f.partition("@")[0] for f in faults]
    unknown = [k for k in kinds if k not in FAULTS]
    if unknown:
        raise ValueError(f"unknown fault kinds {unknown}: choose from {', '.join(FAULTS)}")
    pinned = {i: f.partition("@")[2] for i, f in enumerate(faults) if "@" in f}  # kind@PHASE: that phase, not a draw
    wrong = [faults[i] for i, ph in pinned.items() if ph not in FAULTS[kinds[i]].phases]
    if wrong:
        raise ValueError(f"faults pinned to a phase their kind cannot fire in: {wrong}")
    rng = random.Random(seed)
    slots = [i % rounds for i in range(len(faults))]
    rng.shuffle(slots)
    out = [Planned(k, r, pinned.get(i) or rng.choice(FAULTS[k].phases)) for i, (k, r) in enumerate(zip(kinds, slots, strict=True))]
    return sorted(out, key=lambda p: (p.round, ORDER.index(p.phase)))


# --------------------------------------------------------------------------- the stream


@dataclass(frozen=True)
class Domain:
    name: str
    lang: str
    heldout: list[str]
    stream: list[str]


def domains(cfg: SoakConfig) -> list[Domain]:
    """Three domains, the last not English; held-out documents are drawn apart from the streamed ones."""
    from daemon.dev.multilingual_corpus import clean_docs
    from daemon.dev.sample_corpus import domain_docs, english_docs

    per = cfg.docs_per_round * cfg.rounds + cfg.heldout_docs  # enough for every round landing on one domain
    pools = [
        ("python-docs", "en", english_docs(per, 2048, seed=cfg.seed + 101)),
        ("ml-docs", "en", domain_docs(per, seed=cfg.seed + 102)),
        ("debian-de", "de", random.Random(cfg.seed).sample(clean := clean_docs("de"), min(per, len(clean)))),
    ]
    return [Domain(n, lang, docs[: cfg.heldout_docs], docs[cfg.heldout_docs :]) for n, lang, docs in pools]


def domain_of(i: int, rounds: int, n_domains: int) -> int:
    return min(i * n_domains // rounds, n_domains - 1)


def batch(doms: list[Domain], i: int, cfg: SoakConfig) -> tuple[str, list[bytes]]:
    d = doms[domain_of(i, cfg.rounds, len(doms))]
    k = sum(1 for j in range(i) if domain_of(j, cfg.rounds, len(doms)) == domain_of(i, cfg.rounds, len(doms)))
    texts = d.stream[k * cfg.docs_per_round : (k + 1) * cfg.docs_per_round]
    msgs = [json.dumps({"text": t, "id": f"{d.name}-{i}-{j}", "meta": {"domain": d.name}}).encode() for j, t in enumerate(texts)]
    return d.name, msgs + list(BROKEN)


def produce(s: Stack, msgs: list[bytes]) -> None:
    from kafka import KafkaProducer

    prod = KafkaProducer(bootstrap_servers=s.bootstrap, linger_ms=5, acks="all")
    futures = [(prod.send(DOCS_TOPIC, m), time.time()) for m in msgs]
    prod.flush()
    for fut, t in futures:
        md = fut.get(timeout=60)
        s.produced[(md.partition, md.offset)] = t
        s.ends[md.partition] = max(s.ends.get(md.partition, 0), md.offset + 1)
    prod.close()


# --------------------------------------------------------------------------- setup


def soak_policy(path: Path, cfg: SoakConfig, min_tokens: int, min_free_gb: float | None = None) -> None:
    """Tiny rounds (the test's tiny Llama, a dozen steps), a buffer trigger at about half a batch."""
    path.write_text(
        yaml.safe_dump(
            {
                "name": "soak",
                "ingest": {"session_timeout_ms": 6000, "heartbeat_interval_ms": 500, "batch_max_docs": 200, "batch_max_wait_ms": 200},
                "train": {
                    "seq_len": 64,
                    "micro_batch_size": 4,
                    "grad_accum": 1,
                    "max_steps": cfg.round_steps,
                    "eval_interval": max(4, cfg.round_steps // 3),
                    "eval_max_docs": 8,
                    "checkpoint_interval": max(4, cfg.round_steps // 3),
                    "keep_checkpoints": 2,
                    "device": "cpu",
                },
                "schedule": {"kind": "rewarm_cosine", "peak_lr": 3e-3, "warmup_frac": 0.1},
                "drift": {"peak_lr_min": 2e-3, "peak_lr_max": 4e-3, "probe_docs": 16, "probe_max_len": 64},
                "replay": {"mode": "fixed", "fixed_ratio": 0.3, "reservoir_docs": 200},  # reached early: Redis flat at its caps
                "rounds": {
                    "budget_tokens": 10**8,
                    "min_tokens": min_tokens,
                    "heldout_frac": 0.2,
                    "heldout_max_docs": 8,
                    "replay_heldout_docs": 8,
                    "eval_checkpoints": 1,
                    "lease_ttl_s": 4,
                    "watch_s": 2,
                    **({"min_free_gb": min_free_gb} if min_free_gb is not None else {}),
                },
                "quality": {"language": {"languages": ["en", "de"]}},  # the stream's third domain is German
                "gates": {"max_forgetting_nats": 1.0, "min_adaptation_nats": 0.0},
                "triggers": {"buffer_tokens": min_tokens, "buffer_check_interval_s": 0.5, "min_gap_s": 0},
            },
            sort_keys=False,
        )
    )


def start_stack(cfg: SoakConfig, doms: list[Domain], log: Callable[[str], None]) -> Stack:
    from daemon.dev.sample_corpus import english_docs
    from daemon.dev.tiny_model import build_tiny_llama
    from daemon.seed_replay import seed_replay
    from policies.config import load_policy

    root = Path(cfg.workdir or tempfile.mkdtemp(prefix="cptd-soak-")).resolve()
    root.mkdir(parents=True, exist_ok=True)
    started: list[Any] = []
    try:
        base = build_tiny_llama(root / "base", [t for d in doms for t in d.heldout + d.stream[:80]], seed=cfg.seed)
        vllms = [
            VLLMServer(model=str(base), served_model_name=SERVED_NAME, dtype="float32", log_path=root / f"vllm-{k}.log").launch()
            for k in range(cfg.replicas)
        ]
        started += vllms
        redis = redis_service(root / "redis", appendfsync="everysec").start()
        started.append(redis)
        kafka_port = free_port()
        proxy = TcpProxy(kafka_port).start()
        started.append(proxy)
        kafka = kafka_service(root / "kafka", port=kafka_port, advertised_port=proxy.port).start()
        started.append(kafka)
        create_topics(f"127.0.0.1:{proxy.port}", {DOCS_TOPIC: 2, DLQ_TOPIC: 1})
        # a buffer trigger at half a batch's estimated tokens (bytes / 4): one round per batch
        min_tokens = max(1, sum(len(t.encode()) for t in doms[0].stream[: cfg.docs_per_round]) // 8)
        policy_path = root / "policy.yaml"
        ckpt = root / "checkpoints"
        ckpt.mkdir(exist_ok=True)
        # disk_full: a floor a few GB under the free space now, which its filler crosses (the volume is the machine's disk)
        min_free_gb = None
        if any(f.startswith("disk_full") for f in cfg.faults):
            min_free_gb = max(0.0, round(shutil.disk_usage(ckpt).free / 1e9 - cfg.disk_headroom_gb, 2))
        soak_policy(policy_path, cfg, min_tokens, min_free_gb)
        redis_url = f"redis://127.0.0.1:{redis.port}/0"
        store = RedisStore.from_url(redis_url, "soak")
        seed_file = root / "seed-replay.jsonl"
        seed_file.write_text("".join(json.dumps({"text": t}) + "\n" for t in english_docs(60, 1024, seed=cfg.seed + 7)))
        seed_replay(seed_file, store, load_policy(policy_path), random.Random(cfg.seed))
        t0 = time.monotonic()
        for v in vllms:
            v.wait_healthy(600)
        log(f"vLLM: {cfg.replicas} replicas up in {time.monotonic() - t0:.0f} s after the rest was ready")
        n_daemons = max(FAULTS[f.partition("@")[0]].needs_daemons for f in cfg.faults) if cfg.faults else 1
        urls_file = root / "vllm-replicas"
        urls_file.write_text("".join(v.url + "\n" for v in vllms))
        daemons = []
        for k in range(n_daemons):
            env = daemon_env(
                policy=policy_path,
                redis_url=redis_url,
                bootstrap=f"127.0.0.1:{proxy.port}",
                port=free_port(),
                token=TOKEN,
                vllm_urls=[],  # discovered from the file, as a restarted replica on a new port must be
                checkpoint_dir=ckpt,
                base_checkpoint=base,
                POD_NAME=f"cptd-{k}",
                CPTD_VLLM_URLS_FILE=str(urls_file),
                CPTD_VLLM_DISCOVERY_S="2",
            )
            daemons.append(DaemonProcess(env, root / f"cptd-{k}.log").start())
            started.append(daemons[-1])
        for d in daemons:
            d.wait_up()
        # every partition owned by some daemon, and one of them leading, before the first message is produced
        wait_for(lambda: sum(len(d.status()["ingest"]["assigned"]) for d in daemons) >= 2, 120, "the consumer group to settle", 0.3)
        wait_for(lambda: any(d.is_leader() for d in daemons), 60, "a daemon to take the round lease", 0.3)
        floor = round(min_free_gb * 1e9) if min_free_gb is not None else None
        return Stack(
            cfg, root, redis, kafka, proxy, vllms, daemons, store, policy_path, ckpt, min_tokens, urls_file=urls_file, min_free_bytes=floor
        )
    except BaseException:
        for x in reversed(started):
            x.stop() if not isinstance(x, Service) else x.kill()
        raise


# --------------------------------------------------------------------------- the run


def safe_rounds(s: Stack) -> list[dict[str, Any]]:
    """The round records in Redis now; each is also kept in `s.records`, so a record Redis loses is still reported."""
    try:
        recs = s.store.list_rounds()
    except Exception:  # noqa: BLE001 - Redis may be down or empty: a fault, not a harness error
        return []
    s.records |= {f"{r['id']}@{r['created_at']}": r for r in recs}
    return recs


def buffer_below_trigger(s: Stack) -> bool:
    """No round is about to start: what waits in the buffer is under the buffer trigger (a refused round gives its
    documents back, and the round that takes them belongs to this batch)."""
    from policies.config import load_policy
    from policies.round_policy import estimate_tokens

    try:
        waiting = estimate_tokens(s.store.buffer_stats()["buffer_bytes"], load_policy(s.policy_path).rounds)
    except Exception:  # noqa: BLE001 - Redis down
        return False
    return waiting < s.min_tokens


def free_disk_after_refusal(s: Stack, ended: list[dict[str, Any]], log: Callable[[str], None]) -> None:
    """disk_full's filler goes once a round was refused for it, as an operator frees space after the alert."""
    filler = s.ckpt / ".soak-filler"
    if filler.exists() and any(r["state"] == "FAILED" and "PENDING: refused" in (r.get("error") or "") for r in ended):
        filler.unlink()
        log("  disk freed: the filler removed after the round was refused at PENDING")


def caught_up(s: Stack) -> bool:
    try:
        stored = s.store.stored_offsets()
    except Exception:  # noqa: BLE001 - Redis down
        return False
    floor = s.offset_floor  # a flushed Redis forgot its offsets; what it stored before still counts
    return all(max(stored.get((DOCS_TOPIC, p), 0), floor.get(p, 0)) >= end for p, end in s.ends.items())


def supervise(s: Stack) -> None:
    """Restart a daemon that exited on its own, as Kubernetes restarts a crashed container; each exit is recorded.

    Faults restart what they kill before they return, so a daemon found dead here died of something else.
    """
    for d in s.daemons:
        if d.alive() or d.proc is None:
            continue
        tail = [x for x in d.log_path.read_text(errors="replace").splitlines() if x.strip()][-1:]
        s.exits.append({"daemon": d.port, "code": d.proc.returncode, "at": time.time(), "last_log_line": tail[0][:300] if tail else ""})
        d.start()


def fire(s: Stack, p: Planned, phase: str, log: Callable[[str], None]) -> None:
    p.fired_in, p.at = phase, time.time()
    try:
        p.note = FAULTS[p.kind].fire(s)
    except Exception as e:  # noqa: BLE001 - a fault the stack did not survive is a finding
        p.note = f"the fault itself failed: {type(e).__name__}: {e}"
    log(f"  fault {p.kind:<14} in {phase:<10} {p.note}")


def run_round(s: Stack, i: int, msgs: list[bytes], planned: list[Planned], seen: set[tuple[str, float]], log) -> list[str]:
    """Produce batch i, follow the round(s) it triggers, fire the round's faults; returns notes of what went wrong."""
    todo = [p for p in planned if p.round == i]
    while todo and todo[0].phase == "BEFORE":  # ahead of the batch, so the round it triggers meets it at PENDING
        fire(s, todo.pop(0), "BEFORE", log)
    produce(s, msgs)
    deadline = time.monotonic() + s.cfg.round_timeout_s
    started: list[str] = []
    notes: list[str] = []
    while time.monotonic() < deadline:
        supervise(s)
        recs = safe_rounds(s)
        new = [r for r in recs if (r["id"], r["created_at"]) not in seen]
        started += [r["id"] for r in new if r["id"] not in started]
        seen |= {(r["id"], r["created_at"]) for r in new}
        active = [r for r in recs if r["state"] not in TERMINAL]
        free_disk_after_refusal(s, [r for r in recs if r["id"] in started and r["state"] in TERMINAL], log)
        phase = active[0]["state"] if active else ("END" if started else None)
        if phase is not None and todo and ORDER.index(phase) >= ORDER.index(todo[0].phase):
            fire(s, todo.pop(0), phase, log)
            continue
        if started and not active and not todo and caught_up(s) and buffer_below_trigger(s):
            return notes
        time.sleep(0.1)  # poll interval of the round record; the loop ends on its conditions or the deadline
    if not started:
        notes.append(f"batch {i}: no round started within {s.cfg.round_timeout_s:.0f} s")
    else:
        notes.append(f"batch {i}: rounds {started} not all ended, or ingest not caught up, within {s.cfg.round_timeout_s:.0f} s")
    for p in todo:
        p.note = "not fired: its round never reached the phase"
    return notes


def run_soak(cfg: SoakConfig, log: Callable[[str], None] = print) -> dict[str, Any]:
    """Run the soak and return the report (also written to WORKDIR/soak-report.json, and a PNG when matplotlib is there)."""
    from bench import soak_report

    t_start = time.monotonic()
    doms = domains(cfg)
    planned = schedule(cfg.faults, cfg.rounds, cfg.seed)
    log("schedule: " + ", ".join(f"{p.kind}@r{p.round}/{p.phase}" for p in planned))
    s = start_stack(cfg, doms, log)
    log(f"stack up in {time.monotonic() - t_start:.0f} s, working in {s.root}")
    samples: list[dict[str, Any]] = [soak_report.sample(s, doms, -1, "base")]
    seen: set[tuple[str, float]] = set()
    notes: list[str] = []
    manifests: dict[str, list[dict[str, Any]]] = {}
    try:
        for i in range(cfg.rounds):
            name, msgs = batch(doms, i, cfg)
            t0 = time.monotonic()
            notes += run_round(s, i, msgs, planned, seen, log)
            (s.ckpt / ".soak-filler").unlink(missing_ok=True)
            soak_report.keep_manifests(s, manifests)
            settled = soak_report.settle(s)
            samples.append(soak_report.sample(s, doms, i, name) | {"settle_s": settled})
            last = samples[-1]
            log(
                f"batch {i} ({name}, {len(msgs)} msgs): {time.monotonic() - t0:.0f} s; replicas {last['versions']}"
                + f" paused {last['paused']}; held-out nll {last['heldout_nll']}"
            )
        report = soak_report.finish(s, doms, planned, samples, manifests, notes, time.monotonic() - t_start)
    finally:
        s.stop()
    soak_report.write(report, s.root, cfg.png)
    return report


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--faults", default=",".join(DEFAULT_FAULTS), help=f"comma-separated, repeats allowed: {', '.join(FAULTS)}")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--replicas", type=int, default=2)
    ap.add_argument("--docs-per-round", type=int, default=40)
    ap.add_argument("--round-steps", type=int, default=12)
    ap.add_argument("--outage-s", type=float, default=60.0)
    ap.add_argument("--round-timeout-s", type=float, default=900.0, help="how long one batch's rounds may take before it is a finding")
    ap.add_argument("--workdir", type=Path)
    ap.add_argument("--no-png", action="store_true")
    a = ap.parse_args(argv)
    cfg = SoakConfig(
        rounds=a.rounds,
        faults=[f for f in a.faults.split(",") if f],
        seed=a.seed,
        replicas=a.replicas,
        docs_per_round=a.docs_per_round,
        round_steps=a.round_steps,
        outage_s=a.outage_s,
        round_timeout_s=a.round_timeout_s,
        workdir=a.workdir,
        png=not a.no_png,
    )
    report = run_soak(cfg)
    from bench.soak_report import summary

    print(summary(report))
    return 0 if not report["findings"] else 1


if __name__ == "__main__":
    sys.exit(main())
