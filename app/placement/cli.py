"""`txroute slots ...`: move slot ranges between shards and regions (issue 11; the work is in mover.py).

    txroute slots move LO-HI --to SHARD [--yes]   prints the plan; with --yes runs the move (or resumes the one
                                                   in progress for that range and shard) to its end
    txroute slots moves [--json]                   every recorded move: phase, rows copied, lag, freeze, next step
    txroute slots cancel ID [--yes]                undo a move before its switch (the source unfrozen)
    txroute slots plan [--json]                    the moves that would make the databases match regions/

Target: the local stack, or a deployed one with --dsn SHARD=DSN (as `txroute ops`): the mover needs the
source's and the target's databases (as their owner: it runs the move functions of migration 0008).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
from typing import Any

from app.ops.cli import target_from_args, target_options
from app.ops.target import confirm
from app.placement.mover import FINAL, FaultPause, Mover, parse_range


def add_parser(sub: Any) -> None:
    slots = sub.add_parser("slots", help="move slot ranges between shards and regions (copy, freeze, switch)")
    commands = slots.add_subparsers(title="slots commands")

    p = commands.add_parser("move", help="move slots LO-HI to a shard; prints the plan, acts with --yes")
    p.add_argument("range", metavar="LO-HI", help="an inclusive slot range, e.g. 100-199")
    p.add_argument("--to", required=True, metavar="SHARD", help="the shard that will own the range")
    p.add_argument("--yes", action="store_true", help="do it (default: print the plan only)")
    p.add_argument("--full-verify", action="store_true",
                   help="under the freeze, compare every row of the range (default: the rows that changed since "
                        "the pre-verify, and every balance at the switch: a shorter freeze)")
    target_options(p, _move)

    p = commands.add_parser("moves", help="recorded moves: phase, progress (rows copied, lag), next step")
    p.add_argument("--json", action="store_true")
    target_options(p, _moves)

    p = commands.add_parser("cancel", help="cancel a move before its switch; needs --yes")
    p.add_argument("id", help="the move's id (mv_...)")
    p.add_argument("--yes", action="store_true")
    target_options(p, _cancel)

    from app.ops.placement_cli import add_plan_parser  # `txroute slots plan`: regions/ against the databases

    add_plan_parser(commands)


def _move(args: argparse.Namespace) -> int:
    lo, hi = parse_range(args.range)
    # TXROUTE_FAULT_MOVER_PAUSE_*: test-only, inert unless set (FaultPause).
    mover = Mover(target_from_args(args), pause=FaultPause.from_env(os.environ), full_verify=args.full_verify)

    async def go() -> int:
        spec = await mover.spec(lo, hi, args.to)
        if not confirm(spec.plan(), args.yes):
            return 0
        await mover.begin(spec)
        phase = await mover.run(spec)
        print(f"{spec.id}: {phase}")
        return 0 if phase == "done" else 1

    return asyncio.run(go())


def _moves(args: argparse.Namespace) -> int:
    moves = asyncio.run(Mover(target_from_args(args)).moves())
    if args.json:
        print(json.dumps(moves, indent=2, default=str))
        return 0
    if not moves:
        print("no slot moves recorded")
    for m in moves:
        freeze = f", froze {m['freeze_s']:.3f} s" if m.get("freeze_s") is not None else ""
        print(f"{m['id']}  slots {m['slots']}  {m['source_shard']} -> {m['target_shard']}  "
              f"{m.get('phase', '?')}  rows copied {m.get('rows_copied', '?')}, lag {m.get('lag', '?')}{freeze}")
        if m.get("reason"):
            print(f"    reason: {m['reason']}")
        if m.get("phase") not in FINAL or m.get("target", {}).get("phase") not in (*FINAL, None):
            print(f"    next: {m.get('next', 're-run it')}")
    return 0


def _cancel(args: argparse.Namespace) -> int:
    mover = Mover(target_from_args(args))

    async def go() -> int:
        spec = await mover.find(args.id)
        plan = [f"cancel {spec.id}: unfreeze slots {spec.slot_lo}-{spec.slot_hi} on {spec.source_shard}, drop the "
                f"copies on {spec.target_shard} (refused once the move is switching)"]
        if not confirm(plan, args.yes):
            return 0
        await mover.cancel(spec)
        return 0

    return asyncio.run(go())
