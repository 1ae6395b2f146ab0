"""Facts the docs state that the code can check: every setting, `cptd` command and option, policy and round record
field, metric, alert (and its runbook section), repository path, module, function, `python -m` module, Kubernetes
object, Helm value, make target and bench option they name exists; links land; architecture.md §1 lists every
module; monitoring.md describes every dashboard panel; the exit code table and the state diagrams are complete.

Docs drift the quiet way (a renamed setting, a command that was folded into another, a field that moved into a
sub-section); these are cheap to keep true. Other facts (figures, behaviour) are held by the tests that measured them.
"""

from __future__ import annotations

import argparse
import itertools
import json
import re
from pathlib import Path
from typing import Any, get_args

import yaml
from pydantic import BaseModel

from daemon.cli import build_parser
from daemon.settings import Settings

ROOT = Path(__file__).resolve().parents[1]
DOCS = [ROOT / "README.md", ROOT / "bench" / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
# CPTD_ names that are not daemon settings, and where each is read: dev tooling, the CLI's client, the trainer's
# pod template, vLLM's container and prefixes of a family of settings.
OTHERS = {
    "CPTD_DEV_REDIS": "daemon/dev/services.py",
    "CPTD_DEV_VLLM_PYTHON": "daemon/dev/vllm_server.py",
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
    parser = build_parser()
    sub = next(a for a in parser._actions if a.dest == "cmd")
    commands: dict[str, argparse.ArgumentParser] = sub.choices  # type: ignore[assignment]
    top = {o for a in parser._actions for o in a.option_strings}
    unknown: dict[str, list[str]] = {}
    for doc in DOCS:
        text = doc.read_text()
        for cmd in set(re.findall(r"`cptd ([a-z][a-z0-9-]*)", text)):
            if cmd not in commands:
                unknown.setdefault(cmd, []).append(str(doc.relative_to(ROOT)))
        # Its options too, in `inline code` and in command lines of code blocks (not `kubectl -n cptd run ...`).
        for line in [*_inline_code(doc), *text.splitlines()]:
            for cmd, rest in re.findall(r"(?<![\w/-])(?<!-n )cptd ([a-z][a-z0-9-]*)([^`#|;&]*)", line):
                if cmd in commands:
                    options = top | {o for a in commands[cmd]._actions for o in a.option_strings}
                    for opt in set(re.findall(r"(?<![\w-])--[a-z][a-z0-9-]*", rest)) - options:
                        unknown[f"cptd {cmd} {opt}"] = [str(doc.relative_to(ROOT))]
    assert not unknown, f"commands or options named in docs that cptd does not have: {unknown}"


# --------------------------------------------------------------------------- policy fields, metrics, alerts, paths
def _inline_code(doc: Path) -> list[str]:
    """The `backticked` spans of a doc: where it names code, settings and paths (prose says the same words freely)."""
    return re.findall(r"`([^`\n]+)`", doc.read_text())


def _resolves(model: type[BaseModel], parts: list[str]) -> bool:
    """Whether `a.b.c` is a field (or a property) path of a pydantic model, through nested models, dicts and lists."""
    cur: Any = model
    for i, part in enumerate(parts):
        if not (isinstance(cur, type) and issubclass(cur, BaseModel)):
            return False
        if part not in cur.model_fields:
            return i == len(parts) - 1 and isinstance(getattr(cur, part, None), property)
        stack, cur = [cur.model_fields[part].annotation], None
        while stack:  # the first model inside Optional[...], list[...], dict[str, ...]
            a = stack.pop()
            if isinstance(a, type) and issubclass(a, BaseModel):
                cur = a
                break
            stack.extend(get_args(a))
    return True


# Dotted names in a policy section's (or a round record part's) namespace that are neither, and where each is made:
# /status fields, failpoints, MLflow params (besides the trainer's step metrics and the drift statistics).
NOT_POLICY = {
    "ingest.broker_error": "daemon/app.py",
    "ingest.operator_pause": "daemon/app.py",
    "rounds.awaiting_approval": "daemon/app.py",
    "rounds.deploy_mode": "daemon/app.py",
    "rounds.latest": "daemon/app.py",
    "rounds.redis_loss": "daemon/rounds/runner.py",
    "deploy.reload_weights": "daemon/serving.py",
    "snapshot.taken": "daemon/rounds/snapshot.py",
    "replay.ratio": "daemon/round_tracking.py",
}
FILE_SUFFIXES = ("json", "jsonl", "log", "yaml", "py", "lua")


def test_every_policy_and_record_field_the_docs_name_exists():
    from daemon.round_record import DriftStatsRecord, RoundRecord
    from daemon.round_tracking import EVAL_METRICS, STEP_METRICS
    from policies.config import Policy

    for name, where in NOT_POLICY.items():
        text = (ROOT / where).read_text()
        assert name in text or f'"{name.rsplit(".", 1)[1]}' in text, f"{name} is no longer made in {where}"
        assert not _resolves(Policy, name.split(".")), f"{name} is a policy field now: drop it from NOT_POLICY"
        assert not _resolves(RoundRecord, name.split(".")), f"{name} is a record field now: drop it from NOT_POLICY"
    tracked = {f"train.{k}" for k in (*STEP_METRICS, *EVAL_METRICS)} | {f"drift.{k}" for k in DriftStatsRecord.model_fields}
    unknown: dict[str, list[str]] = {}
    for doc in DOCS:
        for code in _inline_code(doc):
            for m in re.finditer(r"(?<![\w./<-])([a-z_]+(?:\.[a-z_][a-z0-9_]*)+)(?![\w/-])", code):
                name, parts = m.group(1), m.group(1).split(".")
                if parts[0] not in {*Policy.model_fields, *RoundRecord.model_fields} or set(parts) & set(FILE_SUFFIXES):
                    continue
                known = _resolves(Policy, parts) or _resolves(RoundRecord, parts) or name in tracked
                if not known and not any(name == n or name.startswith(n + ".") for n in NOT_POLICY):
                    unknown.setdefault(name, []).append(str(doc.relative_to(ROOT)))
    assert not unknown, f"fields named in docs that neither the policy nor the round record has: {unknown}"


def test_every_metric_and_alert_the_docs_name_exists():
    from daemon.metrics import REGISTRY
    from tests.test_monitoring_rules import registry_sample_names

    names = registry_sample_names() | {m.name for m in REGISTRY.collect() if m.type == "histogram"}  # `cptd_swap_pause_seconds`
    rules = yaml.safe_load((ROOT / "deploy" / "prometheus" / "rules.yaml").read_text())
    alerts = {r["alert"] for g in rules["groups"] for r in g["rules"] if "alert" in r}
    unknown: dict[str, list[str]] = {}
    for doc in DOCS:
        text = doc.read_text()
        for name in set(re.findall(r"\bcptd_[a-z0-9_]+\*?", text)):
            family = name.endswith("_*") and any(n.startswith(name[:-1]) for n in names)  # "the `cptd_train_*` metrics"
            if name not in names and not family:
                unknown.setdefault(name, []).append(str(doc.relative_to(ROOT)))
        for name in set(re.findall(r"\bCptd[A-Z][A-Za-z]+", text)):
            if name not in alerts:
                unknown.setdefault(name, []).append(str(doc.relative_to(ROOT)))
    assert not unknown, f"metrics or alerts named in docs that daemon/metrics.py or the alert rules do not have: {unknown}"
    # Every alert's runbook_url points at its section of monitoring.md.
    text = (ROOT / "docs" / "monitoring.md").read_text()
    sections = set(re.findall(r"^### (Cptd\w+)$", text[text.index("## Alerts") :], re.M))
    assert sections == alerts, f"alerts without a section: {alerts - sections}; sections without an alert: {sections - alerts}"
    for rule in (r for g in rules["groups"] for r in g["rules"] if "alert" in r):
        url = rule["annotations"].get("runbook_url", "")
        assert url.endswith("/docs/monitoring.md#" + rule["alert"].lower()), f"{rule['alert']}: runbook_url {url!r} is not its section"


def test_every_path_module_and_object_the_docs_name_exists():
    kinds = {"deploy": "Deployment", "statefulset": "StatefulSet", "svc": "Service"}
    objects = {
        (o["kind"], o["metadata"]["name"])
        for f in (ROOT / "deploy" / "k8s" / "base").glob("*.yaml")
        for o in yaml.safe_load_all(f.read_text())
        if o and "metadata" in o
    }
    missing: dict[str, list[str]] = {}
    for doc in DOCS:
        where = str(doc.relative_to(ROOT))
        for code in _inline_code(doc):
            for m in re.finditer(r"(?<![\w./-])((?:daemon|connectors|policies|tests|deploy|bench|constraints|docs)/[\w./*-]*)", code):
                path = m.group(1).rstrip(".")
                if re.fullmatch(r"deploy/[a-z0-9-]+", path):  # `kubectl exec deploy/NAME`: an object, checked below
                    continue
                if not (sorted(ROOT.glob(path)) if "*" in path else (ROOT / path).exists()):
                    missing.setdefault(path, []).append(where)
        for module in re.findall(r"python -m ((?:daemon|connectors|policies|bench|tests)(?:\.\w+)+)\b(?!\.<)", doc.read_text()):
            if not (ROOT / (module.replace(".", "/") + ".py")).exists():
                missing.setdefault(module, []).append(where)
        for kind, name in re.findall(r"\b(deploy|statefulset|svc)/([a-z0-9-]+)\b(?![./\w])", doc.read_text()):
            if (kinds[kind], name) not in objects:
                missing.setdefault(f"{kind}/{name}", []).append(where)
    assert not missing, f"paths, modules or Kubernetes objects named in docs that do not exist: {missing}"


def _anchors(doc: Path) -> set[str]:
    """GitHub's anchors of a doc's headings: lower case, punctuation dropped, spaces as hyphens."""
    text = re.sub(r"```.*?```", "", doc.read_text(), flags=re.S)
    return {re.sub(r"[^\w\- ]", "", h.strip().lower()).replace(" ", "-") for h in re.findall(r"^#{1,6} (.+)$", text, flags=re.M)}


def test_every_link_in_the_docs_lands():
    broken: dict[str, list[str]] = {}
    for doc in DOCS:
        for target, anchor in re.findall(r"\]\(([^)#\s]*)#([^)\s]+)\)", doc.read_text()):
            page = doc.parent / target if target else doc
            if page.suffix == ".md" and (not page.exists() or anchor not in _anchors(page)):
                broken.setdefault(f"{target}#{anchor}", []).append(str(doc.relative_to(ROOT)))
        for target in re.findall(r"\]\(([^)#\s:]+)[)#]", doc.read_text()):  # files and folders, not https://
            if not (doc.parent / target).exists():
                broken.setdefault(target, []).append(str(doc.relative_to(ROOT)))
    assert not broken, f"links in docs to files or headings that do not exist: {broken}"


def _defines(src: str, name: str) -> bool:
    """Whether a module's source defines `name` (a function, class, method, constant or class attribute)."""
    return re.search(rf"^\s*((async )?def|class) {name}\b|^\s*{name}\s*[:=]", src, re.M) is not None


def _defined(dotted: str) -> bool:
    """Whether `pkg.module[.name[.attr]]` names a module of ours and what it defines (read, not imported: no torch)."""
    parts = dotted.split(".")
    for i in range(len(parts), 0, -1):
        module = ROOT.joinpath(*parts[:i])
        if module.with_suffix(".py").exists():
            src = module.with_suffix(".py").read_text()
            return all(_defines(src, n) for n in parts[i:])
        if module.is_dir():
            return i == len(parts)
    return False


def _helm_value(values: dict[str, Any], dotted: str) -> bool:
    """Whether `a.b.{c,d}` are keys of the chart's values.yaml (`...` in a brace list stands for the rest)."""
    alternatives = [p[1:-1].split(",") if p.startswith("{") else [p] for p in re.findall(r"\{[^}]*\}|[^.{}]+", dotted)]
    for path in itertools.product(*alternatives):
        node: Any = values
        for key in (k for k in path if k != "..."):
            if not isinstance(node, dict) or key not in node:
                return False
            node = node[key]
    return True


def test_every_code_name_and_helm_value_the_docs_name_exists():
    values = yaml.safe_load((ROOT / "deploy" / "helm" / "cptd" / "values.yaml").read_text())
    helm = set(values) - {"policy", "image"}  # `policy.train.x`: MLflow params; `policy.yaml`, `image.tag` in prose
    sources = [p.read_text() for d in ("daemon", "connectors", "policies") for p in sorted((ROOT / d).rglob("*.py"))]
    unknown: dict[str, list[str]] = {}
    for doc in DOCS:
        for code in _inline_code(doc):
            for cls, attr in re.findall(r"(?<![\w./-])([A-Z][a-z]\w*)\.([a-z_]\w*)\b(?!\.)", code):  # `ServingController.validate`
                if not any(re.search(rf"^class {cls}\b", src, re.M) and _defines(src, attr) for src in sources):
                    unknown.setdefault(f"{cls}.{attr}", []).append(str(doc.relative_to(ROOT)))
            for m in re.finditer(r"(?<![\w./-])([a-zA-Z_]\w*(?:\.(?:\w+|\{[\w,.]+\}))+)", code):
                name, first = m.group(1), m.group(1).split(".")[0]
                if first in ("daemon", "connectors", "policies", "bench", "tests"):
                    known = _defined(name) or (first in helm and _helm_value(values, name))  # `daemon.replicas`
                elif first in helm:
                    known = _helm_value(values, name)
                else:
                    continue
                if not known:
                    unknown.setdefault(name, []).append(str(doc.relative_to(ROOT)))
    assert not unknown, f"modules, functions or Helm values named in docs that do not exist: {unknown}"


def test_every_module_has_its_room_in_the_architecture():
    """docs/architecture.md §1 lists every module of the process and what it does: a new one without its line is a
    module nobody was told about."""
    text = (ROOT / "docs" / "architecture.md").read_text()
    rooms = text[text.index("## 1.") : text.index("## 2.")]
    unlisted = [
        str(p.relative_to(ROOT))
        for d in ("policies", "connectors", "daemon")
        for p in sorted((ROOT / d).rglob("*.py"))
        if p.name != "__init__.py" and not re.search(rf"(?<![\w/]){p.stem}(\.py)?\b", rooms)
    ]
    assert not unlisted, f"modules docs/architecture.md §1 does not list: {unlisted}"


def test_monitoring_md_describes_every_dashboard_panel_by_its_title():
    dashboard = json.loads((ROOT / "deploy" / "grafana" / "cptd-dashboard.json").read_text())
    panels = {p["title"] for p in dashboard["panels"] if p.get("type") != "row"}
    rows = {p["title"] for p in dashboard["panels"] if p.get("type") == "row"}
    text = (ROOT / "docs" / "monitoring.md").read_text()
    section = text[text.index("## The dashboard, panel by panel") : text.index("## Alerts")]
    # "* **Title** — what it shows", "* **A**, **B** and **C** — ..."
    described = {t for line in re.findall(r"^\* (.+?) — ", section, re.M) for t in re.findall(r"\*\*(.+?)\*\*", line)}
    assert described == panels, f"panels not described: {panels - described}; described, not panels: {described - panels}"
    assert set(re.findall(r"^### (.+)$", section, re.M)) == rows


def test_daemon_md_lists_every_exit_code_cptd_has():
    from daemon.cli_exit import Exit

    text = (ROOT / "docs" / "daemon.md").read_text()
    table = text[text.index("| exit | meaning |") :].split("\n\n")[0]
    codes = {int(n) for n in re.findall(r"^\| (\d+) \|", table, re.M)}
    assert codes == {int(e) for e in Exit}, f"docs/daemon.md's exit codes {sorted(codes)} are not cptd's {sorted(map(int, Exit))}"


def test_the_state_diagrams_have_every_round_state_and_no_other():
    from daemon.round_record import RoundState

    states = {s.value for s in RoundState}
    for doc, heading in (("architecture.md", "## 3. A round"), ("daemon.md", "## A round")):
        text = (ROOT / "docs" / doc).read_text()
        diagram = re.search(r"```\n(.*?)```", text[text.index(heading) :], re.S)
        assert diagram, f"{doc}: no state diagram under {heading!r}"
        named = set(re.findall(r"\b[A-Z][A-Z_]{3,}\b", diagram.group(1)))
        assert named == states, f"{doc}: states drawn but not RoundState {named - states}; RoundState not drawn {states - named}"


def test_every_bench_option_the_docs_name_exists():
    unknown: dict[str, list[str]] = {}
    for doc in DOCS:
        for line in doc.read_text().splitlines():
            for script, module, rest in re.findall(r"python3? (?:(bench/\w+\.py)|-m (bench\.\w+))([^`|#;&]*)", line):
                path = ROOT / (script or module.replace(".", "/") + ".py")
                source = path.read_text() if path.exists() else ""
                for opt in set(re.findall(r"(?<![\w-])--[a-z][a-z0-9-]*", rest)):
                    if f'"{opt}"' not in source:  # argparse's add_argument("--opt", ...)
                        unknown[f"{script or module} {opt}"] = [str(doc.relative_to(ROOT))]
    assert not unknown, f"bench options named in docs that the bench does not have: {unknown}"


def test_every_make_target_the_docs_name_exists():
    targets = set(re.findall(r"^([a-z][\w-]*):", (ROOT / "Makefile").read_text(), re.M))
    unknown: dict[str, list[str]] = {}
    for doc in DOCS:
        for target in set(re.findall(r"(?:^|`|&& )make ([a-z][\w-]*)", doc.read_text(), re.M)) - targets:
            unknown.setdefault(target, []).append(str(doc.relative_to(ROOT)))
    assert not unknown, f"make targets named in docs that the Makefile does not have: {unknown}"
