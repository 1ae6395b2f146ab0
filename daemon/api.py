"""HTTP surface: a thin layer over the running daemon (health, metrics, status, rounds, control).

Shaped like vLLM's entrypoints: the routes only translate HTTP to calls on an
engine object and back; all behaviour lives in the daemon. Responses are the
typed models of daemon/round_record.py, so /openapi.json (and /docs) shows
real schemas. Domain exceptions map to HTTP statuses once, in ERROR_STATUS.
Mutating routes require the bearer token, checked before their body is read;
bodies are capped at MAX_BODY_BYTES; every error, FastAPI's own 404/405/422
included, is JSON {"error": message}.
"""

from __future__ import annotations

import argparse
import hmac
from collections.abc import Awaitable, Callable, Coroutine
from typing import Any, Protocol

from fastapi import APIRouter, FastAPI, HTTPException, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from fastapi.routing import APIRoute
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from pydantic import BaseModel, Field
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import Message

from daemon import metrics as M
from daemon.round_record import ApprovalResult, CancelResult, RollbackResult, RoundRecord, RoundSummary, TriggerResult


class UnknownRound(KeyError):
    """No round with that id."""


class Engine(Protocol):
    def status(self) -> dict[str, Any]: ...
    def ready(self) -> tuple[bool, str]: ...
    def pause_ingest(self, paused: bool) -> None: ...
    def reload_policy(self) -> dict[str, Any]: ...
    def rounds(self, limit: int = 50) -> list[RoundSummary]: ...
    def round(self, round_id: str) -> RoundRecord | None: ...
    def round_manifest(self, round_id: str, offset: int = 0, limit: int = 1000) -> list[dict[str, Any]] | None: ...
    def trigger(self, reason: str, wait_s: float = 5.0) -> TriggerResult: ...
    def trigger_result(self, request_id: str) -> TriggerResult | None: ...
    def cancel(self, round_id: str) -> CancelResult: ...
    def decide(self, round_id: str, decision: str, by: str | None, note: str | None) -> ApprovalResult: ...
    def rollback(self, to: str | None) -> RollbackResult: ...


# The engine's refusals, mapped to HTTP once (vLLM maps its domain errors on the app the same way).
ERROR_STATUS: dict[type[Exception], int] = {
    UnknownRound: 404,
    PermissionError: 409,  # this daemon does not hold the round lease
    ValueError: 409,  # the request contradicts the state (round already ended, unknown rollback target)
    RuntimeError: 409,  # busy (a deploy or rollback in progress) or rounds disabled
    ConnectionError: 503,  # Redis, where the request would be kept, is unreachable
}


# Read routes answer in bounded pages: a round's manifest has a line per document (millions on a large round).
MANIFEST_PAGE, MAX_MANIFEST_PAGE, MAX_ROUNDS = 1000, 10_000, 1000

# Control bodies are a reason or a round id: anything near this size is a mistake or an attack, refused unread.
MAX_BODY_BYTES = 16 * 1024


class TriggerBody(BaseModel):
    reason: str = "operator"


class DecisionBody(BaseModel):
    by: str | None = Field(default=None, max_length=200)  # who decides (the CLI sends user@host)
    note: str | None = Field(default=None, max_length=2000)  # why; kept in the round's record


class RollbackBody(BaseModel):
    to: str | None = None  # a round id (or "base"); default: the version before the live one


Token = str | None | Callable[[], str | None]  # a callable is asked at every request: a mounted Secret rotates


def control_route(token: Token, max_body: int = MAX_BODY_BYTES) -> type[APIRoute]:
    """The route class of every mutating route: the bearer token is checked, then the body is read under a size cap,
    and only then does FastAPI parse and validate it. A FastAPI dependency would run after the body had been parsed,
    so a caller without a token could make the daemon read and parse any amount of JSON (and get 422, not 401)."""

    class ControlRoute(APIRoute):
        def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
            handle = super().get_route_handler()

            async def guarded(request: Request) -> Response:
                _check_token(request, token() if callable(token) else token)
                body = await _read_capped(request, max_body)

                async def replay() -> Message:
                    return {"type": "http.request", "body": body, "more_body": False}

                return await handle(Request(request.scope, replay))

            return guarded

    return ControlRoute


def _check_token(request: Request, token: str | None) -> None:
    """401 without the right bearer token; 503 if none is configured (never open by default)."""
    if token is None:
        raise HTTPException(503, "no API token configured (set CPTD_API_TOKEN or CPTD_API_TOKEN_FILE)")
    got = request.headers.get("authorization", "")
    if not got.startswith("Bearer ") or not hmac.compare_digest(got[7:].encode(), token.encode()):
        raise HTTPException(401, "missing or wrong bearer token")


async def _read_capped(request: Request, max_body: int) -> bytes:
    """The whole body, or 413: by the declared Content-Length before reading anything, then by the bytes that
    actually arrive (a chunked body declares no length, and a client can send more than it declared)."""
    too_large = HTTPException(413, f"request body larger than {max_body} bytes")
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > max_body:  # the server rejects a malformed one
        raise too_large
    chunks: list[bytes] = []
    size = 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > max_body:
            raise too_large
        chunks.append(chunk)
    return b"".join(chunks)


def _validation_message(exc: RequestValidationError) -> str:
    """One line naming each wrong field ("body.reason: Input should be a valid string"), so the caller can fix it."""
    parts = []
    for err in exc.errors():
        loc = [str(x) for x in err.get("loc", ())]
        if err.get("type") == "json_invalid":  # loc is ("body", character position)
            parts.append(f"body: invalid JSON at character {loc[-1]}: {err.get('ctx', {}).get('error', err['msg'])}")
        else:
            parts.append(f"{'.'.join(loc) or 'request'}: {err['msg']}")
    return "; ".join(parts) or "invalid request"


def create_app(engine: Engine | None = None, token: Token = None) -> FastAPI:
    app = FastAPI(title="cptd", version="0.1.0", description="Continual pre-training daemon control API")
    control = APIRouter(route_class=control_route(token))

    # Starlette's HTTPException, the base of FastAPI's: also the router's own 404 (no such route) and 405.
    @app.exception_handler(StarletteHTTPException)
    async def _json_errors(_req: Request, exc: StarletteHTTPException) -> JSONResponse:
        return JSONResponse({"error": exc.detail}, status_code=exc.status_code, headers=exc.headers)

    @app.exception_handler(RequestValidationError)
    async def _invalid_request(_req: Request, exc: RequestValidationError) -> JSONResponse:
        return JSONResponse({"error": _validation_message(exc)}, status_code=422)

    def _domain_error(status: int) -> Callable[[Request, Exception], Awaitable[JSONResponse]]:
        async def handler(_req: Request, exc: Exception) -> JSONResponse:
            msg = exc.args[0] if isinstance(exc, KeyError) and exc.args else str(exc)
            return JSONResponse({"error": msg}, status_code=status)

        return handler

    for exc_type, code in ERROR_STATUS.items():
        app.add_exception_handler(exc_type, _domain_error(code))

    @app.exception_handler(Exception)
    async def _internal_error(_req: Request, exc: Exception) -> JSONResponse:
        """A bug: the shape stays {"error"}, the traceback goes to the server log, not to the caller."""
        return JSONResponse({"error": f"internal error ({type(exc).__name__})"}, status_code=500)

    @app.get("/healthz")
    def healthz() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/readyz")
    def readyz() -> JSONResponse:
        ok, why = engine.ready() if engine else (True, "standalone")
        return JSONResponse({"ready": ok, "reason": why}, status_code=200 if ok else 503)

    @app.get("/metrics")
    def metrics() -> Response:
        return Response(generate_latest(M.REGISTRY), media_type=CONTENT_TYPE_LATEST)

    @app.get("/status")
    def status() -> dict[str, Any]:
        return _need(engine).status()

    @control.post("/ingest/pause")
    def ingest_pause() -> dict[str, bool]:
        _need(engine).pause_ingest(True)
        return {"paused": True}

    @control.post("/ingest/resume")
    def ingest_resume() -> dict[str, bool]:
        _need(engine).pause_ingest(False)
        return {"paused": False}

    @control.post("/policy/reload")
    def policy_reload() -> JSONResponse:
        """Read the policy file now; 422 with the field named if it is invalid (the old policy stays)."""
        r = _need(engine).reload_policy()
        if r["error"]:
            return JSONResponse({"error": r["error"], "policy_hash": r["policy_hash"]}, status_code=422)
        return JSONResponse({"changed": r["changed"], "policy_hash": r["policy_hash"], "message": r["message"]})

    @app.get("/rounds")
    def rounds(limit: int = Query(50, ge=1, le=MAX_ROUNDS)) -> list[RoundSummary]:
        """Newest first, one summary per round."""
        return _need(engine).rounds(limit)

    @app.get("/rounds/{round_id}", response_model_exclude={"policy"})
    def round_(round_id: str) -> RoundRecord:
        """The whole record: lineage, phases, drift, schedule, training progress, eval, gate, deploy."""
        rec = _need(engine).round(round_id)
        if rec is None:
            raise UnknownRound(f"no round {round_id!r}")
        return rec

    @app.get("/rounds/{round_id}/manifest")
    def round_manifest(
        round_id: str, offset: int = Query(0, ge=0), limit: int = Query(MANIFEST_PAGE, ge=1, le=MAX_MANIFEST_PAGE)
    ) -> list[dict[str, Any]]:
        """The documents the round took, one page: content hash, Kafka topic/partition/offset, held out or trained.
        A page shorter than `limit` is the last."""
        m = _need(engine).round_manifest(round_id, offset, limit)
        if m is None:
            raise UnknownRound(f"round {round_id!r} has no snapshot")
        return m

    @control.post("/rounds", status_code=202)
    def trigger(body: TriggerBody | None = None) -> TriggerResult:
        """Start a round now (one at a time; ignores the minimum gap, not an empty buffer)."""
        return _need(engine).trigger((body or TriggerBody()).reason)

    @app.get("/requests/{request_id}")
    def request_result(request_id: str) -> TriggerResult:
        """The lease holder's answer to a `POST /rounds` that was answered `queued` (the round it started, or why
        not): 404 until it has answered, and after the answer expires. `cptd trigger --wait` polls it."""
        res = _need(engine).trigger_result(request_id)
        if res is None:
            raise HTTPException(404, f"no answer to request {request_id!r} yet")
        return res

    @control.post("/rounds/{round_id}/cancel")
    def cancel(round_id: str) -> CancelResult:
        try:
            return _need(engine).cancel(round_id)
        except KeyError:
            raise UnknownRound(f"no round {round_id!r}") from None

    def _decide(round_id: str, decision: str, body: DecisionBody | None) -> ApprovalResult:
        b = body or DecisionBody()
        try:
            return _need(engine).decide(round_id, decision, b.by, b.note)
        except KeyError:
            raise UnknownRound(f"no round {round_id!r}") from None

    @control.post("/rounds/{round_id}/approve")
    def approve(round_id: str, body: DecisionBody | None = None) -> ApprovalResult:
        """deploy.mode approve: deploy the round waiting in AWAITING_APPROVAL (409 naming its state if it is not)."""
        return _decide(round_id, "approved", body)

    @control.post("/rounds/{round_id}/reject")
    def reject(round_id: str, body: DecisionBody | None = None) -> ApprovalResult:
        """deploy.mode approve: the waiting round ends REJECTED, its documents released as after a gate rejection."""
        return _decide(round_id, "rejected", body)

    @control.post(
        "/rollback",
        response_model=RollbackResult,
        responses={
            202: {"model": RollbackResult, "description": "queued: the lease holder has not answered yet"},
            502: {"model": RollbackResult, "description": "the rollback failed on a replica"},
        },
    )
    def rollback(body: RollbackBody | None = None) -> JSONResponse:
        """Any daemon takes it: one that does not hold the round lease has the holder carry it out and relays its answer."""
        out = _need(engine).rollback((body or RollbackBody()).to)
        code = 202 if out.queued else 200 if out.ok else 502
        return JSONResponse(out.model_dump(mode="json", by_alias=True), status_code=code)

    app.include_router(control)
    return app


def _need(engine: Engine | None) -> Engine:
    if engine is None:
        raise HTTPException(503, "no daemon attached")
    return engine


def main(argv: list[str] | None = None) -> None:
    """Serve /healthz and /metrics alone: for probing the monitoring stack without the rest of the daemon."""
    import time

    import uvicorn

    ap = argparse.ArgumentParser(prog="python -m daemon.api")
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, default=8080)
    a = ap.parse_args(argv)
    M.UP_SINCE.set(time.time())
    uvicorn.run(create_app(), host=a.host, port=a.port, log_level="warning")


if __name__ == "__main__":
    main()
