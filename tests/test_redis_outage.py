"""A Redis outage during TRAINING does not fail the round (issue 24): real Redis, stopped and restarted.

The round's record, lease and fence live in a real Redis (AOF, fsync always) that the test kills and restarts on
the same port. The trainer is a small child process standing in for daemon.jobs.trainer (the real one needs a model
and minutes); it notes each start and runs until the test lets it finish. The lease is held by the real lease loop
(`RoundRunner.lease_loop`); the loop that drives the round while this process holds the lease is the runner's own
(`RoundRunner.run`) minus its take-over, which needs vLLM and is covered by tests/test_round_runner.py. The client
has redis-py's own retries off, so every failed call reaches the round code at once (the worst case, and fast).
"""

from __future__ import annotations

import os
import sys
import threading
import time
from pathlib import Path
from typing import Any

import pytest
from redis.backoff import NoBackoff
from redis.retry import Retry

from connectors.redis_store import Fence, RedisStore, connect
from daemon.dev.services import Service, redis_service, wait_for
from daemon.job_launchers import Job, ProcessLauncher
from daemon.jobs.specs import TrainSpec
from daemon.round_record import RoundRecord, RoundState, TrainRecord
from daemon.rounds import state_machine
from daemon.rounds.context import RoundContext, Stop
from daemon.rounds.runner import RoundRunner
from daemon.rounds.state_machine import drive
from daemon.serving import KnownVersion, ServingState
from daemon.settings import Settings
from policies.config import Policy
from tests.job_context import bare_record
from tests.test_deploy_guard import _context as deploy_guard_context
from tests.test_deploy_guard import _deploying_round as deploying_round

# The lease is renewed every TTL/3 and ends 0.8 TTL after its last renewal, so an outage shorter than 0.46 TTL
# (3.7 s) cannot end it; the job is polled every second.
LEASE_TTL_S = 8.0

# Stands in for the trainer: notes its pid, runs until the test creates `release`, then writes its result.
TRAINER = """
import json, os, pathlib, sys, time
spec = json.loads(pathlib.Path(sys.argv[1]).read_text())
out = pathlib.Path(spec["out_dir"]); out.mkdir(parents=True, exist_ok=True)
with open(out / "starts", "a") as f:
    f.write(f"{os.getpid()}\\n")
while not (out / "release").exists():
    time.sleep(0.05)
(out / "result.json").write_text(json.dumps({"round_id": spec["round_id"], "steps": 12, "final": str(out / "final")}))
"""


class StandInTrainer(ProcessLauncher):
    def command(self, job: Job) -> list[str]:
        assert job.module == "daemon.jobs.trainer", job.module
        return [sys.executable, "-c", TRAINER, str(job.spec_path)]


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def _training_round(ctx: RoundContext, policy: Policy) -> RoundRecord:
    rec = bare_record("r00001", RoundState.TRAINING)
    rec.owner, rec.policy = ctx.owner, policy
    d = ctx.round_dir(rec.id)
    (d / "data").mkdir(parents=True)
    spec = TrainSpec(parent_dir="/ck/base", out_dir=str(d / "train"), new_path=str(d / "data/new.jsonl"), round_id=rec.id)
    rec.train = TrainRecord(spec=spec, spec_digest=spec.digest(), out_dir=spec.out_dir, launcher="subprocess")
    ctx.put(rec)
    return rec


def test_a_redis_outage_during_training_keeps_the_trainer_and_a_longer_one_resumes_the_same_round(
    redis_server: Service, redis_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    monkeypatch.setattr("daemon.rounds.context.launcher_for", lambda *a, **k: StandInTrainer())
    reached = threading.Event()

    def evaluating_reached(ctx: RoundContext, rec: RoundRecord) -> None:  # the test is about TRAINING: stop here
        reached.set()
        raise Stop("test: TRAINING is done")

    monkeypatch.setitem(state_machine.PHASE, RoundState.EVALUATING, evaluating_reached)
    policy = Policy.model_validate({"rounds": {"lease_ttl_s": LEASE_TTL_S, "redis_outage_s": 60}})
    store = RedisStore(connect(redis_url, retry=Retry(NoBackoff(), 0)), "outage")
    runner = RoundRunner(store, Settings(checkpoint_dir=tmp_path), lambda: policy, owner="daemon-a")
    ctx, stop = runner.ctx, threading.Event()
    ctx.stop = stop
    threading.Thread(target=runner.lease_loop, args=(stop,), daemon=True).start()
    wait_for(lambda: ctx.fence is not None, 10, "the lease")
    rec = _training_round(ctx, policy)
    starts = Path(rec.train.out_dir if rec.train else "") / "starts"
    outcomes: list[str] = []  # how each drive() of the round ended

    def hold_and_drive() -> None:
        while not stop.is_set() and not reached.is_set():
            if ctx.fence is None:
                stop.wait(0.1)
                continue
            try:
                outcomes.append(drive(ctx, rec.id).state.value)
                return
            except Stop as e:
                outcomes.append(f"Stop: {e}")
            except Exception as e:  # noqa: BLE001 - as RoundRunner.run: log, wait, drive the round again
                outcomes.append(f"{type(e).__name__}: {e}")
                stop.wait(1.0)

    driver = threading.Thread(target=hold_and_drive, daemon=True)
    driver.start()
    servers = [redis_server]  # the Redis running now is the last; every restart serves the same AOF on the same port

    def restart() -> float:
        servers.append(redis_service(tmp_path / "redis", port=redis_server.port).start())
        return time.time()

    try:
        pids = wait_for(lambda: starts.exists() and starts.read_text().split(), 30, "the trainer to start")
        epoch = ctx.fence.epoch if ctx.fence else None

        # 1. Shorter than the lease, longer than the poll interval: the same trainer runs on, nothing is redone.
        servers[-1].kill()
        stop.wait(2.0)  # the outage itself
        back = restart()
        wait_for(lambda: (r := store.get_round(rec.id)) and r["updated_at"] > back, 20, "the round's progress written again")
        assert starts.read_text().split() == pids, f"the trainer was restarted by a short outage: {outcomes}"
        assert _alive(int(pids[0])) and outcomes == [], outcomes
        assert ctx.fence is not None and ctx.fence.epoch == epoch  # the lease never changed hands

        # 2. Longer than the lease TTL: the lease ends, the trainer is stopped with it (a daemon without the lease
        # runs no job), the round waits where it is and resumes under the same id when the lease comes back.
        down = time.monotonic()
        servers[-1].kill()
        wait_for(lambda: ctx.fence is None, 2 * LEASE_TTL_S, "the lease to lapse")
        wait_for(lambda: not _alive(int(pids[0])), 30, "the trainer to stop with the lease")
        stop.wait(max(0.0, down + 1.25 * LEASE_TTL_S - time.monotonic()))  # the rest of the outage
        restart()
        wait_for(lambda: starts.exists() and len(starts.read_text().split()) == 2, 60, f"the round to resume: {outcomes}")
        (starts.parent / "release").touch()
        assert reached.wait(30), outcomes
        after = store.get_round(rec.id)
        assert after is not None and after["state"] == RoundState.EVALUATING.value and after["error"] is None
        assert after["train"]["result"]["steps"] == 12
        assert outcomes == ["Stop: lease lost", "Stop: test: TRAINING is done"], outcomes
        assert ctx.fence is not None and epoch is not None and ctx.fence.epoch > epoch
    finally:
        stop.set()
        driver.join(30)
        for svc in servers[1:]:  # the fixture stops the first
            svc.kill()


class OutageAtDeployed(RedisStore):
    """The real store; Redis goes down (killed, restarted 1.5 s later) just as the round's DEPLOYED state is written."""

    servers: list[Service]
    workdir: Path

    def put_round(self, fence: Fence, round_id: str, record: dict[str, Any], serving: str | None = None) -> None:
        if record.get("state") == RoundState.DEPLOYED.value and len(self.servers) == 1:
            port = self.servers[0].port
            self.servers[0].kill()
            timer = threading.Timer(1.5, lambda: self.servers.append(redis_service(self.workdir, port=port).start()))
            timer.start()
        super().put_round(fence, round_id, record, serving)


def test_a_deploy_whose_final_save_meets_an_outage_ends_deployed_not_failed(redis_server: Service, redis_url: str, tmp_path: Path):
    # Every replica serves r00004 already (the swap is done); the write of DEPLOYED meets Redis down.
    state = ServingState(
        versions={"base": KnownVersion("base", "/ck/base", "fp-base"), "r00004": KnownVersion("r00004", "/ck/r00004", "fp-4")},
        desired_version="r00004",
        previous_version="base",
    )
    store = OutageAtDeployed(connect(redis_url, retry=Retry(NoBackoff(), 0)), "deploy-outage")
    store.servers, store.workdir = [redis_server], tmp_path / "redis"
    ctx = deploy_guard_context(store, tmp_path / "ck", state)
    deploying_round(ctx, "r00004", parent="base", candidate=tmp_path / "rounds" / "r00004" / "final")
    try:
        out = drive(ctx, "r00004")
    finally:
        for svc in store.servers[1:]:
            svc.kill()
    assert len(store.servers) == 2  # the outage happened
    assert out.state == RoundState.DEPLOYED and out.error is None, out.error
