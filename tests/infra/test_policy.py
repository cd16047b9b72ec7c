"""The policy pack's validators, called directly with the argument shapes the engine passes."""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

import pytest
import txroute_policies as p

SAFE_CLUSTER = {
    "engine": "postgres", "dbClusterInstanceClass": "db.r6g.large", "storageEncrypted": True,
    "kmsKeyId": "arn:aws:kms:eu-west-1:1:key/k", "publiclyAccessible": False, "deletionProtection": True,
    "skipFinalSnapshot": False, "backupRetentionPeriod": 14, "manageMasterUserPassword": True,
    "performanceInsightsEnabled": True,
}


def violations(validate: Any, resource_type: str, props: dict[str, Any], **extra: Any) -> list[str]:
    found: list[str] = []
    validate(SimpleNamespace(resource_type=resource_type, props=props, name="r", urn="urn:r", **extra),
             lambda message, *_: found.append(message))
    return found


def test_a_safe_database_passes() -> None:
    assert violations(p.database_is_safe, p.RDS_CLUSTER, SAFE_CLUSTER) == []


@pytest.mark.parametrize(("change", "expected"), [
    ({"storageEncrypted": False}, "storageEncrypted"),
    ({"kmsKeyId": ""}, "kmsKeyId"),
    ({"publiclyAccessible": True}, "publiclyAccessible"),
    ({"deletionProtection": False}, "deletionProtection"),
    ({"skipFinalSnapshot": True}, "skipFinalSnapshot"),
    ({"backupRetentionPeriod": 3}, "backupRetentionPeriod"),
    ({"manageMasterUserPassword": False, "masterPassword": "hunter2"}, "master password"),
    ({"performanceInsightsEnabled": False}, "performanceInsightsEnabled"),
    ({"dbClusterInstanceClass": None}, "Multi-AZ DB cluster"),
])
def test_each_unsafe_database_setting_is_reported(change: dict[str, Any], expected: str) -> None:
    found = violations(p.database_is_safe, p.RDS_CLUSTER, {**SAFE_CLUSTER, **change})
    assert len(found) == 1 and expected in found[0], found


def test_a_single_instance_must_be_multi_az() -> None:
    props = {k: v for k, v in SAFE_CLUSTER.items() if k not in ("engine", "dbClusterInstanceClass")}
    assert violations(p.database_is_safe, p.RDS_INSTANCE, {**props, "multiAz": True}) == []
    assert violations(p.database_is_safe, p.RDS_INSTANCE, props) == ["multiAz must be true"]


def test_postgres_parameter_groups_must_force_tls() -> None:
    group = p.PARAMETER_GROUPS[0]
    tls = [{"name": "rds.force_ssl", "value": "1"}]
    assert violations(p.database_requires_tls, group, {"family": "postgres16", "parameters": tls}) == []
    assert violations(p.database_requires_tls, group, {"family": "postgres16", "parameters": []})
    assert violations(p.database_requires_tls, group, {"family": "mysql8.0", "parameters": []}) == []


def _rule(port: int, cidrs: list[str], protocol: str = "tcp") -> dict[str, Any]:
    return {"protocol": protocol, "fromPort": port, "toPort": port, "cidrBlocks": cidrs}


@pytest.mark.parametrize(("rules", "ok"), [
    ([_rule(443, ["0.0.0.0/0"])], True),
    ([_rule(8000, ["10.0.0.0/16"])], True),
    ([_rule(80, ["0.0.0.0/0"])], False),
    ([_rule(5432, ["0.0.0.0/0"])], False),
    ([{"protocol": "-1", "fromPort": 0, "toPort": 0, "cidrBlocks": ["0.0.0.0/0"]}], False),
    ([{"protocol": "tcp", "fromPort": 0, "toPort": 65535, "ipv6CidrBlocks": ["::/0"]}], False),
])
def test_world_ingress_is_allowed_only_on_443(rules: list[dict[str, Any]], ok: bool) -> None:
    found = violations(p.no_world_ingress_except_https, p.SECURITY_GROUP, {"ingress": rules})
    assert (found == []) is ok, found


def test_standalone_world_ingress_rules_are_refused() -> None:
    rule_type = p.STANDALONE_INGRESS[0]
    assert violations(p.no_world_ingress_except_https, rule_type, {"cidrIpv4": "0.0.0.0/0", "fromPort": 443})
    assert violations(p.no_world_ingress_except_https, rule_type, {"cidrIpv4": "10.0.0.0/8"}) == []
    sg_rule = p.STANDALONE_INGRESS[1]
    assert violations(p.no_world_ingress_except_https, sg_rule, {"type": "egress", "cidrBlocks": ["0.0.0.0/0"]}) == []


def _res(resource_type: str, name: str, props: dict[str, Any], **deps: list[Any]) -> SimpleNamespace:
    return SimpleNamespace(resource_type=resource_type, name=name, urn=f"urn:{name}", props=props,
                           property_dependencies=deps)


def _stack(*resources: SimpleNamespace) -> list[str]:
    found: list[str] = []
    p.world_ingress_only_on_public_lb(SimpleNamespace(resources=list(resources)), lambda m, *_: found.append(m))
    return found


def test_an_open_group_on_a_public_https_load_balancer_passes() -> None:
    sg = _res(p.SECURITY_GROUP, "public-sg", {"ingress": [_rule(443, ["0.0.0.0/0"])]})
    lb = _res(p.LOAD_BALANCER, "public", {"internal": False}, securityGroups=[sg])
    listener = _res(p.LISTENER, "https", {"protocol": "HTTPS", "certificateArn": "arn:cert"}, loadBalancerArn=[lb])
    router_sg = _res(p.SECURITY_GROUP, "router-sg", {"ingress": []}, ingress=[sg])
    assert _stack(sg, lb, listener, router_sg) == []


def test_an_open_group_on_an_internal_lb_or_a_task_is_reported() -> None:
    sg = _res(p.SECURITY_GROUP, "open-sg", {"ingress": [_rule(443, ["0.0.0.0/0"])]})
    internal = _res(p.LOAD_BALANCER, "internal", {"internal": True}, securityGroups=[sg])
    service = _res("aws:ecs/service:Service", "svc", {}, networkConfiguration=[sg])
    found = _stack(sg, internal, service)
    assert len(found) == 2, found
    assert any(" internal " in f for f in found) and any(" svc " in f for f in found), found


def test_a_plain_http_listener_on_a_public_load_balancer_is_reported() -> None:
    lb = _res(p.LOAD_BALANCER, "public", {"internal": False})
    http = _res(p.LISTENER, "http", {"protocol": "HTTP", "port": 80}, loadBalancerArn=[lb])
    internal = _res(p.LOAD_BALANCER, "internal", {"internal": True})
    internal_http = _res(p.LISTENER, "api", {"protocol": "HTTP", "port": 8080}, loadBalancerArn=[internal])
    assert _stack(lb, http, internal, internal_http) == [
        "listener http of a public load balancer must be HTTPS with a certificate"]


def test_every_listener_internal_ones_included_must_be_https_with_a_certificate_and_a_tls_policy() -> None:
    https = {"protocol": "HTTPS", "port": 443, "certificateArn": "arn:cert", "sslPolicy": "ELBSecurityPolicy-TLS13"}
    assert violations(p.listeners_are_https, p.LISTENER, https) == []
    internal_http = {"protocol": "HTTP", "port": 8080}
    found = violations(p.listeners_are_https, p.LISTENER, internal_http)
    assert found == ["listener: protocol must be HTTPS, got HTTP", "listener: certificateArn must name a certificate",
                     "listener: sslPolicy must be set"], found
    assert violations(p.listeners_are_https, p.LISTENER, {**https, "certificateArn": ""}) == [
        "listener: certificateArn must name a certificate"]
    # Unknown in a preview: not reported.
    assert violations(p.listeners_are_https, p.LISTENER, {**https, "certificateArn": None}) == []


def test_alarms_must_name_an_existing_runbook_and_notify() -> None:
    good = {"alarmDescription": "Too slow. Runbook: runbooks/high-latency-or-errors.md", "alarmActions": ["arn"]}
    assert violations(p.alarm_names_runbook, p.METRIC_ALARM, good) == []
    assert violations(p.alarm_names_runbook, p.METRIC_ALARM, {**good, "alarmDescription": "Too slow."})
    missing = {**good, "alarmDescription": "x Runbook: runbooks/no-such-runbook.md"}
    assert "does not exist" in violations(p.alarm_names_runbook, p.METRIC_ALARM, missing)[0]
    assert violations(p.alarm_names_runbook, p.METRIC_ALARM, {**good, "alarmActions": []})


def test_logs_must_expire_and_keys_must_rotate() -> None:
    assert violations(p.logs_have_retention, p.LOG_GROUP, {"retentionInDays": 30, "kmsKeyId": "k"}) == []
    assert violations(p.logs_have_retention, p.LOG_GROUP, {"kmsKeyId": "k"})
    assert violations(p.keys_rotate, p.KMS_KEY, {"enableKeyRotation": True}) == []
    assert violations(p.keys_rotate, p.KMS_KEY, {})


def test_aws_resources_must_use_an_explicit_provider() -> None:
    explicit = SimpleNamespace(name="eu-west-1-aws")
    assert violations(p.explicit_provider, "aws:ec2/vpc:Vpc", {}, provider=explicit) == []
    assert violations(p.explicit_provider, "aws:ec2/vpc:Vpc", {}, provider=SimpleNamespace(name="default_7_5_0"))
    assert violations(p.explicit_provider, "aws:ec2/vpc:Vpc", {}, provider=None)
    assert violations(p.explicit_provider, "txroute:cell:Network", {}, provider=None) == []


def test_the_pack_entry_point_registers_every_rule() -> None:
    source = (p.REPO_ROOT / "infra" / "policy" / "__main__.py").read_text()
    assert "RESOURCE_RULES.items()" in source and "STACK_RULES.items()" in source
    assert len(p.RESOURCE_RULES) == 8 and len(p.STACK_RULES) == 1
