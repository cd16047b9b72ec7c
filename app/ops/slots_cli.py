"""`txroute slots plan`: where the slots are against where `regions/` wants them. The wiring only; the work is
in app/ops/placement.py. Registered in the `txroute slots` group (app/placement/cli.py), with the target
options of `txroute ops` (the local stack, or `--endpoint`/`--dsn`)."""

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
