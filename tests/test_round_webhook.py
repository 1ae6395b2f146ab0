"""The round-end webhook (daemon/round_webhook.py): retried within its bound, counted when it fails, and never
holding up the round. Against a real HTTP server in the test (http.server in a thread) and a real Redis.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import redis as redis_lib
import tenacity

from connectors.redis_store import RedisStore
from daemon import metrics as M
from daemon import round_webhook
from daemon.dev.services import wait_for
from daemon.round_record import ApprovalRecord, RoundState
from daemon.rounds.context import RoundContext
from daemon.settings import Settings
from policies.config import Policy
from tests.job_context import bare_record


class Receiver:
    """Answers every POST with `status`; with `hold` set, keeps each request open until `release` is set."""

    def __init__(self, status: int, hold: bool = False) -> None:
        self.status, self.hold = status, hold
        self.hits: list[bytes] = []
        self.got, self.release, self.answered = threading.Event(), threading.Event(), threading.Event()
        me = self

        class H(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802
                me.hits.append(self.rfile.read(int(self.headers["content-length"])))
                me.got.set()
                if me.hold:
                    me.release.wait(timeout=30)
                self.send_response(me.status)
                self.end_headers()
                me.answered.set()

            def log_message(self, *args: object) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), H)
        self.url = f"http://127.0.0.1:{self.server.server_port}/hook"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()


@pytest.fixture
def receivers() -> Iterator[list[Receiver]]:
    made: list[Receiver] = []
    yield made
    for r in made:
        r.release.set()
        r.server.shutdown()


def _failed() -> float:
    return M.REGISTRY.get_sample_value("cptd_round_webhooks_total", {"outcome": "failed"}) or 0.0


def _event() -> round_webhook.RoundEnded:
    return round_webhook.round_ended(bare_record("r00003", RoundState.FAILED), "hooks", "base")


def test_a_failing_webhook_is_retried_within_its_bound_then_counted(receivers):
    down = Receiver(503)
    receivers.append(down)
    before = _failed()
    assert round_webhook.post(down.url, _event(), attempts=3, wait=tenacity.wait_none()) is False
    assert len(down.hits) == 3 and _failed() == before + 1
    refused = Receiver(400)  # the receiver says the request is wrong: sending it again would not help
    receivers.append(refused)
    assert round_webhook.post(refused.url, _event(), attempts=3, wait=tenacity.wait_none()) is False
    assert len(refused.hits) == 1 and _failed() == before + 2


def test_the_round_ends_without_waiting_for_the_webhook(redis_client: redis_lib.Redis, tmp_path: Path, receivers):
    """The receiver holds the request open; the round's end (ctx.enter) has returned all the same."""
    slow = Receiver(200, hold=True)
    receivers.append(slow)
    kw = redis_client.connection_pool.connection_kwargs
    store = RedisStore(redis_client, "hooks")
    settings = Settings(redis_url=f"redis://{kw['host']}:{kw['port']}/0", checkpoint_dir=tmp_path, round_webhook_url=slow.url)
    ctx = RoundContext(store, settings, get_policy=lambda: Policy(name="hooks"), owner="t", fence=store.lease_acquire("t", 60))
    rec = bare_record("r00003", RoundState.EVALUATING)
    rec.error = "EVALUATING: ValueError: no held-out documents"
    ctx.put(rec)
    ctx.enter(rec, RoundState.FAILED)
    assert not slow.answered.is_set()
    wait_for(slow.got.is_set, timeout=30, what="the webhook request")
    stored = ctx.get_round("r00003")
    assert stored is not None and stored.state == RoundState.FAILED  # written before the webhook was sent
    slow.release.set()
    wait_for(slow.answered.is_set, timeout=30, what="the webhook's answer")
    body = slow.hits[0].decode()
    assert '"state":"FAILED"' in body and '"reason":"EVALUATING: ValueError: no held-out documents"' in body


def test_the_event_says_why_an_approve_round_ended_rejected_and_that_a_shadow_round_changed_nothing():
    rejected = bare_record("r00004", RoundState.REJECTED)
    rejected.approval = ApprovalRecord(since=0, deadline=60, decision="rejected", by="ops@host", at=30)
    assert round_webhook.round_ended(rejected, "hooks", "base").reason == "approval rejected by ops@host"
    rejected.approval = ApprovalRecord(since=0, deadline=60, decision="timed_out", at=60)
    assert round_webhook.round_ended(rejected, "hooks", "base").reason == "approval timed_out"
    shadowed = round_webhook.round_ended(bare_record("r00005", RoundState.SHADOWED), "hooks", "r00003")
    assert (shadowed.state, shadowed.deployed_version, shadowed.reason) == (RoundState.SHADOWED, "r00003", None)
