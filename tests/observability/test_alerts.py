"""Every alert names its runbook and every incident runbook has its alerts (DESIGN D9): the Prometheus rules
in infra/observability, the CloudWatch alarms the Pulumi program creates (run under mocks), and the table in
runbooks/README.md agree both ways. The rules and the dashboard use only metrics the services expose, and
the region's CloudWatch lines publish every custom metric an alarm watches."""

from __future__ import annotations

import json
import re
from collections import defaultdict
from pathlib import Path
from typing import Any

import pytest
import yaml

from app import telemetry

REPO = Path(__file__).resolve().parents[2]
RULES = REPO / "infra" / "observability" / "prometheus-rules.yml"
DASHBOARD = REPO / "infra" / "observability" / "grafana-dashboard.json"
RUNBOOKS = REPO / "runbooks"
_METRIC = re.compile(r"\b(txroute_[a-z_]+|up)\b")


@pytest.fixture(scope="module")
def rules() -> list[dict[str, Any]]:
    doc = yaml.safe_load(RULES.read_text())
    return [rule for group in doc["groups"] for rule in group["rules"]]


@pytest.fixture(scope="module")
def cloudwatch_alarms() -> list[dict[str, Any]]:
    """The alarms of the real program (regions/ as it is) under Pulumi mocks."""
    from tests.infra.conftest import run_program

    run = run_program(None)
    return [a.inputs for a in run.of_type("aws:cloudwatch/metricAlarm:MetricAlarm")]


@pytest.fixture(scope="module")
def readme() -> dict[str, dict[str, set[str]]]:
    """runbook -> {"cloudwatch": alarm suffixes, "prometheus": alert names} from the README's table."""
    table: dict[str, dict[str, set[str]]] = defaultdict(lambda: {"cloudwatch": set(), "prometheus": set()})
    for line in (RUNBOOKS / "README.md").read_text().splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) != 4 or not cells[0].startswith("`"):
            continue
        runbook = "runbooks/" + re.fullmatch(r"\[[^]]+\]\(([a-z0-9-]+\.md)\)", cells[3]).group(1)  # type: ignore[union-attr]
        table[runbook]["cloudwatch"] |= set(re.findall(r"`([a-z0-9-]+)`", cells[0]))
        table[runbook]["prometheus"] |= set(re.findall(r"`([A-Za-z0-9]+)`", cells[1]))
    assert table, "expected the README's alert table"
    return dict(table)


def _exposed_names() -> set[str]:
    names = {"up"}
    for collector in telemetry.METRICS.__dict__.values():
        if hasattr(collector, "describe"):
            for family in collector.describe():
                base = family.name
                names |= {base, base + "_total", base + "_bucket", base + "_count", base + "_sum"}
    return names


def _alarm_runbook(alarm: dict[str, Any]) -> str:
    match = re.search(r"Runbook: (runbooks/[a-z0-9-]+\.md)$", alarm["alarmDescription"])
    assert match, f"{alarm['name']}: expected its description to end with its runbook"
    return match.group(1)


def _alarm_suffix(alarm: dict[str, Any]) -> str:
    # txroute-<env>-<region>-<alert>; regions look like eu-west-1
    match = re.fullmatch(r"txroute-[a-z0-9]+-[a-z]+-[a-z]+-[0-9]+-(.+)", alarm["name"])
    assert match, alarm["name"]
    return match.group(1)


def test_every_prometheus_alert_names_an_existing_runbook_listed_for_it(rules, readme) -> None:
    assert rules, "expected alerting rules"
    for rule in rules:
        runbook = rule["annotations"]["runbook"]
        assert (REPO / runbook).is_file(), f"{rule['alert']}: {runbook} does not exist"
        assert rule["alert"] in readme.get(runbook, {}).get("prometheus", set()), (
            f"expected runbooks/README.md to list {rule['alert']} against {runbook}")
        assert rule["labels"]["severity"] in ("page", "ticket") and rule["annotations"]["summary"]


def test_every_cloudwatch_alarm_names_an_existing_runbook_listed_for_it(cloudwatch_alarms, readme) -> None:
    assert cloudwatch_alarms
    for alarm in cloudwatch_alarms:
        runbook = _alarm_runbook(alarm)
        assert (REPO / runbook).is_file(), f"{alarm['name']}: {runbook} does not exist"
        assert _alarm_suffix(alarm) in readme.get(runbook, {}).get("cloudwatch", set()), (
            f"expected runbooks/README.md to list {_alarm_suffix(alarm)} against {runbook}")


def _procedures() -> set[str]:
    """Runbooks the README lists as procedures (run on purpose, no alert): two-column rows with a link."""
    found = set()
    for line in (RUNBOOKS / "README.md").read_text().splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        link = re.fullmatch(r"\[[^]]+\]\(([a-z0-9-]+\.md)\)", cells[-1]) if len(cells) == 2 else None
        if link:
            found.add("runbooks/" + link.group(1))
    return found


def test_every_incident_runbook_has_a_prometheus_alert_and_a_cloudwatch_alarm(rules, cloudwatch_alarms, readme):
    # Every runbook file is an incident's unless the README lists it as a procedure.
    procedures = _procedures()
    incidents = {f"runbooks/{p.name}" for p in RUNBOOKS.glob("*.md") if p.name != "README.md"} - procedures
    assert set(readme) <= incidents, f"the alert table names procedures or missing files: {set(readme) - incidents}"
    prometheus = {rule["annotations"]["runbook"] for rule in rules}
    cloudwatch = {_alarm_runbook(alarm) for alarm in cloudwatch_alarms}
    for runbook in sorted(incidents):
        assert runbook in prometheus, f"expected a Prometheus alert naming {runbook}"
        assert runbook in cloudwatch, f"expected a CloudWatch alarm naming {runbook}"
        listed = readme.get(runbook, {"cloudwatch": set(), "prometheus": set()})
        assert listed["prometheus"] <= {r["alert"] for r in rules if r["annotations"]["runbook"] == runbook}, (
            f"runbooks/README.md lists Prometheus alerts for {runbook} that do not exist or name another runbook")
        assert listed["cloudwatch"] <= {_alarm_suffix(a) for a in cloudwatch_alarms if _alarm_runbook(a) == runbook}, (
            f"runbooks/README.md lists CloudWatch alarms for {runbook} that do not exist or name another runbook")


def test_rules_and_dashboard_use_only_exposed_metrics_and_the_dashboard_shows_every_one(rules) -> None:
    exposed = _exposed_names()
    for rule in rules:
        unknown = set(_METRIC.findall(rule["expr"])) - exposed
        assert not unknown, f"{rule['alert']} uses metrics no service exposes: {unknown}"
    dashboard = json.loads(DASHBOARD.read_text())
    exprs = [t["expr"] for panel in dashboard["panels"] for t in panel["targets"]]
    used = {name for expr in exprs for name in _METRIC.findall(expr)}
    assert used <= exposed, f"the dashboard uses metrics no service exposes: {used - exposed}"
    families = {f.name for c in telemetry.METRICS.__dict__.values() if hasattr(c, "describe") for f in c.describe()}
    shown = {f for f in families if any(f in name for name in used)}
    assert shown == families, f"expected a dashboard panel for each metric; missing {families - shown}"
    assert len({p["id"] for p in dashboard["panels"]}) == len(dashboard["panels"])


def test_regions_publish_every_custom_cloudwatch_metric_an_alarm_watches(cloudwatch_alarms) -> None:
    line = json.loads(telemetry.CloudWatchEmf("eu-west-1").line(outbox_oldest_s=1.5, audit_clean=True,
                                                                     move_phase_age_s=0.0))
    (directive,) = line["_aws"]["CloudWatchMetrics"]
    published = {(directive["Namespace"], m["Name"]) for m in directive["Metrics"]}
    assert directive["Dimensions"] == [["Region"]] and line["Region"] == "eu-west-1"
    assert all(line[name] is not None for _, name in published)
    watched = set()
    for alarm in cloudwatch_alarms:
        metrics = [alarm] + [q["metric"] for q in alarm.get("metricQueries", []) if q.get("metric")]
        watched |= {(m["namespace"], m["metricName"]) for m in metrics if m.get("namespace") == telemetry.EMF_NAMESPACE}
    assert watched and watched <= published, f"alarms watch metrics no region publishes: {watched - published}"
