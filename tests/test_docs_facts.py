"""Facts the docs state that the code can check: every setting they name exists, every `cptd` command they name runs.

Docs drift the quiet way (a renamed setting, a command that was folded into another); these two are cheap to keep
true. Other facts (figures, behaviour) are held by the tests that measured them.
"""

from __future__ import annotations

import re
from pathlib import Path

from daemon.cli import build_parser
from daemon.settings import Settings

ROOT = Path(__file__).resolve().parents[1]
DOCS = [ROOT / "README.md", ROOT / "bench" / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
# CPTD_ names that are not daemon settings, and where each is read: dev tooling, the CLI's client, the trainer's
# pod template, vLLM's container and prefixes of a family of settings.
OTHERS = {
    "CPTD_DEV_REDIS": "daemon/dev/services.py",
    "CPTD_FAILPOINTS": "daemon/failpoints.py",
    "CPTD_NODE_RANK": "connectors/kubernetes_jobs.py",
    "CPTD_SERVED_MODEL_NAME": "deploy/k8s/base/vllm.yaml",
    "CPTD_SERVING_MODEL": "deploy/k8s/base/vllm.yaml",
    "CPTD_URL": "daemon/cli.py",
}


def test_every_setting_the_docs_name_exists():
    settings = {"CPTD_" + name.upper() for name in Settings.model_fields}
    for name, where in OTHERS.items():
        assert name in (ROOT / where).read_text(), f"{name} is no longer read in {where}"
    unknown: dict[str, list[str]] = {}
    for doc in [*DOCS, *sorted((ROOT / "deploy").rglob("*.yaml"))]:
        for name in set(re.findall(r"CPTD_[A-Z0-9_]*[A-Z0-9]", doc.read_text())):
            family = any(s.startswith(name + "_") for s in settings)  # "CPTD_KAFKA_*" in prose
            if name not in settings and name not in OTHERS and not family:
                unknown.setdefault(name, []).append(str(doc.relative_to(ROOT)))
    assert not unknown, f"settings named in docs that do not exist: {unknown}"


def test_every_cptd_command_the_docs_name_exists():
    sub = next(a for a in build_parser()._actions if a.dest == "cmd")
    commands = set(sub.choices)  # type: ignore[arg-type]
    unknown: dict[str, list[str]] = {}
    for doc in DOCS:
        for cmd in set(re.findall(r"`cptd ([a-z][a-z0-9-]*)", doc.read_text())):
            if cmd not in commands:
                unknown.setdefault(cmd, []).append(str(doc.relative_to(ROOT)))
    assert not unknown, f"commands named in docs that cptd does not have: {unknown}"
