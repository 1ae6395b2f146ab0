"""deploy.mode shadow and approve, from the gate's decision to the end: a shadow round never touches a replica, an
approve round deploys only after `cptd approve`, and a wait nobody answers ends REJECTED, across a lease change.

Real parts: Redis, the daemon's runner and state machine (take-over, EVALUATING's gate, AWAITING_APPROVAL, DEPLOYING's
swap), its API served by uvicorn, the CLI, and a vLLM replica (the session's shared `vllm_server`, already started by
the serving tests). A round starts at EVALUATING with its evaluator report already written, as a round resumed after
the evaluator finished does, so no torch job runs: the candidate is the second tiny model, and the gate reads the
report and accepts it. The whole round from Kafka to a swap is tests/test_round_runner.py's.
"""

from __future__ import annotations

import contextlib
import json
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import redis as redis_lib
import uvicorn

from connectors.redis_store import BatchItem
from connectors.vllm import Replica
from daemon import metrics as M
from daemon.api import create_app
from daemon.app import Daemon
from daemon.cli import main
from daemon.cli_exit import Exit
from daemon.dev.services import free_port, wait_for
from daemon.jobs.specs import EvalReport, LossSummary, ModelReport, TrainResult, TrainSpec
from daemon.round_record import Parent, RoundRecord, RoundState, TrainRecord
from daemon.rounds.context import Stop
from daemon.settings import Settings
from policies.config import Policy
from tests.job_context import bare_record
from tests.vllm_fixtures import TinyModels, reset_to_base

TOKEN = "modes-token"
PROMPT = "the quick fox of round"


@contextlib.contextmanager
def serve(daemon: Daemon) -> Iterator[str]:
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(create_app(daemon, TOKEN), host="127.0.0.1", port=port, log_level="warning"))
    t = threading.Thread(target=server.run, daemon=True)
    t.start()
    wait_for(lambda: server.started, timeout=30, what="the API server")
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        t.join(timeout=10)


def make_daemon(redis_client: redis_lib.Redis, tmp_path: Path, policy: Policy, vllm_url: str, base: Path) -> Daemon:
    kw = redis_client.connection_pool.connection_kwargs
    policy_file = tmp_path / "policy.yaml"
    policy_file.write_text(json.dumps(policy.model_dump(mode="json")))
    settings = Settings(
        redis_url=f"redis://{kw['host']}:{kw['port']}/0", checkpoint_dir=tmp_path / "ck", policy=policy_file,
        vllm_urls=vllm_url, base_checkpoint=base,
    )  # fmt: skip
    d = Daemon(policy, settings)
    d.runner.ctx.fence = d.store.lease_acquire(d.runner.ctx.owner, 60)
    return d


def cli(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    with pytest.raises(SystemExit) as e:
        main(list(argv))
    out, err = capsys.readouterr()
    return int(e.value.code or 0), out, err


def evaluated_round(d: Daemon, rid: str, candidate: Path, parent: Path, docs: int = 6, policy: Policy | None = None) -> RoundRecord:
    """A round whose trainer and evaluator have finished: its documents taken from the buffer, `final` the candidate, the
    evaluator's report written (the candidate better on the new documents, no worse on replay), state EVALUATING."""
    ctx, store = d.runner.ctx, d.store
    first = store.stored_offsets().get(("docs", 0), 0)
    store.write_batch([doc(rid, first + i) for i in range(docs)], max_exact_keys=1000)
    assert len(store.snapshot_take(ctx.fenced(), rid, 10**6)) == docs
    out = ctx.round_dir(rid) / "train"
    out.mkdir(parents=True)
    (out / "final").symlink_to(candidate)
    rec = bare_record(rid, RoundState.EVALUATING)
    rec.owner, rec.policy, rec.parent = ctx.owner, policy or d.policy, Parent(version="base", checkpoint=str(parent))
    spec = TrainSpec(parent_dir=str(parent), out_dir=str(out), new_path=str(out / "new.jsonl"), round_id=rid)
    result = TrainResult(round_id=rid, steps=12, final=str(out / "final"))
    rec.train = TrainRecord(spec=spec, spec_digest="-", out_dir=str(out), launcher="subprocess", result=result)

    def scored(name: str, path: Path, new: float) -> ModelReport:
        return ModelReport(name=name, path=str(path), new=LossSummary(new, 1.0, 100), replay=LossSummary(3.0, 1.0, 100))

    report = EvalReport(round_id=rid, serving=scored("serving", parent, 3.0), candidates=[scored("final", candidate, 2.5)])
    (ctx.round_dir(rid) / "eval_report.json").write_text(report.to_json())
    ctx.put(rec)
    return rec


def doc(rid: str, offset: int) -> BatchItem:
    key = f"{rid}-doc{offset}"
    return BatchItem("docs", 0, offset, "candidate", "", key, 40, (), {"text": f"document {offset} of {rid}", "bytes": 40})


def replica_calls(url: str) -> dict[str, float]:
    """vLLM's own count of the requests it served, by method and handler (its /metrics)."""
    out: dict[str, float] = {}
    for line in httpx.get(url + "/metrics", timeout=10).text.splitlines():
        if line.startswith("http_requests_total{"):
            labels = dict(p.split("=", 1) for p in line[len("http_requests_total{") : line.index("}")].split(","))
            key = f"{labels.get('method', '').strip(chr(34))} {labels.get('handler', '').strip(chr(34))}"
            out[key] = out.get(key, 0.0) + float(line.rsplit(" ", 1)[1])
    return out


def writes(before: dict[str, float], after: dict[str, float]) -> dict[str, float]:
    """The requests other than GETs the replica served between two counts: a pause, a reload, a label, a completion."""
    return {k: n - before.get(k, 0.0) for k, n in after.items() if not k.startswith("GET ") and n > before.get(k, 0.0)}


@pytest.fixture
def on_replica(vllm_server, tiny_models: TinyModels) -> Iterator[Replica]:
    """The shared replica back on its boot weights, and left with the label it had (other tests adopt it afresh)."""
    reset_to_base(vllm_server.url, tiny_models.base)
    r = Replica(vllm_server.url)
    label = r.weight_version()
    yield r
    reset_to_base(vllm_server.url, tiny_models.base)
    r.set_weight_version(label)
    r.close()


def test_a_shadow_round_never_touches_a_replica(redis_client, tmp_path, on_replica: Replica, tiny_models: TinyModels, capsys):
    policy = Policy.model_validate({"name": "shadow", "deploy": {"mode": "shadow"}})
    d = make_daemon(redis_client, tmp_path, policy, on_replica.url, tiny_models.base)
    d.runner.take_over()  # the lease holder adopts the replica as "base": its last write to it
    served = on_replica.complete(PROMPT, 8)
    evaluated_round(d, "r00001", tiny_models.other, tiny_models.base)
    before = replica_calls(on_replica.url)
    shadowed = M.ROUNDS.labels(state="SHADOWED")._value.get()

    rec = d.runner.drive("r00001")

    assert rec.state == RoundState.SHADOWED, rec.error
    assert writes(before, replica_calls(on_replica.url)) == {}  # no pause, reload, label or completion: nothing but reads
    assert on_replica.weight_version() == "base" and not on_replica.is_paused() and on_replica.complete(PROMPT, 8) == served
    assert rec.deploy is None and rec.deployed_at is None and d.runner.ctx.serving.state.desired_version == "base"
    assert rec.shadow is not None and rec.shadow.model_dump() == {
        "version": "r00001", "kind": "deploy", "candidate": str(tmp_path / "ck/rounds/r00001/train/final"), "route_model": None,
        "replicas": [on_replica.url], "serving_version": "base",
    }  # fmt: skip
    # Its documents: trained on, so released as after a gate rejection (replay, then out of the buffer), not requeued.
    assert rec.docs is not None and (rec.docs.fate, rec.docs.docs) == ("released", 6)
    assert d.store.buffer_keys() == [] and d.store.round_docs("r00001") == []
    assert M.ROUNDS.labels(state="SHADOWED")._value.get() == shadowed + 1
    with serve(d) as url:
        rc, out, _ = cli(capsys, "round", "r00001", "--wait", "--json", "--url", url)
        assert rc == Exit.SHADOWED and json.loads(out)["outcome"] == "SHADOWED"
        rc, out, _ = cli(capsys, "round", "r00001", "--url", url)
        assert rc == Exit.OK and "would have deployed r00001 (deploy) to 1 replica(s) serving base" in out
        rounds = httpx.get(url + "/status", timeout=10).json()["rounds"]
        assert rounds["deploy_mode"] == "shadow" and rounds["latest"]["shadow"]["version"] == "r00001"
        assert 'cptd_deploy_mode{mode="shadow"} 1.0' in httpx.get(url + "/metrics", timeout=10).text

    # A LoRA round in shadow mode: its adapter is checked as deploy_lora would check it, and never loaded.
    lora = Policy.model_validate({"name": "shadow", "deploy": {"mode": "shadow"}, "train": {"mode": "lora", "lora_r": 8, "lora_alpha": 16}})
    evaluated_round(d, "r00002", tiny_models.lora1, tiny_models.base, policy=lora)
    models, before = on_replica.model_ids(), replica_calls(on_replica.url)
    rec = d.runner.drive("r00002")
    assert rec.state == RoundState.SHADOWED, rec.error
    assert writes(before, replica_calls(on_replica.url)) == {} and on_replica.model_ids() == models
    assert rec.shadow is not None and (rec.shadow.kind, rec.shadow.route_model, rec.shadow.serving_version) == (
        "lora",
        "cptd-r00002",
        "base",
    )


def test_an_approve_round_deploys_only_after_cptd_approve(redis_client, tmp_path, on_replica, tiny_models, capsys, monkeypatch):
    policy = Policy.model_validate({"name": "approve", "deploy": {"mode": "approve", "approval_timeout_s": 600}})
    d = make_daemon(redis_client, tmp_path, policy, on_replica.url, tiny_models.base)
    d.runner.take_over()
    monkeypatch.setenv("CPTD_API_TOKEN", TOKEN)
    d.runner.ctx.put(bare_record("r00001", RoundState.TRAINING))  # an older record, not waiting: a decision is refused
    evaluated_round(d, "r00002", tiny_models.other, tiny_models.base)
    before = replica_calls(on_replica.url)
    ended: list[RoundRecord] = []
    driver = threading.Thread(target=lambda: ended.append(d.runner.drive("r00002")), daemon=True)
    with serve(d) as url:
        driver.start()
        rec = wait_for(lambda: (r := d.runner.get_round("r00002")) and r.state == RoundState.AWAITING_APPROVAL and r, 30, "the wait")
        assert rec.approval is not None and rec.approval.deadline == pytest.approx(rec.approval.since + 600)
        waiting = httpx.get(url + "/status", timeout=10).json()["rounds"]["awaiting_approval"]
        assert waiting == {"round": "r00002", "since": rec.approval.since, "deadline": rec.approval.deadline}
        assert M.ROUND_AWAITING_APPROVAL._value.get() == rec.approval.since
        rc, out, err = cli(capsys, "approve", "r00001", "--url", url)
        assert rc == Exit.REFUSED and "round r00001 is not waiting for approval: it is TRAINING" in err
        assert driver.is_alive() and writes(before, replica_calls(on_replica.url)) == {}  # nothing deployed while it waits
        assert on_replica.weight_version() == "base"

        rc, out, _ = cli(capsys, "approve", "r00002", "--note", "looks good", "--by", "ops", "--url", url)
        assert rc == Exit.OK and "round r00002 approved" in out
        driver.join(timeout=120)
        assert ended and ended[0].state == RoundState.DEPLOYED, ended and ended[0].error
        assert on_replica.weight_version() == "r00002" and d.runner.ctx.serving.state.desired_version == "r00002"
        rec = ended[0]
        assert rec.approval is not None and (rec.approval.decision, rec.approval.by, rec.approval.note) == ("approved", "ops", "looks good")
        assert rec.docs is not None and rec.docs.fate == "released" and M.ROUND_AWAITING_APPROVAL._value.get() == 0
        rc, _, err = cli(capsys, "reject", "r00002", "--url", url)
        assert rc == Exit.REFUSED and "it ended DEPLOYED" in err
        rc, out, _ = cli(capsys, "round", "r00002", "--url", url)
        assert rc == Exit.OK and "approval    approved by ops" in out and ": looks good" in out
        assert httpx.get(url + "/status", timeout=10).json()["rounds"]["awaiting_approval"] is None


def test_an_unanswered_approval_rejects_the_round_across_a_lease_change_and_reject_or_cancel_end_a_wait(
    redis_client, tmp_path, capsys, monkeypatch
):
    """No replica: nothing here would reach one (the decision is before DEPLOYING). The first lease holder stops while
    the round waits; the next one waits on to the same deadline, and the round ends REJECTED, documents released."""
    policy = Policy.model_validate({"name": "timeout", "deploy": {"mode": "approve", "approval_timeout_s": 2}})
    a = make_daemon(redis_client, tmp_path, policy, f"http://127.0.0.1:{free_port()}", tmp_path / "base")
    evaluated_round(a, "r00001", tmp_path / "candidate", tmp_path / "base")
    stopped: list[BaseException] = []

    def first_holder() -> None:
        try:
            a.runner.drive("r00001")
        except Stop as e:
            stopped.append(e)

    driver = threading.Thread(target=first_holder, daemon=True)
    driver.start()
    waiting = wait_for(lambda: (r := a.runner.get_round("r00001")) and r.state == RoundState.AWAITING_APPROVAL and r, 30, "the wait")
    a.runner.ctx.stop.set()  # SIGTERM: the round stays where it is, resumable
    driver.join(timeout=10)
    assert stopped and a.runner.get_round("r00001").state == RoundState.AWAITING_APPROVAL
    a.store.lease_release(a.runner.ctx.fenced())

    b = make_daemon(redis_client, tmp_path, policy, f"http://127.0.0.1:{free_port()}", tmp_path / "base")  # same volume
    assert b.runner.ctx.fenced().epoch > a.runner.ctx.fenced().epoch
    rec = b.runner.drive("r00001")
    assert rec.state == RoundState.REJECTED and rec.approval is not None and rec.approval.decision == "timed_out"
    assert rec.approval.deadline == waiting.approval.deadline  # the deadline came from Redis, not from the restart
    assert rec.docs is not None and rec.docs.fate == "released" and b.store.buffer_keys() == []

    # An operator's reject, through the API, ends a waiting round the same way.
    monkeypatch.setenv("CPTD_API_TOKEN", TOKEN)
    evaluated_round(b, "r00002", tmp_path / "candidate", tmp_path / "base")
    driver = threading.Thread(target=lambda: b.runner.drive("r00002"), daemon=True)
    with serve(b) as url:
        driver.start()
        wait_for(lambda: b.runner.get_round("r00002").state == RoundState.AWAITING_APPROVAL, 30, "the second wait")
        rc, out, _ = cli(capsys, "--json", "reject", "r00002", "--url", url)
        assert rc == Exit.OK and json.loads(out) == {"round": "r00002", "decision": "rejected", "state": "AWAITING_APPROVAL"}
        driver.join(timeout=30)
        rec2: Any = b.runner.get_round("r00002")
        assert rec2.state == RoundState.REJECTED and rec2.approval.decision == "rejected" and rec2.docs.fate == "released"
        rc, out, _ = cli(capsys, "round", "r00002", "--wait", "--json", "--url", url)
        assert rc == Exit.REJECTED

        # A cancel while it waits ends it FAILED with its documents back in the buffer, as in any phase before DEPLOYING.
        evaluated_round(b, "r00003", tmp_path / "candidate", tmp_path / "base")
        driver = threading.Thread(target=lambda: b.runner.drive("r00003"), daemon=True)
        driver.start()
        wait_for(lambda: b.runner.get_round("r00003").state == RoundState.AWAITING_APPROVAL, 30, "the third wait")
        assert cli(capsys, "cancel", "r00003", "--url", url)[0] == Exit.OK
        driver.join(timeout=30)
        rec3: Any = b.runner.get_round("r00003")
        assert rec3.state == RoundState.FAILED and rec3.cancelled and rec3.docs.fate == "requeued"
        assert sorted(b.store.buffer_keys()) == [f"r00003-doc{o}" for o in range(12, 18)]  # offsets 12..17: its six
