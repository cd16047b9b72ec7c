"""The whole deployment: `deploy(topology, config)` wires one cell per region, the peering mesh between
them and the global entry in front. Adding a region is adding a file to `regions/`."""

from __future__ import annotations

from dataclasses import dataclass

import pulumi

from txroute_infra.components.cell import RegionalCell, region_provider
from txroute_infra.components.global_entry import CertificateDns, GlobalEntry, InternalDns, global_provider
from txroute_infra.components.interconnect import PeeringMesh
from txroute_infra.config import InfraConfig
from txroute_infra.topology import Topology


@dataclass(frozen=True)
class Deployment:
    cells: dict[str, RegionalCell]
    mesh: PeeringMesh
    entry: GlobalEntry


def deploy(topology: Topology, config: InfraConfig) -> Deployment:
    assert topology.regions, "the loader refuses an empty regions/"
    cells: dict[str, RegionalCell] = {}
    for region in topology.regions:
        peers = [r for r in topology.regions if r.name != region.name]
        cells[region.name] = RegionalCell(region, peers=peers, config=config,
                                          provider=region_provider(region.name, config.environment))
    shared = global_provider(config.environment)
    # The validation record is created in the stack's zone, so each certificate validation waits only for a
    # record this same update publishes (never for a manual step past the pipeline's timeout).
    first = cells[topology.regions[0].name]
    dns = CertificateDns(first.compute.certificate, hosted_zone_id=config.hosted_zone_id, provider=shared)
    # Internal TLS: the internal APIs' names and their (wildcard) certificate's validation record.
    internal_dns = CertificateDns(first.compute.internal_certificate, hosted_zone_id=config.hosted_zone_id,
                                  provider=shared, key="internal-cert")
    InternalDns(list(cells.values()), hosted_zone_id=config.hosted_zone_id, provider=shared)
    region_urls = pulumi.Output.all(**{name: cell.compute.internal_url for name, cell in cells.items()})
    for cell in cells.values():
        cell.add_router(region_urls=region_urls,
                        validation_record_fqdns=[dns.fqdn_for(cell.compute.certificate)],
                        internal_validation_record_fqdns=[internal_dns.fqdn_for(cell.compute.internal_certificate)])
    mesh = PeeringMesh(list(cells.values()), environment=config.environment)
    entry = GlobalEntry(list(cells.values()), environment=config.environment, api_domain=config.api_domain,
                        hosted_zone_id=config.hosted_zone_id, provider=shared)

    pulumi.export("accelerator_dns_name", entry.accelerator.dns_name)
    pulumi.export("accelerator_ips", entry.accelerator.ip_sets)
    pulumi.export("ecr_repositories", {n: c.compute.repository.repository_url for n, c in cells.items()})
    pulumi.export("alarm_topics", {n: c.observability.topic.arn for n, c in cells.items()})
    return Deployment(cells=cells, mesh=mesh, entry=entry)
