"""Redis data loss against a real Redis: an emptied Redis is caught before any round or take-over, round ids stay
unique, and `cptd accept-redis-reset` makes Redis agree with the checkpoint volume again.

The replica URL points at a port nothing listens on: with the loss caught nothing may call it. Without the guard the
runner takes over at once: it builds its serving controller and calls adopt() on the replicas (labelling what they
serve `base`), which `runner.ctx.serving` shows.
"""

from __future__ import annotations

import threading
from pathlib import Path

import pytest
import redis as redis_lib
import yaml

from connectors.redis_store import RedisStore
from daemon import metrics as M
from daemon import redis_loss
from daemon.cli import main
from daemon.dev.services import free_port, wait_for
from daemon.rounds.runner import RoundRunner
from daemon.serving import KnownVersion, ServingState
from daemon.settings import Settings
from policies.config import Policy

DEPLOYED = ServingState(
    versions={"base": KnownVersion("base", "/ck/base", "fp-base"), "r00002": KnownVersion("r00002", "/ck/rounds/r00002/final", "fp-2")},
    desired_version="r00002",
    previous_version="base",
)


def _runner(store: RedisStore, checkpoints: Path) -> RoundRunner:
    settings = Settings(checkpoint_dir=checkpoints, vllm_urls=f"http://127.0.0.1:{free_port()}")
    return RoundRunner(store, settings, get_policy=Policy, owner=f"daemon-{free_port()}")


def _history(store: RedisStore, checkpoints: Path) -> None:
    """A deployment that ran rounds r00001 and r00002 and serves r00002, its serving state saved as the daemon saves it."""
    assert redis_loss.check(store, checkpoints) is None  # a new deployment: marked in Redis and on the volume
    for _ in range(2):
        (checkpoints / "rounds" / f"r{store.next_round_number():05d}").mkdir(parents=True)
    fence = store.lease_acquire("earlier-daemon", 60)
    assert fence is not None
    redis_loss.put_serving(store, fence, checkpoints, DEPLOYED.to_json())
    store.lease_release(fence)


def test_an_emptied_redis_is_caught_before_any_round_or_take_over(redis_client: redis_lib.Redis, tmp_path: Path):
    store = RedisStore(redis_client, "loss")
    checkpoints = tmp_path / "checkpoints"
    _history(store, checkpoints)
    redis_client.flushall()  # Redis lost everything; the volume still knows the history

    runner = _runner(store, checkpoints)
    request = runner.request_manual("operator")
    stop = threading.Event()
    loop = threading.Thread(target=runner.run, args=(stop,), daemon=True)
    loop.start()
    try:
        wait_for(
            lambda: runner.leader() and (runner.ctx.serving is not None or getattr(runner, "redis_loss", None) is not None),
            30,
            "the lease holder to take over or to catch the loss",
            0.05,
        )
        assert runner.ctx.serving is None, "the runner took over an emptied Redis: adopt() was called on the replicas"
        status = runner.status()["redis_loss"]
        assert status is not None and "Redis has no identity" in status["cause"] and "r00002" in status["cause"]
        assert "cptd accept-redis-reset" in status["action"]
        assert M.REGISTRY.get_sample_value("cptd_redis_data_loss") == 1
        assert store.get_serving() is None  # nothing labelled `base`
        assert store.list_rounds() == [] and store.request_result(request) is None  # no round started, the request waits
    finally:
        stop.set()
        loop.join(timeout=30)


def test_a_round_after_a_redis_reset_does_not_reuse_a_round_directory(redis_client: redis_lib.Redis, tmp_path: Path):
    store = RedisStore(redis_client, "ids")
    checkpoints = tmp_path / "checkpoints"
    for rid in ("r00001", "r00002", "r00007"):
        (checkpoints / "rounds" / rid).mkdir(parents=True)  # round_seq lost with the rest of Redis
    runner = _runner(store, checkpoints)
    runner.ctx.fence = store.lease_acquire(runner.ctx.owner, 60)

    rid = runner.create(Policy(), "manual", "test", None)

    assert rid == "r00008"
    assert not (checkpoints / "rounds" / rid).exists()


def test_accept_redis_reset_restores_identity_round_numbers_and_the_serving_state(
    redis_client: redis_lib.Redis, redis_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
):
    store = RedisStore(redis_client, "accept")
    checkpoints = tmp_path / "checkpoints"
    _history(store, checkpoints)
    identity = redis_loss.volume_identity(checkpoints)
    redis_client.flushall()
    policy = tmp_path / "policy.yaml"
    policy.write_text(yaml.safe_dump({"name": "accept"}))
    for k, v in {"CPTD_POLICY": str(policy), "CPTD_REDIS_URL": redis_url, "CPTD_CHECKPOINT_DIR": str(checkpoints)}.items():
        monkeypatch.setenv(k, v)

    with pytest.raises(SystemExit) as dry:
        main(["accept-redis-reset"])
    out = capsys.readouterr().out
    assert dry.value.code == 1 and "would change" in out
    assert "replay reservoir is empty" in out and "cptd seed-replay" in out  # the emptied reservoir: the gate would reject every round
    assert redis_loss.check(store, checkpoints) is not None  # a dry run writes nothing

    with pytest.raises(SystemExit) as done:
        main(["accept-redis-reset", "--yes"])
    assert done.value.code == 0, capsys.readouterr()

    assert redis_loss.check(store, checkpoints) is None
    assert identity is not None and store.identity() is not None and identity.id in store.identity()  # type: ignore[operator]
    assert store.round_seq() == 2
    restored = store.get_serving()
    assert restored is not None and ServingState.from_json(restored).desired_version == "r00002"
    runner = _runner(store, checkpoints)
    assert not runner.redis_lost()  # rounds and take-over go on: take-over reconciles to r00002, nothing adopted
