"""HTTP surface: a thin layer over the running daemon (health, metrics, status).

Shaped like vLLM's entrypoints: the routes only translate HTTP to calls on an
engine object and back; all behaviour lives in the daemon. Mutating routes
(added by the control-API work) require the bearer token.
"""
from __future__ import annotations

import argparse
import hmac
from typing import Any, Protocol

from fastapi import Depends, FastAPI, HTTPException, Request
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from daemon import metrics as M


class Engine(Protocol):
    def status(self) -> dict[str, Any]: ...
    def ready(self) -> tuple[bool, str]: ...
    def pause_ingest(self, paused: bool) -> None: ...
    def reload_policy(self) -> dict[str, Any]: ...


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
