"""The typed round record: stored shape, API schemas and error mapping, and the CLI reading it.

The HTTP layer is exercised over a real uvicorn server with a small in-test engine (the daemon's own
engine needs Redis, Kafka and vLLM; tests/test_round_runner.py runs that one end to end).
"""

from __future__ import annotations

import json
import threading

import httpx
import pytest
import uvicorn

from daemon.api import create_app
from daemon.cli import main as cli_main
from daemon.dev.services import free_port, wait_for
from daemon.jobs.specs import TrainSpec
from daemon.round_record import (
    TERMINAL,
    CancelResult,
    DeploySummary,
    GateReasonRecord,
    GateRecord,
    Parent,
    PhaseTimes,
    RollbackResult,
    RoundRecord,
    RoundState,
    RoundSummary,
    TrainRecord,
    Trigger,
    TriggerResult,
)
from policies.gates import GatePolicy, ModelScores, gate_round

TOKEN = "t0k3n"


def _record(state: RoundState = RoundState.DEPLOYED) -> RoundRecord:
    d = gate_round(GatePolicy(), ModelScores("serving", 3.0, 2.0), [ModelScores("step-5", 2.5, 2.2), ModelScores("final", 2.5, 2.01)])
    from dataclasses import asdict

    return RoundRecord(
        id="r00007",
        number=7,
        state=state,
        created_at=100.0,
        updated_at=200.0,
        owner="pod-a",
        trigger=Trigger(kind="manual", reason="operator"),
        policy_hash="abc",
        policy={"name": "x"},
        parent=Parent(version="base", checkpoint="/ck/base"),
        phases={RoundState.PENDING: PhaseTimes(started_at=100.0, finished_at=101.0), state: PhaseTimes(started_at=150.0)},
        train=TrainRecord(
            spec=TrainSpec(parent_dir="/ck/base", out_dir="/o", new_path="/o/new.jsonl", round_id="r00007"),
            spec_digest="d",
            out_dir="/o",
            launcher="subprocess",
            curve=[(1, 3.5, 1e-4), (2, 3.1, 2e-4)],
        ),
        gate=GateRecord.model_validate(asdict(d)),
        deployed_at=199.0,
    )


def test_record_round_trips_through_the_stored_json_and_ignores_unknown_fields():
    rec = _record()
    stored = json.loads(json.dumps(rec.to_store()))
    assert stored["state"] == "DEPLOYED" and stored["phases"]["PENDING"]["finished_at"] == 101.0
    back = RoundRecord.model_validate({**stored, "field_from_a_newer_version": 1})
    assert back == rec
    assert back.gate is not None and back.gate.accepted and back.gate.chosen == "final"
    codes = [r.code for r in back.gate.reasons]
    assert codes == ["chosen", "forgetting_exceeded"] and back.gate.reasons[1].checkpoint == "step-5"
    assert back.train is not None and back.train.curve[1] == (2, 3.1, 2e-4)


def test_states_are_one_enum_and_terminal_ones_are_named():
    assert {s.value for s in TERMINAL} == {"DEPLOYED", "REJECTED", "FAILED", "ROLLED_BACK", "SHADOWED"}
    assert RoundState.DEPLOYED.terminal and not RoundState.TRAINING.terminal
    with pytest.raises(ValueError):
        RoundRecord.model_validate({**_record().to_store(), "state": "HALF_DONE"})


def test_summary_reads_the_record():
    s = RoundSummary.of(_record())
    assert (s.id, s.state, s.trigger, s.gate, s.chosen, s.deployed_at) == ("r00007", RoundState.DEPLOYED, "manual", True, "final", 199.0)


class _Engine:
    """Answers like the daemon for one known round; refuses the way the daemon refuses."""

    def __init__(self) -> None:
        self.rec = _record()

    def status(self):
        return {"name": "test", "rounds": {"latest": {"id": self.rec.id, "state": self.rec.state.value}}}

    def ready(self):
        return False, "redis unreachable: test"

    def pause_ingest(self, paused):
        pass

    def reload_policy(self):
        return {"changed": False, "message": "", "policy_hash": "abc", "error": None}

    def rounds(self, limit=50):
        return [RoundSummary.of(self.rec)]

    def round(self, round_id):
        return self.rec.model_copy(update={"policy": None}) if round_id == self.rec.id else None

    def round_manifest(self, round_id, offset=0, limit=1000):
        return None

    def trigger(self, reason, wait_s=5.0):
        raise RuntimeError("rounds are disabled: no vLLM replicas configured")

    def cancel(self, round_id):
        if round_id != self.rec.id:
            raise KeyError(round_id)
        raise ValueError(f"round {round_id} already ended DEPLOYED")

    def rollback(self, to):
        if to == "nowhere":
            raise ValueError("cannot roll back to 'nowhere'")
        if to == "standby":
            raise PermissionError("this daemon does not run rounds")
        return RollbackResult(
            ok=True,
            from_version=self.rec.id,
            to=to or "base",
            record=DeploySummary(ok=True, kind="rollback", version=to or "base", checkpoint="/ck/base"),
        )


@pytest.fixture(scope="module")
def api_url():
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(create_app(_Engine(), TOKEN), host="127.0.0.1", port=port, log_level="warning"))
    t = threading.Thread(target=server.run, daemon=True)
    t.start()
    url = f"http://127.0.0.1:{port}"
    wait_for(lambda: _up(url), timeout=30, what="test API server")
    yield url
    server.should_exit = True
    t.join(timeout=10)


def _up(url: str) -> bool:
    try:
        return httpx.get(url + "/healthz", timeout=1).status_code == 200
    except httpx.HTTPError:
        return False


def test_openapi_shows_the_record_schemas(api_url):
    spec = httpx.get(api_url + "/openapi.json").json()
    ref = spec["paths"]["/rounds/{round_id}"]["get"]["responses"]["200"]["content"]["application/json"]["schema"]["$ref"]
    assert ref.endswith("/RoundRecord")
    schemas = spec["components"]["schemas"]
    assert set(schemas["RoundState"]["enum"]) == {s.value for s in RoundState}
    assert {"gate", "snapshot", "train", "deploy", "rollback"} <= set(schemas["RoundRecord"]["properties"])
    assert spec["paths"]["/rounds"]["get"]["responses"]["200"]["content"]["application/json"]["schema"]["items"]["$ref"].endswith(
        "/RoundSummary"
    )
    assert schemas["GateReasonRecord"]["required"] == ["code", "message"]


def test_routes_return_typed_records_and_map_refusals_once(api_url):
    auth = {"Authorization": f"Bearer {TOKEN}"}
    rec = httpx.get(api_url + "/rounds/r00007").json()
    assert "policy" not in rec and RoundRecord.model_validate(rec).gate.chosen == "final"
    assert httpx.get(api_url + "/rounds").json()[0]["id"] == "r00007"
    r = httpx.get(api_url + "/rounds/r99999")
    assert r.status_code == 404 and r.json() == {"error": "no round 'r99999'"}
    r = httpx.post(api_url + "/rounds", headers=auth)
    assert r.status_code == 409 and "rounds are disabled" in r.json()["error"]
    r = httpx.post(api_url + "/rounds/r99999/cancel", headers=auth)
    assert r.status_code == 404 and "r99999" in r.json()["error"]
    r = httpx.post(api_url + "/rounds/r00007/cancel", headers=auth)
    assert r.status_code == 409 and "already ended" in r.json()["error"]
    r = httpx.post(api_url + "/rollback", headers=auth, json={"to": "standby"})
    assert r.status_code == 409 and "does not run rounds" in r.json()["error"]
    r = httpx.post(api_url + "/rollback", headers=auth, json={"to": "base"})
    assert r.status_code == 200 and r.json()["from"] == "r00007" and r.json()["to"] == "base"
    r = httpx.get(api_url + "/readyz")
    assert r.status_code == 503 and r.json() == {"ready": False, "reason": "redis unreachable: test"}


def test_cli_flags_work_after_the_subcommand(api_url, capsys):
    for argv in (["status", "--json", "--url", api_url], ["--json", "--url", api_url, "status"]):
        with pytest.raises(SystemExit) as e:
            cli_main(argv)
        assert e.value.code == 0
        assert json.loads(capsys.readouterr().out)["name"] == "test"
    with pytest.raises(SystemExit) as e:
        cli_main(["rounds", "r00007", "--url", api_url])
    out = capsys.readouterr().out
    assert e.value.code == 0 and "round r00007  DEPLOYED" in out and "[forgetting_exceeded] step-5:" in out


def test_trigger_and_cancel_results_are_models():
    assert TriggerResult(request_id="q", queued=True).model_dump()["queued"] is True
    assert CancelResult(round="r1", cancel_requested=True, state="TRAINING").state is RoundState.TRAINING
    assert GateReasonRecord(code="chosen", message="m").checkpoint is None
