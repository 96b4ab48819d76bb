"""Prometheus and Grafana configuration: promtool accepts the config and the alert rules, the rules' own unit tests
pass, and the dashboard asks only for metrics the services export, in valid PromQL.

promtool comes with the Debian package ``prometheus``; without it these tests fail on CI (CI=true) and are skipped
elsewhere.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml
from prometheus_client import REGISTRY

import services.common.metrics as common_metrics
import services.opscenter.metrics as ops_metrics

REPO = Path(__file__).resolve().parents[2]
PROMETHEUS = REPO / "infra" / "prometheus"
GRAFANA = REPO / "infra" / "grafana"
DASHBOARD = GRAFANA / "dashboards" / "gridloop.json"

ALERTS = {"OverdueBacklogRising", "DeadLetterNonEmpty", "ConsumerLagHigh", "ServiceDown", "OutboxStuck"}
APP_PORTS = {"intake": 8101, "handling": 8102, "verification": 8103, "opscenter": 8104, "dispatch": 8105}


def promtool() -> str:
    path = shutil.which("promtool")
    if path is None:
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail("promtool is not installed (Debian package `prometheus`)", pytrace=False)
        pytest.skip("promtool is not installed (Debian package `prometheus`)")
    return path


def run_promtool(*args: str) -> str:
    result = subprocess.run([promtool(), *args], cwd=REPO, capture_output=True, text=True, timeout=120, check=False)
    output = f"{result.stdout}{result.stderr}"
    assert result.returncode == 0, f"promtool {' '.join(args)} failed (exit {result.returncode}):\n{output}"
    return output


def load_yaml(path: Path) -> Any:
    return yaml.safe_load(path.read_text(encoding="utf-8"))


def rules() -> list[dict[str, Any]]:
    return [rule for group in load_yaml(PROMETHEUS / "rules.yml")["groups"] for rule in group["rules"]]


# -- promtool ----------------------------------------------------------------------------------------------


def test_promtool_accepts_the_config() -> None:
    output = run_promtool("check", "config", "infra/prometheus/prometheus.yml")
    assert "1 rule files found" in output


def test_promtool_accepts_the_rules() -> None:
    output = run_promtool("check", "rules", "infra/prometheus/rules.yml")
    assert f"{len(ALERTS)} rules found" in output


def test_the_rules_pass_their_unit_tests() -> None:
    output = run_promtool("test", "rules", "infra/prometheus/rules_test.yml")
    assert "SUCCESS" in output


# -- the rules and their tests -----------------------------------------------------------------------------


def test_every_alert_has_a_severity_and_plain_words() -> None:
    found = {rule["alert"]: rule for rule in rules() if "alert" in rule}
    assert set(found) == ALERTS
    for name, rule in found.items():
        assert rule["labels"]["severity"] in {"critical", "warning"}, name
        assert rule["annotations"]["summary"].strip(), name
        assert rule["annotations"]["description"].strip(), name


def test_every_alert_is_tested_firing_and_not_firing() -> None:
    firing: set[str] = set()
    quiet: set[str] = set()
    for case in load_yaml(PROMETHEUS / "rules_test.yml")["tests"]:
        for check in case.get("alert_rule_test", []):
            (firing if check.get("exp_alerts") else quiet).add(check["alertname"])
    assert firing == ALERTS, f"never shown firing: {ALERTS - firing}"
    assert quiet == ALERTS, f"never shown quiet: {ALERTS - quiet}"


def test_prometheus_scrapes_every_service_and_loads_the_rules() -> None:
    config = load_yaml(PROMETHEUS / "prometheus.yml")
    assert config["rule_files"] == ["rules.yml"]
    [job] = [j for j in config["scrape_configs"] if j["job_name"] == "gridloop"]
    assert job.get("honor_labels") is True  # else the services' own `service` label becomes exported_service
    targets = {static["labels"]["service"]: target for static in job["static_configs"] for target in static["targets"]}
    assert targets == {name: f"{name}:{port}" for name, port in APP_PORTS.items()}


# -- Grafana ---------------------------------------------------------------------------------------------------


def dashboard_exprs() -> list[str]:
    dashboard = json.loads(DASHBOARD.read_text(encoding="utf-8"))
    return [t["expr"] for p in dashboard["panels"] for t in p.get("targets", [])]


def exported_names() -> set[str]:
    """Every sample name the services can export (including families that have no series yet)."""
    names = {common_metrics.WORK_ORDERS_OPEN, common_metrics.WORK_ORDERS_OVERDUE, ops_metrics.CONSUMER_LAG}
    for family in REGISTRY.collect():
        suffixes = {"counter": ["_total"], "histogram": ["_bucket", "_sum", "_count"]}.get(family.type, [""])
        names.update(family.name + suffix for suffix in suffixes)
    return names


def referenced(exprs: list[str]) -> set[str]:
    return {name for expr in exprs for name in re.findall(r"\bgridloop_[a-z0-9_]+", expr)}


def test_the_dashboard_is_provisioned_from_the_prometheus_datasource() -> None:
    provider = load_yaml(GRAFANA / "provisioning" / "dashboards" / "dashboards.yml")
    [file_provider] = provider["providers"]
    assert file_provider["type"] == "file" and file_provider["options"]["path"].startswith("/")
    datasource = load_yaml(GRAFANA / "provisioning" / "datasources" / "prometheus.yml")
    uids = {ds["uid"] for ds in datasource["datasources"]}
    dashboard = json.loads(DASHBOARD.read_text(encoding="utf-8"))
    assert dashboard["uid"] and dashboard["title"]
    ids = [p["id"] for p in dashboard["panels"]]
    assert len(ids) == len(set(ids)), "panel ids repeat"
    for panel in dashboard["panels"]:
        for target in panel.get("targets", []):
            assert target["datasource"]["uid"] in uids, panel["title"]


def test_dashboard_and_rules_use_only_exported_metrics() -> None:
    exprs = dashboard_exprs() + [rule["expr"] for rule in rules()]
    unknown = referenced(exprs) - exported_names()
    assert not unknown, f"not exported by any service: {sorted(unknown)}"
    shown = referenced(dashboard_exprs())
    for wanted in (
        "gridloop_incidents_reported_total",
        "gridloop_incidents_closed_total",
        "gridloop_work_orders_open",
        "gridloop_work_orders_overdue",
        "gridloop_stage_duration_seconds_bucket",
        "gridloop_dead_letters_total",
        "gridloop_consumer_lag",
    ):
        assert wanted in shown, f"the dashboard does not show {wanted}"
    assert any(re.search(r"\bup\{", expr) for expr in dashboard_exprs()), "the dashboard does not show `up`"


def test_dashboard_queries_are_valid_promql(tmp_path: Path) -> None:
    """promtool parses each query (Grafana's $__rate_interval replaced) as a recording rule."""
    exprs = [expr.replace("$__rate_interval", "5m") for expr in dashboard_exprs()]
    as_rules = {
        "groups": [
            {"name": "dashboard", "rules": [{"record": f"dashboard:query{n}", "expr": e} for n, e in enumerate(exprs)]}
        ]
    }
    path = tmp_path / "dashboard_queries.yml"
    path.write_text(yaml.safe_dump(as_rules, allow_unicode=True), encoding="utf-8")
    output = run_promtool("check", "rules", str(path))
    assert f"{len(exprs)} rules found" in output
