"""Round workloads on Kubernetes, through the official `kubernetes` client: objects, create-or-attach, status, delete.

The round runner (CPTD_TRAIN_LAUNCHER=kubernetes) builds a `WorkloadSpec` per round, job kind and attempt and calls
`KubernetesLauncher.ensure`, then `status` until the workload ends, `delete` on cancel. Nothing here decides
what a round does next: that stays with the round state machine.

The trainer is `distributed`: the shapes below. Every other job that loads a model (evaluator, drift probe,
generated-text detector, device check) is a plain Job from the same pod template: one pod, one process
(`python -m MODULE SPEC`), the container's `nvidia.com/gpu` request and limit set to one (each of those jobs uses
one device), no Service, no rendezvous, whatever the trainer's workload kind. Its CPU and memory stay the
template's: it never runs beside its round's trainer, and loading a model needs host memory about the model.
Each job kind has its own name (`cptd-<role>-<round>-a<attempt>`), so a round's evaluator never meets its trainer's
Job, and a restarted daemon re-attaches to the job it was following by that name.

Workload shapes:
* `job` (default): a `batch/v1` Indexed Job, completions = parallelism = nodes, one pod per node, plus a headless
  Service of the same name. With `subdomain` set to that Service, pod `<job>-<index>` is reachable as
  `<job>-<index>.<job>`; every pod runs torchrun with a *static* rendezvous on `<job>-0.<job>:29500`, node rank =
  the pod's completion index (`--node-rank=$(CPTD_NODE_RANK)`, from the `batch.kubernetes.io/job-completion-index`
  annotation). One node: `torchrun --standalone` (no DNS needed).
* `trainjob`: a Kubeflow Trainer `TrainJob` (trainer.kubeflow.org/v1alpha1, runtimeRef `torch-distributed`); the
  Trainer controller makes the JobSet and the rendezvous.

The pod template comes from the suspended CronJob the operator keeps in the cluster (`spec.jobTemplate`): image,
resources, volumes, service account, node selector and tolerations are the operator's; the launcher sets names,
labels, the torchrun command, `subdomain`, `terminationMessagePolicy: FallbackToLogsOnError` and the Indexed mode.
The template's env is kept except what a trainer must never hold (`workload_env`): the daemon's own settings
(CPTD_*, the Redis URL above all), values read from a Secret, secret-named variables and `envFrom`. The trainer
reads its spec and the shared volume and talks to no service but its peers.
Nodes per workload: the template annotation `cptd.io/nodes` (default 1); GPUs per node: `cptd.io/gpus-per-node`, else
the trainer container's `nvidia.com/gpu` limit.
"""

from __future__ import annotations

import copy
import hashlib
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from kubernetes import client as k8s
from kubernetes import config as k8s_config
from kubernetes.client.exceptions import ApiException

from connectors.secret_names import SECRET_NAME

WorkloadKind = Literal["job", "trainjob"]
RDZV_PORT = 29500
LABEL_ROUND = "cptd.io/round"
LABEL_ATTEMPT = "cptd.io/attempt"
LABEL_WORKLOAD = "cptd.io/workload"
LABEL_ROLE = "cptd.io/job"  # train, eval, drift, detector, device-check
ANNOTATION_DIGEST = "cptd.io/spec-digest"
ANNOTATION_NODES = "cptd.io/nodes"
ANNOTATION_GPUS = "cptd.io/gpus-per-node"
TRAINJOB_GROUP, TRAINJOB_VERSION, TRAINJOB_PLURAL = "trainer.kubeflow.org", "v1alpha1", "trainjobs"
_INDEX_FIELD = "metadata.annotations['batch.kubernetes.io/job-completion-index']"  # set by the Job controller
_SA_NAMESPACE = Path("/var/run/secrets/kubernetes.io/serviceaccount/namespace")


class KubernetesLaunchError(Exception):
    """The API refused or the cluster holds something that does not fit (e.g. a Job of our name for another spec)."""


def workload_name(round_id: str, attempt: int = 1, prefix: str = "cptd-train") -> str:
    """`cptd-train-r00012-a1` (`cptd-eval-r00012-a1`, ...): deterministic per round, job kind (the prefix) and attempt,
    DNS-1123 label safe, at most 63 characters.

    A DNS label because the name is also the headless Service's and the pods' hostnames (`<name>-<index>`)."""
    raw = f"{prefix}-{round_id}-a{attempt}".lower()
    name = re.sub(r"[^a-z0-9-]+", "-", raw).strip("-")
    if len(name) > 52:  # room for the pod suffix "-<index>" under 63, and a digest against collisions
        name = name[:43].rstrip("-") + "-" + hashlib.sha256(raw.encode()).hexdigest()[:8]
    if not name or not name[0].isalpha():
        name = "w-" + name
    return name


def current_namespace(default: str = "default") -> str:
    """POD_NAMESPACE (downward API), else the mounted ServiceAccount's namespace, else `default`."""
    ns = os.environ.get("POD_NAMESPACE")
    if ns:
        return ns
    try:
        return _SA_NAMESPACE.read_text().strip() or default
    except OSError:
        return default


def default_api_client() -> k8s.ApiClient:
    """In a pod: the ServiceAccount token and CA; elsewhere: the current kubeconfig context."""
    try:
        k8s_config.load_incluster_config()
    except k8s_config.ConfigException:
        k8s_config.load_kube_config()
    return k8s.ApiClient()


@dataclass(frozen=True)
class WorkloadSpec:
    round_id: str
    attempt: int
    namespace: str
    spec_path: str  # the job's spec JSON on the shared volume, same path in the daemon's and the job's pods
    spec_digest: str
    template: dict[str, Any]  # the CronJob's spec.jobTemplate (metadata + spec of a Job), camelCase as in YAML
    kind: WorkloadKind = "job"
    nodes: int = 1
    gpus_per_node: int = 1
    runtime: str = "torch-distributed"  # TrainJob only: the ClusterTrainingRuntime
    port: int = RDZV_PORT
    module: str = "daemon.jobs.trainer"  # python -m MODULE SPEC
    role: str = "train"  # the job kind: names the workload
    distributed: bool = True  # torchrun over nodes x GPUs; False: one process on one GPU, a plain Job

    @property
    def name(self) -> str:
        return workload_name(self.round_id, self.attempt, prefix=f"cptd-{self.role}")

    def labels(self) -> dict[str, str]:
        return {
            "app.kubernetes.io/name": "cptd-trainer",
            "app.kubernetes.io/part-of": "cptd",
            "app.kubernetes.io/managed-by": "cptd-daemon",
            LABEL_ROUND: self.round_id,
            LABEL_ATTEMPT: str(self.attempt),
            LABEL_ROLE: self.role,
            LABEL_WORKLOAD: self.name,
        }


@dataclass(frozen=True)
class WorkloadStatus:
    phase: Literal["missing", "pending", "running", "succeeded", "failed"]
    reason: str = ""
    message: str = ""
    pods: tuple[str, ...] = field(default_factory=tuple)  # one line per pod that failed: name, exit code, termination message

    def failure(self) -> str:
        """One line for the round record: the workload's condition, then what the failed pods said."""
        head = f"{self.reason}: {self.message}".strip(": ") or self.phase
        return "; ".join([head, *self.pods])


def template_shape(template: dict[str, Any]) -> tuple[int, int]:
    """(nodes, GPUs per node) of a job template: its annotations, else the trainer container's GPU limit."""
    ann = (template.get("metadata") or {}).get("annotations") or {}
    nodes = int(ann.get(ANNOTATION_NODES, 1))
    gpus = ann.get(ANNOTATION_GPUS)
    if gpus is None:
        c = _trainer_container(template["spec"]["template"]["spec"])
        gpus = ((c.get("resources") or {}).get("limits") or {}).get("nvidia.com/gpu", 1)
    if nodes < 1 or int(gpus) < 1:
        raise KubernetesLaunchError(f"job template: nodes={nodes}, gpus per node={gpus}: both must be at least 1")
    return nodes, int(gpus)


def _trainer_container(pod_spec: dict[str, Any]) -> dict[str, Any]:
    cs = pod_spec["containers"]
    return next((c for c in cs if c.get("name") == "trainer"), cs[0])


def workload_env(env: list[dict[str, Any]] | None) -> list[dict[str, Any]]:
    """The template's env minus the daemon's settings (CPTD_*), Secret-backed values and secret-named variables.

    An operator's template may have been written from the daemon's pod (the shipped one once carried CPTD_REDIS_URL);
    a trainer holding Redis credentials could rewrite the round state it is only meant to be driven by."""
    out = []
    for e in env or []:
        name = str(e.get("name", ""))
        if name.startswith("CPTD_") or SECRET_NAME.search(name) or "secretKeyRef" in (e.get("valueFrom") or {}):
            continue
        out.append(e)
    return out


def torchrun_command(spec: WorkloadSpec) -> list[str]:
    cmd = ["torchrun", f"--nnodes={spec.nodes}", f"--nproc-per-node={spec.gpus_per_node}"]
    if spec.nodes == 1:
        cmd.append("--standalone")
    else:  # static rendezvous: rank 0 (completion index 0) hosts the store, the others reach it by its stable DNS name
        cmd += ["--node-rank=$(CPTD_NODE_RANK)", f"--master-addr={spec.name}-0.{spec.name}", f"--master-port={spec.port}"]
    return [*cmd, "-m", spec.module, spec.spec_path]


def workload_command(spec: WorkloadSpec) -> list[str]:
    """torchrun over every rank for the trainer; one `python -m MODULE SPEC` for any other job."""
    return torchrun_command(spec) if spec.distributed else ["python", "-m", spec.module, spec.spec_path]


def job_manifest(spec: WorkloadSpec) -> dict[str, Any]:
    """The template's pod with our names, labels and command: for the trainer an Indexed Job with its rendezvous
    wiring, for any other job one pod with the GPU count cut to the job's."""
    tpl = copy.deepcopy(spec.template)
    meta = tpl.get("metadata") or {}
    job_spec = tpl["spec"]
    labels = {**(meta.get("labels") or {}), **spec.labels()}
    annotations = {**(meta.get("annotations") or {}), ANNOTATION_DIGEST: spec.spec_digest}
    job_spec.pop("selector", None)
    job_spec.pop("manualSelector", None)
    if spec.distributed:
        job_spec.update(completionMode="Indexed", completions=spec.nodes, parallelism=spec.nodes)
    else:
        job_spec.pop("completionMode", None)
        job_spec.update(completions=1, parallelism=1)
    job_spec.setdefault("backoffLimit", 0)
    pod_meta = job_spec["template"].setdefault("metadata", {})
    pod_meta["labels"] = {**(pod_meta.get("labels") or {}), **spec.labels()}
    pod = job_spec["template"]["spec"]
    pod["restartPolicy"] = "Never"
    c = _trainer_container(pod)
    c["command"] = workload_command(spec)
    c.pop("args", None)
    c["terminationMessagePolicy"] = "FallbackToLogsOnError"  # the job's traceback tail becomes the pod's message
    c.pop("envFrom", None)  # whole Secrets and ConfigMaps: not filterable by name, so not passed
    env = workload_env(c.get("env"))
    if spec.distributed:
        pod["subdomain"] = spec.name
        env.append({"name": "CPTD_NODE_RANK", "valueFrom": {"fieldRef": {"fieldPath": _INDEX_FIELD}}})
        ports = [p for p in c.get("ports") or [] if p.get("containerPort") != spec.port]
        c["ports"] = [*ports, {"name": "rdzv", "containerPort": spec.port, "protocol": "TCP"}]
    else:
        for key in ("limits", "requests"):
            res = (c.get("resources") or {}).get(key) or {}
            if "nvidia.com/gpu" in res:
                res["nvidia.com/gpu"] = str(spec.gpus_per_node)
    c["env"] = env
    return {
        "apiVersion": "batch/v1",
        "kind": "Job",
        "metadata": {"name": spec.name, "namespace": spec.namespace, "labels": labels, "annotations": annotations},
        "spec": job_spec,
    }


def service_manifest(spec: WorkloadSpec, owner_uid: str | None = None) -> dict[str, Any]:
    """Headless Service giving pod `<job>-<i>` the DNS name `<job>-<i>.<job>`; owned by the Job, so it goes with it."""
    meta: dict[str, Any] = {"name": spec.name, "namespace": spec.namespace, "labels": spec.labels()}
    if owner_uid:
        meta["ownerReferences"] = [{"apiVersion": "batch/v1", "kind": "Job", "name": spec.name, "uid": owner_uid}]
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": meta,
        "spec": {
            "clusterIP": "None",
            "publishNotReadyAddresses": True,  # rank 0 must be resolvable before any readiness
            "selector": {LABEL_WORKLOAD: spec.name},
            "ports": [{"name": "rdzv", "port": spec.port, "targetPort": spec.port, "protocol": "TCP"}],
        },
    }


def trainjob_manifest(spec: WorkloadSpec) -> dict[str, Any]:
    """A Kubeflow Trainer TrainJob running the trainer module under the torch-distributed runtime."""
    pod = spec.template["spec"]["template"]["spec"]
    c = _trainer_container(pod)
    trainer: dict[str, Any] = {
        "image": c["image"],
        "command": ["torchrun"],
        # the torch plugin sets PET_NNODES, PET_NPROC_PER_NODE, PET_NODE_RANK, PET_MASTER_ADDR/PORT, which torchrun reads
        "args": ["-m", spec.module, spec.spec_path],
        "numNodes": spec.nodes,
        "numProcPerNode": spec.gpus_per_node,
        "resourcesPerNode": c.get("resources") or {},
    }
    if env := workload_env(c.get("env")):
        trainer["env"] = env
    return {
        "apiVersion": f"{TRAINJOB_GROUP}/{TRAINJOB_VERSION}",
        "kind": "TrainJob",
        "metadata": {
            "name": spec.name,
            "namespace": spec.namespace,
            "labels": spec.labels(),
            "annotations": {ANNOTATION_DIGEST: spec.spec_digest},
        },
        "spec": {"runtimeRef": {"name": spec.runtime}, "trainer": trainer, "labels": spec.labels()},
    }


class KubernetesLauncher:
    """create-or-attach, status and delete of one workload kind in one namespace (no retries, no decisions)."""

    def __init__(self, api_client: k8s.ApiClient | None = None):
        self.api = api_client or default_api_client()
        self.batch = k8s.BatchV1Api(self.api)
        self.core = k8s.CoreV1Api(self.api)
        self.custom = k8s.CustomObjectsApi(self.api)

    # ---------------------------------------------------------------- template
    def load_template(self, cronjob: str, namespace: str) -> dict[str, Any]:
        """spec.jobTemplate of the (suspended) CronJob the operator keeps, as a camelCase dict."""
        try:
            cj = self.batch.read_namespaced_cron_job(cronjob, namespace)
        except ApiException as e:
            raise KubernetesLaunchError(f"job template CronJob {namespace}/{cronjob}: {_api_error(e)}") from e
        out = self.api.sanitize_for_serialization(cj.spec.job_template)
        assert isinstance(out, dict)
        return out

    # ---------------------------------------------------------------- create or attach
    def ensure(self, spec: WorkloadSpec, _raced: bool = False) -> bool:
        """Create the workload unless it is there; True = created, False = attached to an existing one."""
        existing = self._read(spec)
        if existing is not None:
            digest = ((existing.get("metadata") or {}).get("annotations") or {}).get(ANNOTATION_DIGEST)
            if digest and digest != spec.spec_digest:
                raise KubernetesLaunchError(f"{spec.kind} {spec.namespace}/{spec.name} exists for another spec (digest {digest})")
            if spec.kind == "job" and spec.distributed:
                self._ensure_service(spec, existing["metadata"].get("uid"))
            return False
        try:
            if spec.kind == "trainjob":
                self.custom.create_namespaced_custom_object(
                    TRAINJOB_GROUP, TRAINJOB_VERSION, spec.namespace, TRAINJOB_PLURAL, trainjob_manifest(spec)
                )
                return True
            job = self.batch.create_namespaced_job(spec.namespace, _model(k8s.V1Job, job_manifest(spec)))
        except ApiException as e:
            if e.status == 409 and not _raced:  # another daemon (or our previous life) won the race: attach
                return self.ensure(spec, _raced=True)
            raise KubernetesLaunchError(f"creating {spec.kind} {spec.namespace}/{spec.name}: {_api_error(e)}") from e
        if spec.distributed:
            self._ensure_service(spec, job.metadata.uid if job.metadata else None)
        return True

    def _ensure_service(self, spec: WorkloadSpec, owner_uid: str | None) -> None:
        try:
            self.core.read_namespaced_service(spec.name, spec.namespace)
            return
        except ApiException as e:
            if e.status != 404:
                raise KubernetesLaunchError(f"reading Service {spec.namespace}/{spec.name}: {_api_error(e)}") from e
        try:
            self.core.create_namespaced_service(spec.namespace, _model(k8s.V1Service, service_manifest(spec, owner_uid)))
        except ApiException as e:
            if e.status != 409:
                raise KubernetesLaunchError(f"creating Service {spec.namespace}/{spec.name}: {_api_error(e)}") from e

    def _read(self, spec: WorkloadSpec) -> dict[str, Any] | None:
        try:
            if spec.kind == "trainjob":
                obj: Any = self.custom.get_namespaced_custom_object(
                    TRAINJOB_GROUP, TRAINJOB_VERSION, spec.namespace, TRAINJOB_PLURAL, spec.name
                )
                return dict(obj)
            out = self.api.sanitize_for_serialization(self.batch.read_namespaced_job(spec.name, spec.namespace))
            assert isinstance(out, dict)
            return out
        except ApiException as e:
            if e.status == 404:
                return None
            raise KubernetesLaunchError(f"reading {spec.kind} {spec.namespace}/{spec.name}: {_api_error(e)}") from e

    # ---------------------------------------------------------------- status
    def status(self, spec: WorkloadSpec) -> WorkloadStatus:
        obj = self._read(spec)
        if obj is None:
            return WorkloadStatus("missing")
        st = obj.get("status") or {}
        conds = {c["type"]: c for c in st.get("conditions") or [] if c.get("status") == "True"}
        if "Failed" in conds:
            c = conds["Failed"]
            return WorkloadStatus("failed", c.get("reason") or "", c.get("message") or "", self.failed_pods(spec))
        if "Complete" in conds:
            return WorkloadStatus("succeeded", conds["Complete"].get("reason") or "")
        if spec.kind == "trainjob":
            return WorkloadStatus("running" if conds else "pending")
        return WorkloadStatus("running" if st.get("active") or st.get("ready") else "pending")

    def failed_pods(self, spec: WorkloadSpec, limit: int = 3) -> tuple[str, ...]:
        """What the failed pods said: exit code, reason and termination message (the log tail, FallbackToLogsOnError)."""
        try:
            # a TrainJob's pods are its JobSet's (Kubeflow Trainer names the JobSet after the TrainJob)
            sel = f"jobset.sigs.k8s.io/jobset-name={spec.name}" if spec.kind == "trainjob" else f"{LABEL_WORKLOAD}={spec.name}"
            pods = self.core.list_namespaced_pod(spec.namespace, label_selector=sel)
        except ApiException as e:
            return (f"pods not readable: {_api_error(e)}",)
        out: list[str] = []
        for p in pods.items or []:
            for cs in (p.status.container_statuses if p.status else None) or []:
                t = cs.state.terminated if cs.state else None
                if t is None or t.exit_code == 0:
                    continue
                msg = (t.message or "").strip()[-800:]
                out.append(f"pod {p.metadata.name if p.metadata else '?'} container {cs.name} exited {t.exit_code} ({t.reason}): {msg}")
        return tuple(out[:limit])

    # ---------------------------------------------------------------- delete
    def delete(self, spec: WorkloadSpec) -> None:
        """Delete the workload with foreground propagation (its pods go first) and the Service; absent is fine."""
        try:
            if spec.kind == "trainjob":
                self.custom.delete_namespaced_custom_object(
                    TRAINJOB_GROUP, TRAINJOB_VERSION, spec.namespace, TRAINJOB_PLURAL, spec.name, propagation_policy="Foreground"
                )
            else:
                self.batch.delete_namespaced_job(spec.name, spec.namespace, propagation_policy="Foreground")
        except ApiException as e:
            if e.status != 404:
                raise KubernetesLaunchError(f"deleting {spec.kind} {spec.namespace}/{spec.name}: {_api_error(e)}") from e
        if spec.kind == "job":
            self.delete_service(spec)

    def delete_service(self, spec: WorkloadSpec) -> None:
        """The rendezvous Service of a distributed Job; a one-process Job has none."""
        if not spec.distributed:
            return
        try:
            self.core.delete_namespaced_service(spec.name, spec.namespace)
        except ApiException as e:
            if e.status != 404:
                raise KubernetesLaunchError(f"deleting Service {spec.namespace}/{spec.name}: {_api_error(e)}") from e


def _model(cls: Any, manifest: dict[str, Any]) -> Any:
    """The client's model of a manifest (the official client serialises it back to the same JSON).

    kubernetes 37's pydantic models have `from_dict`; 36 (what cptd pins: 37 needs a python-dateutil that botocore
    refuses) builds models only from API answers, so the manifest goes through that same deserializer."""
    from_dict = getattr(cls, "from_dict", None)
    if from_dict is not None:
        out = from_dict(manifest)
    else:
        import json

        from kubernetes import client as k8s

        out = k8s.ApiClient().deserialize(_Answer(json.dumps(manifest)), cls.__name__)
    assert out is not None
    return out


@dataclass(frozen=True)
class _Answer:
    """What `ApiClient.deserialize` reads of an HTTP answer: its JSON text."""

    data: str


def _api_error(e: ApiException) -> str:
    """`403 Forbidden: jobs.batch is forbidden: ...` from the Status body the API server sends."""
    import json

    msg = ""
    try:
        msg = json.loads(e.body or "{}").get("message", "")
    except (ValueError, AttributeError):
        msg = str(e.body or "")[:300]
    return f"{e.status} {e.reason}: {msg}".strip(": ")
