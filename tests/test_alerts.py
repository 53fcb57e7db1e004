"""docker/prometheus/alerts.yaml checked by promtool: the rules parse, and their unit tests
(tests/prometheus/alerts_test.yaml: input series, expected alerts at given times) pass. A live
Prometheus loads and evaluates the same file against a real service in test_dashboard_live.py."""

from __future__ import annotations

import subprocess
from pathlib import Path

import yaml

from tests.test_deploy import DOCKER, _tool, metric_series_names, promql_metric_names

ALERTS = DOCKER / "prometheus" / "alerts.yaml"
ALERT_TESTS = Path(__file__).parent / "prometheus" / "alerts_test.yaml"
# What the issue asks the alerts to cover.
EXPECTED = {
    "FoalnetHighErrorRatio",
    "FoalnetSlowRequests",
    "FoalnetNotReady",
    "FoalnetCpuFallback",
    "FoalnetOverloaded",
    "FoalnetDecodeSaturated",
}


def _rules() -> list[dict]:
    return [rule for group in yaml.safe_load(ALERTS.read_text())["groups"] for rule in group["rules"]]


def test_promtool_accepts_the_rules() -> None:
    proc = subprocess.run([_tool("promtool"), "check", "rules", str(ALERTS)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_promtool_rule_unit_tests_pass() -> None:
    proc = subprocess.run(
        [_tool("promtool"), "test", "rules", ALERT_TESTS.name],
        capture_output=True,
        text=True,
        cwd=ALERT_TESTS.parent,
    )
    assert proc.returncode == 0 and "SUCCESS" in proc.stdout, proc.stdout + proc.stderr


def test_every_alert_is_covered_and_reads_real_metrics() -> None:
    rules = _rules()
    assert {r["alert"] for r in rules} == EXPECTED
    known = metric_series_names()
    for rule in rules:
        names = promql_metric_names(rule["expr"])
        assert names and names <= known, f"{rule['alert']}: unknown series {names - known}"
        assert rule["labels"]["severity"] in ("page", "ticket")
        assert {"summary", "description"} <= set(rule["annotations"])
    tested = yaml.safe_load(ALERT_TESTS.read_text())
    fired = {
        case["alertname"]
        for test in tested["tests"]
        for case in test["alert_rule_test"]
        if case["exp_alerts"]
    }
    assert fired == EXPECTED, f"no firing test for {EXPECTED - fired}"
