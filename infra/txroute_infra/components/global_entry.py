"""Global entry: one AWS Global Accelerator (two anycast IPs) with a TCP 443 listener and one endpoint
group per region pointing at that region's public router load balancer (Global Accelerator follows that
load balancer's own target health: `layout.HEALTH_PATH` on the router's target group); and, in the stack's
Route 53 zone (required), the API name as an alias of the accelerator plus the certificate validation
records, and each region's internal API name (`InternalDns`) as an alias of its internal load balancer.

Global Accelerator's API exists only in us-west-2, and Route 53 is global: both use the `global` provider.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import pulumi
import pulumi_aws
import pulumi_aws.globalaccelerator as ga
import pulumi_aws.route53 as route53

from txroute_infra import layout

if TYPE_CHECKING:
    from txroute_infra.components.cell import RegionalCell

GLOBAL_ACCELERATOR_REGION = "us-west-2"
# Global Accelerator's fixed hosted zone for alias records.
GLOBAL_ACCELERATOR_ZONE_ID = "Z2BJ6XQ5FK7U4H"
VALIDATION_RECORD_TTL_S = 300
# Share of a region's traffic its endpoint group takes (the runbook lowers it to drain a region).
TRAFFIC_DIAL_PERCENT = 100
ENDPOINT_WEIGHT = 128


def global_provider(environment: str) -> pulumi_aws.Provider:
    return pulumi_aws.Provider(
        "global-aws", region=GLOBAL_ACCELERATOR_REGION,
        default_tags={"tags": {"app": "txroute", "environment": environment, "managed-by": "pulumi"}})


class CertificateDns(pulumi.ComponentResource):
    """The DNS record that proves we own the API name. ACM gives every certificate for one domain in one
    account the same validation CNAME (a second region's record collides with the first's: see
    infra/README.md), so one record, taken from the first region's certificate, validates every region's.
    `fqdn_for` refuses, at `up` time and before anything waits on DNS, a certificate whose record differs."""

    def __init__(self, certificate: pulumi_aws.acm.Certificate, *, hosted_zone_id: str,
                 provider: pulumi_aws.Provider, key: str = "cert",
                 opts: pulumi.ResourceOptions | None = None) -> None:
        super().__init__("txroute:global:CertificateDns", f"global-{key}-dns", None, opts)
        option = certificate.domain_validation_options.apply(lambda o: o[0])
        self.record = route53.Record(
            f"global-{key}-validation", zone_id=hosted_zone_id, name=option.resource_record_name,
            type=option.resource_record_type, records=[option.resource_record_value],
            ttl=VALIDATION_RECORD_TTL_S, allow_overwrite=True,
            opts=pulumi.ResourceOptions(parent=self, provider=provider))
        self._name = option.resource_record_name
        self.register_outputs({"fqdn": self.record.fqdn})

    def fqdn_for(self, certificate: pulumi_aws.acm.Certificate) -> pulumi.Output[str]:
        """The validation record's FQDN for `certificate`, after checking it asks for the same record."""
        theirs = certificate.domain_validation_options.apply(lambda o: o[0].resource_record_name)

        def same(args: list[str]) -> str:
            fqdn, ours, wanted = args
            if ours.rstrip(".") != wanted.rstrip("."):
                raise ValueError(f"ACM asks for validation record {wanted!r}, not the shared {ours!r}: give "
                                 "each region its own record (infra/README.md, DNS)")
            return fqdn

        return pulumi.Output.all(self.record.fqdn, self._name, theirs).apply(same)


class InternalDns(pulumi.ComponentResource):
    """`<region>.internal.<apiDomain>` -> that region's internal load balancer, in the stack's public zone.
    The name resolves to private addresses, reachable only inside the VPCs and over the peering mesh; it is
    public so that ACM can issue a free certificate for it, which routers and relays verify (infra/README.md).
    Its certificate's validation record is made by `CertificateDns(..., key="internal-cert")`."""

    def __init__(self, cells: Sequence[RegionalCell], *, hosted_zone_id: str, provider: pulumi_aws.Provider,
                 opts: pulumi.ResourceOptions | None = None) -> None:
        super().__init__("txroute:global:InternalDns", "global-internal-dns", None, opts)
        child = pulumi.ResourceOptions(parent=self, provider=provider)
        self.records = {
            cell.region: route53.Record(
                f"global-{cell.region}-internal-api", zone_id=hosted_zone_id, name=cell.compute.internal_name,
                type="A", aliases=[{"name": cell.compute.internal_lb.dns_name,
                                    "zone_id": cell.compute.internal_lb.zone_id, "evaluate_target_health": True}],
                opts=child)
            for cell in cells
        }
        self.register_outputs({"names": {region: r.fqdn for region, r in self.records.items()}})


class GlobalEntry(pulumi.ComponentResource):
    def __init__(self, cells: Sequence[RegionalCell], *, environment: str, api_domain: str,
                 hosted_zone_id: str, provider: pulumi_aws.Provider,
                 opts: pulumi.ResourceOptions | None = None) -> None:
        super().__init__("txroute:global:GlobalEntry", "global-entry", None, opts)
        child = pulumi.ResourceOptions(parent=self, provider=provider)
        tags = {"app": "txroute", "environment": environment}
        self.accelerator = ga.Accelerator("global-accelerator", name=f"txroute-{environment}",
                                          ip_address_type="IPV4", enabled=True, tags=tags, opts=child)
        # TCP pass-through: TLS ends at each region's load balancer, with its own certificate.
        self.listener = ga.Listener("global-https", accelerator_arn=self.accelerator.arn, protocol="TCP",
                                    client_affinity="NONE", port_ranges=[{"from_port": layout.HTTPS_PORT,
                                                                         "to_port": layout.HTTPS_PORT}],
                                    opts=child)
        self.endpoint_groups = {
            cell.region: ga.EndpointGroup(
                f"global-{cell.region}-endpoints", listener_arn=self.listener.arn,
                endpoint_group_region=cell.region,
                endpoint_configurations=[{"endpoint_id": cell.compute.public_lb.arn, "weight": ENDPOINT_WEIGHT,
                                          "client_ip_preservation_enabled": True}],
                # No health_check_* or threshold_count: ignored for load balancer endpoints (layout).
                traffic_dial_percentage=TRAFFIC_DIAL_PERCENT, opts=child)
            for cell in cells
        }
        route53.Record("global-api-alias", zone_id=hosted_zone_id, name=api_domain, type="A",
                       aliases=[{"name": self.accelerator.dns_name, "zone_id": GLOBAL_ACCELERATOR_ZONE_ID,
                                 "evaluate_target_health": True}], opts=child)
        self.register_outputs({"dns_name": self.accelerator.dns_name})
