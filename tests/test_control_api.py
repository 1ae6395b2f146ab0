"""The control API's front door (issue 24): the token is checked before a body is read, bodies are capped, and every
error, FastAPI's own 404/405/422 included, has the documented shape {"error": message}. Runs a real uvicorn server."""

from __future__ import annotations

import socket
import threading
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
import uvicorn
from fastapi.routing import APIRoute

from daemon.api import MAX_BODY_BYTES, create_app
from daemon.dev.services import free_port, wait_for
from daemon.round_record import CancelResult, DeploySummary, RollbackResult, RoundRecord, RoundSummary, TriggerResult

TOKEN = "s3cr3t-t0ken"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
JSON = {"Content-Type": "application/json"}


class Boom(Exception):
    """A bug inside the engine, not one of its mapped refusals."""


class _Engine:
    """Records every call that reaches it: a refused request must never get this far."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, Any]] = []

    def status(self) -> dict[str, Any]:
        raise Boom("status exploded")

    def ready(self) -> tuple[bool, str]:
        return True, "ok"

    def pause_ingest(self, paused: bool) -> None:
        self.calls.append(("pause_ingest", paused))

    def reload_policy(self) -> dict[str, Any]:
        self.calls.append(("reload_policy", None))
        return {"changed": False, "message": "", "policy_hash": "abc", "error": None}

    def rounds(self, limit: int = 50) -> list[RoundSummary]:
        return []

    def round(self, round_id: str) -> RoundRecord | None:
        return None

    def round_manifest(self, round_id: str, offset: int = 0, limit: int = 1000) -> list[dict[str, Any]] | None:
        return None

    def trigger(self, reason: str, wait_s: float = 5.0) -> TriggerResult:
        self.calls.append(("trigger", reason))
        return TriggerResult(request_id="q1", queued=True)

    def cancel(self, round_id: str) -> CancelResult:
        self.calls.append(("cancel", round_id))
        raise KeyError(round_id)

    def rollback(self, to: str | None) -> RollbackResult:
        self.calls.append(("rollback", to))
        return RollbackResult(
            ok=True,
            from_version="r1",
            to=to or "base",
            record=DeploySummary(ok=True, kind="rollback", version=to or "base", checkpoint="/ck"),
        )


@pytest.fixture(scope="module")
def served() -> Iterator[tuple[str, _Engine, Any]]:
    engine = _Engine()
    app = create_app(engine, TOKEN)
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="critical"))
    t = threading.Thread(target=server.run, daemon=True)
    t.start()
    url = f"http://127.0.0.1:{port}"
    wait_for(lambda: _up(url), timeout=30, what="control API server")
    yield url, engine, app
    server.should_exit = True
    t.join(timeout=10)


@pytest.fixture
def api(served: tuple[str, _Engine, Any]) -> Iterator[tuple[str, _Engine]]:
    url, engine, _app = served
    engine.calls.clear()
    yield url, engine


def _up(url: str) -> bool:
    try:
        return httpx.get(url + "/healthz", timeout=1).status_code == 200
    except httpx.HTTPError:
        return False


def _mutating_paths(app: Any) -> list[str]:
    """Every non-GET route of the app, path parameters filled in: new routes are covered without editing the test."""
    out = []
    for r in app.routes:
        if isinstance(r, APIRoute) and r.methods - {"GET", "HEAD"}:
            out.append(r.path.replace("{round_id}", "r00001"))
    return out


def _raw_first_line(url: str, request: bytes) -> bytes:
    """Send raw bytes and return the status line: for a request whose body is announced but never sent."""
    host, port = url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=10) as s:
        s.sendall(request)
        return s.makefile("rb").readline()


def test_invalid_json_without_a_token_is_401_on_every_mutating_route(served):
    url, engine, app = served
    paths = _mutating_paths(app)
    assert {"/rounds", "/rollback", "/rounds/r00001/cancel", "/ingest/pause", "/policy/reload"} <= set(paths)
    for path in paths:
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": TOKEN}):
            r = httpx.post(url + path, content=b'{"reason": oops', headers={**JSON, **headers})
            assert (r.status_code, r.json()) == (401, {"error": "missing or wrong bearer token"}), (path, headers)
    assert engine.calls == []


def test_a_body_announced_without_a_token_is_refused_before_it_is_sent(api):
    url, engine = api
    head = b"POST /rollback HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: 1000000000\r\n\r\n"
    assert _raw_first_line(url, head).startswith(b"HTTP/1.1 401")
    assert engine.calls == []


def test_an_oversized_body_is_413_before_it_is_parsed(api):
    url, engine = api
    junk = b'{"reason": ' + b"x" * MAX_BODY_BYTES  # invalid JSON: parsed, it would be a 422
    r = httpx.post(url + "/rounds", content=junk, headers={**AUTH, **JSON})
    assert r.status_code == 413 and r.json() == {"error": f"request body larger than {MAX_BODY_BYTES} bytes"}

    def chunked() -> Iterator[bytes]:  # no Content-Length: the cap must count the bytes that arrive
        for _ in range(MAX_BODY_BYTES // 1024 + 2):
            yield b"x" * 1024

    r = httpx.post(url + "/rollback", content=chunked(), headers={**AUTH, **JSON})
    assert "content-length" not in r.request.headers
    assert r.status_code == 413 and "larger than" in r.json()["error"]

    # A declared length over the cap is refused without waiting for a byte of the body.
    head = (
        b"POST /rounds HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer " + TOKEN.encode() + b"\r\n"
        b"Content-Type: application/json\r\nContent-Length: 1000000000\r\n\r\n"
    )
    assert _raw_first_line(url, head).startswith(b"HTTP/1.1 413")
    assert engine.calls == []

    # At the cap, a valid body still goes through.
    reason = "r" * (MAX_BODY_BYTES - len('{"reason": ""}'))
    r = httpx.post(url + "/rounds", json={"reason": reason}, headers=AUTH)
    assert r.status_code == 202 and engine.calls == [("trigger", reason)]


def test_unknown_routes_and_methods_answer_the_error_shape(api):
    url, _engine = api
    r = httpx.get(url + "/no/such/route")
    assert r.status_code == 404 and r.json() == {"error": "Not Found"}
    r = httpx.post(url + "/healthz")
    assert r.status_code == 405 and r.json() == {"error": "Method Not Allowed"} and r.headers["allow"] == "GET"
    r = httpx.get(url + "/rounds/r404")
    assert r.status_code == 404 and r.json() == {"error": "no round 'r404'"}


def test_a_wrong_field_is_422_naming_the_field(api):
    url, engine = api
    r = httpx.post(url + "/rounds", json={"reason": 5}, headers=AUTH)
    assert r.status_code == 422 and list(r.json()) == ["error"] and "body.reason" in r.json()["error"]
    r = httpx.post(url + "/rollback", json={"to": ["r1"]}, headers=AUTH)
    assert r.status_code == 422 and list(r.json()) == ["error"] and "body.to" in r.json()["error"]
    r = httpx.get(url + "/rounds", params={"limit": "many"})
    assert r.status_code == 422 and "query.limit" in r.json()["error"]
    r = httpx.post(url + "/rounds", content=b'{"reason": oops', headers={**AUTH, **JSON})
    assert r.status_code == 422 and r.json()["error"].startswith("body: invalid JSON at character 11")
    assert engine.calls == []
    r = httpx.post(url + "/rollback", json={"to": "r1"}, headers=AUTH)
    assert r.status_code == 200 and engine.calls == [("rollback", "r1")]


def test_an_engine_bug_is_500_in_the_error_shape(api):
    url, _engine = api
    r = httpx.get(url + "/status")
    assert r.status_code == 500 and r.json() == {"error": "internal error (Boom)"}


def test_a_rotated_token_file_takes_effect_without_a_restart(tmp_path):
    """The daemon reads CPTD_API_TOKEN_FILE at every request, as the CLI does: after the Secret rotates, the new
    token is accepted and the old one refused, with no restart (before: the token read once at start)."""
    from daemon.settings import Settings

    token_file = tmp_path / "api-token"
    token_file.write_text("old-token\n")
    settings = Settings(api_token_file=token_file)
    app = create_app(_Engine(), settings.token)
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="critical"))
    t = threading.Thread(target=server.run, daemon=True)
    t.start()
    url = f"http://127.0.0.1:{port}"
    try:
        wait_for(lambda: _up(url), timeout=30, what="control API server")

        def rollback(token: str) -> int:
            return httpx.post(f"{url}/rollback", json={}, headers={"Authorization": f"Bearer {token}"}, timeout=10).status_code

        assert rollback("old-token") == 200
        token_file.write_text("new-token\n")
        assert (rollback("old-token"), rollback("new-token")) == (401, 200)
    finally:
        server.should_exit = True
        t.join(timeout=10)
