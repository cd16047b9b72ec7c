"""Runs the Pulumi program in-process under mocks (no CLI, no cloud) and records every resource.

`infra/` and the policy pack are put on `sys.path` here so the tests import them from any working folder.
Each scenario (the real `regions/`, and a temp copy with a fourth region) runs once per session.
"""

from __future__ import annotations

import importlib
import shutil
import sys
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

REPO = Path(__file__).resolve().parents[2]
for extra in (REPO / "infra", REPO / "infra" / "policy"):
    if str(extra) not in sys.path:
        sys.path.insert(0, str(extra))

# The pulumi_aws submodules the program uses, loaded once here: some emit DeprecationWarnings about
# resources we never use when first imported; keep them out of the run even under `-W error`.
with warnings.catch_warnings():
    warnings.simplefilter("ignore", DeprecationWarning)
    for _module in ("acm", "cloudwatch", "ec2", "ecr", "ecs", "globalaccelerator", "iam", "kms", "lb", "rds",
                    "route53", "secretsmanager", "sns"):
        hasattr(importlib.import_module(f"pulumi_aws.{_module}"), "_loaded")  # any attribute runs the load

FOURTH_REGION = """\
name = "ap-southeast-2"
vpc_cidr = "10.40.0.0/16"

[capacity]
db_instance_class = "db.r6gd.large"
db_allocated_storage_gb = 400
db_max_connections = 400
region_service_tasks = 2
router_tasks = 2
task_cpu = 1024
task_memory_mib = 2048

[[shards]]
name = "apse2-a"
slots = ["3414-4095"]
"""


@dataclass
class Recorded:
    type: str
    name: str
    inputs: dict[str, Any]
    provider: str  # "urn::id" of the provider resource, "" when none
    custom: bool


@dataclass
class Run:
    """What a program run registered: resources in order, and each provider's id -> region."""

    resources: list[Recorded] = field(default_factory=list)
    calls: list[str] = field(default_factory=list)
    call_args: list[tuple[str, dict[str, Any]]] = field(default_factory=list)
    urns: list[str] = field(default_factory=list)
    # Per URN, as the engine would see them: parent URN, every URN it depends on (explicitly or through a
    # property), the URNs each input property depends on, and its ignore_changes.
    parents: dict[str, str] = field(default_factory=dict)
    dependencies: dict[str, set[str]] = field(default_factory=dict)
    property_dependencies: dict[str, dict[str, set[str]]] = field(default_factory=dict)
    ignore_changes: dict[str, list[str]] = field(default_factory=dict)

    def of_type(self, type_: str) -> list[Recorded]:
        return [r for r in self.resources if r.type == type_]

    def named(self, name: str) -> Recorded:
        (match,) = [r for r in self.resources if r.name == name]
        return match

    @property
    def provider_regions(self) -> dict[str, str]:
        """Provider id -> the region it was configured with."""
        return {f"{r.name}_id": r.inputs["region"] for r in self.resources if r.type == "pulumi:providers:aws"}

    def urn_of(self, resource: Recorded) -> str:
        (urn,) = [u for u in self.urns if u.endswith(f"::{resource.name}")
                  and u.split("::")[2].split("$")[-1] == resource.type]
        return urn

    def region_of(self, resource: Recorded) -> str | None:
        """The region of the provider a resource was created with (None: no explicit provider)."""
        provider_id = resource.provider.rsplit("::", 1)[-1] if resource.provider else ""
        return self.provider_regions.get(provider_id)


def _outputs(args: Any) -> dict[str, Any]:
    """Fake the outputs the program reads from a resource (ids, ARNs, DNS names)."""
    name, t = args.name, args.typ
    arn = f"arn:aws:mock:{name}"
    out: dict[str, Any] = {"arn": arn, "id": f"{name}_id"}
    if t == "aws:rds/cluster:Cluster":
        identifier = args.inputs.get("clusterIdentifier", name)
        out |= {"endpoint": f"{name}.cluster.mock",
                "clusterMembers": [f"{identifier}-instance-{i}" for i in (3, 1, 2)], "masterUserSecrets": [
            {"secretArn": f"arn:aws:secretsmanager:mock:secret:rds!{name}", "secretStatus": "active",
             "kmsKeyId": "k"}]}
    elif t == "aws:lb/loadBalancer:LoadBalancer":
        out |= {"arnSuffix": f"app/{name}/1", "dnsName": f"{name}.elb.mock", "zoneId": "ZLB"}
    elif t == "aws:lb/targetGroup:TargetGroup":
        out |= {"arnSuffix": f"targetgroup/{name}/1"}
    elif t == "aws:ecr/repository:Repository":
        out |= {"repositoryUrl": f"123456789012.dkr.ecr.mock/{args.inputs.get('name', name)}"}
    elif t == "aws:acm/certificate:Certificate":
        out |= {"domainValidationOptions": [{
            "domainName": args.inputs["domainName"], "resourceRecordName": "_x." + args.inputs["domainName"],
            "resourceRecordType": "CNAME", "resourceRecordValue": "_y.acm-validations.aws"}]}
    elif t == "aws:acm/certificateValidation:CertificateValidation":
        out |= {"certificateArn": args.inputs["certificateArn"]}
    elif t == "aws:globalaccelerator/accelerator:Accelerator":
        out |= {"dnsName": "a1.awsglobalaccelerator.com", "ipSets": [{"ipAddresses": ["1.2.3.4"]}]}
    elif t == "aws:route53/record:Record":
        out |= {"fqdn": args.inputs["name"]}
    elif t == "aws:kms/key:Key":
        out |= {"keyId": f"{name}-key-id"}
    return {**args.inputs, **out}


def run_program(regions_dir: Path | None, **config_overrides: Any) -> Run:
    import pulumi

    run = Run()

    class Mocks(pulumi.runtime.Mocks):
        def new_resource(self, args: pulumi.runtime.MockResourceArgs) -> tuple[str, dict[str, Any]]:
            inputs = dict(args.inputs)
            run.resources.append(Recorded(args.typ, args.name, inputs, args.provider or "",
                                          bool(args.custom)))
            return f"{args.name}_id", _outputs(args)

        def call(self, args: pulumi.runtime.MockCallArgs) -> tuple[dict[str, Any], list[tuple[str, str]]]:
            run.calls.append(args.token)
            run.call_args.append((args.token, dict(args.args)))
            if args.token == "aws:index/getAvailabilityZones:getAvailabilityZones":
                return {"names": ["za", "zb", "zc", "zd"], "zoneIds": ["z1", "z2", "z3", "z4"]}, []
            if args.token == "aws:index/getCallerIdentity:getCallerIdentity":
                return {"accountId": "123456789012", "arn": "arn:aws:iam::123456789012:user/t",
                        "userId": "t", "id": "123456789012"}, []
            raise AssertionError(f"unexpected invoke {args.token}")

    class EngineUrns(pulumi.runtime.mocks.MockMonitor):
        """URNs as the engine makes them: the full chain of parent types (the stock mock keeps only the
        nearest parent's), without the root stack's type."""

        def make_urn(self, parent: str, type_: str, name: str) -> str:
            if parent and "::pulumi:pulumi:Stack::" not in parent:
                type_ = parent.split("::")[2] + "$" + type_
            return "urn:pulumi:" + "::".join([pulumi.get_stack(), pulumi.get_project(), type_, name])

        def RegisterResource(self, request: Any) -> Any:
            urn = self.make_urn(request.parent, request.type, request.name)
            run.parents[urn] = request.parent
            by_property = {key: set(deps.urns) for key, deps in request.propertyDependencies.items()}
            run.property_dependencies[urn] = by_property
            run.dependencies[urn] = set(request.dependencies).union(*by_property.values())
            run.ignore_changes[urn] = list(request.ignoreChanges)
            return super().RegisterResource(request)

    mocks = Mocks()
    monitor = EngineUrns(mocks)
    pulumi.runtime.set_mocks(mocks, project="txroute", stack="test", preview=False, monitor=monitor)
    from txroute_infra.config import InfraConfig
    from txroute_infra.program import deploy
    from txroute_infra.topology import load_topology

    settings: dict[str, Any] = {"environment": "test", "api_domain": "api.txroute.example",
                                "image_tag": "abc123", "hosted_zone_id": "Z0123456789ABC",
                                "alarm_email": "oncall@txroute.example"}
    settings |= config_overrides
    topology = load_topology(regions_dir)

    @pulumi.runtime.test
    def program() -> None:
        deploy(topology, InfraConfig(**settings))

    program()
    run.urns = list(monitor.resources)
    return run


@pytest.fixture(scope="session")
def four_regions_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The three real region files plus a fourth that takes us-east-1's second shard's slots."""
    folder = tmp_path_factory.mktemp("regions4")
    for path in sorted((REPO / "regions").glob("*.toml")):
        shutil.copy(path, folder / path.name)
    use1 = folder / "us-east-1.toml"
    text = use1.read_text()
    cut = text.index('[[shards]]\nname = "use1-b"')
    use1.write_text(text[:cut].rstrip() + "\n")
    (folder / "ap-southeast-2.toml").write_text(FOURTH_REGION)
    return folder


@pytest.fixture(scope="session")
def empty_region_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The three real region files plus a fourth whose shards own no slots yet (a region being added)."""
    folder = tmp_path_factory.mktemp("regions-empty")
    for path in sorted((REPO / "regions").glob("*.toml")):
        shutil.copy(path, folder / path.name)
    text = FOURTH_REGION.replace('slots = ["3414-4095"]', "slots = []")
    (folder / "ap-southeast-2.toml").write_text(text + '\n[[shards]]\nname = "apse2-b"\nslots = []\n')
    return folder


@pytest.fixture(scope="session")
def program_run_empty(empty_region_dir: Path) -> Run:
    return run_program(empty_region_dir)


@pytest.fixture(scope="session")
def program_run() -> Run:
    return run_program(None)


@pytest.fixture(scope="session")
def program_run_4(four_regions_dir: Path) -> Run:
    return run_program(four_regions_dir)


@pytest.fixture(scope="session")
def run_with() -> Callable[..., Run]:
    return run_program
