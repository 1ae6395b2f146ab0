"""Control requests hold for the whole deployment, whichever daemon receives them (issue 24).

A rollback sent to a daemon that does not hold the round lease is queued in (real) Redis and carried out by the
holder, which answers; the operator's ingest pause is a Redis key that every daemon's ingest loop obeys, a restarted
one included. The rollback's replica is a port nothing listens on: the holder's attempt fails there, naming the replica
and step, which only the holder, the one with the serving state, can answer (the swap itself is tested against vLLM in
tests/test_vllm_swap.py).
"""

from __future__ import annotations

import threading
from pathlib import Path

import httpx
import pytest
import redis as redis_lib

from connectors.redis_store import RedisStore
from connectors.vllm import ServingConfig
from daemon.dev.services import create_topics, free_port, wait_for
from daemon.rounds.runner import RoundRunner
from daemon.serving import KnownVersion, ReplicaState, ServingController, ServingState
from daemon.settings import Settings
from policies.config import Policy, load_policy
from tests.conftest import make_policy
from tests.streams import good_docs, produce

TOKEN = {"Authorization": "Bearer test-token"}


def _runner(client: redis_lib.Redis, tmp_path: Path, owner: str) -> RoundRunner:
    return RoundRunner(RedisStore(client, "fwd"), Settings(checkpoint_dir=tmp_path), Policy, owner=owner)


def test_a_rollback_sent_to_a_daemon_without_the_lease_is_carried_out_by_the_holder(redis_url: str, tmp_path: Path):
    a = _runner(redis_lib.Redis.from_url(redis_url), tmp_path, "daemon-a")
    b = _runner(redis_lib.Redis.from_url(redis_url), tmp_path, "daemon-b")
    # daemon-a holds the lease; it serves r00002 (rollback target: base) on one replica.
    a.ctx.fence = a.ctx.store.lease_acquire(a.ctx.owner, 60)
    url = f"http://127.0.0.1:{free_port()}"
    state = ServingState(
        versions={"base": KnownVersion("base", "/ck/base", "fp-base"), "r00002": KnownVersion("r00002", "/ck/r00002", "fp-2")},
        desired_version="r00002",
        previous_version="base",
        replicas={url: ReplicaState(url=url, version="r00002", status="serving")},
    )
    a.ctx.serving = ServingController(
        [url], state, on_state=lambda s: a.ctx.store.put_serving(a.ctx.fenced(), s.to_json()), config=ServingConfig(retries=0)
    )
    stop = threading.Event()
    threading.Thread(target=a.control_loop, args=(stop,), daemon=True).start()
    try:
        # Sent to daemon-b: daemon-a carries it out, and daemon-b answers with daemon-a's result.
        out = b.rollback("base")
        assert not out.queued and out.lease_holder == "daemon-a"
        assert out.from_version == "r00002" and out.to == "base" and out.record is not None and out.record.kind == "rollback"
        assert not out.ok and out.error is not None and out.error["replica"] == url, out.error  # the holder's swap attempt
        # A refusal of the holder's comes back as the same refusal, naming the holder and its known versions.
        refused = r"lease holder daemon-a: cannot roll back to 'r00009': known versions are \['base', 'r00002'\]"
        with pytest.raises(ValueError, match=refused):
            b.rollback("r00009")

        # Nobody holds the lease: the caller is told so after its wait; the holder carries the request out later.
        fence, a.ctx.fence = a.ctx.fenced(), None
        a.ctx.store.lease_release(fence)
        early = b.rollback("base", wait_s=0.3)
        assert early.queued and not early.ok and early.lease_holder is None and early.request_id
        a.ctx.fence = a.ctx.store.lease_acquire(a.ctx.owner, 60)
        late = wait_for(lambda: b.ctx.store.request_result(early.request_id or ""), 10, "the holder to answer the queued rollback")
        assert late is not None and late["rollback"]["to"] == "base" and late["rollback"]["error"]["replica"] == url, late
    finally:
        stop.set()
    assert a.ctx.serving.state.desired_version == "r00002"  # the failed rollbacks changed nothing


def test_an_ingest_pause_sent_to_one_daemon_pauses_every_daemon_and_outlives_a_restart(
    ingest_procs, redis_url: str, bootstrap: str, topics: dict, tmp_path: Path
):
    create_topics(bootstrap, {topics["docs"]: 2, topics["dlq"]: 1})
    policy_path = make_policy(tmp_path, topics)
    policy = load_policy(policy_path)
    store = RedisStore.from_url(redis_url, policy.name)
    a = ingest_procs(policy_path, redis_url, bootstrap)
    a.wait_assigned(90)
    assert httpx.post(f"http://127.0.0.1:{a.port}/ingest/pause", headers=TOKEN, timeout=10).status_code == 200
    wait_for(lambda: a.status()["ingest"]["paused"] == "operator", 30, "daemon a to pause")

    # A daemon started after the pause (a second replica, or one restarted) never received it, and obeys it.
    b = ingest_procs(policy_path, redis_url, bootstrap)
    wait_for(lambda: b.status()["ingest"]["assigned"] and b.status()["ingest"]["paused"] == "operator", 90, "daemon b, paused")
    status = b.status()
    assert status["ingest"]["operator_pause"]["by"] != status["rounds"]["owner"]  # daemon a's pause
    docs = [t.encode() for t in good_docs(20, policy)]
    produce(bootstrap, topics["docs"], docs)
    wait_for(lambda: a.status()["ingest"]["assigned"], 60, "daemon a to hold partitions again after b joined")
    assert sum(store.counters().values()) == 0  # both are paused at their batch boundary: nothing was consumed

    # Resumed through daemon b: both take up the stream, every message accounted.
    assert httpx.post(f"http://127.0.0.1:{b.port}/ingest/resume", headers=TOKEN, timeout=10).status_code == 200
    wait_for(lambda: sum(store.counters().values()) == len(docs), 90, f"{len(docs)} messages accounted", 0.2)
    assert a.status()["ingest"]["paused"] is None and b.status()["ingest"]["operator_pause"] is None
