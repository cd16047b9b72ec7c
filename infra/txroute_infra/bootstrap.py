"""What the first, registry-only `pulumi up` of a stack targets (`ci/github/deploy.sh`, step 1).

A new region's services need its image before they start, and the image needs the region's ECR repository
(encrypted with the region's KMS key). So before the full `up`, one targeted `up` creates just those. The
engine creates a targeted resource only when everything it needs is in the state or targeted too: its
property dependencies and its **parent** (a child of an untargeted, not-yet-created component fails the
update with "untargeted create"). Providers and the root stack are targeted implicitly. Hence the list below
holds, per region, the repository, the key it is encrypted with, and the components above both; the
provider is listed as well, harmless either way. `tests/infra/test_pipeline.py` checks the list against the
URNs, parents and dependencies the program really registers.

Run from `infra/`: `python -m txroute_infra.bootstrap <stack>` prints one URN per line. Pure: no Pulumi.
"""

from __future__ import annotations

import sys
from collections.abc import Iterable

# Pulumi.yaml `name`, the component types of `components/` and the child names they give (the cell, the key
# and compute components are `<region>-<type's last part, lowercased>`; see components/base.py).
PROJECT = "txroute"
CELL = "txroute:cell:RegionalCell"
KEY_COMPONENT = "txroute:cell:RegionKey"
COMPUTE = "txroute:cell:Compute"
KMS_KEY = "aws:kms/key:Key"
REPOSITORY = "aws:ecr/repository:Repository"


def bootstrap_targets(stack: str, regions: Iterable[str], *, project: str = PROJECT) -> list[str]:
    base = f"urn:pulumi:{stack}::{project}::"
    targets: list[str] = []
    for region in regions:
        targets += [
            f"{base}pulumi:providers:aws::{region}-aws",
            f"{base}{CELL}::{region}-regionalcell",
            f"{base}{CELL}${KEY_COMPONENT}::{region}-regionkey",
            f"{base}{CELL}${KEY_COMPONENT}${KMS_KEY}::{region}-key",
            f"{base}{CELL}${COMPUTE}::{region}-compute",
            f"{base}{CELL}${COMPUTE}${REPOSITORY}::{region}-ecr",
        ]
    return targets


def main(argv: list[str]) -> int:
    if len(argv) != 1:
        print("usage: python -m txroute_infra.bootstrap <stack>", file=sys.stderr)
        return 2
    from txroute_infra.topology import load_topology

    print("\n".join(bootstrap_targets(argv[0], (r.name for r in load_topology().regions))))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
