"""Private connectivity between regions for saga traffic (and router-to-home-region forwarding): a full
mesh of inter-region VPC peering connections, one per pair of regions.

Why peering rather than Transit Gateway peering: with a handful of regions the mesh is small (n(n-1)/2
connections: 3 for 3 regions, 6 for 4), and peering adds no hop, no per-GB processing charge and no
attachment-hour charge, where a TGW per region plus TGW peering adds all three and a bandwidth ceiling per
attachment. Inter-region peering traffic stays on the AWS backbone and is encrypted by it. Past roughly ten
regions (45 connections, route tables growing with them) Transit Gateway becomes the simpler thing to run;
this component is the one place to change.
"""

from __future__ import annotations

from collections.abc import Sequence
from itertools import combinations
from typing import TYPE_CHECKING

import pulumi
import pulumi_aws.ec2 as ec2

if TYPE_CHECKING:
    from txroute_infra.components.cell import RegionalCell


class PeeringMesh(pulumi.ComponentResource):
    def __init__(self, cells: Sequence[RegionalCell], *, environment: str,
                 opts: pulumi.ResourceOptions | None = None) -> None:
        super().__init__("txroute:global:PeeringMesh", "peering-mesh", None, opts)
        self.connections: dict[tuple[str, str], ec2.VpcPeeringConnection] = {}
        for a, b in combinations(sorted(cells, key=lambda c: c.region), 2):
            tags = {"app": "txroute", "environment": environment, "Name": f"txroute-{a.region}-{b.region}"}
            # The requester side lives in `a`'s region and provider, the accepter in `b`'s.
            request = ec2.VpcPeeringConnection(
                f"{a.region}-peer-{b.region}", vpc_id=a.network.vpc.id, peer_vpc_id=b.network.vpc.id,
                peer_region=b.region, auto_accept=False, tags=tags,
                opts=pulumi.ResourceOptions(parent=self, provider=a.provider))
            accept = ec2.VpcPeeringConnectionAccepter(
                f"{b.region}-accept-{a.region}", vpc_peering_connection_id=request.id, auto_accept=True,
                tags=tags, opts=pulumi.ResourceOptions(parent=self, provider=b.provider))
            for here, there in ((a, b), (b, a)):
                for i, table in enumerate(here.network.private_route_tables):
                    ec2.Route(f"{here.region}-to-{there.region}-{i}", route_table_id=table.id,
                              destination_cidr_block=there.spec.vpc_cidr, vpc_peering_connection_id=request.id,
                              opts=pulumi.ResourceOptions(parent=self, provider=here.provider,
                                                          depends_on=[accept]))
            self.connections[(a.region, b.region)] = request
        self.register_outputs({})
