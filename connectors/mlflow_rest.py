"""MLflow's tracking server over its REST API (api/2.0/mlflow): experiments, runs, metrics, the model registry.

Plain HTTP through httpx rather than the `mlflow` package: the REST API is MLflow's public, versioned interface
(what its own client speaks), and the package would add a dependency tree to the daemon's image for a dozen calls
(`mlflow` pins pyarrow and python-dateutil below ours). Every call has a bounded timeout and no retry of its own:
the caller (daemon/round_tracking.py) retries a whole export later, and every step here is idempotent, so an export
cut short anywhere is finished by the next one.

Credentials: the URL's userinfo (basic auth) or a bearer token, as MLflow's own MLFLOW_TRACKING_TOKEN. Neither is
ever put in an error message: `where` is the scheme, host and port.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import quote, urlsplit, urlunsplit

import httpx

# The server's limits (mlflow/utils/validation.py): per log-batch call, and value lengths.
MAX_PARAMS_TAGS_PER_BATCH = 100
MAX_METRICS_PER_BATCH = 1000
MAX_PARAM_VALUE = 6000
MAX_TAG_VALUE = 8000


class MlflowError(Exception):
    """A call the server refused or did not answer in time; the message names the call and the server's reason."""


@dataclass(frozen=True)
class Metric:
    key: str
    value: float
    step: int
    timestamp_ms: int  # fixed by the caller, so that logging the same point again is a no-op on the server


@dataclass
class RunHandle:
    run_id: str
    artifact_uri: str
    params: dict[str, str] = field(default_factory=dict)  # already logged: a param's value can never change


class MlflowClient:
    def __init__(self, uri: str, token: str | None = None, timeout_s: float = 10.0):
        u = urlsplit(uri.rstrip("/"))
        if u.scheme not in ("http", "https") or not u.hostname:
            raise ValueError(f"MLflow tracking URI must be http(s)://host[:port][/path], got scheme {u.scheme!r}")
        netloc = u.hostname + (f":{u.port}" if u.port else "")
        self.where = f"{u.scheme}://{netloc}"
        auth = httpx.BasicAuth(u.username, u.password or "") if u.username else None
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        self.http = httpx.Client(
            base_url=urlunsplit((u.scheme, netloc, u.path, "", "")),
            auth=auth,
            headers=headers,
            timeout=httpx.Timeout(timeout_s, connect=min(timeout_s, 5.0)),
        )

    def close(self) -> None:
        self.http.close()

    # ------------------------------------------------------------------ plumbing
    def _call(self, method: str, path: str, body: dict[str, Any] | None = None, params: dict[str, Any] | None = None) -> dict[str, Any]:
        try:
            r = self.http.request(method, f"/api/2.0/mlflow/{path}", json=body, params=params)
        except httpx.HTTPError as e:
            raise MlflowError(f"{path} at {self.where}: {type(e).__name__}: {e}") from e
        if r.status_code >= 400:
            raise MlflowError(f"{path} at {self.where}: HTTP {r.status_code} {_error_code(r)}")
        return r.json() if r.content else {}

    def _exists(self, e: MlflowError) -> bool:
        return "RESOURCE_ALREADY_EXISTS" in str(e)

    # ------------------------------------------------------------------ experiments and runs
    def experiment_id(self, name: str) -> str:
        """The experiment's id, created when missing (two daemons creating it at once both get the one id)."""
        try:
            return str(self._call("GET", "experiments/get-by-name", params={"experiment_name": name})["experiment"]["experiment_id"])
        except MlflowError as e:
            if "RESOURCE_DOES_NOT_EXIST" not in str(e):
                raise
        try:
            return str(self._call("POST", "experiments/create", {"name": name})["experiment_id"])
        except MlflowError as e:
            if not self._exists(e):
                raise
            return str(self._call("GET", "experiments/get-by-name", params={"experiment_name": name})["experiment"]["experiment_id"])

    def find_run(self, experiment_id: str, tag: str, value: str) -> RunHandle | None:
        """The live run whose tag `tag` is `value` (the export's key: one run per round), or None."""
        flt = f"tags.`{tag}` = '{value}'"
        runs = self._call("POST", "runs/search", {"experiment_ids": [experiment_id], "filter": flt, "max_results": 1}).get("runs", [])
        return _handle(runs[0]) if runs else None

    def create_run(self, experiment_id: str, name: str, start_ms: int, tags: dict[str, str]) -> RunHandle:
        body = {"experiment_id": experiment_id, "run_name": name, "start_time": start_ms, "tags": _pairs(tags, MAX_TAG_VALUE)}
        return _handle(self._call("POST", "runs/create", body)["run"])

    def log(self, run: RunHandle, params: dict[str, str], tags: dict[str, str], metrics: Sequence[Metric]) -> None:
        """Params not logged before (a changed value would be refused), tags (overwritten), metrics (a point logged
        again with its step and timestamp is not stored twice), in batches within the server's limits."""
        fresh = {k: v for k, v in params.items() if k not in run.params}
        for part in _chunks(_pairs(fresh, MAX_PARAM_VALUE), MAX_PARAMS_TAGS_PER_BATCH):
            self._call("POST", "runs/log-batch", {"run_id": run.run_id, "params": part})
        run.params.update(fresh)
        for part in _chunks(_pairs(tags, MAX_TAG_VALUE), MAX_PARAMS_TAGS_PER_BATCH):
            self._call("POST", "runs/log-batch", {"run_id": run.run_id, "tags": part})
        rows = [{"key": m.key, "value": m.value, "step": m.step, "timestamp": m.timestamp_ms} for m in metrics]
        for part in _chunks(rows, MAX_METRICS_PER_BATCH):
            self._call("POST", "runs/log-batch", {"run_id": run.run_id, "metrics": part})

    def end_run(self, run: RunHandle, status: str, end_ms: int) -> None:
        self._call("POST", "runs/update", {"run_id": run.run_id, "status": status, "end_time": end_ms})

    def put_artifact(self, run: RunHandle, path: str, blob: bytes) -> bool:
        """Upload a small file into the run's artifacts when the server proxies them (artifact URI
        mlflow-artifacts:/...); False when it does not (the store is the client's to write: not done here)."""
        prefix = "mlflow-artifacts:/"
        if not run.artifact_uri.startswith(prefix):
            return False
        where = quote(f"{run.artifact_uri[len(prefix) :].strip('/')}/{path}")
        try:
            r = self.http.put(f"/api/2.0/mlflow-artifacts/artifacts/{where}", content=blob)
        except httpx.HTTPError as e:
            raise MlflowError(f"artifact {path} at {self.where}: {type(e).__name__}: {e}") from e
        if r.status_code >= 400:
            raise MlflowError(f"artifact {path} at {self.where}: HTTP {r.status_code} {_error_code(r)}")
        return True

    # ------------------------------------------------------------------ model registry
    def register(self, model: str, source: str, run: RunHandle, tags: dict[str, str], description: str) -> str:
        """The model version of `run` under `model` (created, with the model, when missing); its tags set. Returns
        the version number. One version per run: an export done again finds it by run id."""
        try:
            self._call("POST", "registered-models/create", {"name": model})
        except MlflowError as e:
            if not self._exists(e):
                raise
        flt = f"name = '{model}' and run_id = '{run.run_id}'"
        found = self._call("GET", "model-versions/search", params={"filter": flt}).get("model_versions", [])
        if found:
            version = str(found[0]["version"])
            for pair in _pairs(tags, MAX_TAG_VALUE):
                self._call("POST", "model-versions/set-tag", {"name": model, "version": version, **pair})
            return version
        body = {"name": model, "source": source, "run_id": run.run_id, "tags": _pairs(tags, MAX_TAG_VALUE), "description": description}
        return str(self._call("POST", "model-versions/create", body)["model_version"]["version"])


def _handle(run: dict[str, Any]) -> RunHandle:
    info, data = run["info"], run.get("data", {})
    return RunHandle(info["run_id"], info.get("artifact_uri", ""), {p["key"]: p["value"] for p in data.get("params", [])})


def _pairs(kv: dict[str, str], max_len: int) -> list[dict[str, str]]:
    return [{"key": k, "value": v[:max_len]} for k, v in kv.items()]


def _chunks(rows: list[Any], n: int) -> list[list[Any]]:
    return [rows[i : i + n] for i in range(0, len(rows), n)]


def _error_code(r: httpx.Response) -> str:
    """The server's error code and message (MLflow answers JSON {error_code, message}); never the request."""
    try:
        body = r.json()
    except json.JSONDecodeError:
        return r.text[:200]
    return f"{body.get('error_code', '')}: {str(body.get('message', ''))[:300]}"
