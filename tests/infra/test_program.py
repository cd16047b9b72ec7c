"""The Pulumi program under mocks: what `regions/` yields, and the safety rules each resource obeys."""

from __future__ import annotations

import ipaddress
import re
from collections import Counter
from typing import Any

import pytest

from tests.infra.conftest import REPO, Recorded, Run

GLOBAL_PREFIX = "global-"
PER_REGION = {  # type -> how many each region gets (one cluster hosts every shard database of a region)
    "aws:ec2/vpc:Vpc": 1,
    "aws:ec2/subnet:Subnet": 9,
    "aws:ec2/natGateway:NatGateway": 3,
    "aws:kms/key:Key": 1,
    "aws:rds/cluster:Cluster": 1,
    "aws:ecr/repository:Repository": 1,
    "aws:ecs/cluster:Cluster": 1,
    "aws:ecs/service:Service": 2,
    "aws:lb/loadBalancer:LoadBalancer": 2,
    "aws:sns/topic:Topic": 1,
    "aws:cloudwatch/metricAlarm:MetricAlarm": 16,  # with webhook-endpoint-disabled (issue 13)
    "aws:acm/certificate:Certificate": 2,  # the public API's, and the internal APIs' (*.internal.<apiDomain>)
    "aws:ec2/vpcEndpoint:VpcEndpoint": 1,  # the S3 gateway endpoint (interface endpoints are opt-in)
}


def _regions(run: Run) -> list[str]:
    return sorted(r.inputs["region"] for r in run.of_type("pulumi:providers:aws")
                  if not r.name.startswith(GLOBAL_PREFIX))


def _by_region(run: Run, type_: str) -> Counter[str]:
    return Counter(run.region_of(r) or "?" for r in run.of_type(type_))


def _service_task_definitions(run: Run) -> list[Recorded]:
    """The services' task definitions (the migrate task, a one-off, has no health check or peers)."""
    return [td for td in run.of_type("aws:ecs/taskDefinition:TaskDefinition")
            if not td.inputs["family"].endswith("-migrate")]


def _world(rule: dict[str, Any]) -> bool:
    return "0.0.0.0/0" in (rule.get("cidrBlocks") or []) or "::/0" in (rule.get("ipv6CidrBlocks") or [])


@pytest.mark.parametrize("fixture", ["program_run", "program_run_4"])
def test_each_region_file_yields_one_full_cell(fixture: str, request: pytest.FixtureRequest) -> None:
    run: Run = request.getfixturevalue(fixture)
    from txroute_infra.topology import load_topology

    expected = sorted(r.name for r in load_topology(
        None if fixture == "program_run" else request.getfixturevalue("four_regions_dir")).regions)
    assert _regions(run) == expected
    for type_, per_region in PER_REGION.items():
        counts = _by_region(run, type_)
        assert counts == dict.fromkeys(expected, per_region), f"{type_}: want {per_region} per region, got {counts}"


def test_a_fourth_region_file_adds_a_cell_an_endpoint_group_and_peerings(program_run: Run,
                                                                         program_run_4: Run) -> None:
    assert len(_regions(program_run)) == 3 and len(_regions(program_run_4)) == 4
    groups = program_run_4.of_type("aws:globalaccelerator/endpointGroup:EndpointGroup")
    assert sorted(g.inputs["endpointGroupRegion"] for g in groups) == _regions(program_run_4)
    # A full mesh: n(n-1)/2 connections, each accepted on the other side.
    assert len(program_run.of_type("aws:ec2/vpcPeeringConnection:VpcPeeringConnection")) == 3
    assert len(program_run_4.of_type("aws:ec2/vpcPeeringConnection:VpcPeeringConnection")) == 6
    assert len(program_run_4.of_type(
        "aws:ec2/vpcPeeringConnectionAccepter:VpcPeeringConnectionAccepter")) == 6
    assert len(program_run_4.of_type("aws:globalaccelerator/accelerator:Accelerator")) == 1


def test_endpoint_groups_leave_health_to_their_regions_router_load_balancer(program_run: Run) -> None:
    public_lbs = {program_run.region_of(r): f"arn:aws:mock:{r.name}"
                  for r in program_run.of_type("aws:lb/loadBalancer:LoadBalancer") if r.inputs["internal"] is False}
    for group in program_run.of_type("aws:globalaccelerator/endpointGroup:EndpointGroup"):
        i = group.inputs
        ignored = {"healthCheckPath", "healthCheckProtocol", "healthCheckPort", "healthCheckIntervalSeconds",
                   "thresholdCount"}
        assert not ignored & set(i), f"Global Accelerator ignores these for ALB endpoints: {ignored & set(i)}"
        assert [e["endpointId"] for e in i["endpointConfigurations"]] == [public_lbs[i["endpointGroupRegion"]]]


def test_every_aws_resource_uses_its_own_regions_provider(program_run_4: Run) -> None:
    regions = _regions(program_run_4)
    for r in program_run_4.resources:
        if not r.custom or r.type.startswith("pulumi:providers:"):
            continue
        if r.name.startswith(GLOBAL_PREFIX):
            assert program_run_4.region_of(r) == "us-west-2", f"{r.name}: global resources use us-west-2"
            continue
        owner = next((reg for reg in regions if r.name.startswith(reg + "-")), None)
        assert owner is not None, f"{r.type} {r.name}: regional resource names start with their region"
        assert program_run_4.region_of(r) == owner, f"{r.name}: provider {r.provider!r}, want {owner}'s"


def test_every_database_is_encrypted_with_its_own_regions_key_private_and_protected(program_run_4: Run) -> None:
    keys = {program_run_4.region_of(k): f"arn:aws:mock:{k.name}" for k in program_run_4.of_type("aws:kms/key:Key")}
    assert len(set(keys.values())) == len(keys) == 4, "one key per region"
    for db in program_run_4.of_type("aws:rds/cluster:Cluster"):
        i, region = db.inputs, program_run_4.region_of(db)
        assert i["storageEncrypted"] is True and i["kmsKeyId"] == keys[region], f"{db.name} key"
        assert i["masterUserSecretKmsKeyId"] == keys[region] and i["performanceInsightsKmsKeyId"] == keys[region]
        assert i["publiclyAccessible"] is False
        assert i["deletionProtection"] is True and i["skipFinalSnapshot"] is False and i["finalSnapshotIdentifier"]
        assert i["backupRetentionPeriod"] >= 7
        assert i["manageMasterUserPassword"] is True and "masterPassword" not in i
        assert i["performanceInsightsEnabled"] is True
        assert i["engine"] == "postgres" and i["dbClusterInstanceClass"], "a Multi-AZ DB cluster"
    for group in program_run_4.of_type("aws:rds/clusterParameterGroup:ClusterParameterGroup"):
        params = {p["name"]: p["value"] for p in group.inputs["parameters"]}
        assert params["rds.force_ssl"] == "1"


def test_database_accepts_postgres_only_from_region_service_tasks(program_run: Run) -> None:
    for sg in program_run.of_type("aws:ec2/securityGroup:SecurityGroup"):
        if not sg.name.endswith("-db-sg"):
            continue
        region = program_run.region_of(sg)
        assert sg.inputs.get("egress", []) == []
        (rule,) = sg.inputs["ingress"]
        assert (rule["fromPort"], rule["toPort"]) == (5432, 5432)
        assert rule["securityGroups"] == [f"{region}-region-sg_id"] and not rule.get("cidrBlocks")


def test_only_the_public_load_balancer_is_open_to_the_world_and_only_on_443(program_run_4: Run) -> None:
    open_groups = set()
    for sg in program_run_4.of_type("aws:ec2/securityGroup:SecurityGroup"):
        for rule in sg.inputs.get("ingress", []):
            if _world(rule):
                assert (rule["protocol"], rule["fromPort"], rule["toPort"]) == ("tcp", 443, 443), sg.name
                open_groups.add(f"{sg.name}_id")
    assert open_groups == {f"{r}-public-lb-sg_id" for r in _regions(program_run_4)}
    for lb in program_run_4.of_type("aws:lb/loadBalancer:LoadBalancer"):
        uses_open = bool(set(lb.inputs["securityGroups"]) & open_groups)
        assert uses_open == (lb.inputs["internal"] is False), lb.name
    for rule_type in ("aws:vpc/securityGroupIngressRule:SecurityGroupIngressRule",
                      "aws:ec2/securityGroupRule:SecurityGroupRule"):
        assert program_run_4.of_type(rule_type) == [], "rules are inline so each group reads as a whole"


def test_public_load_balancers_speak_https_only_with_a_certificate(program_run: Run) -> None:
    listeners = program_run.of_type("aws:lb/listener:Listener")
    public = {f"arn:aws:mock:{lb.name}" for lb in program_run.of_type("aws:lb/loadBalancer:LoadBalancer")
              if lb.inputs["internal"] is False}
    public_listeners = [li for li in listeners if li.inputs["loadBalancerArn"] in public]
    assert len(public_listeners) == 3
    for li in public_listeners:
        assert (li.inputs["protocol"], li.inputs["port"]) == ("HTTPS", 443)
        assert li.inputs["certificateArn"].startswith("arn:aws:mock:") and li.inputs["sslPolicy"].startswith(
            "ELBSecurityPolicy-TLS13")


def test_internal_load_balancers_listen_https_on_443_with_the_internal_certificate(program_run: Run) -> None:
    internal = {f"arn:aws:mock:{lb.name}": program_run.region_of(lb)
                for lb in program_run.of_type("aws:lb/loadBalancer:LoadBalancer") if lb.inputs["internal"] is True}
    listeners = [li for li in program_run.of_type("aws:lb/listener:Listener")
                 if li.inputs["loadBalancerArn"] in internal]
    assert sorted(internal[li.inputs["loadBalancerArn"]] for li in listeners) == _regions(program_run)
    certificates = {c.name: c for c in program_run.of_type("aws:acm/certificate:Certificate")}
    for li in listeners:
        assert (li.inputs["protocol"], li.inputs["port"]) == ("HTTPS", 443)
        assert li.inputs["sslPolicy"].startswith("ELBSecurityPolicy-TLS13")
        # The validated certificate of that region's internal API names.
        cert_name = li.inputs["certificateArn"].removeprefix("arn:aws:mock:")
        cert = certificates[cert_name]
        assert cert.inputs["domainName"] == "*.internal.api.txroute.example", cert.inputs
        assert cert.inputs["validationMethod"] == "DNS" and program_run.region_of(cert) == program_run.region_of(li)


def test_routers_and_relays_call_every_region_at_its_https_internal_name_with_the_system_trust_store(
    program_run: Run,
) -> None:
    import json

    regions = _regions(program_run)
    for td in _service_task_definitions(program_run):
        (container,) = json.loads(td.inputs["containerDefinitions"])
        env = {e["name"]: e["value"] for e in container["environment"]}
        assert json.loads(env["TXROUTE_REGION_URLS"]) == {
            r: f"https://{r}.internal.api.txroute.example" for r in regions}
        # Public ACM certificates: the image's trust store verifies them; no plaintext knob, ever.
        assert "TXROUTE_INTERNAL_PLAINTEXT" not in env and "TXROUTE_INTERNAL_CA_FILE" not in env


def test_internal_traffic_is_allowed_on_443_only_between_app_subnets(program_run: Run) -> None:
    groups = {g.name: g for g in program_run.of_type("aws:ec2/securityGroup:SecurityGroup")}
    for name, group in groups.items():
        if name.endswith("-internal-lb-sg"):
            assert [(r["fromPort"], r["toPort"]) for r in group.inputs["ingress"]] == [(443, 443)], name
            assert not any(_world(r) for r in group.inputs["ingress"]), name
        if name.endswith("-router-sg") or name.endswith("-region-sg"):
            mesh = [r for r in group.inputs["egress"] if "regional APIs" in r["description"]]
            assert [(r["fromPort"], r["toPort"]) for r in mesh] == [(443, 443)], name
            assert not any(_world(r) for r in mesh), name


def test_with_a_hosted_zone_each_internal_name_aliases_its_internal_load_balancer(program_run: Run) -> None:
    records = {r.inputs["name"]: r for r in program_run.of_type("aws:route53/record:Record")}
    internal = {program_run.region_of(lb): lb.name for lb in program_run.of_type(
        "aws:lb/loadBalancer:LoadBalancer") if lb.inputs["internal"] is True}
    for region in _regions(program_run):
        record = records[f"{region}.internal.api.txroute.example"]
        (alias,) = record.inputs["aliases"]
        assert internal[region] in alias["name"], (region, alias)
    assert len(program_run.of_type("aws:acm/certificateValidation:CertificateValidation")) == 2 * len(
        _regions(program_run))


def test_subnets_come_from_the_region_cidr_across_three_zones(program_run: Run) -> None:
    from txroute_infra.topology import load_topology

    cidrs = {r.name: ipaddress.IPv4Network(r.vpc_cidr) for r in load_topology().regions}
    for region, net in cidrs.items():
        subnets = [s for s in program_run.of_type("aws:ec2/subnet:Subnet") if program_run.region_of(s) == region]
        assert all(ipaddress.IPv4Network(s.inputs["cidrBlock"]).subnet_of(net) for s in subnets)
        for tier in ("public", "app", "data"):
            zones = {s.inputs["availabilityZone"] for s in subnets if s.inputs["tags"]["tier"] == tier}
            assert zones == {"za", "zb", "zc"}, f"{region} {tier}: {zones}"
        assert not any(s.inputs["mapPublicIpOnLaunch"] for s in subnets)


def test_services_run_private_with_liveness_health_checks_and_their_regions_image(program_run: Run) -> None:
    import json

    failover_s = 35  # a Multi-AZ DB cluster failover, typically under 35 s
    for svc in program_run.of_type("aws:ecs/service:Service"):
        net = svc.inputs["networkConfiguration"]
        assert net["assignPublicIp"] is False and svc.inputs["deploymentCircuitBreaker"]["rollback"] is True
    for tg in program_run.of_type("aws:lb/targetGroup:TargetGroup"):
        hc = tg.inputs["healthCheck"]
        assert hc["path"] == "/healthz" and hc["interval"] == 10 and hc["timeout"] == 5
        assert hc["interval"] * hc["unhealthyThreshold"] > failover_s, "a failover must not empty the target group"
    for td in _service_task_definitions(program_run):
        region = program_run.region_of(td)
        (container,) = json.loads(td.inputs["containerDefinitions"])
        assert container["image"] == "123456789012.dkr.ecr.mock/txroute-test:abc123"
        check = container["healthCheck"]
        assert "/healthz" in " ".join(check["command"]) and "/readyz" not in " ".join(check["command"])
        assert check["interval"] * check["retries"] > failover_s, "a failover must not make ECS replace tasks"
        assert container["logConfiguration"]["options"]["awslogs-region"] == region
        assert not any("PASSWORD" in e["name"] or "KEY" in e["name"] for e in container["environment"]), \
            "secrets come from Secrets Manager, never plain environment"


def test_region_services_can_reach_and_sign_for_every_region_for_sagas(program_run: Run) -> None:
    import json

    task_definitions = _service_task_definitions(program_run)
    regions = {program_run.region_of(td) for td in task_definitions}
    services = 0
    for td in task_definitions:
        (container,) = json.loads(td.inputs["containerDefinitions"])
        env = {e["name"]: e["value"] for e in container["environment"]}
        secrets = {s["name"] for s in container["secrets"]}
        assert "TXROUTE_REGION_URLS" in env, "both services call other regions (router: forwarding; region: sagas)"
        if "TXROUTE_DATABASE_URL" in env:  # the regional service
            services += 1
            urls = json.loads(env["TXROUTE_REGION_URLS"])
            assert set(urls) == regions, f"expected every region's internal URL, got {sorted(urls)}"
            assert "TXROUTE_SAGA_PRIVATE_KEY" in secrets, "the saga relay signs its calls to other regions"
    assert services == len(regions), "expected one regional service per region"


def test_routers_receive_no_saga_key_and_regions_no_hop_private_key(program_run: Run) -> None:
    """DESIGN D8: the internet-facing router can sign hop tokens only; the saga key pair is the regions'."""
    import json

    from txroute_infra.components.compute import REGION_SECRET_KEYS, ROUTER_SECRET_KEYS

    routers = regions = 0
    for td in _service_task_definitions(program_run):
        (container,) = json.loads(td.inputs["containerDefinitions"])
        names = {e["name"] for e in container["environment"]} | {s["name"] for s in container["secrets"]}
        sources = " ".join(s["valueFrom"] for s in container["secrets"])
        if container["name"] == "router":
            routers += 1
            assert not any("SAGA" in n for n in names), f"a router task receives a saga key: {sorted(names)}"
            assert "saga" not in sources and "region-secret" not in sources, sources
            assert {"TXROUTE_HOP_PRIVATE_KEY", "TXROUTE_CLIENT_ISSUERS"} <= names
        else:
            regions += 1
            # The client issuers too: a region serves the client token the router forwards, not its hop token.
            assert {"TXROUTE_HOP_PUBLIC_KEY", "TXROUTE_SAGA_PUBLIC_KEY", "TXROUTE_SAGA_PRIVATE_KEY",
                    "TXROUTE_CLIENT_ISSUERS"} <= names
            assert "TXROUTE_HOP_PRIVATE_KEY" not in names, "a region must not be able to sign hop tokens"
            assert "router-secret" not in sources, sources
    assert routers == regions == len(_regions(program_run)), (routers, regions)
    assert not any("saga" in k for k in ROUTER_SECRET_KEYS), "the router secret documents no saga key"
    assert not any("hop_private" in k for k in REGION_SECRET_KEYS)
    for secret in program_run.of_type("aws:secretsmanager/secret:Secret"):
        if secret.inputs["name"].endswith("/router"):
            assert "saga" not in secret.inputs["description"], secret.inputs["description"]


def test_public_load_balancers_never_forward_metrics_or_internal_routes(program_run: Run) -> None:
    rules = program_run.of_type("aws:lb/listenerRule:ListenerRule")
    listeners = program_run.of_type("aws:lb/listener:Listener")
    public = {f"arn:aws:mock:{lb.name}" for lb in program_run.of_type("aws:lb/loadBalancer:LoadBalancer")
              if lb.inputs["internal"] is False}
    public_listeners = {f"arn:aws:mock:{li.name}" for li in listeners if li.inputs["loadBalancerArn"] in public}
    assert rules and len(rules) == len(public_listeners), "expected one private-paths rule per public listener"
    assert {rule.inputs["listenerArn"] for rule in rules} == public_listeners
    for rule in rules:
        (condition,) = rule.inputs["conditions"]
        assert set(condition["pathPattern"]["values"]) >= {"/metrics", "/internal/*"}, condition
        (action,) = rule.inputs["actions"]
        assert action["type"] == "fixed-response" and action["fixedResponse"]["statusCode"] == "404", action


def test_task_roles_read_only_their_own_secrets(program_run: Run) -> None:
    import json

    policies = {p.name: json.loads(p.inputs["policy"]) for p in program_run.of_type("aws:iam/rolePolicy:RolePolicy")}
    for region in _regions(program_run):
        db_secret = f"arn:aws:mock:{region}-db-service-secret"  # the service role's, never the master's
        region_stmt = policies[f"{region}-region-service-task-secrets"]["Statement"][0]
        router_stmt = policies[f"{region}-router-task-secrets"]["Statement"][0]
        assert sorted(region_stmt["Resource"]) == sorted([db_secret, f"arn:aws:mock:{region}-region-secret"])
        assert router_stmt["Resource"] == [f"arn:aws:mock:{region}-router-secret"]
        assert region_stmt["Action"] == router_stmt["Action"] == "secretsmanager:GetSecretValue"


def test_every_alarm_names_a_runbook_that_exists_and_notifies_its_regions_topic(program_run_4: Run) -> None:
    topics = {program_run_4.region_of(t): f"arn:aws:mock:{t.name}"
              for t in program_run_4.of_type("aws:sns/topic:Topic")}
    seen_runbooks = set()
    for alarm in program_run_4.of_type("aws:cloudwatch/metricAlarm:MetricAlarm"):
        match = re.search(r"Runbook: (runbooks/[a-z0-9-]+\.md)$", alarm.inputs["alarmDescription"])
        assert match, f"{alarm.name}: description must end with its runbook"
        assert (REPO / match.group(1)).is_file(), f"{alarm.name}: {match.group(1)} does not exist"
        seen_runbooks.add(match.group(1))
        assert alarm.inputs["alarmActions"] == [topics[program_run_4.region_of(alarm)]]
        assert alarm.inputs["evaluationPeriods"] >= alarm.inputs["datapointsToAlarm"] >= 1
    from txroute_infra import layout

    assert seen_runbooks == set(layout.RUNBOOKS), "expected every runbook in layout.RUNBOOKS used by an alarm"
    kinds = {a.name.split("-", 3)[-1] for a in program_run_4.of_type("aws:cloudwatch/metricAlarm:MetricAlarm")}
    for needed in ("5xx-ratio", "p99-latency", "db-cpu", "db-free-storage", "db-connections",
                   "db-replica-lag", "saga-outbox-age", "reconciliation-mismatch", "idempotency-conflict-ratio",
                   "tenant-throttled", "webhook-endpoint-disabled"):
        assert any(k.endswith(needed) for k in kinds), f"no {needed} alarm in {kinds}"


def test_logs_expire_and_are_encrypted(program_run: Run) -> None:
    groups = program_run.of_type("aws:cloudwatch/logGroup:LogGroup")
    assert len(groups) == 9
    for g in groups:
        assert g.inputs["retentionInDays"] == 365 and g.inputs["kmsKeyId"].startswith("arn:aws:mock:")


def test_no_output_or_input_carries_a_password(program_run: Run) -> None:
    for r in program_run.resources:
        assert "masterPassword" not in r.inputs and "password" not in {k.lower() for k in r.inputs}, r.name


def test_a_stack_without_a_hosted_zone_is_refused_before_anything_is_created() -> None:
    from txroute_infra.config import ConfigError, InfraConfig

    with pytest.raises(ConfigError, match="txroute:hostedZoneId"):
        InfraConfig(environment="test", api_domain="api.txroute.example", image_tag="abc", hosted_zone_id="")


def test_every_certificate_validation_waits_only_for_the_record_this_stack_creates(program_run: Run) -> None:
    records = {r.name: r for r in program_run.of_type("aws:route53/record:Record")}
    validations = program_run.of_type("aws:acm/certificateValidation:CertificateValidation")
    assert len(validations) == 2 * len(_regions(program_run)), "the public and the internal certificate"
    for v in validations:
        record = records["global-internal-cert-validation" if v.name.endswith("-internal-cert-validation")
                         else "global-cert-validation"]
        assert v.inputs["validationRecordFqdns"] == [record.inputs["name"]], v.name
        deps = program_run.property_dependencies[program_run.urn_of(v)]["validationRecordFqdns"]
        assert program_run.urn_of(record) in deps, f"{v.name}: the validation must wait for the record's creation"


def test_a_certificate_asking_for_another_validation_record_fails_the_update() -> None:
    import pulumi
    from txroute_infra.components.global_entry import CertificateDns

    dns = object.__new__(CertificateDns)
    dns.record = type("R", (), {"fqdn": pulumi.Output.from_input("_a.api.txroute.example")})()
    dns._name = pulumi.Output.from_input("_a.api.txroute.example.")
    other = type("C", (), {"domain_validation_options": pulumi.Output.from_input(
        [type("O", (), {"resource_record_name": "_b.api.txroute.example."})()])})()
    with pytest.raises(ValueError, match="not the shared"):
        pulumi.runtime.sync_await._sync_await(dns.fqdn_for(other).future())  # type: ignore[arg-type]


def test_without_an_alarm_email_or_nat_per_az_there_is_no_subscription_and_one_nat(run_with: Any) -> None:
    run = run_with(None, alarm_email="", nat_gateway_per_az=False)
    assert run.of_type("aws:sns/topicSubscription:TopicSubscription") == []
    assert Counter(run.region_of(n) for n in run.of_type("aws:ec2/natGateway:NatGateway")) == dict.fromkeys(
        _regions(run), 1)


def test_program_resources_satisfy_every_resource_policy(program_run_4: Run) -> None:
    from types import SimpleNamespace

    import txroute_policies as policies

    violations: list[str] = []
    names = {f"{r.name}_id": r.name for r in program_run_4.of_type("pulumi:providers:aws")}
    for r in program_run_4.resources:
        provider = SimpleNamespace(name=names.get(r.provider.rsplit("::", 1)[-1], "")) if r.provider else None
        opts = SimpleNamespace(ignore_changes=program_run_4.ignore_changes.get(program_run_4.urn_of(r), []))
        args = SimpleNamespace(resource_type=r.type, props=r.inputs, name=r.name, provider=provider, opts=opts)
        for rule, (_, validate) in policies.RESOURCE_RULES.items():
            if not r.custom or r.type.startswith("pulumi:"):
                continue
            validate(args, lambda message, *_, rule=rule, r=r: violations.append(f"{rule}: {r.name}: {message}"))
    assert violations == []


def _resource(run: Run, name: str) -> Recorded:
    return run.named(name)


def test_program_resources_satisfy_every_stack_policy(program_run_4: Run) -> None:
    from types import SimpleNamespace

    import txroute_policies as policies

    run = program_run_4
    by_urn = {run.urn_of(r): SimpleNamespace(resource_type=r.type, name=r.name, urn=run.urn_of(r), props=r.inputs)
              for r in run.resources if r.custom}
    for urn, resource in by_urn.items():
        resource.property_dependencies = {
            key: [by_urn[d] for d in deps if d in by_urn] for key, deps in run.property_dependencies[urn].items()}
    violations: list[str] = []
    for rule, (_, validate) in policies.STACK_RULES.items():
        validate(SimpleNamespace(resources=list(by_urn.values())),
                 lambda message, *_, rule=rule: violations.append(f"{rule}: {message}"))
    assert violations == []


def test_subnets_use_only_the_regions_own_availability_zones(program_run: Run) -> None:
    lookups = [args for token, args in program_run.call_args if token.endswith("getAvailabilityZones")]
    assert len(lookups) == len(_regions(program_run))
    for args in lookups:
        assert {"name": "opt-in-status", "values": ["opt-in-not-required"]} in args["filters"], \
            "Local Zones and Wavelength Zones the account opted into must not get subnets"


def test_databases_are_orderable_multi_az_db_clusters_that_tolerate_minor_upgrades(program_run: Run) -> None:
    from app.topology.loader import MULTI_AZ_DB_CLUSTER_CLASS_FAMILIES

    for db in program_run.of_type("aws:rds/cluster:Cluster"):
        i = db.inputs
        assert i["dbClusterInstanceClass"].split(".")[1] in MULTI_AZ_DB_CLUSTER_CLASS_FAMILIES
        assert i["storageType"] == "gp3" and i["allocatedStorage"] >= 400 and i["iops"] == 12_000, i
        assert i["autoMinorVersionUpgrade"] is True
        assert "engineVersion" in program_run.ignore_changes[program_run.urn_of(db)], \
            "after an automatic minor upgrade the pinned version must not ask RDS for a downgrade"
    for group in program_run.of_type("aws:rds/clusterParameterGroup:ClusterParameterGroup"):
        names = {p["name"] for p in group.inputs["parameters"]}
        assert not names & {"log_min_duration_statement", "log_statement", "log_min_duration_sample"}, \
            "statement logging would carry bind values (account data) into CloudWatch"


def test_database_alarms_are_metric_math_over_the_member_instances(program_run: Run) -> None:
    clusters = {program_run.region_of(c): c.inputs["clusterIdentifier"]
                for c in program_run.of_type("aws:rds/cluster:Cluster")}
    db_alarms = [a for a in program_run.of_type("aws:cloudwatch/metricAlarm:MetricAlarm") if "-db-" in a.name]
    assert len(db_alarms) == 4 * len(clusters)
    for alarm in db_alarms:
        queries = alarm.inputs["metricQueries"]
        members = sorted(q["metric"]["dimensions"]["DBInstanceIdentifier"] for q in queries if "metric" in q)
        identifier = clusters[program_run.region_of(alarm)]
        assert members == [f"{identifier}-instance-{i}" for i in (1, 2, 3)], members
        (result,) = [q for q in queries if q["returnData"]]
        assert re.fullmatch(r"(MAX|MIN)\(\[m0, m1, m2\]\)", result["expression"]), result
        assert alarm.inputs["treatMissingData"] in ("notBreaching", "breaching"), "missing data is decided"
    lag = [a for a in db_alarms if a.name.endswith("db-replica-lag")]
    assert all(a.inputs["treatMissingData"] == "breaching" for a in lag), "a silent cluster pages"


def test_each_region_reaches_s3_through_a_gateway_endpoint_on_its_private_routes(program_run: Run) -> None:
    for endpoint in program_run.of_type("aws:ec2/vpcEndpoint:VpcEndpoint"):
        region = program_run.region_of(endpoint)
        assert endpoint.inputs["serviceName"] == f"com.amazonaws.{region}.s3"
        assert endpoint.inputs["vpcEndpointType"] == "Gateway"
        assert sorted(endpoint.inputs["routeTableIds"]) == [f"{region}-private-rt-{i}_id" for i in range(3)]


def test_interface_endpoints_are_added_when_configured_and_open_only_to_app_subnets(run_with: Any) -> None:
    run = run_with(None, interface_endpoints=("ecr", "logs", "secretsmanager"))
    for region in _regions(run):
        interface = [e for e in run.of_type("aws:ec2/vpcEndpoint:VpcEndpoint")
                     if run.region_of(e) == region and e.inputs["vpcEndpointType"] == "Interface"]
        assert sorted(e.inputs["serviceName"].removeprefix(f"com.amazonaws.{region}.") for e in interface) == [
            "ecr.api", "ecr.dkr", "logs", "secretsmanager"]
        assert all(e.inputs["privateDnsEnabled"] is True for e in interface)
        (sg,) = [g for g in run.of_type("aws:ec2/securityGroup:SecurityGroup") if g.name == f"{region}-endpoints-sg"]
        (rule,) = sg.inputs["ingress"]
        assert (rule["fromPort"], rule["toPort"]) == (443, 443) and all(
            c.startswith("10.") for c in rule["cidrBlocks"]) and sg.inputs.get("egress", []) == []


def test_the_public_404_is_a_fixed_response_elb_accepts(program_run: Run) -> None:
    from txroute_infra import layout

    for rule in program_run.of_type("aws:lb/listenerRule:ListenerRule"):
        (action,) = rule.inputs["actions"]
        assert action["fixedResponse"]["contentType"] in layout.FIXED_RESPONSE_CONTENT_TYPES


def test_services_log_in_as_the_service_role_over_verified_tls_and_only_the_migrate_task_reads_the_master_secret(
    program_run: Run,
) -> None:
    import json

    policies = {p.name: json.loads(p.inputs["policy"]) for p in program_run.of_type("aws:iam/rolePolicy:RolePolicy")}
    for region in _regions(program_run):
        master = f"arn:aws:secretsmanager:mock:secret:rds!{region}-db"
        service_secret = f"arn:aws:mock:{region}-db-service-secret"
        readers = sorted(name for name, doc in policies.items()
                         if any(master in json.dumps(s.get("Resource")) for s in doc["Statement"]))
        assert readers == [f"{region}-migrate-task-secrets"], f"expected only the migrate task to read {master}"
        (migrate,) = [td for td in program_run.of_type("aws:ecs/taskDefinition:TaskDefinition")
                      if td.inputs["family"].endswith("-migrate") and program_run.region_of(td) == region]
        (container,) = json.loads(migrate.inputs["containerDefinitions"])
        env = {e["name"]: e["value"] for e in container["environment"]}
        assert container["command"] == ["python", "-m", "app.store.provision"]
        assert env["TXROUTE_DATABASE_SECRET_ID"] == master
        assert env["TXROUTE_SERVICE_DATABASE_SECRET_ID"] == service_secret
        assert env["TXROUTE_SERVICE_DATABASE_USER"] == "txroute_service"
    for td in _service_task_definitions(program_run):
        (container,) = json.loads(td.inputs["containerDefinitions"])
        env = {e["name"]: e["value"] for e in container["environment"]}
        secrets = {s["name"]: s["valueFrom"] for s in container["secrets"]}
        assert not any("rds!" in v for v in [*env.values(), *secrets.values()]), "no service gets the master secret"
        if "TXROUTE_DATABASE_URL" in env:  # the regional service
            assert env["TXROUTE_DATABASE_URL"].startswith("postgresql://txroute_service@")
            assert env["TXROUTE_DATABASE_SECRET_ID"] == f"arn:aws:mock:{program_run.region_of(td)}-db-service-secret"
            assert env["TXROUTE_DATABASE_SSLMODE"] == "verify-full"


def test_no_deployed_region_relaxes_the_webhook_url_rules_or_the_retry_schedule(program_run: Run) -> None:
    import json

    for td in _service_task_definitions(program_run):
        (container,) = json.loads(td.inputs["containerDefinitions"])
        env = {e["name"] for e in container["environment"]}
        # Loopback and http receivers are for the local stack; a short schedule is for tests (issue 13).
        assert not env & {"TXROUTE_WEBHOOK_ALLOW_LOOPBACK", "TXROUTE_WEBHOOK_RETRY_SCHEDULE_S"}, td.name
