"""A region's VPC: three availability zones, public / app / data subnets, NAT, and one security group per
tier that admits only what that tier needs:

    internet --443--> public LB --8000--> router tasks --8080--> internal LB (this or a peer region)
    internal LB --8000--> region tasks --5432--> database

Only the public load balancer's group is open to the world, and only on 443. Rules are inline so each
group reads as a whole (and the policy pack can judge it as one).
"""

from __future__ import annotations

from collections.abc import Sequence

import pulumi
import pulumi_aws.ec2 as ec2
from pulumi_aws import get_availability_zones_output

from txroute_infra import layout
from txroute_infra.components.base import RegionalComponent, tags

WORLD = "0.0.0.0/0"
# `get_availability_zones` also returns Local Zones and Wavelength Zones the account opted into; the subnet
# plan wants the region's own AZs only (EC2 API Reference, DescribeAvailabilityZones: opt-in-status filter).
REGION_AZ_FILTER = {"name": "opt-in-status", "values": ["opt-in-not-required"]}
# Interface endpoints by config name (`txroute:interfaceEndpoints`): the AWS services each one covers. ECR
# needs both its API and its registry (Docker) endpoint; image layers themselves come from S3, which the
# free gateway endpoint carries in every region. Whether each pays for itself is in infra/README.md.
INTERFACE_ENDPOINT_SERVICES = {"ecr": ("ecr.api", "ecr.dkr"), "logs": ("logs",),
                               "secretsmanager": ("secretsmanager",)}


class Network(RegionalComponent):
    def __init__(self, region: str, vpc_cidr: str, *, peer_cidrs: Sequence[str], nat_per_az: bool,
                 environment: str, provider: pulumi.ProviderResource,
                 interface_endpoints: Sequence[str] = (), opts: pulumi.ResourceOptions | None = None) -> None:
        super().__init__("txroute:cell:Network", region, provider, opts)
        plan = layout.subnet_plan(vpc_cidr)
        self.plan = plan
        t = tags(environment, region)
        azs = get_availability_zones_output(state="available", filters=[REGION_AZ_FILTER],
                                            opts=self.invoke_opts())
        self.vpc = ec2.Vpc(self.name("vpc"), cidr_block=vpc_cidr, enable_dns_support=True,
                           enable_dns_hostnames=True, tags={**t, "Name": f"txroute-{environment}"},
                           opts=self.child())
        igw = ec2.InternetGateway(self.name("igw"), vpc_id=self.vpc.id, tags=t, opts=self.child())

        def subnets(tier: str, cidrs: Sequence[str]) -> list[ec2.Subnet]:
            return [
                ec2.Subnet(self.name(f"{tier}-{i}"), vpc_id=self.vpc.id, cidr_block=cidr,
                           availability_zone=azs.names[i], map_public_ip_on_launch=False,
                           tags={**t, "tier": tier, "Name": f"txroute-{tier}-{i}"}, opts=self.child())
                for i, cidr in enumerate(cidrs)
            ]

        self.public_subnets = subnets("public", plan.public)
        self.app_subnets = subnets("app", plan.app)
        self.data_subnets = subnets("data", plan.data)

        public_rt = ec2.RouteTable(self.name("public-rt"), vpc_id=self.vpc.id, tags=t, opts=self.child())
        ec2.Route(self.name("public-default"), route_table_id=public_rt.id, destination_cidr_block=WORLD,
                  gateway_id=igw.id, opts=self.child())
        for i, subnet in enumerate(self.public_subnets):
            ec2.RouteTableAssociation(self.name(f"public-{i}"), subnet_id=subnet.id,
                                      route_table_id=public_rt.id, opts=self.child())

        nat_count = layout.AZ_COUNT if nat_per_az else 1
        nats = []
        for i in range(nat_count):
            eip = ec2.Eip(self.name(f"nat-{i}"), domain="vpc", tags=t, opts=self.child())
            nats.append(ec2.NatGateway(self.name(f"nat-{i}"), allocation_id=eip.id,
                                       subnet_id=self.public_subnets[i].id, tags=t,
                                       opts=self.child(depends_on=[igw])))
        # Internal load balancers live in the app subnets, so "the app subnets of every region" is where
        # routers, relays and regional APIs talk to each other.
        # App and data subnets route to the internet only through NAT (image pulls, AWS APIs), and to peer
        # regions through the peering mesh (routes added by `Interconnect`).
        self.private_route_tables: list[ec2.RouteTable] = []
        for i in range(layout.AZ_COUNT):
            rt = ec2.RouteTable(self.name(f"private-rt-{i}"), vpc_id=self.vpc.id, tags=t, opts=self.child())
            ec2.Route(self.name(f"private-default-{i}"), route_table_id=rt.id, destination_cidr_block=WORLD,
                      nat_gateway_id=nats[i % nat_count].id, opts=self.child())
            for tier, tier_subnets in (("app", self.app_subnets), ("data", self.data_subnets)):
                ec2.RouteTableAssociation(self.name(f"{tier}-{i}"), subnet_id=tier_subnets[i].id,
                                          route_table_id=rt.id, opts=self.child())
            self.private_route_tables.append(rt)
        # S3 through a gateway endpoint (no hourly or per-GB charge) instead of NAT: ECR image layers are
        # served from S3, so every task start's image pull stays off the NAT gateways.
        self.s3_endpoint = ec2.VpcEndpoint(
            self.name("s3"), vpc_id=self.vpc.id, service_name=f"com.amazonaws.{region}.s3",
            vpc_endpoint_type="Gateway", route_table_ids=[rt.id for rt in self.private_route_tables],
            tags={**t, "Name": f"txroute-{environment}-s3"}, opts=self.child())

        app_cidrs = list(plan.app)
        mesh_app_cidrs = app_cidrs + [c for peer in peer_cidrs for c in layout.subnet_plan(peer).app]

        def tcp(port: int, description: str, *, cidrs: Sequence[str] = (),
                groups: Sequence[pulumi.Input[str]] = ()) -> dict[str, object]:
            rule: dict[str, object] = {"protocol": "tcp", "from_port": port, "to_port": port,
                                       "description": description}
            if cidrs:
                rule["cidr_blocks"] = list(cidrs)
            if groups:
                rule["security_groups"] = list(groups)
            return rule

        def group(tier: str, description: str, ingress: list[dict[str, object]],
                  egress: list[dict[str, object]]) -> ec2.SecurityGroup:
            return ec2.SecurityGroup(self.name(f"{tier}-sg"), vpc_id=self.vpc.id, description=description,
                                     ingress=ingress, egress=egress,  # type: ignore[arg-type]
                                     revoke_rules_on_delete=True, tags={**t, "tier": tier},
                                     opts=self.child())

        self.public_lb_sg = group(
            "public-lb", "Public router load balancer: HTTPS from anywhere, to router tasks only",
            [tcp(layout.HTTPS_PORT, "HTTPS from clients (through Global Accelerator)", cidrs=[WORLD])],
            [tcp(layout.CONTAINER_PORT, "to router tasks", cidrs=app_cidrs)],
        )
        self.router_sg = group(
            "router", "Router tasks: from the public load balancer only",
            [tcp(layout.CONTAINER_PORT, "from the public load balancer", groups=[self.public_lb_sg.id])],
            [tcp(layout.INTERNAL_API_PORT, "HTTPS to regional APIs in every region", cidrs=mesh_app_cidrs),
             tcp(layout.HTTPS_PORT, "to AWS APIs (ECR, Secrets Manager, CloudWatch) through NAT",
                 cidrs=[WORLD])],
        )
        self.internal_lb_sg = group(
            "internal-lb", "Regional API load balancer: from routers and saga relays of every region",
            [tcp(layout.INTERNAL_API_PORT, "HTTPS from app subnets of this and peer regions",
                 cidrs=mesh_app_cidrs)],
            [tcp(layout.CONTAINER_PORT, "to region service tasks", cidrs=app_cidrs)],
        )
        self.region_sg = group(
            "region", "Region service tasks: from the internal load balancer only",
            [tcp(layout.CONTAINER_PORT, "from the internal load balancer", groups=[self.internal_lb_sg.id])],
            [tcp(layout.POSTGRES_PORT, "to the region's database", cidrs=list(plan.data)),
             tcp(layout.INTERNAL_API_PORT, "saga relay (HTTPS) to regional APIs of peer regions",
                 cidrs=mesh_app_cidrs),
             tcp(layout.HTTPS_PORT, "to AWS APIs (ECR, Secrets Manager, CloudWatch) through NAT",
                 cidrs=[WORLD])],
        )
        self.db_sg = group(
            "db", "Database: PostgreSQL from region service tasks only; no egress",
            [tcp(layout.POSTGRES_PORT, "from region service tasks", groups=[self.region_sg.id])],
            [],
        )
        self.interface_endpoints = self._interface_endpoints(region, environment, interface_endpoints, t)
        self.register_outputs({"vpc_id": self.vpc.id})

    def _interface_endpoints(self, region: str, environment: str, names: Sequence[str],
                             t: dict[str, str]) -> list[ec2.VpcEndpoint]:
        """Private DNS endpoints in the app subnets for the services named in `txroute:interfaceEndpoints`;
        tasks reach them on 443 from the app subnets, nothing else does."""
        if not names:
            return []
        sg = ec2.SecurityGroup(
            self.name("endpoints-sg"), vpc_id=self.vpc.id, description="Interface endpoints: HTTPS from app subnets",
            ingress=[{"protocol": "tcp", "from_port": layout.HTTPS_PORT, "to_port": layout.HTTPS_PORT,
                      "cidr_blocks": list(self.plan.app), "description": "from tasks in the app subnets"}],
            egress=[], revoke_rules_on_delete=True, tags={**t, "tier": "endpoints"}, opts=self.child())
        return [
            ec2.VpcEndpoint(
                self.name(f"{service.replace('.', '-')}-endpoint"), vpc_id=self.vpc.id,
                service_name=f"com.amazonaws.{region}.{service}", vpc_endpoint_type="Interface",
                private_dns_enabled=True, subnet_ids=[s.id for s in self.app_subnets], security_group_ids=[sg.id],
                tags={**t, "Name": f"txroute-{environment}-{service}"}, opts=self.child())
            for name in names for service in INTERFACE_ENDPOINT_SERVICES[name]
        ]
