"""`txroute slots plan` (where the slots are against where `regions/` wants them; app/ops/placement.py),
registered in the `txroute slots` group (app/placement/cli.py), and `txroute regions evacuate`
(app/ops/evacuate.py). The wiring only, with the target options of `txroute ops` (the local stack, or
`--endpoint`/`--dsn`)."""

from __future__ import annotations

import argparse
import asyncio
from typing import Any

from app.ops.cli import target_from_args, target_options


def add_plan_parser(commands: Any) -> None:
    p = commands.add_parser("plan", help="the moves that would make the shard databases match regions/ "
                                         "(changes nothing)")
    p.add_argument("--json", action="store_true")
    target_options(p, _plan)


def _plan(args: argparse.Namespace) -> int:
    import json

    from app.ops import placement

    target = target_from_args(args)
    claims, unreadable = asyncio.run(placement.recorded_claims(target))
    drift = placement.plan(target.topology, claims, unreadable)
    print(json.dumps(placement.document(drift), indent=2) if args.json else placement.text(drift))
    return 0


def add_regions_parser(sub: Any) -> None:
    regions = sub.add_parser("regions", help="whole regions: evacuate one (move all its slots to another)")
    commands = regions.add_subparsers(title="regions commands")
    p = commands.add_parser("evacuate", help="move every slot range of REGION to REGION2's shards, one move at a "
                                             "time; prints the plan, acts with --yes")
    p.add_argument("region")
    p.add_argument("--to", required=True, metavar="REGION2", help="the region that takes the slots")
    p.add_argument("--yes", action="store_true", help="do it (default: print the plan only)")
    target_options(p, _evacuate)


def _evacuate(args: argparse.Namespace) -> int:
    from app.ops.evacuate import evacuate, plan_evacuation
    from app.ops.target import confirm

    target = target_from_args(args)

    async def go() -> int:
        evacuation = await plan_evacuation(target, args.region, args.to)
        if not confirm(evacuation.plan(), args.yes) or not evacuation.moves:
            return 0
        if await evacuate(target, evacuation):
            print(f"evacuated {args.region}: every range moved to {args.to}")
            return 0
        print(f"stopped: a move did not finish; run the command again to resume ({args.region} -> {args.to})")
        return 1

    return asyncio.run(go())
