"""Experiment tracking (daemon/round_tracking.py): an ended round becomes an MLflow run with its params, per-step
metrics, eval results and lineage, and its candidate a registered model version; a tracker that stalls never holds
up a round, is counted, and the round is exported on a later pass.

Against a real `mlflow server` (sqlite backend, artifacts proxied) from the venv `make install-test` builds
(.venv-mlflow: `mlflow` cannot share the main venv, see the Makefile) and a real Redis. The round is a record built
here, with a progress.jsonl as the trainer writes it: the export reads nothing else, and no training is needed.
"""

from __future__ import annotations

import json
import socket
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import redis as redis_lib
from pydantic import SecretStr

from connectors.redis_store import RedisStore
from daemon import metrics as M
from daemon.dev.services import Service, free_port, wait_for
from daemon.jobs.specs import TrainSpec
from daemon.round_record import (
    CandidateScores,
    DriftRecord,
    DriftStatsRecord,
    EvalSummary,
    GateRecord,
    ModelLosses,
    OffsetRange,
    Parent,
    PhaseTimes,
    RollbackRecord,
    RoundRecord,
    RoundState,
    Snapshot,
    TrainRecord,
    VerdictRecord,
)
from daemon.rounds.context import RoundContext
from daemon.settings import Settings
from policies.config import Policy
from policies.lr_schedule import SchedulePolicy
from tests.job_context import bare_record

MLFLOW = Path(__file__).resolve().parents[1] / ".venv-mlflow" / "bin" / "mlflow"
STEPS = 6


@pytest.fixture(scope="module")
def mlflow_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    assert MLFLOW.exists(), f"{MLFLOW} missing: `make install-test` builds the MLflow server's venv"
    d = tmp_path_factory.mktemp("mlflow")
    port = free_port()
    argv = [str(MLFLOW), "server", "--host", "127.0.0.1", "--port", str(port), "--workers", "1"]
    argv += ["--backend-store-uri", f"sqlite:///{d / 'mlflow.db'}", "--artifacts-destination", str(d / "artifacts")]
    svc = Service("mlflow", port, argv, d / "mlflow.log").start(timeout=60)
    url = f"http://127.0.0.1:{port}"
    wait_for(lambda: httpx.get(f"{url}/health", timeout=2).status_code == 200, 60, "mlflow /health", proc=svc.proc, log_path=svc.log_path)
    yield url
    svc.stop()


def _api(url: str, method: str, path: str, **kw: Any) -> dict[str, Any]:
    r = httpx.request(method, f"{url}/api/2.0/mlflow/{path}", timeout=10, **kw)
    r.raise_for_status()
    return r.json()


def _context(redis_client: redis_lib.Redis, tmp_path: Path, uri: str, **kw: Any) -> RoundContext:
    store = RedisStore(redis_client, "tracked")
    settings = Settings(checkpoint_dir=tmp_path, mlflow_tracking_uri=uri, **kw)
    return RoundContext(store, settings, get_policy=lambda: Policy(name="tracked"), owner="t", fence=store.lease_acquire("t", 60))


def _exports(outcome: str) -> float:
    return M.REGISTRY.get_sample_value("cptd_tracking_exports_total", {"outcome": outcome}) or 0.0


def trained_round(tmp_path: Path, rid: str) -> RoundRecord:
    """A round that trained STEPS steps and passed the gate, as its record stands when DEPLOYING ends."""
    rec = bare_record(rid, RoundState.DEPLOYING)
    rec.created_at = 1_790_000_000.0
    rec.policy, rec.policy_hash = Policy(name="tracked"), "policy-hash-1"
    rec.parent = Parent(version="r00006", checkpoint="/checkpoints/rounds/r00006/train/final")
    rec.snapshot = Snapshot(
        docs=40,
        train_docs=36,
        heldout_docs=4,
        bytes=80_000,
        tokens_estimate=20_000,
        manifest=str(tmp_path / "manifest.jsonl"),
        manifest_sha256="ab" * 32,
        kafka_offsets={"docs|0": OffsetRange(first=100, last=139, docs=40)},
        replay_docs=8,
    )
    stats = DriftStatsRecord(loss_new=3.2, loss_ref=2.9, js_distance=0.21, tokens_new=5000, tokens_ref=5000)
    rec.drift = DriftRecord(stats=stats, score=0.42, level="weak", replay_ratio=0.25, peak_lr=2e-4, warmup_frac=0.02)
    rec.replay_ratio = 0.25
    rec.schedule = SchedulePolicy(kind="wsd", peak_lr=2e-4, warmup_frac=0.02)
    out = tmp_path / rid / "train"
    out.mkdir(parents=True)
    spec = TrainSpec(parent_dir=rec.parent.checkpoint or "", out_dir=str(out), new_path="-", round_id=rid)
    rec.train = TrainRecord(spec=spec, spec_digest=spec.digest(), out_dir=str(out), launcher="subprocess")
    t = rec.created_at + 10
    lines = [{"event": "start", "time": t, "total_steps": STEPS, "main_steps": STEPS, "resumed_at": None}]
    for s in range(1, STEPS + 1):
        step = {"step": s, "loss": 4.0 - 0.25 * s, "lr": 1e-4 * s, "grad_norm": 1.0 / s, "tokens_per_s": 900.0 + s, "tokens": 512 * s}
        lines.append({"event": "step", "time": t + s, **step})
        if s % 3 == 0:
            lines.append({"event": "eval", "time": t + s, "step": s, "loss_heldout_new": 3.5 - 0.1 * s, "loss_heldout_replay": 2.6})
    (out / "progress.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))
    rec.phases = {
        RoundState.TRAINING: PhaseTimes(started_at=t, finished_at=t + STEPS + 1),
        RoundState.EVALUATING: PhaseTimes(started_at=t + STEPS + 1, finished_at=t + STEPS + 5),
        RoundState.DEPLOYING: PhaseTimes(started_at=t + STEPS + 5),
    }
    rec.eval = EvalSummary(
        report=str(out / "eval.json"),
        serving=ModelLosses(new_nll=3.3, replay_nll=2.55),
        candidates=[CandidateScores(name="final", new_nll=2.9, replay_nll=2.57, suites={"arc_easy": 0.61})],
    )
    rec.gate = GateRecord(
        accepted=True, chosen="final", verdicts=[VerdictRecord(name="final", passed=True, adaptation=0.4, forgetting=0.02)]
    )
    rec.candidate = str(out / "final")
    return rec


def test_an_ended_round_is_a_run_with_its_lineage_and_its_candidate_a_model_version(mlflow_url, redis_client, tmp_path):
    ctx = _context(redis_client, tmp_path, mlflow_url)
    rec = trained_round(tmp_path, "r00007")
    ctx.put(rec)
    try:
        ctx.enter(rec, RoundState.DEPLOYED)
        wait_for(lambda: not ctx.store.tracking_pending(), 30, "the round's export")

        runs = _api(mlflow_url, "POST", "runs/search", json={"experiment_ids": ["0", "1"], "filter": "tags.`cptd.round_id` = 'r00007'"})
        [run] = runs["runs"]
        run_id, data = run["info"]["run_id"], run["data"]
        assert run["info"]["run_name"] == "r00007" and run["info"]["status"] == "FINISHED"
        params = {p["key"]: p["value"] for p in data["params"]}
        assert params["policy.name"] == "tracked" and params["policy.schedule.kind"] == "rewarm_cosine"  # the whole policy
        assert params["schedule.kind"] == "wsd" and params["schedule.peak_lr"] == "0.0002"  # after the drift response
        assert params["drift.level"] == "weak" and params["drift.score"] == "0.42" and params["replay.ratio"] == "0.25"
        tags = {t["key"]: t["value"] for t in data["tags"]}
        assert tags["cptd.parent.version"] == "r00006" and tags["cptd.manifest_sha256"] == "ab" * 32
        assert json.loads(tags["cptd.kafka_offsets"]) == {"docs|0": "100-139"} and tags["cptd.state"] == "DEPLOYED"
        assert tags["cptd.gate.accepted"] == "true" and tags["cptd.candidate"] == rec.candidate

        def history(key: str) -> list[tuple[int, float]]:
            got = _api(mlflow_url, "GET", "metrics/get-history", params={"run_id": run_id, "metric_key": key})
            return sorted((m["step"], m["value"]) for m in got.get("metrics", []))

        assert history("train.loss") == [(s, 4.0 - 0.25 * s) for s in range(1, STEPS + 1)]
        assert [s for s, _ in history("train.grad_norm")] == list(range(1, STEPS + 1))
        assert len(history("train.lr")) == len(history("train.tokens_per_s")) == STEPS
        assert history("train.loss_heldout_new") == [(3, pytest.approx(3.2)), (6, pytest.approx(2.9))]
        latest = {m["key"]: m["value"] for m in data["metrics"]}
        assert latest["eval.final.new_nll"] == 2.9 and latest["eval.serving.replay_nll"] == 2.55
        assert latest["eval.final.suite.arc_easy"] == 0.61 and latest["gate.final.adaptation"] == 0.4 and latest["gate.accepted"] == 1.0
        assert latest["drift.js_distance"] == 0.21

        [version] = _api(mlflow_url, "GET", "model-versions/search", params={"filter": f"name = 'tracked' and run_id = '{run_id}'"})[
            "model_versions"
        ]
        assert version["run_id"] == run_id and version["source"] == f"runs:/{run_id}/candidate"
        vtags = {t["key"]: t["value"] for t in version["tags"]}
        assert vtags["cptd.candidate"] == rec.candidate and vtags["cptd.parent.version"] == "r00006"
        assert vtags["cptd.manifest_sha256"] == "ab" * 32
        pointer = httpx.get(
            f"{mlflow_url}/api/2.0/mlflow-artifacts/artifacts/{run['info']['artifact_uri'].split(':/', 1)[1]}/candidate/candidate.json"
        )
        assert pointer.json() == {"round_id": "r00007", "candidate": rec.candidate}

        # The round ends again (an operator's rollback): the same run and version move on, nothing is logged twice.
        rec.rollback = RollbackRecord(at=time.time(), trigger="operator", to="r00006", ok=True)
        ctx.enter(rec, RoundState.ROLLED_BACK)
        wait_for(lambda: not ctx.store.tracking_pending(), 30, "the rolled-back round's export")
        [again] = _api(mlflow_url, "POST", "runs/search", json={"experiment_ids": ["1"], "filter": "tags.`cptd.round_id` = 'r00007'"})[
            "runs"
        ]
        assert again["info"]["run_id"] == run_id
        assert {t["key"]: t["value"] for t in again["data"]["tags"]}["cptd.state"] == "ROLLED_BACK"
        assert len(history("train.loss")) == STEPS
        [version] = _api(mlflow_url, "GET", "model-versions/search", params={"filter": f"name = 'tracked' and run_id = '{run_id}'"})[
            "model_versions"
        ]
        assert {t["key"]: t["value"] for t in version["tags"]}["cptd.state"] == "ROLLED_BACK"
    finally:
        ctx.stop.set()


def test_a_stalled_tracker_never_holds_up_a_round_and_the_round_is_exported_later(mlflow_url, redis_client, tmp_path):
    """The tracker accepts connections and never answers: the round ends at once, the export gives up within its
    bound and is counted, the round stays pending; with the tracker back, the next pass exports it."""
    stalled = socket.socket()
    stalled.bind(("127.0.0.1", 0))
    stalled.listen(8)  # the kernel completes the handshake; nothing ever reads or answers
    ctx = _context(redis_client, tmp_path, f"http://127.0.0.1:{stalled.getsockname()[1]}", mlflow_timeout_s=1.0)
    rec = trained_round(tmp_path, "r00008")
    rec.error = "DEPLOYING: replica refused the weights"
    ctx.put(rec)
    failed = _exports("failed")
    try:
        t0 = time.monotonic()
        ctx.enter(rec, RoundState.FAILED)
        assert time.monotonic() - t0 < 1.0  # returned without waiting for the tracker
        assert ctx.get_round("r00008").state == RoundState.FAILED
        wait_for(lambda: _exports("failed") > failed, 20, "the stalled export counted as failed")
        assert ctx.store.tracking_pending() == ["r00008"]  # what was not exported is on record
        assert M.REGISTRY.get_sample_value("cptd_tracking_pending_rounds") == 1

        ctx.settings = ctx.settings.model_copy(update={"mlflow_tracking_uri": SecretStr(mlflow_url)})
        ctx.tracker().kick()  # the next pass (the worker's every RETRY_S, a new lease holder's take-over)
        wait_for(lambda: not ctx.store.tracking_pending(), 30, "the export once the tracker is back")
        [run] = _api(mlflow_url, "POST", "runs/search", json={"experiment_ids": ["1"], "filter": "tags.`cptd.round_id` = 'r00008'"})["runs"]
        tags = {t["key"]: t["value"] for t in run["data"]["tags"]}
        assert run["info"]["status"] == "FAILED" and tags["cptd.error"] == "DEPLOYING: replica refused the weights"
        assert M.REGISTRY.get_sample_value("cptd_tracking_pending_rounds") == 0
    finally:
        ctx.stop.set()
        stalled.close()


def test_a_tracking_uri_the_daemon_cannot_speak_to_is_refused_at_start():
    """Only a tracking server's http(s) URL: a file store or `databricks` would fail every export, so the daemon
    refuses to start with it (the field named) instead of a thread failing later."""
    from pydantic import ValidationError

    for uri in ("file:///mlruns", "databricks", "sqlite:///mlflow.db"):
        with pytest.raises(ValidationError, match="mlflow_tracking_uri"):
            Settings(mlflow_tracking_uri=uri)
    assert Settings(mlflow_tracking_uri="https://u:p@mlflow.example:5000/x").mlflow_tracking_uri is not None
