"""Entry point for `pulumi preview` / `pulumi up`: only wiring. The topology comes from `regions/` through
the app's loader, the settings from this stack's `txroute:` config."""

from txroute_infra.config import InfraConfig
from txroute_infra.program import deploy
from txroute_infra.topology import load_topology

deploy(load_topology(), InfraConfig.from_stack())
