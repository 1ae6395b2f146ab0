"""The alert rules and the Grafana dashboard: they query only metrics the daemon defines, and promtool passes them
and their unit tests (every alert fires when it should and stays silent on a daemon that has just started)."""

from __future__ import annotations

import json
import re

import yaml

from tests.manifest_tools import DEPLOY, promtool, run

# --------------------------------------------------------------------------- PromQL names
_KEYWORDS = {"and", "or", "unless", "bool", "offset", "by", "without", "on", "ignoring", "group_left", "group_right", "inf", "nan", "atan2"}


def promql_metric_names(expr: str) -> set[str]:
    """Metric names referenced by a PromQL expression (Grafana variables allowed)."""
    s = re.sub(r"\$__\w+|\$\{\w+\}|\$\w+", "5m", expr)
    s = re.sub(r'"(?:\\.|[^"\\])*"|\'(?:\\.|[^\'\\])*\'|`[^`]*`', '""', s)  # string literals
    names = set(re.findall(r"__name__\s*=~?\s*\"([^\"]*)\"", expr))
    s = re.sub(r"\{[^{}]*\}", "", s)  # label matchers
    s = re.sub(r"\[[^\[\]]*\]", "", s)  # ranges, subqueries
    s = re.sub(r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^()]*\)", " ", s)
    for m in re.finditer(r"(?<![\w.:])([a-zA-Z_:][\w:]*)(\s*\()?", s):
        if m.group(2) or m.group(1) in _KEYWORDS:
            continue
        names.add(m.group(1))
    return names


def registry_sample_names() -> set[str]:
    from daemon.metrics import REGISTRY

    suffixes = {
        "counter": ("_total", "_created"),
        "gauge": ("",),
        "histogram": ("_bucket", "_sum", "_count", "_created"),
        "summary": ("", "_sum", "_count", "_created"),
        "info": ("_info",),
        "stateset": ("",),
        "gaugehistogram": ("_bucket", "_gsum", "_gcount"),
    }
    return {m.name + sfx for m in REGISTRY.collect() for sfx in suffixes[m.type]}


def test_promql_parser_finds_metric_names():
    assert promql_metric_names(
        'sum by (le, outcome) (rate(cptd_a_bucket{outcome="cptd_not_a_metric", job=~"$job"}[$__rate_interval]))'
    ) == {"cptd_a_bucket"}
    assert promql_metric_names("time() - max(cptd_x{a='b'} offset 1h) > 1e3 and on (pod) cptd_y unless cptd_z") == {
        "cptd_x",
        "cptd_y",
        "cptd_z",
    }
    assert promql_metric_names("histogram_quantile(0.9, sum(rate(foo_bucket[5m])) by (le)) / ignoring(le) bar") == {"foo_bucket", "bar"}
    assert "cptd_buffer_docs" in registry_sample_names() and "cptd_ingest_docs_total" in registry_sample_names()
    assert "cptd_swap_pause_seconds_bucket" in registry_sample_names() and "cptd_policy_info" in registry_sample_names()
    assert "cptd_ingest_docs" not in registry_sample_names()


def _dashboard_exprs(dash: dict) -> list[tuple[str, str]]:
    out = []

    def walk(panels):
        for p in panels:
            for t in p.get("targets", []):
                out.append((p.get("title", "?"), t["expr"]))
            walk(p.get("panels", []))

    walk(dash["panels"])
    for var in dash.get("templating", {}).get("list", []):
        q = var.get("query")
        q = q.get("query") if isinstance(q, dict) else q
        m = re.match(r"label_values\((.*),\s*\w+\)$", q or "")
        if m:
            out.append((f"variable {var['name']}", m.group(1)))
    return out


def test_dashboard_queries_only_defined_metrics():
    dash = json.loads((DEPLOY / "grafana" / "cptd-dashboard.json").read_text())
    known = registry_sample_names()
    exprs = _dashboard_exprs(dash)
    assert len(exprs) >= 30
    used: set[str] = set()
    for title, expr in exprs:
        names = promql_metric_names(expr)
        assert names, f"{title}: no metric in {expr!r}"
        unknown = names - known
        assert not unknown, f"panel {title!r} queries metrics not in daemon/metrics.py: {sorted(unknown)}"
        used |= names
    # The panels the issue asks for are there.
    for needed in (
        "cptd_ingest_docs_total",
        "cptd_buffer_docs",
        "cptd_replay_docs",
        "cptd_drift_score",
        "cptd_round_phase",
        "cptd_round_phase_seconds_bucket",
        "cptd_train_loss",
        "cptd_train_learning_rate",
        "cptd_train_tokens_per_second",
        "cptd_eval_forgetting_nats",
        "cptd_eval_adaptation_nats",
        "cptd_gate_decisions_total",
        "cptd_swap_pause_seconds_bucket",
        "cptd_rollbacks_total",
        "cptd_live_weight_version_info",
    ):
        assert needed in used, needed
    ids = [p["id"] for p in dash["panels"]]
    assert len(ids) == len(set(ids)), "panel ids must be unique"
    assert dash["uid"] == "cptd-overview"


def test_alert_rules_query_only_defined_metrics():
    rules = yaml.safe_load((DEPLOY / "prometheus" / "rules.yaml").read_text())
    known = registry_sample_names()
    for group in rules["groups"]:
        for rule in group["rules"]:
            names = promql_metric_names(rule["expr"])
            assert names and not names - known, f"{rule['alert']}: {sorted(names - known)}"


# --------------------------------------------------------------------------- promtool
REQUIRED_ALERTS = {
    "CptdIngestStalled",
    "CptdDeadLetterRatioHigh",
    "CptdBufferNearCap",
    "CptdRoundFailed",
    "CptdRollback",
    "CptdSwapSlow",
    "CptdPolicyReloadRefused",
    "CptdLeaderLeaseLost",
    "CptdRedisMemoryNearMax",
    "CptdRedisMaxmemoryUnset",
    "CptdCheckpointDiskLow",
    "CptdVllmReplicasDown",
}


def test_promtool_check_rules():
    res = run([promtool(), "check", "rules", str(DEPLOY / "prometheus" / "rules.yaml")])
    assert res.returncode == 0, res.stdout + res.stderr
    assert "SUCCESS" in res.stdout


def test_promtool_unit_tests_cover_every_alert():
    rules = yaml.safe_load((DEPLOY / "prometheus" / "rules.yaml").read_text())
    alerts = {r["alert"] for g in rules["groups"] for r in g["rules"] if "alert" in r}
    assert REQUIRED_ALERTS <= alerts
    tests = yaml.safe_load((DEPLOY / "prometheus" / "rules_test.yaml").read_text())
    fires, silent = set(), set()
    for case in tests["tests"]:
        for a in case.get("alert_rule_test", []):
            (fires if a.get("exp_alerts") else silent).add(a["alertname"])
    assert alerts <= fires, f"alerts never expected to fire in rules_test.yaml: {sorted(alerts - fires)}"
    assert alerts <= silent, f"alerts never expected to stay silent in rules_test.yaml: {sorted(alerts - silent)}"
    res = run([promtool(), "test", "rules", "rules_test.yaml"], cwd=DEPLOY / "prometheus")
    assert res.returncode == 0, res.stdout + res.stderr
    assert "SUCCESS" in res.stdout
