"""What every regional component shares: its region's provider handed to each child explicitly."""

from __future__ import annotations

from typing import Any

import pulumi


class RegionalComponent(pulumi.ComponentResource):
    """A component bound to one region. Child resource names start with the region name (unique per stack,
    readable in `pulumi preview`), and every child uses the region's provider."""

    def __init__(self, type_: str, region: str, provider: pulumi.ProviderResource,
                 opts: pulumi.ResourceOptions | None = None) -> None:
        super().__init__(type_, f"{region}-{type_.rsplit(':', 1)[-1].lower()}", None,
                         pulumi.ResourceOptions.merge(opts, pulumi.ResourceOptions(providers=[provider])))
        self.region = region
        self.provider = provider

    def child(self, **extra: Any) -> pulumi.ResourceOptions:
        return pulumi.ResourceOptions(parent=self, provider=self.provider, **extra)

    def invoke_opts(self) -> pulumi.InvokeOutputOptions:
        return pulumi.InvokeOutputOptions(parent=self, provider=self.provider)

    def name(self, suffix: str) -> str:
        return f"{self.region}-{suffix}"


def tags(environment: str, region: str, **extra: str) -> dict[str, str]:
    return {"app": "txroute", "environment": environment, "region": region, **extra}
