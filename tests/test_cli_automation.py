"""The CLI as a workflow step sees it: `trigger --wait` / `round ID --wait` exit codes, one-line errors (JSON with
--json), --version, shell completion, the policy's JSON Schema (docs/daemon.md, Automation).

The waits run against the daemon's real API app and engine (daemon.app.Daemon over a real Redis, served by uvicorn
in a thread); the test plays the lease holder by writing the round's record and the request's answer the way the
round runner does. No Kafka, vLLM or training: each test takes about a second.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import httpx
import jsonschema
import pytest
import redis as redis_lib
import uvicorn
import yaml

from daemon.api import create_app
from daemon.app import Daemon
from daemon.cli import build_parser, cptd_version, main, policy_schema
from daemon.cli_exit import EXIT, Exit
from daemon.dev.services import free_port, wait_for
from daemon.round_record import CANCEL_CAUSE, RoundState
from daemon.rounds.context import RoundContext
from daemon.settings import Settings
from policies.config import Policy
from tests.job_context import bare_record

REPO = Path(__file__).resolve().parent.parent
TOKEN = "wait-token"


def cli(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    with pytest.raises(SystemExit) as e:
        main(list(argv))
    out, err = capsys.readouterr()
    return int(e.value.code or 0), out, err


class Hook(BaseHTTPRequestHandler):
    """The round-end webhook's receiver: keeps each JSON body it is sent."""

    bodies: list[dict[str, Any]] = []

    def do_POST(self) -> None:  # noqa: N802 - http.server's name
        self.bodies.append(json.loads(self.rfile.read(int(self.headers["content-length"]))))
        self.send_response(204)
        self.end_headers()

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture
def hook() -> Iterator[tuple[str, list[dict[str, Any]]]]:
    bodies: list[dict[str, Any]] = []
    server = ThreadingHTTPServer(("127.0.0.1", 0), type("H", (Hook,), {"bodies": bodies}))
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_port}/hooks/secret-part", bodies
    server.shutdown()


@pytest.fixture
def served(redis_client: redis_lib.Redis, tmp_path: Path, hook, monkeypatch) -> Iterator[tuple[str, RoundContext]]:
    """The daemon's API over a real Redis, and the lease holder's context (fenced) to write rounds with."""
    kw = redis_client.connection_pool.connection_kwargs
    policy = tmp_path / "policy.yaml"
    policy.write_text("name: waits\n")
    settings = Settings(
        redis_url=f"redis://{kw['host']}:{kw['port']}/0", checkpoint_dir=tmp_path / "ck", policy=policy,
        vllm_urls=f"http://127.0.0.1:{free_port()}", round_webhook_url=hook[0],
    )  # fmt: skip
    daemon = Daemon(Policy(name="waits"), settings)
    ctx = daemon.runner.ctx
    ctx.fence = daemon.store.lease_acquire(ctx.owner, 60)
    monkeypatch.setenv("CPTD_API_TOKEN", TOKEN)
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(create_app(daemon, TOKEN), host="127.0.0.1", port=port, log_level="warning"))
    t = threading.Thread(target=server.run, daemon=True)
    t.start()
    url = f"http://127.0.0.1:{port}"
    wait_for(lambda: server.started, timeout=30, what="the API server")
    yield url, ctx
    server.should_exit = True
    t.join(timeout=10)


def _round(ctx: RoundContext, rid: str, state: RoundState, error: str | None = None) -> None:
    rec = bare_record(rid, RoundState.TRAINING)
    rec.error = error
    ctx.put(rec)
    if state != RoundState.TRAINING:
        ctx.enter(rec, state)


def test_round_wait_exit_code_says_how_the_round_ended(served, capsys):
    url, ctx = served
    ends = {
        "r00001": (RoundState.DEPLOYED, None, Exit.OK),
        "r00002": (RoundState.REJECTED, None, Exit.REJECTED),
        "r00003": (RoundState.FAILED, "TRAINING: trainer exited 1", Exit.FAILED),
        "r00004": (RoundState.FAILED, CANCEL_CAUSE, Exit.CANCELLED),
        "r00005": (RoundState.ROLLED_BACK, None, Exit.OTHER_END),
        "r00010": (RoundState.SHADOWED, None, Exit.SHADOWED),
    }
    for rid, (state, error, _) in ends.items():
        _round(ctx, rid, state, error)
    for rid, (state, _, code) in ends.items():
        rc, out, _ = cli(capsys, "round", rid, "--wait", "--json", "--url", url, "--poll", "0.05")
        assert rc == code and json.loads(out) == {
            "round": rid, "state": state.value, "cancelled": code == Exit.CANCELLED, "error": ends[rid][1],
            "exit": int(code), "outcome": code.name,
        }  # fmt: skip
    _round(ctx, "r00006", RoundState.TRAINING)
    rc, out, err = cli(capsys, "round", "r00006", "--wait", "--timeout", "0.3", "--url", url, "--poll", "0.05")
    assert rc == Exit.TIMEOUT and "round r00006 TRAINING" in out and "still TRAINING at --timeout 0.3 s" in err
    rc, out, _ = cli(capsys, "round", "r99999", "--wait", "--json", "--url", url)
    assert rc == Exit.BAD_INPUT and json.loads(out) == {"error": "cptd answered 404: no round 'r99999'"}


def test_trigger_wait_follows_the_round_the_lease_holder_starts_to_its_end(served, hook, capsys):
    """The test answers the trigger as the lease holder's runner does, moves the round on once the CLI has seen it
    training, and the CLI exits 0 when it is DEPLOYED; the round-end webhook got the same end."""
    url, ctx = served
    done: list[int] = []

    def run() -> None:
        with pytest.raises(SystemExit) as e:
            main(["trigger", "--wait", "--reason", "airflow", "--url", url, "--poll", "0.05", "--timeout", "60"])
        done.append(int(e.value.code or 0))

    t = threading.Thread(target=run)
    t.start()
    req = wait_for(lambda: list(ctx.store.take_requests()), timeout=10, what="the trigger request in Redis")[0]
    _round(ctx, "r00007", RoundState.TRAINING)
    ctx.store.set_request_result(req, {"round": "r00007"})
    seen = ""

    def printed(line: str) -> bool:
        nonlocal seen
        seen += capsys.readouterr().out
        return line in seen

    wait_for(lambda: printed("round r00007 TRAINING"), timeout=10, what="the CLI following the round")
    rec = ctx.get_round("r00007")
    assert rec is not None
    rec.parent.version = "base"
    ctx.enter(rec, RoundState.DEPLOYED)
    t.join(timeout=30)
    assert done == [Exit.OK] and printed("round r00007 ended DEPLOYED: exit 0")
    body = wait_for(lambda: hook[1], timeout=30, what="the round-end webhook")[0]
    assert {k: body[k] for k in ("event", "deployment", "round", "state", "cancelled", "reason", "parent", "deployed_version")} == {
        "event": "round.ended", "deployment": "waits", "round": "r00007", "state": "DEPLOYED", "cancelled": False,
        "reason": None, "parent": "base", "deployed_version": "r00007",
    }  # fmt: skip


def test_a_trigger_the_lease_holder_answers_late_is_followed_through_its_answer(served, capsys):
    """The daemon answers `queued` after waiting 5 s for the holder (a daemon without the lease); the CLI then reads
    GET /requests/{id} until the holder answers, and follows the round it names."""
    url, ctx = served
    done: list[int] = []

    def run() -> None:
        with pytest.raises(SystemExit) as e:
            main(["trigger", "--wait", "--url", url, "--poll", "0.05", "--timeout", "60"])
        done.append(int(e.value.code or 0))

    t = threading.Thread(target=run)
    t.start()
    req = wait_for(lambda: list(ctx.store.take_requests()), timeout=10, what="the trigger request in Redis")[0]
    seen = ""

    def printed(line: str) -> bool:
        nonlocal seen
        seen += capsys.readouterr().out
        return line in seen

    wait_for(lambda: printed(f"request {req} queued"), timeout=30, what="the daemon's queued answer")
    _round(ctx, "r00008", RoundState.REJECTED)
    ctx.store.set_request_result(req, {"round": "r00008"})
    t.join(timeout=30)
    assert done == [Exit.REJECTED] and printed("round r00008 ended REJECTED: exit 10")


def test_a_refused_trigger_and_a_queued_answer(served, capsys):
    url, ctx = served
    answered: list[str] = []

    def refuse() -> None:
        req = wait_for(lambda: list(ctx.store.take_requests()), timeout=10, what="the trigger request")[0]
        ctx.store.set_request_result(req, {"round": None, "refused": "buffer empty"})
        answered.append(req)

    t = threading.Thread(target=refuse)
    t.start()
    rc, out, _ = cli(capsys, "trigger", "--wait", "--url", url)
    t.join(timeout=10)
    assert rc == Exit.REFUSED and "no round started: buffer empty" in out
    r = httpx.get(f"{url}/requests/{answered[0]}")  # what `trigger --wait` polls when the holder answers late
    assert r.status_code == 200 and r.json()["refused"] == "buffer empty"
    r = httpx.get(f"{url}/requests/nope")
    assert r.status_code == 404 and r.json() == {"error": "no answer to request 'nope' yet"}


def test_errors_are_one_line_and_json_with_json(tmp_path: Path, capsys, monkeypatch):
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: [unclosed\n")
    offload = tmp_path / "offload.yaml"  # valid, but not on the default one-rank launcher
    offload.write_text("name: x\ntrain: {parallelism: fsdp, cpu_offload: true}\n")
    dead = f"http://127.0.0.1:{free_port()}"
    cases = [
        (["run", "--policy", str(offload)], Exit.BAD_INPUT, "invalid policy for this deployment: train.cpu_offload"),
        (["run", "--policy", str(tmp_path / "missing.yaml")], Exit.BAD_INPUT, "cannot read policy file"),
        (["run", "--policy", str(bad)], Exit.BAD_INPUT, "not valid YAML"),
        (["validate-policy", str(tmp_path / "missing.yaml")], Exit.NO, "cannot read policy file"),
        (["status", "--url", dead], Exit.UNREACHABLE, "cannot reach cptd"),
        (["trigger", "--wait", "--url", dead], Exit.UNREACHABLE, "cannot reach cptd"),
        (["round"], Exit.BAD_INPUT, "required: round"),
        (["no-such-command"], Exit.BAD_INPUT, "invalid choice"),
        (["round", "r1", "--wait", "--timeout", "-1", "--url", dead], Exit.BAD_INPUT, "--timeout -1.0: must be 0 or more"),
    ]
    for argv, code, words in cases:
        rc, out, err = cli(capsys, *argv)
        assert (rc, out) == (code, "") and err.count("\n") == 1 and err.startswith("cptd: ") and words in err, (argv, err)
        rc, out, err = cli(capsys, "--json", *argv)
        assert (rc, err) == (code, "") and words in json.loads(out)["error"], (argv, out)
    monkeypatch.setenv("CPTD_TRAIN_LAUNCHER", "bogus")
    rc, out, err = cli(capsys, "run", "--policy", str(bad))
    assert (rc, out) == (
        Exit.BAD_INPUT,
        "",
    ) and err == "cptd: invalid Settings: CPTD_TRAIN_LAUNCHER='bogus' is not supported: use subprocess, torchrun:N or kubernetes\n"


def test_exit_codes_version_and_completion_are_there_for_scripts(capsys):
    rc, out, _ = cli(capsys, "--help")
    docs = (REPO / "docs" / "daemon.md").read_text()
    for code, why in EXIT.items():
        assert rc == 0 and f"{int(code):>2}  {why}" in out
        assert f"| {int(code)} |" in docs, f"exit code {int(code)} missing from docs/daemon.md"
    rc, out, _ = cli(capsys, "--version")
    assert rc == 0 and out == f"cptd {cptd_version()}\n" and cptd_version()[0].isdigit()
    for shell in ("bash", "zsh"):
        rc, out, _ = cli(capsys, "completion", shell)
        assert rc == 0 and "trigger" in out and "--wait" in out and "policy-schema" in out
    assert {"--wait", "--timeout"} <= set(build_parser()._subparsers._group_actions[0].choices["round"]._option_string_actions)  # type: ignore[union-attr]


def test_the_committed_policy_schema_is_what_the_command_prints_and_the_example_follows_it(capsys):
    rc, out, _ = cli(capsys, "policy-schema")
    committed = (REPO / "deploy" / "policy.schema.json").read_text()
    assert rc == 0 and json.loads(out) == json.loads(committed) == policy_schema(), "run: cptd policy-schema > deploy/policy.schema.json"
    example = (REPO / "deploy" / "policy.example.yaml").read_text()
    assert example.startswith("# yaml-language-server: $schema=./policy.schema.json\n")
    jsonschema.validate(yaml.safe_load(example), json.loads(committed))
    with pytest.raises(jsonschema.ValidationError, match="batch_max_docs"):
        jsonschema.validate({"ingest": {"batch_max_docs": "many"}}, json.loads(committed))
