"""DEPLOYING's guards that need no vLLM: a rollback is never undone by a descendant, and the lock covers the record.

Real Redis (the round record, the fence, the documents' fate). The serving controller points at a port nothing
listens on: both cases are decided before any replica would be called, and a call would fail the test.
The swap itself, and the reconcile after a failed one, are tested against real vLLM in tests/test_vllm_swap.py.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import redis as redis_lib

from connectors.redis_store import Fence, RedisStore
from daemon.dev.services import free_port
from daemon.round_record import Parent, RoundRecord, RoundState
from daemon.rounds.context import RoundContext
from daemon.rounds.state_machine import drive
from daemon.serving import KnownVersion, ReplicaState, ServingController, ServingState
from daemon.settings import Settings
from policies.config import Policy
from tests.job_context import bare_record


class LockWitness(RedisStore):
    """The real store; notes whether the serving lock is held when a round record says DEPLOYED."""

    ctx: RoundContext | None = None
    held_at_deployed: list[bool]

    def put_round(self, fence: Fence, round_id: str, record: dict[str, Any], serving: str | None = None) -> None:
        if record.get("state") == RoundState.DEPLOYED.value and self.ctx is not None:
            self.held_at_deployed.append(self.ctx.serving_lock.locked())
        super().put_round(fence, round_id, record, serving)


def _context(store: RedisStore, tmp_path: Path, state: ServingState) -> RoundContext:
    ctx = RoundContext(store, Settings(checkpoint_dir=tmp_path), get_policy=Policy, owner="guard-test")
    ctx.fence = store.lease_acquire(ctx.owner, 60)
    url = f"http://127.0.0.1:{free_port()}"  # nothing listens: a replica call would be an error
    state.replicas = {url: ReplicaState(url=url, version=state.desired_version, status="serving")}
    ctx.serving = ServingController([url], state, on_state=lambda s: store.put_serving(ctx.fenced(), s.to_json()))
    return ctx


def _deploying_round(ctx: RoundContext, rid: str, parent: str, candidate: Path) -> RoundRecord:
    rec = bare_record(rid, RoundState.DEPLOYING)
    rec.owner, rec.policy, rec.candidate = ctx.owner, Policy(), str(candidate)
    rec.parent = Parent(version=parent, checkpoint=f"/ck/{parent}")
    ctx.put(rec)
    return rec


def test_a_round_whose_parent_was_rolled_back_is_refused_and_its_documents_requeued(redis_client: redis_lib.Redis, tmp_path: Path):
    # r00002 was deployed, r00003 trained from it; then the operator rolled back to base.
    state = ServingState(
        versions={"base": KnownVersion("base", "/ck/base", "fp-base"), "r00002": KnownVersion("r00002", "/ck/r00002", "fp-2")},
        desired_version="base",
    )
    store = RedisStore(redis_client, "guard")
    ctx = _context(store, tmp_path, state)
    _deploying_round(ctx, "r00003", parent="r00002", candidate=tmp_path / "rounds" / "r00003" / "final")

    out = drive(ctx, "r00003")

    assert out.state == RoundState.FAILED
    assert out.error is not None and "'r00002'" in out.error and "'base'" in out.error, out.error
    assert out.docs is not None and out.docs.fate == "requeued"
    assert out.deploy is None  # no swap was tried
    assert ctx.serving is not None and ctx.serving.state.desired_version == "base"
    assert all(r.step is None and r.status == "serving" for r in ctx.serving.state.replicas.values())


def test_the_serving_lock_is_held_until_the_deployed_state_is_written(redis_client: redis_lib.Redis, tmp_path: Path):
    # A round resumed after its swap finished: the replicas already serve it, so DEPLOYING only writes the end.
    state = ServingState(
        versions={"base": KnownVersion("base", "/ck/base", "fp-base"), "r00004": KnownVersion("r00004", "/ck/r00004", "fp-4")},
        desired_version="r00004",
        previous_version="base",
    )
    store = LockWitness(redis_client, "guard-lock")
    store.held_at_deployed = []
    ctx = _context(store, tmp_path, state)
    store.ctx = ctx
    _deploying_round(ctx, "r00004", parent="base", candidate=tmp_path / "rounds" / "r00004" / "final")

    out = drive(ctx, "r00004")

    assert out.state == RoundState.DEPLOYED, out.error
    assert store.held_at_deployed == [True]  # an operator rollback could not slip in before the record
    assert not ctx.serving_lock.locked()


def test_an_adapter_round_continuing_a_rolled_back_adapter_is_refused(redis_client: redis_lib.Redis, tmp_path: Path):
    # r00005 trained on adapter cptd-r00004; then the operator sent clients back to the base model.
    state = ServingState(versions={"base": KnownVersion("base", "/ck/base", "fp-base")}, desired_version="base", lora_active=None)
    store = RedisStore(redis_client, "guard-lora")
    ctx = _context(store, tmp_path, state)
    rec = _deploying_round(ctx, "r00005", parent="base", candidate=tmp_path / "rounds" / "r00005" / "adapter")
    rec.policy = Policy.model_validate({"train": {"mode": "lora"}})
    rec.parent.adapter = "cptd-r00004"
    ctx.put(rec)

    out = drive(ctx, "r00005")

    assert out.state == RoundState.FAILED and out.docs is not None and out.docs.fate == "requeued"
    assert out.error is not None and "'cptd-r00004'" in out.error and "'the base model'" in out.error, out.error
    assert ctx.serving is not None and ctx.serving.state.lora_active is None and ctx.serving.state.lora_versions == []
