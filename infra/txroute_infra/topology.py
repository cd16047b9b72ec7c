"""The one door from infra/ to `regions/`: the app's own loader and model (never a second parser)."""

from __future__ import annotations

import sys

from txroute_infra.layout import REPO_ROOT

if str(REPO_ROOT) not in sys.path:  # `pulumi up` runs from infra/ with the repo root not on the path
    sys.path.insert(0, str(REPO_ROOT))

from app.topology.loader import load_topology
from app.topology.model import Capacity, Region, Topology

__all__ = ["Capacity", "Region", "Topology", "load_topology"]
