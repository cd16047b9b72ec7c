"""Adding a region (issue 11, item 4): a fourth region file whose shards own no slots yet yields a full cell and
its Global Accelerator endpoint group, every other region learns its internal URL, and the arguments of its
resources are within AWS's own limits (not only what the mocks accept)."""

from __future__ import annotations

import json
import re
from pathlib import Path
from types import SimpleNamespace

from tests.infra.conftest import Run
from tests.infra.test_program import PER_REGION, _by_region, _regions, _service_task_definitions

NEW = "ap-southeast-2"


def test_a_region_file_with_no_slots_yields_a_full_cell(program_run_empty: Run, empty_region_dir: Path) -> None:
    from txroute_infra.topology import load_topology

    topology = load_topology(empty_region_dir)
    assert not topology.region(NEW).owns_slots, "expected the fourth region to own no slots"
    assert _regions(program_run_empty) == sorted(r.name for r in topology.regions)
    for type_, per_region in PER_REGION.items():
        assert _by_region(program_run_empty, type_)[NEW] == per_region, f"{type_}: want {per_region} in {NEW}"
    (db,) = [c for c in program_run_empty.of_type("aws:rds/cluster:Cluster") if program_run_empty.region_of(c) == NEW]
    assert db.inputs["tags"]["shards"] == "apse2-a apse2-b", "expected one cluster holding both (empty) shards"


def test_its_endpoint_group_sends_to_its_router_load_balancer_within_global_accelerator_limits(
    program_run_empty: Run,
) -> None:
    (group,) = [g for g in program_run_empty.of_type("aws:globalaccelerator/endpointGroup:EndpointGroup")
                if g.inputs["endpointGroupRegion"] == NEW]
    (public_lb,) = [lb for lb in program_run_empty.of_type("aws:lb/loadBalancer:LoadBalancer")
                    if program_run_empty.region_of(lb) == NEW and lb.inputs["internal"] is False]
    i = group.inputs
    assert i["listenerArn"] == "arn:aws:mock:global-https", "expected the one accelerator's listener"
    # Global Accelerator: traffic dial 0..100 percent; endpoint weight 0..255; an ALB endpoint by its ARN.
    assert 0 <= i.get("trafficDialPercentage", 100) <= 100
    (endpoint,) = i["endpointConfigurations"]
    assert endpoint["endpointId"] == f"arn:aws:mock:{public_lb.name}"
    assert 0 <= endpoint.get("weight", 128) <= 255
    assert program_run_empty.region_of(group) == "us-west-2", "Global Accelerator is managed from us-west-2"


def test_every_region_and_router_learns_the_new_regions_internal_url(program_run_empty: Run) -> None:
    for td in _service_task_definitions(program_run_empty):
        (container,) = json.loads(td.inputs["containerDefinitions"])
        env = {e["name"]: e["value"] for e in container["environment"]}
        assert json.loads(env["TXROUTE_REGION_URLS"])[NEW] == f"https://{NEW}.internal.api.txroute.example", (
            f"{td.name}: expected the new region's internal URL")


def test_the_new_cells_names_are_within_aws_limits(program_run_empty: Run) -> None:
    run = program_run_empty
    mine = [r for r in run.resources if r.custom and run.region_of(r) == NEW]
    for db in (r for r in mine if r.type == "aws:rds/cluster:Cluster"):
        # RDS: 1..63 characters, a letter first, letters, digits and hyphens, no '--', no trailing hyphen.
        identifier = db.inputs["clusterIdentifier"]
        assert re.fullmatch(r"[a-z][a-z0-9-]{0,62}", identifier) and "--" not in identifier
        assert not identifier.endswith("-")
    for alarm in (r for r in mine if r.type == "aws:cloudwatch/metricAlarm:MetricAlarm"):
        assert 1 <= len(alarm.inputs["name"]) <= 255 and len(alarm.inputs["alarmDescription"]) <= 1024
    for topic in (r for r in mine if r.type == "aws:sns/topic:Topic"):
        assert re.fullmatch(r"[A-Za-z0-9_-]{1,256}", topic.inputs["name"])
    for secret in (r for r in mine if r.type == "aws:secretsmanager/secret:Secret"):
        assert re.fullmatch(r"[A-Za-z0-9/_+=.@-]{1,512}", secret.inputs["name"])
    for group in (r for r in mine if r.type == "aws:cloudwatch/logGroup:LogGroup"):
        assert re.fullmatch(r"[._/#A-Za-z0-9-]{1,512}", group.inputs["name"])
    for service in (r for r in mine if r.type == "aws:ecs/service:Service"):
        assert re.fullmatch(r"[A-Za-z0-9_-]{1,255}", service.inputs["name"])


def test_the_new_cell_satisfies_every_resource_policy(program_run_empty: Run) -> None:
    import txroute_policies as policies

    run = program_run_empty
    violations: list[str] = []
    names = {f"{r.name}_id": r.name for r in run.of_type("pulumi:providers:aws")}
    for r in run.resources:
        if not r.custom or r.type.startswith("pulumi:") or not r.name.startswith(NEW):
            continue
        provider = SimpleNamespace(name=names.get(r.provider.rsplit("::", 1)[-1], "")) if r.provider else None
        opts = SimpleNamespace(ignore_changes=run.ignore_changes.get(run.urn_of(r), []))
        args = SimpleNamespace(resource_type=r.type, props=r.inputs, name=r.name, provider=provider, opts=opts)
        for rule, (_, validate) in policies.RESOURCE_RULES.items():
            validate(args, lambda message, *_, rule=rule, r=r: violations.append(f"{rule}: {r.name}: {message}"))
    assert violations == []
