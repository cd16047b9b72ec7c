"""The policy pack's validators, called directly with the argument shapes the engine passes."""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

import pytest
import txroute_policies as p

SAFE_CLUSTER = {
    "engine": "postgres", "dbClusterInstanceClass": "db.r6gd.large", "storageEncrypted": True,
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
    assert len(p.RESOURCE_RULES) == 14 and len(p.STACK_RULES) == 4


# --- what AWS would refuse or ignore (issue: the first real `pulumi up`) --------------------------------------

def test_the_pack_restates_the_program_and_loader_facts_exactly() -> None:
    from txroute_infra import layout

    from app.topology import loader

    assert p.FIXED_RESPONSE_CONTENT_TYPES == layout.FIXED_RESPONSE_CONTENT_TYPES
    assert p.MULTI_AZ_DB_CLUSTER_CLASS_FAMILIES == loader.MULTI_AZ_DB_CLUSTER_CLASS_FAMILIES
    assert p.GP3_EXPLICIT_IOPS_STORAGE_GB_MIN == loader.DB_ALLOCATED_STORAGE_GB_MIN
    assert (p.DB_FAILOVER_S, p.READINESS_PATH) == (layout.DB_FAILOVER_S, layout.READINESS_PATH)


def _fixed(content_type: str) -> list[dict[str, Any]]:
    return [{"type": "fixed-response", "fixedResponse": {"contentType": content_type, "statusCode": "404"}}]


@pytest.mark.parametrize("content_type", ["application/problem+json", "application/xml", "text/json"])
def test_fixed_responses_with_a_content_type_elb_refuses_are_reported(content_type: str) -> None:
    found = violations(p.fixed_responses_use_allowed_content_types, p.LISTENER_RULE, {"actions": _fixed(content_type)})
    assert len(found) == 1 and content_type in found[0], found
    listener = violations(p.fixed_responses_use_allowed_content_types, p.LISTENER,
                          {"defaultActions": _fixed(content_type)})
    assert len(listener) == 1, listener


def test_fixed_responses_in_json_or_text_pass() -> None:
    for content_type in ("application/json", "text/plain"):
        assert violations(p.fixed_responses_use_allowed_content_types, p.LISTENER_RULE,
                          {"actions": _fixed(content_type)}) == []


ORDERABLE = {**SAFE_CLUSTER, "storageType": "gp3", "allocatedStorage": 400, "iops": 12_000}


def test_an_orderable_multi_az_db_cluster_passes() -> None:
    assert violations(p.multi_az_db_cluster_is_orderable, p.RDS_CLUSTER, ORDERABLE) == []
    io1 = {**ORDERABLE, "storageType": "io1", "allocatedStorage": 100, "iops": 3000}
    assert violations(p.multi_az_db_cluster_is_orderable, p.RDS_CLUSTER, io1) == []
    aurora = {**ORDERABLE, "engine": "aurora-postgresql", "dbClusterInstanceClass": "db.r6g.large"}
    assert violations(p.multi_az_db_cluster_is_orderable, p.RDS_CLUSTER, aurora) == []


@pytest.mark.parametrize(("change", "expected"), [
    ({"dbClusterInstanceClass": "db.r6g.large"}, "not offered for Multi-AZ DB clusters"),
    ({"dbClusterInstanceClass": "db.t4g.medium"}, "not offered for Multi-AZ DB clusters"),
    ({"iops": None}, "iops is required"),
    ({"allocatedStorage": 100, "iops": 3000}, "allocatedStorage >= 400"),
    ({"storageType": "gp2"}, "io1, io2 or gp3"),
    ({"iops": 64_000, "storageType": "io1", "allocatedStorage": 400}, "times allocatedStorage"),
])
def test_a_multi_az_db_cluster_rds_would_refuse_is_reported(change: dict[str, Any], expected: str) -> None:
    found = violations(p.multi_az_db_cluster_is_orderable, p.RDS_CLUSTER, {**ORDERABLE, **change})
    assert len(found) == 1 and expected in found[0], found


def test_a_pinned_engine_version_with_minor_upgrades_must_ignore_drift() -> None:
    props = {**SAFE_CLUSTER, "engineVersion": "16.4", "autoMinorVersionUpgrade": True}
    ignoring = SimpleNamespace(ignore_changes=["engineVersion"])
    assert violations(p.engine_version_drift_is_ignored, p.RDS_CLUSTER, props, opts=ignoring) == []
    found = violations(p.engine_version_drift_is_ignored, p.RDS_CLUSTER, props,
                       opts=SimpleNamespace(ignore_changes=[]))
    assert len(found) == 1 and "ignore_changes" in found[0], found
    manual = {**props, "autoMinorVersionUpgrade": False}
    assert violations(p.engine_version_drift_is_ignored, p.RDS_CLUSTER, manual,
                      opts=SimpleNamespace(ignore_changes=[])) == []


def _params(**values: str) -> dict[str, Any]:
    tls = [{"name": "rds.force_ssl", "value": "1"}]
    return {"family": "postgres16", "parameters": tls + [{"name": k, "value": v} for k, v in values.items()]}


@pytest.mark.parametrize("logging", [
    {"log_min_duration_statement": "500"}, {"log_min_duration_statement": "0"}, {"log_statement": "all"},
    {"log_min_duration_sample": "100"}, {"log_duration": "on"},
])
def test_statement_logging_without_hiding_bind_values_is_reported(logging: dict[str, str]) -> None:
    group = p.PARAMETER_GROUPS[0]
    found = violations(p.database_logs_no_bind_values, group, _params(**logging))
    assert len(found) == 1 and "log_parameter_max_length = 0" in found[0], found
    hidden = _params(**logging, log_parameter_max_length="0")
    assert violations(p.database_logs_no_bind_values, group, hidden) == []


def test_no_statement_logging_passes_and_bind_values_on_error_are_reported() -> None:
    group = p.PARAMETER_GROUPS[0]
    assert violations(p.database_logs_no_bind_values, group, _params(log_min_duration_statement="-1")) == []
    assert violations(p.database_logs_no_bind_values, group, _params(log_statement="ddl")) == []
    assert violations(p.database_logs_no_bind_values, group, _params(log_parameter_max_length_on_error="64"))


def test_rds_alarms_on_the_cluster_dimension_are_reported() -> None:
    base = {"alarmDescription": "x Runbook: runbooks/database-capacity.md", "alarmActions": ["arn"]}
    single = {**base, "namespace": "AWS/RDS", "metricName": "CPUUtilization",
              "dimensions": {"DBClusterIdentifier": "txroute-prod-eu-west-1"}}
    assert violations(p.rds_alarms_watch_member_instances, p.METRIC_ALARM, single)
    math = {**base, "metricQueries": [
        {"id": "m0", "metric": {"namespace": "AWS/RDS", "dimensions": {"DBClusterIdentifier": "c"}}},
        {"id": "r", "expression": "MAX([m0])", "returnData": True}]}
    assert violations(p.rds_alarms_watch_member_instances, p.METRIC_ALARM, math)
    members = {**base, "metricQueries": [
        {"id": f"m{i}", "metric": {"namespace": "AWS/RDS", "dimensions": {"DBInstanceIdentifier": f"c-{i}"}}}
        for i in range(3)]}
    assert violations(p.rds_alarms_watch_member_instances, p.METRIC_ALARM, members) == []
    alb = {**base, "namespace": "AWS/ApplicationELB", "dimensions": {"LoadBalancer": "app/x/1"}}
    assert violations(p.rds_alarms_watch_member_instances, p.METRIC_ALARM, alb) == []


@pytest.mark.parametrize(("health_check", "expected"), [
    ({"path": "/readyz", "interval": 10, "unhealthyThreshold": 5}, "/readyz"),
    ({"path": "/healthz", "interval": 10, "unhealthyThreshold": 3}, "35 s"),
    ({"path": "/healthz", "interval": 5, "unhealthyThreshold": 7}, "35 s"),
])
def test_target_groups_probing_readiness_or_giving_up_within_a_failover_are_reported(
        health_check: dict[str, Any], expected: str) -> None:
    found = violations(p.health_checks_are_liveness, p.TARGET_GROUP, {"healthCheck": health_check})
    assert len(found) == 1 and expected in found[0], found
    live = {"path": "/healthz", "interval": 10, "unhealthyThreshold": 5}
    assert violations(p.health_checks_are_liveness, p.TARGET_GROUP, {"healthCheck": live}) == []


def test_container_health_checks_probing_readiness_or_giving_up_within_a_failover_are_reported() -> None:
    import json

    def task(path: str, interval: int, retries: int) -> dict[str, Any]:
        command = ["CMD", "python", "-c", f"urlopen('http://127.0.0.1:8000{path}')"]
        return {"containerDefinitions": json.dumps([{"name": "svc", "healthCheck": {
            "command": command, "interval": interval, "retries": retries}}])}

    assert violations(p.health_checks_are_liveness, p.TASK_DEFINITION, task("/healthz", 10, 5)) == []
    assert "/readyz" in violations(p.health_checks_are_liveness, p.TASK_DEFINITION, task("/readyz", 10, 5))[0]
    assert "35 s" in violations(p.health_checks_are_liveness, p.TASK_DEFINITION, task("/healthz", 10, 3))[0]


def _endpoint_group(lb: SimpleNamespace, **props: Any) -> SimpleNamespace:
    return _res(p.ENDPOINT_GROUP, "eg", props, endpointConfigurations=[lb])


def _stack_with(rule: Any, *resources: SimpleNamespace) -> list[str]:
    found: list[str] = []
    rule(SimpleNamespace(resources=list(resources)), lambda m, *_: found.append(m))
    return found


def test_health_check_settings_on_an_alb_endpoint_group_are_reported() -> None:
    lb = _res(p.LOAD_BALANCER, "public", {"internal": False})
    rule = p.endpoint_groups_leave_health_to_load_balancers
    assert _stack_with(rule, lb, _endpoint_group(lb, healthCheckProtocol="TCP", thresholdCount=3)) == []
    assert _stack_with(rule, lb, _endpoint_group(lb, healthCheckPath="/readyz", healthCheckProtocol="HTTPS"))
    assert _stack_with(rule, lb, _endpoint_group(lb, healthCheckProtocol="HTTP"))


def test_a_vpc_without_an_s3_gateway_endpoint_is_reported() -> None:
    vpc = _res(p.VPC, "eu-west-1-vpc", {})
    rule = p.every_vpc_has_an_s3_gateway_endpoint
    assert _stack_with(rule, vpc) == ["VPC eu-west-1-vpc has no S3 gateway endpoint"]
    s3 = _res(p.VPC_ENDPOINT, "s3", {"serviceName": "com.amazonaws.eu-west-1.s3", "vpcEndpointType": "Gateway"},
              vpcId=[vpc])
    assert _stack_with(rule, vpc, s3) == []
    logs = _res(p.VPC_ENDPOINT, "logs", {"serviceName": "com.amazonaws.eu-west-1.logs",
                                         "vpcEndpointType": "Interface"}, vpcId=[vpc])
    assert _stack_with(rule, vpc, logs)


def test_a_certificate_validation_without_records_from_the_stack_is_reported() -> None:
    rule = p.certificates_validate_through_dns_records
    record = _res(p.ROUTE53_RECORD, "validation", {"name": "_x.api.example.com"})
    waiting = _res(p.CERTIFICATE_VALIDATION, "v", {"certificateArn": "arn"})
    assert len(_stack_with(rule, waiting)) == 1
    external = _res(p.CERTIFICATE_VALIDATION, "v", {"validationRecordFqdns": ["_x.api.example.com"]})
    assert len(_stack_with(rule, external)) == 1, "a name typed in by hand is not a record the stack creates"
    ours = _res(p.CERTIFICATE_VALIDATION, "v", {"validationRecordFqdns": ["_x.api.example.com"]},
                validationRecordFqdns=[record])
    assert _stack_with(rule, record, ours) == []
