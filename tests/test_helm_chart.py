"""The Helm chart deploy/helm/cptd: it lints, renders objects valid against the Kubernetes schemas of two versions
(and the custom resources against tests/custom_resource_schemas.py), and its values do what docs/kubernetes.md says:
bring-your-own Kafka, Redis and vLLM replace the bundled ones, the launcher modes, monitoring, and checkpoints on
object storage (no volume; vLLM streams from the URL).

Helm runs as a library: PyPI `helm-python-sdk` (dev extra) ships Helm's Go SDK compiled into its wheel, so rendering
and linting need no helm binary and no network.
"""

from __future__ import annotations

import copy
import re
from pathlib import Path

import jsonschema
import kubernetes_validate
import pytest
import yaml

from tests.custom_resource_schemas import CR_SCHEMAS
from tests.manifest_tools import CHART, DEPLOY, ROOT, by_kind, pod_specs, render_chart
from tests.test_manifests import CORE_GROUPS, K8S_VERSION, _group, network_allows

EXAMPLE = DEPLOY / "helm" / "examples" / "production-stack-strimzi-kube-prometheus.yaml"
EVALUATION = {"kafka": {"bundled": {"enabled": True}}}  # everything bundled: the smallest install that renders
JOB_LAUNCHER = {
    **EVALUATION,
    "launcher": {"mode": "kubernetes"},
    "monitoring": {"serviceMonitor": {"enabled": True, "labels": {"release": "kps"}}, "prometheusRule": {"enabled": True}},
}
OBJECT_STORAGE = {
    **EVALUATION,
    "storage": {
        "objectStorage": {
            "enabled": True, "url": "s3://models/cptd/", "endpoint": "https://storage.googleapis.com", "region": "auto",
            "credentialsSecret": "gcs-hmac", "scratchSize": "50Gi",
        }
    },
}  # fmt: skip
SCENARIOS = {
    "evaluation": EVALUATION,
    "job-launcher": JOB_LAUNCHER,
    "object-storage": OBJECT_STORAGE,
    "example": yaml.safe_load(EXAMPLE.read_text()),
}
_RENDERED: dict[str, list[dict]] = {}


def rendered(scenario: str) -> list[dict]:
    if scenario not in _RENDERED:
        _RENDERED[scenario] = render_chart(copy.deepcopy(SCENARIOS[scenario]))
    return _RENDERED[scenario]


def daemon_env(docs: list[dict]) -> dict[str, dict]:
    return {e["name"]: e for e in by_kind(docs, "Deployment")["cptd-daemon"]["spec"]["template"]["spec"]["containers"][0]["env"]}


def mounted_secret(docs: list[dict], env_path: str) -> tuple[str, str]:
    """(Secret name, key) behind a file path the daemon's env names."""
    pod = by_kind(docs, "Deployment")["cptd-daemon"]["spec"]["template"]["spec"]
    mounts = {m["mountPath"]: m["name"] for m in pod["containers"][0]["volumeMounts"]}
    volume = {v["name"]: v for v in pod["volumes"]}[mounts[str(Path(env_path).parent)]]["secret"]
    item = next(i for i in volume["items"] if i["path"] == Path(env_path).name)
    return volume["secretName"], item["key"]


@pytest.mark.parametrize("scenario", sorted(SCENARIOS))
def test_chart_lints_clean(scenario):
    import helm_python

    report = helm_python.lint(str(CHART), copy.deepcopy(SCENARIOS[scenario]), strict=True, kube_version=f"v{K8S_VERSION}")
    assert report["total_charts_linted"] == 1
    findings = [m for m in report["messages"] if m["severity"] >= 2]  # 2 warning, 3 error; info (no icon) is fine
    assert not findings and not report["errors"], report


@pytest.mark.parametrize("scenario", sorted(SCENARIOS))
@pytest.mark.parametrize("version", [K8S_VERSION, kubernetes_validate.latest_version()])
def test_chart_objects_validate_against_schemas(scenario, version):
    docs = rendered(scenario)
    errors = []
    for d in docs:
        try:
            if _group(d["apiVersion"]) in CORE_GROUPS:
                kubernetes_validate.validate(d, version, strict=True)
            else:
                jsonschema.validate(d, CR_SCHEMAS[(d["apiVersion"], d["kind"])])
        except (kubernetes_validate.ValidationError, jsonschema.ValidationError) as e:
            errors.append(f"{d['kind']}/{d['metadata']['name']}: {e.message} at {list(e.path)}")
    assert not errors, "\n".join(errors)
    assert len(docs) >= 15, [d["kind"] for d in docs]


@pytest.mark.parametrize("scenario", sorted(SCENARIOS))
def test_every_pod_is_restricted_and_every_reference_resolves(scenario):
    docs = rendered(scenario)
    configmaps, pvcs, sas = by_kind(docs, "ConfigMap"), by_kind(docs, "PersistentVolumeClaim"), by_kind(docs, "ServiceAccount")
    for name, spec in pod_specs(docs).items():
        assert spec["securityContext"]["runAsNonRoot"] is True, name
        assert spec["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}, name
        job_launcher = scenario in ("job-launcher", "example")  # only the Job launcher's daemon talks to the API server
        assert spec.get("automountServiceAccountToken") is (name == "Deployment/cptd-daemon" and job_launcher), name
        if spec.get("serviceAccountName"):
            assert spec["serviceAccountName"] in sas, name
        for c in spec["containers"]:
            assert c["securityContext"]["allowPrivilegeEscalation"] is False and c["securityContext"]["capabilities"]["drop"] == ["ALL"]
            assert c["resources"]["requests"] and c["resources"]["limits"]["memory"], (name, c["name"])
            assert not c["image"].endswith(":latest") and ":" in c["image"].rsplit("/", 1)[-1], (name, c["image"])
        for v in spec.get("volumes", []):
            if "configMap" in v:
                assert v["configMap"]["name"] in configmaps, (name, v)
            if "persistentVolumeClaim" in v:
                assert v["persistentVolumeClaim"]["claimName"] in pvcs, (name, v)
    policy = by_kind(docs, "ConfigMap")["cptd-policy"]["data"]["policy.yaml"]
    assert policy == (DEPLOY / "policy.example.yaml").read_text(), "the chart's default policy is the example policy"
    # Every ServiceMonitor selects a rendered Service with the named port.
    services = by_kind(docs, "Service")
    for sm in by_kind(docs, "ServiceMonitor").values():
        sel = sm["spec"]["selector"]["matchLabels"]
        matched = [s for s in services.values() if sel.items() <= s["metadata"]["labels"].items()]
        assert len(matched) == 1, (sm["metadata"]["name"], [s["metadata"]["name"] for s in matched])
        assert {e["port"] for e in sm["spec"]["endpoints"]} <= {p["name"] for p in matched[0]["spec"]["ports"]}


def test_bring_your_own_kafka_redis_vllm_replace_the_bundled_ones(monkeypatch):
    """The example values (Strimzi, managed Redis, vLLM production-stack): nothing bundled, the daemon's env points at
    the given endpoints with the given security settings, and the daemon's own settings validator accepts it."""
    from daemon.settings import Settings
    from policies.config import IngestPolicy

    values = SCENARIOS["example"]
    docs = rendered("example")
    assert not by_kind(docs, "StatefulSet"), "no bundled Redis"
    assert set(by_kind(docs, "Deployment")) == {"cptd-daemon"}, "no bundled vLLM or Kafka"
    assert set(by_kind(docs, "NetworkPolicy")) == {"cptd-daemon", "cptd-trainer"}
    env = daemon_env(docs)
    assert env["CPTD_KAFKA_BOOTSTRAP"]["value"] == values["kafka"]["bootstrap"]
    assert env["CPTD_REDIS_URL"]["value"] == values["redis"]["url"]
    assert env["CPTD_VLLM_CONTROL_URL"]["value"] == values["vllm"]["controlUrl"] and "CPTD_VLLM_URLS" not in env
    assert "CPTD_REDIS_CA_FILE" not in env, "an empty CA Secret name means the system CAs"
    assert mounted_secret(docs, env["CPTD_KAFKA_SASL_PASSWORD_FILE"]["value"]) == ("cptd", "password")
    assert mounted_secret(docs, env["CPTD_KAFKA_CA_FILE"]["value"]) == ("my-cluster-cluster-ca-cert", "ca.crt")
    assert mounted_secret(docs, env["CPTD_REDIS_PASSWORD_FILE"]["value"]) == ("cptd-secrets", "CPTD_REDIS_PASSWORD")
    # The headless Service selects the production-stack engine pods on their raw port.
    control = by_kind(docs, "Service")["cptd-vllm-control"]["spec"]
    assert control["clusterIP"] == "None" and control["selector"] == {"model": "llama3", "helm-release-name": "vllm"}
    assert [p["port"] for p in control["ports"]] == [8000]
    # daemon/settings.py accepts the rendered environment (files replaced by values: they exist only in the pod).
    for name, e in env.items():
        if name.startswith("CPTD_") and "value" in e and not name.endswith("_FILE"):
            monkeypatch.setenv(name, e["value"])
    monkeypatch.setenv("CPTD_KAFKA_SASL_PASSWORD", "x")
    kafka = Settings().kafka()
    assert (kafka.bootstrap, kafka.security_protocol, kafka.sasl_mechanism, kafka.sasl_username) == (
        "my-cluster-kafka-bootstrap.kafka.svc:9093",
        "SASL_SSL",
        "SCRAM-SHA-512",
        "cptd",
    )
    # Strimzi: topics and a user with exactly the policy's topics and group, on the named cluster.
    ingest = IngestPolicy()
    topics = by_kind(docs, "KafkaTopic")
    assert {t["spec"]["topicName"] for t in topics.values()} == {*ingest.topics, ingest.dead_letter_topic}
    user = by_kind(docs, "KafkaUser")["cptd"]
    for d in [*topics.values(), user]:
        assert d["metadata"]["labels"]["strimzi.io/cluster"] == "my-cluster"
    acls = {(a["resource"]["type"], a["resource"]["name"]): set(a["operations"]) for a in user["spec"]["authorization"]["acls"]}
    assert acls == {
        ("topic", ingest.topics[0]): {"Read", "Describe"},
        ("topic", ingest.dead_letter_topic): {"Write", "Describe"},
        ("group", ingest.group_id): {"Read", "Describe"},
    }


def test_monitoring_labels_and_prometheus_rule_from_the_rules_file():
    docs = rendered("example")
    monitors = by_kind(docs, "ServiceMonitor")
    assert set(monitors) == {"cptd-daemon"}, "no vLLM ServiceMonitor when vLLM is not bundled (production-stack has its own)"
    assert all(m["metadata"]["labels"]["release"] == "kube-prometheus-stack" for m in monitors.values())
    rule = by_kind(docs, "PrometheusRule")["cptd"]
    assert rule["metadata"]["labels"]["release"] == "kube-prometheus-stack"
    source = yaml.safe_load((DEPLOY / "prometheus" / "rules.yaml").read_text())["groups"]
    assert rule["spec"]["groups"] == source, "the PrometheusRule is rules.yaml, unchanged (runbook base aside)"
    alerts = [r for g in rule["spec"]["groups"] for r in g["rules"] if "alert" in r]
    assert len(alerts) >= 12
    for r in alerts:
        assert "runbook" not in r["annotations"]
        assert r["annotations"]["runbook_url"] == f"https://github.com/example/cptd/blob/main/docs/monitoring.md#{r['alert'].lower()}"
    # Each runbook anchor is a section of docs/monitoring.md.
    headings = {ln.lstrip("#").strip().lower() for ln in (ROOT / "docs" / "monitoring.md").read_text().splitlines() if ln.startswith("#")}
    assert {r["alert"].lower() for r in alerts} <= {h.strip("`") for h in headings}
    moved = render_chart(
        {**EVALUATION, "monitoring": {"prometheusRule": {"enabled": True}, "runbookBaseUrl": "https://wiki.internal/cptd"}}
    )
    urls = [r["annotations"]["runbook_url"] for g in by_kind(moved, "PrometheusRule")["cptd"]["spec"]["groups"] for r in g["rules"]]
    assert urls and all(u.startswith("https://wiki.internal/cptd#cptd") for u in urls)


def test_launcher_modes():
    """In-pod: one daemon holding the GPUs (torchrun:N past one GPU), no API token, no Role. Kubernetes: the Role and
    Job template the multi-gpu overlay has, and the Job the launcher makes from the template validates."""
    from connectors.kubernetes_jobs import WorkloadSpec, job_manifest, template_shape
    from connectors.redis_store import acl_rule

    single = rendered("evaluation")
    daemon = by_kind(single, "Deployment")["cptd-daemon"]
    assert daemon["spec"]["replicas"] == 1 and daemon["spec"]["strategy"] == {"type": "Recreate"}
    assert daemon_env(single)["CPTD_TRAIN_LAUNCHER"]["value"] == "subprocess"
    assert daemon["spec"]["template"]["spec"]["containers"][0]["resources"]["limits"]["nvidia.com/gpu"] == "1"
    assert not by_kind(single, "Role") and not by_kind(single, "CronJob")
    four = render_chart({**EVALUATION, "launcher": {"inPod": {"gpus": 4}}})
    assert daemon_env(four)["CPTD_TRAIN_LAUNCHER"]["value"] == "torchrun:4"
    # The bundled Redis and vLLM proxy run the kustomize base's files; Redis grants cptd's ACL user exactly what
    # connectors/redis_store.py sends.
    base = DEPLOY / "k8s" / "base"
    assert by_kind(single, "ConfigMap")["cptd-redis"]["data"] == {f: (base / f).read_text() for f in ("redis.conf", "redis-start.sh")}
    assert by_kind(single, "ConfigMap")["cptd-vllm-proxy"]["data"] == {"vllm-proxy.conf": (base / "vllm-proxy.conf").read_text()}
    redis = by_kind(single, "StatefulSet")["cptd-redis"]["spec"]["template"]["spec"]["containers"][0]
    assert " ".join(redis["args"]) == acl_rule("default")

    multi = rendered("job-launcher")
    daemon = by_kind(multi, "Deployment")["cptd-daemon"]
    assert (
        daemon["spec"]["replicas"] == 2
        and "nvidia.com/gpu" not in daemon["spec"]["template"]["spec"]["containers"][0]["resources"]["limits"]
    )
    env = daemon_env(multi)
    assert (env["CPTD_TRAIN_LAUNCHER"]["value"], env["CPTD_TRAIN_WORKLOAD"]["value"]) == ("kubernetes", "job")
    role = by_kind(multi, "Role")["cptd-train-launcher"]
    rules = {(r["apiGroups"][0], r["resources"][0]): set(r["verbs"]) for r in role["rules"]}
    assert rules == {
        ("batch", "cronjobs"): {"get"},
        ("batch", "jobs"): {"create", "get", "delete"},
        ("", "services"): {"create", "get", "delete"},
        ("", "pods"): {"list"},
    }
    assert role["rules"][0]["resourceNames"] == [env["CPTD_TRAIN_JOB_TEMPLATE"]["value"]]
    binding = by_kind(multi, "RoleBinding")["cptd-train-launcher"]
    assert binding["subjects"] == [{"kind": "ServiceAccount", "name": "cptd-daemon", "namespace": "cptd"}]
    tpl = by_kind(multi, "CronJob")[env["CPTD_TRAIN_JOB_TEMPLATE"]["value"]]["spec"]["jobTemplate"]
    assert template_shape(tpl) == (1, 4)
    job = job_manifest(WorkloadSpec("r00012", 1, "cptd", "/checkpoints/rounds/r00012/train-spec.json", "d", tpl, "job", 2, 4))
    kubernetes_validate.validate(job, K8S_VERSION, strict=True)
    trainer = job["spec"]["template"]["spec"]["containers"][0]
    assert trainer["image"] == daemon["spec"]["template"]["spec"]["containers"][0]["image"]
    assert not [e for e in trainer.get("env") or [] if "secretKeyRef" in (e.get("valueFrom") or {})], "no Secret reaches a trainer"
    assert "CPTD_REDIS_URL" not in {e["name"] for e in trainer.get("env") or []}
    labels = {
        name: d["spec"]["template"]["metadata"]["labels"]
        for name, d in {**by_kind(multi, "Deployment"), **by_kind(multi, "StatefulSet")}.items()
    }
    trainer_labels = job["spec"]["template"]["metadata"]["labels"]
    assert not network_allows(multi, trainer_labels, labels["cptd-redis"], 6379), "a training pod can open a connection to Redis"
    assert network_allows(multi, labels["cptd-daemon"], labels["cptd-redis"], 6379)
    assert network_allows(multi, labels["cptd-daemon"], labels["cptd-vllm"], 8000)
    assert not network_allows(multi, trainer_labels, labels["cptd-vllm"], 8000)
    assert network_allows(multi, trainer_labels, trainer_labels, 29500)


@pytest.mark.parametrize(
    ("values", "message"),
    [
        ({**JOB_LAUNCHER, "storage": {"objectStorage": {"enabled": True, "url": "s3://b/p"}}}, "launcher.mode kubernetes is not supported"),
        ({**EVALUATION, "storage": {"objectStorage": {"enabled": True}}}, "storage.objectStorage.url is empty"),
        ({}, "kafka.bootstrap is empty"),
        ({"kafka": {"bootstrap": "k:9092", "securityProtocol": "SASL_SSL"}}, "needs kafka.sasl.mechanism"),
        ({**EVALUATION, "redis": {"bundled": {"enabled": False}}}, "redis.url is empty"),
        ({**EVALUATION, "vllm": {"controlUrl": "http://v:8000"}}, "pick one"),
        ({**EVALUATION, "launcher": {"mode": "slurm"}}, "at '/launcher/mode': value must be one of 'inPod', 'kubernetes'"),
        ({"kafka": {"bootstap": "k:9092"}}, "at '/kafka': additional properties 'bootstap' not allowed"),  # values.schema.json
    ],
)
def test_values_the_daemon_cannot_run_are_refused_by_name(values, message):
    import helm_python

    with pytest.raises(helm_python.HelmError, match=re.escape(message)):
        render_chart(values)


def test_object_storage_values_replace_the_volume_with_the_url():
    docs = rendered("object-storage")
    assert "PersistentVolumeClaim" not in {d["kind"] for d in docs}, "no volume with checkpoints on object storage"
    env = daemon_env(docs)
    assert env["CPTD_CHECKPOINT_URL"]["value"] == "s3://models/cptd/" and env["CPTD_CHECKPOINT_DIR"]["value"] == "/checkpoints"
    assert env["AWS_ENDPOINT_URL"]["value"] == "https://storage.googleapis.com" and env["AWS_REGION"]["value"] == "auto"
    for key in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
        assert env[key]["valueFrom"]["secretKeyRef"] == {"name": "gcs-hmac", "key": key}
    daemon_pod = by_kind(docs, "Deployment")["cptd-daemon"]["spec"]["template"]["spec"]
    assert {v["name"]: v for v in daemon_pod["volumes"]}["checkpoints"] == {"name": "checkpoints", "emptyDir": {"sizeLimit": "50Gi"}}
    vllm = by_kind(docs, "Deployment")["cptd-vllm"]["spec"]["template"]["spec"]
    engine = vllm["containers"][0]
    engine_env = {e["name"]: e for e in engine["env"]}
    assert "--load-format=runai_streamer" in engine["args"] and engine_env["CPTD_SERVING_MODEL"]["value"] == "s3://models/cptd/base"
    assert engine_env["AWS_ENDPOINT_URL"] == env["AWS_ENDPOINT_URL"] and engine_env["AWS_SECRET_ACCESS_KEY"] == env["AWS_SECRET_ACCESS_KEY"]
    assert "checkpoints" not in {m["name"] for m in engine["volumeMounts"]} | {v["name"] for v in vllm["volumes"]}
    # The volume install is unchanged: a PVC, no URL, vLLM from /checkpoints/base.
    plain = rendered("evaluation")
    assert "CPTD_CHECKPOINT_URL" not in daemon_env(plain) and "PersistentVolumeClaim" in {d["kind"] for d in plain}


def test_tracking_values_set_the_mlflow_settings_and_the_token_comes_from_the_secret():
    assert not any(n.startswith("CPTD_MLFLOW") for n in daemon_env(rendered("evaluation"))), "tracking is off by default"
    values = {
        **EVALUATION,
        "tracking": {"mlflow": {"uri": "http://mlflow.ml:5000", "experiment": "fresh", "tokenSecretKey": "MLFLOW_TOKEN"}},
    }
    env = daemon_env(render_chart(values))
    assert env["CPTD_MLFLOW_TRACKING_URI"]["value"] == "http://mlflow.ml:5000" and env["CPTD_MLFLOW_EXPERIMENT"]["value"] == "fresh"
    assert env["CPTD_MLFLOW_TRACKING_TOKEN"]["valueFrom"]["secretKeyRef"] == {"name": "cptd-secrets", "key": "MLFLOW_TOKEN"}
    with pytest.raises(Exception, match="uri"):  # the daemon takes http(s) only: the chart refuses the rest by name
        render_chart({**EVALUATION, "tracking": {"mlflow": {"uri": "file:///tmp/mlruns"}}})
