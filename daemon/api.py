"""HTTP surface: a thin layer over the running daemon (health, metrics, status, rounds, control).

Shaped like vLLM's entrypoints: the routes only translate HTTP to calls on an
engine object and back; all behaviour lives in the daemon. Mutating routes
require the bearer token; errors are JSON {"error": message}. FastAPI serves
the OpenAPI description at /openapi.json (and /docs).
"""
from __future__ import annotations

import argparse
import hmac
from typing import Any, Protocol

from fastapi import Depends, FastAPI, HTTPException, Request
from fastapi.responses import JSONResponse, Response
from pydantic import BaseModel
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from daemon import metrics as M


class Engine(Protocol):
    def status(self) -> dict[str, Any]: ...
    def ready(self) -> tuple[bool, str]: ...
    def pause_ingest(self, paused: bool) -> None: ...
    def reload_policy(self) -> dict[str, Any]: ...
    def rounds(self, limit: int = 50) -> list[dict[str, Any]]: ...
    def round(self, round_id: str) -> dict[str, Any] | None: ...
    def round_manifest(self, round_id: str) -> list[dict[str, Any]] | None: ...
    def trigger(self, reason: str, wait_s: float = 5.0) -> dict[str, Any]: ...
    def cancel(self, round_id: str) -> dict[str, Any]: ...
    def rollback(self, to: str | None) -> dict[str, Any]: ...


class TriggerBody(BaseModel):
    reason: str = "operator"


class RollbackBody(BaseModel):
    to: str | None = None  # a round id (or "base"); default: the version before the live one


def create_app(engine: Engine | None = None, token: str | None = None) -> FastAPI:
    app = FastAPI(title="cptd", version="0.1.0", description="Continual pre-training daemon control API")

    def require_token(request: Request) -> None:
        """Mutating routes: 401 without the right bearer token; 503 if none is configured (never open by default)."""
        if token is None:
            raise HTTPException(503, "no API token configured (set CPTD_API_TOKEN or CPTD_API_TOKEN_FILE)")
        got = request.headers.get("authorization", "")
        if not got.startswith("Bearer ") or not hmac.compare_digest(got[7:].encode(), token.encode()):
            raise HTTPException(401, "missing or wrong bearer token")

    @app.exception_handler(HTTPException)
    async def _json_errors(_req: Request, exc: HTTPException) -> JSONResponse:
        return JSONResponse({"error": exc.detail}, status_code=exc.status_code, headers=exc.headers)

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

    @app.post("/ingest/pause", dependencies=[Depends(require_token)])
    def ingest_pause() -> dict[str, bool]:
        _need(engine).pause_ingest(True)
        return {"paused": True}

    @app.post("/ingest/resume", dependencies=[Depends(require_token)])
    def ingest_resume() -> dict[str, bool]:
        _need(engine).pause_ingest(False)
        return {"paused": False}

    @app.post("/policy/reload", dependencies=[Depends(require_token)])
    def policy_reload() -> JSONResponse:
        """Read the policy file now; 422 with the field named if it is invalid (the old policy stays)."""
        r = _need(engine).reload_policy()
        if r["error"]:
            return JSONResponse({"error": r["error"], "policy_hash": r["policy_hash"]}, status_code=422)
        return JSONResponse({"changed": r["changed"], "policy_hash": r["policy_hash"], "message": r["message"]})

    @app.get("/rounds")
    def rounds(limit: int = 50) -> list[dict[str, Any]]:
        """Newest first, one summary per round."""
        return _need(engine).rounds(limit)

    @app.get("/rounds/{round_id}")
    def round_(round_id: str) -> dict[str, Any]:
        """The whole record: lineage, phases, drift, schedule, training progress, eval, gate, deploy."""
        rec = _need(engine).round(round_id)
        if rec is None:
            raise HTTPException(404, f"no round {round_id!r}")
        return rec

    @app.get("/rounds/{round_id}/manifest")
    def round_manifest(round_id: str) -> list[dict[str, Any]]:
        """The documents the round took: content hash, Kafka topic/partition/offset, held out or trained."""
        m = _need(engine).round_manifest(round_id)
        if m is None:
            raise HTTPException(404, f"round {round_id!r} has no snapshot")
        return m

    @app.post("/rounds", dependencies=[Depends(require_token)], status_code=202)
    def trigger(body: TriggerBody | None = None) -> dict[str, Any]:
        """Start a round now (one at a time; ignores the minimum gap, not an empty buffer)."""
        try:
            return _need(engine).trigger((body or TriggerBody()).reason)
        except RuntimeError as e:
            raise HTTPException(409, str(e)) from None

    @app.post("/rounds/{round_id}/cancel", dependencies=[Depends(require_token)])
    def cancel(round_id: str) -> dict[str, Any]:
        try:
            return _need(engine).cancel(round_id)
        except KeyError:
            raise HTTPException(404, f"no round {round_id!r}") from None
        except ValueError as e:
            raise HTTPException(409, str(e)) from None

    @app.post("/rollback", dependencies=[Depends(require_token)])
    def rollback(body: RollbackBody | None = None) -> JSONResponse:
        try:
            out = _need(engine).rollback((body or RollbackBody()).to)
        except PermissionError as e:
            raise HTTPException(409, str(e)) from None
        except (RuntimeError, ValueError) as e:
            raise HTTPException(409, str(e)) from None
        return JSONResponse(out, status_code=200 if out["ok"] else 502)

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
