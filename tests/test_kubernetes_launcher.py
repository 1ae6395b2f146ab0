"""The Kubernetes launcher (connectors/kubernetes_jobs.py, daemon/job_launchers.py KubernetesJobLauncher) without a cluster.

No API server runs here. Two checks stand in for one:
* every object the launcher creates validates against the Kubernetes OpenAPI schema (kubernetes-validate, strict),
  and the TrainJob against a structural schema written from the Kubeflow Trainer v1alpha1 CRD;
* create, re-attach, cancel and failure run the official `kubernetes` client against a loopback HTTP server that
  answers the paths the client calls with JSON in the shapes the API documents (Job, Service, Pod, Status), and
  records every request. The client's own serialisation and deserialisation are exercised; the API server's
  behaviour (controllers, admission, RBAC) is not.
"""

from __future__ import annotations

import json
import re
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

import jsonschema
import kubernetes_validate
import pytest
import yaml
from kubernetes import client as k8s

from connectors.kubernetes_jobs import (
    KubernetesLauncher,
    KubernetesLaunchError,
    WorkloadSpec,
    _model,
    job_manifest,
    service_manifest,
    template_shape,
    trainjob_manifest,
    workload_name,
)

ROOT = Path(__file__).resolve().parents[1]
NS = "cptd"
K8S_VERSION = "1.33.0"
DNS1123_LABEL = re.compile(r"^[a-z]([-a-z0-9]*[a-z0-9])?$")


def _template() -> dict:
    cj = yaml.safe_load((ROOT / "deploy/k8s/overlays/multi-gpu/train-job-template.yaml").read_text())
    return cj["spec"]["jobTemplate"]


def _spec(nodes: int | None = None, kind: str = "job", round_id: str = "r00012", digest: str = "d1") -> WorkloadSpec:
    tpl = _template()
    n, g = template_shape(tpl)
    return WorkloadSpec(round_id, 1, NS, f"/checkpoints/rounds/{round_id}/train-spec.json", digest, tpl, kind, nodes or n, g)  # type: ignore[arg-type]


# --------------------------------------------------------------------------- fake API server
class FakeApi:
    """Canned Kubernetes API: objects by (collection, name); every request recorded as (method, path, query, body)."""

    def __init__(self) -> None:
        self.objects: dict[tuple[str, str], dict] = {}
        self.requests: list[tuple[str, str, dict, dict | None]] = []
        self.pods: list[dict] = []
        self.conflict_once = False  # POST jobs answers 409 once, as when another daemon created it in between
        self.hidden_once = False  # the first GET of a Job answers 404 (the race's other half)
        self.uid = 0
        cj = yaml.safe_load((ROOT / "deploy/k8s/overlays/multi-gpu/train-job-template.yaml").read_text())
        cj["metadata"]["namespace"] = NS
        self.objects[("cronjobs", "cptd-train-template")] = cj

    def mutations(self) -> list[tuple[str, str]]:
        return [(m, p) for m, p, _q, _b in self.requests if m != "GET"]


def _status(code: int, reason: str, message: str) -> dict:
    return {"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure", "message": message, "reason": reason, "code": code}


_PATH = re.compile(r"^/(?:api/v1|apis/batch/v1|apis/trainer\.kubeflow\.org/v1alpha1)/namespaces/([^/]+)/([a-z]+)(?:/([^/]+))?$")


def _handler(api: FakeApi):
    class H(BaseHTTPRequestHandler):
        def log_message(self, *a):  # quiet
            pass

        def _send(self, code: int, body: dict) -> None:
            data = json.dumps(body).encode()
            self.send_response(code)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def _handle(self, method: str) -> None:
            u = urlsplit(self.path)
            n = int(self.headers.get("Content-Length") or 0)
            body = json.loads(self.rfile.read(n)) if n else None
            query = {k: v[0] for k, v in parse_qs(u.query).items()}
            api.requests.append((method, u.path, query, body))
            m = _PATH.match(u.path)
            if not m or m.group(1) != NS:
                return self._send(404, _status(404, "NotFound", f"no route {u.path}"))
            coll, name = m.group(2), m.group(3)
            if method == "GET" and coll == "pods" and name is None:
                sel = query.get("labelSelector", "")
                k, _, v = sel.partition("=")
                items = [p for p in api.pods if p["metadata"]["labels"].get(k) == v]
                return self._send(200, {"kind": "PodList", "apiVersion": "v1", "metadata": {}, "items": items})
            if method == "GET" and name:
                if coll == "jobs" and api.hidden_once:
                    api.hidden_once = False
                    return self._send(404, _status(404, "NotFound", f'jobs.batch "{name}" not found'))
                obj = api.objects.get((coll, name))
                if obj is None:
                    return self._send(404, _status(404, "NotFound", f'{coll} "{name}" not found'))
                return self._send(200, obj)
            if method == "POST" and name is None:
                assert body is not None
                key = (coll, body["metadata"]["name"])
                if key in api.objects or (coll == "jobs" and api.conflict_once):
                    api.conflict_once = False
                    return self._send(409, _status(409, "AlreadyExists", f'{coll} "{key[1]}" already exists'))
                api.uid += 1
                obj = json.loads(json.dumps(body))
                obj["metadata"].update(uid=f"uid-{api.uid}", resourceVersion="1", creationTimestamp="2026-11-29T06:00:00Z")
                api.objects[key] = obj
                return self._send(201, obj)
            if method == "DELETE" and name:
                gone = api.objects.pop((coll, name), None)
                if gone is None:
                    return self._send(404, _status(404, "NotFound", f'{coll} "{name}" not found'))
                if coll == "services":  # as the API documents: deleteNamespacedService answers the Service
                    return self._send(200, gone)
                return self._send(200, {"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Success"})
            return self._send(405, _status(405, "MethodNotAllowed", method))

        def do_GET(self):
            self._handle("GET")

        def do_POST(self):
            self._handle("POST")

        def do_DELETE(self):
            self._handle("DELETE")

    return H


@pytest.fixture
def fake():
    api = FakeApi()
    srv = ThreadingHTTPServer(("127.0.0.1", 0), _handler(api))
    t = threading.Thread(target=srv.serve_forever, daemon=True)
    t.start()
    api.host = f"http://127.0.0.1:{srv.server_address[1]}"  # type: ignore[attr-defined]
    yield api
    srv.shutdown()
    srv.server_close()


def _launcher(api: FakeApi) -> KubernetesLauncher:
    """A fresh launcher = a fresh daemon process: its own ApiClient pointed at the fake server."""
    cfg = k8s.Configuration(host=api.host)  # type: ignore[attr-defined]
    return KubernetesLauncher(k8s.ApiClient(cfg))


# --------------------------------------------------------------------------- objects


def failed_pod(name: str, workload: str, terminated: dict) -> dict:
    """A failed trainer pod as the Pod API returns it, with its container's `terminated` state."""
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": name, "namespace": NS, "labels": {"cptd.io/workload": workload}},
        "spec": {"containers": [{"name": "trainer", "image": "cptd"}]},
        "status": {
            "phase": "Failed",
            "containerStatuses": [
                {
                    "name": "trainer",
                    "image": "cptd",
                    "imageID": "",
                    "ready": False,
                    "restartCount": 0,
                    "state": {"terminated": terminated},
                }
            ],
        },
    }


def test_names_are_deterministic_dns_labels():
    assert workload_name("r00012", 1) == "cptd-train-r00012-a1"
    assert workload_name("r00012", 1) == workload_name("r00012", 1) != workload_name("r00012", 2)
    long = workload_name("R" + "x_" * 60, 3)
    assert len(long) <= 52 and DNS1123_LABEL.match(long) and long != workload_name("R" + "x_" * 61, 3)
    for n in ("cptd-train-r00012-a1", long):
        assert len(f"{n}-{999}") <= 63 and DNS1123_LABEL.match(n)


@pytest.mark.parametrize("nodes", [1, 2])
@pytest.mark.parametrize("version", [K8S_VERSION, kubernetes_validate.latest_version()])
def test_created_objects_validate_against_kubernetes_schema(nodes, version):
    spec = _spec(nodes)
    job, svc = job_manifest(spec), service_manifest(spec, owner_uid="uid-1")
    for obj in (job, svc):
        kubernetes_validate.validate(obj, version, strict=True)
    # the official client's model gives back exactly what we built (nothing dropped on the way to the API)
    api = k8s.ApiClient()
    assert api.sanitize_for_serialization(_model(k8s.V1Job, job)) == job
    assert api.sanitize_for_serialization(_model(k8s.V1Service, svc)) == svc


def test_job_shape_indexed_one_pod_per_node_with_static_rendezvous():
    spec = _spec(nodes=3)
    job = job_manifest(spec)
    js = job["spec"]
    assert js["completionMode"] == "Indexed" and js["completions"] == js["parallelism"] == 3 and js["backoffLimit"] == 0
    pod = js["template"]["spec"]
    assert pod["subdomain"] == spec.name == "cptd-train-r00012-a1" and pod["restartPolicy"] == "Never"
    c = pod["containers"][0]
    assert c["command"] == [
        "torchrun",
        "--nnodes=3",
        "--nproc-per-node=4",
        "--node-rank=$(CPTD_NODE_RANK)",
        "--master-addr=cptd-train-r00012-a1-0.cptd-train-r00012-a1",
        "--master-port=29500",
        "-m",
        "daemon.jobs.trainer",
        "/checkpoints/rounds/r00012/train-spec.json",
    ]
    assert "args" not in c and c["terminationMessagePolicy"] == "FallbackToLogsOnError"
    env = {e["name"]: e for e in c["env"]}
    assert env["CPTD_NODE_RANK"]["valueFrom"]["fieldRef"]["fieldPath"] == "metadata.annotations['batch.kubernetes.io/job-completion-index']"
    assert env["NCCL_DEBUG"]["value"] == "WARN", "the template's env is kept"
    # the operator's template decides image, resources, volumes, service account, tolerations
    tpl_pod = _template()["spec"]["template"]["spec"]
    assert c["resources"] == tpl_pod["containers"][0]["resources"] and c["image"] == "cptd"
    assert pod["volumes"] == tpl_pod["volumes"] and pod["serviceAccountName"] == "cptd-trainer"
    assert pod["tolerations"] == tpl_pod["tolerations"]
    labels = js["template"]["metadata"]["labels"]
    assert labels["cptd.io/workload"] == spec.name and labels["cptd.io/round"] == "r00012"
    svc = service_manifest(spec)
    assert svc["spec"]["clusterIP"] == "None" and svc["spec"]["selector"] == {"cptd.io/workload": spec.name}
    assert svc["spec"]["publishNotReadyAddresses"] is True
    single = job_manifest(_spec(nodes=1))["spec"]["template"]["spec"]["containers"][0]["command"]
    assert "--standalone" in single and not any(a.startswith("--master-addr") for a in single)


# ---- TrainJob: structural schema from the Kubeflow Trainer CRD (trainer.kubeflow.org/v1alpha1, TrainJob),
# the fields the launcher writes, with their types and additionalProperties: false where the CRD has it.
TRAINJOB_SCHEMA = {
    "type": "object",
    "required": ["apiVersion", "kind", "metadata", "spec"],
    "additionalProperties": False,
    "properties": {
        "apiVersion": {"const": "trainer.kubeflow.org/v1alpha1"},
        "kind": {"const": "TrainJob"},
        "metadata": {"type": "object", "required": ["name"], "properties": {"name": {"type": "string", "pattern": DNS1123_LABEL.pattern}}},
        "spec": {
            "type": "object",
            "required": ["runtimeRef"],
            "additionalProperties": False,
            "properties": {
                "runtimeRef": {
                    "type": "object",
                    "required": ["name"],
                    "additionalProperties": False,
                    "properties": {"name": {"type": "string", "minLength": 1}, "apiGroup": {"type": "string"}, "kind": {"type": "string"}},
                },
                "trainer": {
                    "type": "object",
                    "additionalProperties": False,
                    "properties": {
                        "image": {"type": "string"},
                        "command": {"type": "array", "items": {"type": "string"}},
                        "args": {"type": "array", "items": {"type": "string"}},
                        "env": {"type": "array", "items": {"type": "object", "required": ["name"]}},
                        "numNodes": {"type": "integer", "minimum": 1},
                        "numProcPerNode": {"anyOf": [{"type": "integer"}, {"type": "string"}]},
                        "resourcesPerNode": {
                            "type": "object",
                            "additionalProperties": False,
                            "properties": {"requests": {"type": "object"}, "limits": {"type": "object"}, "claims": {"type": "array"}},
                        },
                    },
                },
                "labels": {"type": "object", "additionalProperties": {"type": "string"}},
                "annotations": {"type": "object", "additionalProperties": {"type": "string"}},
                "initializer": {"type": "object"},
                "podSpecOverrides": {"type": "array"},
                "managedBy": {"type": "string"},
                "suspend": {"type": "boolean"},
            },
        },
    },
}


def test_trainjob_matches_the_trainer_crd_structure():
    tj = trainjob_manifest(_spec(nodes=2, kind="trainjob"))
    jsonschema.validate(tj, TRAINJOB_SCHEMA)
    assert tj["spec"]["runtimeRef"]["name"] == "torch-distributed"
    t = tj["spec"]["trainer"]
    assert t["numNodes"] == 2 and t["numProcPerNode"] == 4 and t["resourcesPerNode"]["limits"]["nvidia.com/gpu"] == "4"
    assert t["args"][-3:] == ["-m", "daemon.jobs.trainer", "/checkpoints/rounds/r00012/train-spec.json"]
    bad = json.loads(json.dumps(tj))
    bad["spec"]["trainer"]["numNode"] = 2  # the check is not vacuous
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(bad, TRAINJOB_SCHEMA)


# --------------------------------------------------------------------------- against the fake API
def test_first_run_creates_job_and_service_restart_attaches(fake):
    launcher = _launcher(fake)
    tpl = launcher.load_template("cptd-train-template", NS)
    assert tpl == _template()
    spec = _spec(nodes=2)
    assert launcher.ensure(spec) is True
    assert fake.mutations() == [("POST", f"/apis/batch/v1/namespaces/{NS}/jobs"), ("POST", f"/api/v1/namespaces/{NS}/services")]
    posted_job = [b for m, p, _q, b in fake.requests if m == "POST" and p.endswith("/jobs")][0]
    assert posted_job == job_manifest(spec), "the client sent the manifest as built"
    svc = fake.objects[("services", spec.name)]
    assert svc["metadata"]["ownerReferences"][0]["uid"] == fake.objects[("jobs", spec.name)]["metadata"]["uid"]
    # a restarted daemon: a new client, same round and attempt -> finds the Job and the Service, creates nothing
    fake.requests.clear()
    assert _launcher(fake).ensure(_spec(nodes=2)) is False
    assert fake.mutations() == []
    assert [(m, p) for m, p, _q, _b in fake.requests] == [
        ("GET", f"/apis/batch/v1/namespaces/{NS}/jobs/{spec.name}"),
        ("GET", f"/api/v1/namespaces/{NS}/services/{spec.name}"),
    ]
    # ... and refuses a Job of its name made for another spec
    with pytest.raises(KubernetesLaunchError, match="another spec"):
        _launcher(fake).ensure(_spec(nodes=2, digest="other"))


def test_the_workload_never_holds_the_daemons_settings_or_a_secret(fake):
    """A template written from the daemon's pod (Redis URL, API token, a Secret by envFrom): the trainer gets none of it."""
    cj = fake.objects[("cronjobs", "cptd-train-template")]
    c = cj["spec"]["jobTemplate"]["spec"]["template"]["spec"]["containers"][0]
    from_secret = {"valueFrom": {"secretKeyRef": {"name": "cptd-secrets", "key": "CPTD_REDIS_URL"}}}
    c["env"] += [
        {"name": "CPTD_REDIS_URL", **from_secret},
        {"name": "CPTD_API_TOKEN", "value": "t"},
        {"name": "WANDB_API_KEY", "value": "k"},
        {"name": "REDIS_URL", **from_secret},  # any name: read from a Secret is enough
        {"name": "TORCH_NCCL_ASYNC_ERROR_HANDLING", "value": "1"},
    ]
    c["envFrom"] = [{"secretRef": {"name": "cptd-secrets"}}]
    launcher = _launcher(fake)
    tpl = launcher.load_template("cptd-train-template", NS)
    for kind in ("job", "trainjob"):
        spec = WorkloadSpec("r00012", 1, NS, "/checkpoints/rounds/r00012/train-spec.json", "d1", tpl, kind)  # type: ignore[arg-type]
        assert launcher.ensure(spec) is True
    posted = {p.rsplit("/", 1)[-1]: b for m, p, _q, b in fake.requests if m == "POST" and not p.endswith("/services")}
    job_c = posted["jobs"]["spec"]["template"]["spec"]["containers"][0]
    for env in (job_c["env"], posted["trainjobs"]["spec"]["trainer"]["env"]):
        names = {e["name"] for e in env}
        assert not names & {"CPTD_REDIS_URL", "CPTD_API_TOKEN", "WANDB_API_KEY", "REDIS_URL"}
        assert not [e for e in env if "secretKeyRef" in (e.get("valueFrom") or {})]
        assert {"NCCL_DEBUG", "TORCH_NCCL_ASYNC_ERROR_HANDLING"} <= names
    assert "envFrom" not in job_c and "CPTD_NODE_RANK" in {e["name"] for e in job_c["env"]}


def test_conflict_on_create_means_already_there(fake):
    spec = _spec()
    fake.objects[("jobs", spec.name)] = {**job_manifest(spec), "status": {}}
    fake.objects[("jobs", spec.name)]["metadata"]["uid"] = "uid-x"
    fake.hidden_once = True  # not seen by the first GET, then POST -> 409
    assert _launcher(fake).ensure(spec) is False
    assert [m for m, _p in fake.mutations()] == ["POST", "POST"]  # the refused Job, then the missing Service
    assert fake.mutations()[1][1].endswith("/services")


def test_cancel_deletes_job_foreground_and_service(fake):
    launcher = _launcher(fake)
    spec = _spec(nodes=2)
    launcher.ensure(spec)
    fake.requests.clear()
    launcher.delete(spec)
    dels = [(p, q) for m, p, q, _b in fake.requests if m == "DELETE"]
    assert dels[0] == (f"/apis/batch/v1/namespaces/{NS}/jobs/{spec.name}", {"propagationPolicy": "Foreground"})
    assert dels[1][0] == f"/api/v1/namespaces/{NS}/services/{spec.name}"
    assert not fake.objects.keys() - {("cronjobs", "cptd-train-template")}
    launcher.delete(spec)  # already gone: fine


def _failed(fake: FakeApi, spec: WorkloadSpec) -> None:
    job = fake.objects[("jobs", spec.name)]
    job["status"] = {
        "failed": 1,
        "startTime": "2026-11-29T06:00:01Z",
        "conditions": [
            {
                "type": "FailureTarget",
                "status": "True",
                "reason": "BackoffLimitExceeded",
                "message": "Job has reached the specified backoff limit",
            },
            {
                "type": "Failed",
                "status": "True",
                "reason": "BackoffLimitExceeded",
                "message": "Job has reached the specified backoff limit",
                "lastTransitionTime": "2026-11-29T06:05:00Z",
            },
        ],
    }
    tb = "Traceback (most recent call last):\n  File trainer.py, line 1\n"
    tb += "torch.OutOfMemoryError: CUDA out of memory. Tried to allocate 2.00 GiB"
    fake.pods = [
        failed_pod(f"{spec.name}-0-abcde", spec.name, {"exitCode": 1, "reason": "Error", "message": tb}),
        failed_pod(f"{spec.name}-1-fghij", spec.name, {"exitCode": 137, "reason": "Error"}),
    ]


def test_failed_job_reports_condition_and_pod_termination_message(fake):
    launcher = _launcher(fake)
    spec = _spec(nodes=2)
    launcher.ensure(spec)
    assert launcher.status(spec).phase == "pending"
    fake.objects[("jobs", spec.name)]["status"] = {"active": 2, "ready": 2}
    assert launcher.status(spec).phase == "running"
    _failed(fake, spec)
    status = launcher.status(spec)
    assert status.phase == "failed" and status.reason == "BackoffLimitExceeded"
    msg = status.failure()
    assert "BackoffLimitExceeded: Job has reached the specified backoff limit" in msg
    assert f"pod {spec.name}-0-abcde container trainer exited 1 (Error)" in msg and "CUDA out of memory" in msg
    assert f"{spec.name}-1-fghij container trainer exited 137" in msg
    pods_q = [q for m, p, q, _b in fake.requests if p.endswith("/pods")]
    assert pods_q[-1]["labelSelector"] == f"cptd.io/workload={spec.name}"
    fake.objects.pop(("jobs", spec.name))
    assert launcher.status(spec).phase == "missing"


# --------------------------------------------------------------------------- the launcher as a round runs it
def _runner(fake: FakeApi, tmp_path: Path, cancel: bool = False, stop: bool = False, spec=None, workload: str = "job"):
    """A round's job (the trainer unless `spec` says) under CPTD_TRAIN_LAUNCHER=kubernetes, run by RoundContext.run_job
    against the fake API."""
    from daemon.job_launchers import Job
    from daemon.jobs.specs import TrainSpec
    from daemon.round_record import RoundState
    from daemon.settings import Settings
    from tests.job_context import CancelFlag, bare_record, job_context

    out = tmp_path / "train"
    out.mkdir(parents=True, exist_ok=True)
    settings = Settings(
        train_launcher="kubernetes",
        train_namespace=NS,
        train_job_template="cptd-train-template",
        train_workload=workload,
        train_runtime="torch-distributed",
        train_poll_s=0.05,
        checkpoint_dir=tmp_path,
    )
    ctx = job_context(settings, CancelFlag(cancel), kube_api_client=k8s.ApiClient(k8s.Configuration(host=fake.host)))
    if stop:
        ctx.stop.set()
    rec = bare_record("r00012", RoundState.TRAINING)
    spec = spec or TrainSpec(parent_dir="-", out_dir=str(out), new_path="-")
    job = Job(spec, tmp_path / f"{spec.role}-spec.json", tmp_path / f"{spec.role}.log", round_id=rec.id)

    def run():
        return ctx.run_job(job, rec)

    return run, out


def test_round_job_failure_reaches_round_failed(fake, tmp_path):
    from daemon.rounds.context import RoundFailed

    run, _ = _runner(fake, tmp_path)
    name = workload_name("r00012", 1)
    orig = fake.objects

    class Fail(dict):  # the Job fails once created
        def __setitem__(self, k, v):
            super().__setitem__(k, v)
            if k == ("jobs", name):
                _failed(fake, _spec())

    fake.objects = Fail(orig)
    with pytest.raises(RoundFailed) as ei:
        run()
    msg = str(ei.value)
    assert msg.startswith(f"job {name} failed: BackoffLimitExceeded")  # the TRAINING phase prefixes its name
    assert "CUDA out of memory" in msg and "exited 1" in msg
    assert ("services", name) not in fake.objects and ("jobs", name) in fake.objects  # the Job stays for kubectl logs


def test_round_job_complete_needs_result_json(fake, tmp_path):
    run, out = _runner(fake, tmp_path)
    name = workload_name("r00012", 1)

    class Done(dict):
        def __setitem__(self, k, v):
            if k == ("jobs", name):
                v = {**v, "status": {"succeeded": 1, "conditions": [{"type": "Complete", "status": "True"}]}}
            super().__setitem__(k, v)

    fake.objects = Done(fake.objects)
    (out / "result.json").write_text('{"steps": 3, "final": "F"}')
    assert run() == {"steps": 3, "final": "F"}  # the round gets the result file's content
    assert ("jobs", name) not in fake.objects  # cleaned up once the round has its result


def test_round_job_cancel_deletes_and_stop_leaves_running(fake, tmp_path):
    from daemon.rounds.context import RoundFailed, Stop

    name = workload_name("r00012", 1)
    run, _ = _runner(fake, tmp_path, stop=True)
    with pytest.raises(Stop):
        run()
    assert ("jobs", name) in fake.objects and ("services", name) in fake.objects  # left running for the next leader
    fake.requests.clear()
    run, _ = _runner(fake, tmp_path, cancel=True)  # the same round's spec: the next leader re-attaches
    with pytest.raises(RoundFailed, match="cancelled by operator"):
        run()
    assert [m for m, _p in fake.mutations()] == ["DELETE", "DELETE"]  # re-attached (no POST), then deleted
    assert [q for m, _p, q, _b in fake.requests if m == "DELETE"][0] == {"propagationPolicy": "Foreground"}


def test_settings_accept_the_launchers_this_version_has():
    from pydantic import ValidationError

    from daemon.settings import Settings

    for ok in ("subprocess", "torchrun:4", "kubernetes"):
        assert Settings(train_launcher=ok).train_launcher == ok
    for bad in ("kubernetes-job", "torchrun:", "torchrun:0", "slurm"):
        with pytest.raises(ValidationError, match="not supported"):
            Settings(train_launcher=bad)
    assert Settings(train_launcher="kubernetes", train_workload="trainjob").train_workload == "trainjob"


def test_trainjob_create_attach_fail_and_delete(fake):
    spec = _spec(nodes=2, kind="trainjob")
    base = f"/apis/trainer.kubeflow.org/v1alpha1/namespaces/{NS}/trainjobs"
    assert _launcher(fake).ensure(spec) is True
    assert fake.mutations() == [("POST", base)]  # no Service: the Trainer controller makes the rendezvous
    fake.requests.clear()
    launcher = _launcher(fake)
    assert launcher.ensure(spec) is False and fake.mutations() == []
    fake.objects[("trainjobs", spec.name)]["status"] = {
        "conditions": [{"type": "Failed", "status": "True", "reason": "JobSetFailed", "message": "jobset failed"}]
    }
    fake.pods = [
        {
            "apiVersion": "v1",
            "kind": "Pod",
            "metadata": {"name": f"{spec.name}-node-0-0-abc", "labels": {"jobset.sigs.k8s.io/jobset-name": spec.name}},
            "status": {
                "containerStatuses": [
                    {
                        "name": "node",
                        "image": "cptd",
                        "imageID": "",
                        "ready": False,
                        "restartCount": 0,
                        "state": {"terminated": {"exitCode": 1, "reason": "Error", "message": "ValueError: bad spec"}},
                    }
                ]
            },
        }
    ]
    msg = launcher.status(spec).failure()
    assert "JobSetFailed: jobset failed" in msg and "ValueError: bad spec" in msg
    fake.requests.clear()
    launcher.delete(spec)
    assert [(m, p, q) for m, p, q, _b in fake.requests] == [("DELETE", f"{base}/{spec.name}", {"propagationPolicy": "Foreground"})]


def test_the_memory_plan_plans_the_ranks_the_launcher_starts(fake):
    """PENDING's memory plan (daemon/rounds/memory_fit.py) plans the ranks a round trains on: one child process,
    torchrun's N, or the job template's nodes x GPUs per node; an unreadable template is a JobStartError, named."""
    from daemon.job_launchers import JobStartError, train_ranks
    from daemon.settings import Settings

    client = k8s.ApiClient(k8s.Configuration(host=fake.host))
    assert train_ranks(Settings(train_launcher="subprocess")) == (1, 1)
    assert train_ranks(Settings(train_launcher="torchrun:4")) == (4, 1)
    nodes, per_node = template_shape(_template())
    settings = Settings(train_launcher="kubernetes", train_namespace=NS, train_job_template="cptd-train-template")
    assert train_ranks(settings, client) == (nodes * per_node, nodes)
    with pytest.raises(JobStartError, match="no-such-template"):
        train_ranks(settings.model_copy(update={"train_job_template": "no-such-template"}), client)


# --------------------------------------------------------------------------- jobs that load a model, not the trainer
def _one_process_specs(tmp_path: Path) -> list:
    from daemon.jobs.specs import DetectorSpec, DeviceCheckSpec, DriftSpec, EvalSpec

    d = tmp_path
    return [
        EvalSpec(round_id="r00012", serving="/s", candidates=[["final", "/f"]], new_path="/n", replay_path="/r", out=str(d / "eval.json")),
        DriftSpec(model="/s", new_path="/n", ref_path="/r", out=str(d / "drift.json")),
        DetectorSpec(served="/s", reference="/b", docs_path="/p", out=str(d / "detector.json")),
        DeviceCheckSpec(device="cuda", out=str(d / "device-check.json")),
    ]


@pytest.mark.parametrize("workload", ["job", "trainjob"])
def test_evaluator_drift_detector_and_device_check_run_as_one_process_on_one_gpu_under_their_own_name(fake, tmp_path, workload):
    """On the multi-gpu overlay nothing that loads a model runs in the daemon's pod: each such job is a Job from the
    trainer's template (its image, volume, node selector, tolerations; its env without secrets), one pod running
    `python -m MODULE SPEC` on one GPU, named after the round and its kind, whatever the trainer's workload kind."""
    from daemon.jobs.specs import TrainSpec
    from daemon.rounds.context import Stop

    tpl = _template()
    tpl_pod = tpl["spec"]["template"]["spec"]
    names = {workload_name("r00012", 1)}  # the trainer's
    for spec in _one_process_specs(tmp_path):
        fake.requests.clear()
        run, _ = _runner(fake, tmp_path, stop=True, spec=spec, workload=workload)
        with pytest.raises(Stop):  # created, then left running: the daemon stops
            run()
        name = f"cptd-{spec.role}-r00012-a1"
        assert fake.mutations() == [("POST", f"/apis/batch/v1/namespaces/{NS}/jobs")], "a plain Job, no Service, no TrainJob"
        job = [b for m, _p, _q, b in fake.requests if m == "POST"][0]
        assert job["metadata"]["name"] == name
        kubernetes_validate.validate(job, K8S_VERSION, strict=True)
        js = job["spec"]
        assert js["completions"] == js["parallelism"] == 1 and "completionMode" not in js
        pod = js["template"]["spec"]
        c = pod["containers"][0]
        assert c["command"] == ["python", "-m", spec.module, str(tmp_path / f"{spec.role}-spec.json")]
        assert c["resources"]["limits"]["nvidia.com/gpu"] == c["resources"]["requests"]["nvidia.com/gpu"] == "1"
        assert c["resources"]["limits"]["memory"] == tpl_pod["containers"][0]["resources"]["limits"]["memory"]
        assert "subdomain" not in pod and "CPTD_NODE_RANK" not in {e["name"] for e in c["env"]}
        assert not [e for e in c["env"] if e["name"].startswith("CPTD_")]
        assert pod["volumes"] == tpl_pod["volumes"] and pod["tolerations"] == tpl_pod["tolerations"] and c["image"] == "cptd"
        assert js["template"]["metadata"]["labels"]["cptd.io/job"] == spec.role
        names.add(name)
    assert len(names) == 5, "every job kind of a round has its own workload name"
    # the trainer keeps its shape and its name
    assert TrainSpec.distributed and job_manifest(_spec())["spec"]["completionMode"] == "Indexed"


def test_a_restarted_daemon_reattaches_to_its_evaluator_not_to_the_trainer(fake, tmp_path):
    from daemon.jobs.specs import EvalSpec
    from daemon.rounds.context import Stop

    spec = _one_process_specs(tmp_path)[0]
    assert isinstance(spec, EvalSpec)
    trainer = workload_name("r00012", 1)
    fake.objects[("jobs", trainer)] = {**job_manifest(_spec()), "status": {"succeeded": 1}}  # the round's finished trainer
    run, _ = _runner(fake, tmp_path, stop=True, spec=spec)
    with pytest.raises(Stop):
        run()
    name = "cptd-eval-r00012-a1"
    assert ("jobs", name) in fake.objects
    fake.objects[("jobs", name)]["status"] = {"succeeded": 1, "conditions": [{"type": "Complete", "status": "True"}]}
    Path(spec.out).write_text('{"round_id": "r00012"}')
    fake.requests.clear()
    run, _ = _runner(fake, tmp_path, spec=spec)  # the next daemon: the same round's evaluator, the same spec
    assert run() == {"round_id": "r00012"}
    assert ("POST", f"/apis/batch/v1/namespaces/{NS}/jobs") not in fake.mutations(), "re-attached, not created again"
    assert [(m, p) for m, p, _q, _b in fake.requests if m == "DELETE"] == [("DELETE", f"/apis/batch/v1/namespaces/{NS}/jobs/{name}")]
    assert ("jobs", trainer) in fake.objects, "the trainer's Job is not the evaluator's"
