"""`txroute ops ...`: the commands the runbooks use (runbooks/). The wiring only: each command's work is in
its own module of `app/ops/`. A command that changes anything prints its plan and acts only with `--yes`.

Target: the local stack whose state is in `--state-dir` / TXROUTE_STATE_DIR / `.state` (ports as `txroute up`
recorded them), or a deployed stack given `--endpoint NAME=URL` (`router=...` or a region name), `--dsn
SHARD=DSN` or `--dsn-file`. DSNs are never printed.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
from pathlib import Path
from typing import Any

import asyncpg

from app.cli.durations import duration_s
from app.local import stack as local_stack
from app.ops.target import OpsError, Target, deployed_target, local_target


def add_parser(sub: Any) -> None:
    ops = sub.add_parser("ops", help="incident-response commands used by runbooks/ (status, sagas, drain, ...)")
    commands = ops.add_subparsers(title="ops commands")

    p = commands.add_parser("status", help="regions, shards, slot ownership, drain, saga backlog, last audit")
    p.add_argument("--json", action="store_true")
    _target_options(p, _status)

    sagas = commands.add_parser("sagas", help="cross-shard transfers waiting in outboxes")
    sagas_sub = sagas.add_subparsers(title="sagas commands")
    p = sagas_sub.add_parser("list", help="messages not yet delivered, oldest first")
    p.add_argument("--stuck-older-than", type=_seconds, default=0.0, metavar="AGE", help="e.g. 60s (default 0)")
    p.add_argument("--json", action="store_true")
    _target_options(p, _sagas_list)
    p = sagas_sub.add_parser("inspect", help="one transfer on every shard: state, history, outbox, inbox")
    p.add_argument("transfer_id")
    p.add_argument("--json", action="store_true")
    _target_options(p, _sagas_inspect)
    p = sagas_sub.add_parser("retry", help="make stuck messages due now (never changes money); needs --yes")
    p.add_argument("transfer_ids", nargs="*")
    p.add_argument("--all-stuck", action="store_true", help="every message older than --stuck-older-than")
    p.add_argument("--stuck-older-than", type=_seconds, default=60.0, metavar="AGE", help="default 60s")
    p.add_argument("--yes", action="store_true", help="do it (without: print the plan only)")
    _target_options(p, _sagas_retry)

    hooks = commands.add_parser("webhooks", help="webhook endpoints: backlog, disabled ones, retry, re-enable")
    hooks_sub = hooks.add_subparsers(title="webhooks commands")
    p = hooks_sub.add_parser("list", help="endpoints with their pending and failed deliveries, and why disabled")
    p.add_argument("--client", default=None)
    p.add_argument("--disabled", action="store_true", help="only the disabled endpoints")
    p.add_argument("--json", action="store_true")
    _target_options(p, _webhooks_list)
    for verb, helptext in (("retry", "make an endpoint's pending and failed deliveries due now; --yes"),
                           ("enable", "enable a disabled endpoint and retry its failed deliveries; --yes")):
        p = hooks_sub.add_parser(verb, help=helptext)
        p.add_argument("endpoint_id")
        p.add_argument("--yes", action="store_true", help="do it (without: print the plan only)")
        _target_options(p, _webhooks_retry if verb == "retry" else _webhooks_enable)

    p = commands.add_parser("audit", help="txroute audit, recorded in every shard; exits 1 on any violation")
    p.add_argument("--json", action="store_true")
    p.add_argument("--full", action="store_true", help="recompute whole histories (default: from checkpoints)")
    _target_options(p, _audit)

    for verb, helptext in (("drain", "stop new writes for a region's accounts (503 region_draining); --yes"),
                           ("undrain", "take new writes for a region's accounts again; --yes")):
        p = commands.add_parser(verb, help=helptext)
        p.add_argument("region")
        if verb == "drain":
            p.add_argument("--reason", default="", help="recorded with the drain and shown to responders")
        p.add_argument("--yes", action="store_true", help="do it (without: print the plan only)")
        _target_options(p, _drain if verb == "drain" else _undrain)

    p = commands.add_parser("restart", help="local stack: start region-<name>, router or postgres-<name> again")
    p.add_argument("service")
    p.add_argument("--yes", action="store_true", help="do it (without: print the plan only)")
    _target_options(p, _restart)

    p = commands.add_parser("sessions", help="database sessions holding a transaction open, and whom they block")
    p.add_argument("--older-than", type=_seconds, default=5.0, metavar="AGE", help="default 5s")
    p.add_argument("--terminate-blockers", action="store_true", help="end those that block others; --yes")
    p.add_argument("--yes", action="store_true", help="do it (without: print the plan only)")
    _target_options(p, _sessions)

    p = commands.add_parser("idempotency", help="what a client's Idempotency-Keys were first used for")
    p.add_argument("--client", required=True)
    p.add_argument("--key", default=None)
    _target_options(p, _idempotency)

    p = commands.add_parser("rotate-keys", help="new internal and dev client keys with an overlap; --yes")
    p.add_argument("--finish", action="store_true", help="end the overlap: accept only the new keys")
    p.add_argument("--yes", action="store_true", help="do it (without: print the plan only)")
    _target_options(p, _rotate_keys)


def _target_options(p: argparse.ArgumentParser, run: Any) -> None:
    p.add_argument("--state-dir", type=Path, default=None, help="the local stack's state (.state/)")
    p.add_argument("--endpoint", action="append", default=[], metavar="NAME=URL",
                   help="deployed stack: router=URL or <region>=URL (repeat)")
    p.add_argument("--dsn", action="append", default=[], metavar="SHARD=DSN", help="deployed stack (repeat)")
    p.add_argument("--dsn-file", type=Path, default=None, help="deployed stack: SHARD=DSN lines")
    p.add_argument("--regions-dir", type=Path, default=None, help="the topology folder (regions/)")
    p.set_defaults(run=lambda args: _guarded(run, args))


def target_options(p: argparse.ArgumentParser, run: Any) -> None:
    """The target options of every `ops` command, for other command groups (`txroute slots`)."""
    _target_options(p, run)


def target_from_args(args: argparse.Namespace) -> Target:
    return _target(args)


def _guarded(run: Any, args: argparse.Namespace) -> int:
    try:
        return int(run(args))
    except OpsError as exc:
        print(f"txroute ops: {exc}", file=sys.stderr)
        return 1


def _seconds(text: str) -> float:
    seconds = duration_s(text, bare_unit="s")
    if not 0 <= seconds <= 30 * 24 * 3600:
        raise argparse.ArgumentTypeError("a duration in 0s..30d")
    return seconds


def _target(args: argparse.Namespace) -> Target:
    if args.endpoint or args.dsn or args.dsn_file:
        return deployed_target(endpoints=args.endpoint, dsns=args.dsn, dsn_file=args.dsn_file,
                               regions_dir=args.regions_dir)
    state = args.state_dir or local_stack.state_dir()
    config = local_stack.recorded_config(state) or local_stack.StackConfig(state=state)
    if args.regions_dir is not None:
        config.regions_dir = args.regions_dir
    return local_target(local_stack.plan(config))


def _print(doc: Any, as_json: bool, text: str) -> None:
    print(json.dumps(doc, indent=2, default=str) if as_json else text)


def _status(args: argparse.Namespace) -> int:
    from app.ops import status

    doc = asyncio.run(status.gather(_target(args)))
    _print(doc, args.json, status.text(doc))
    return 0


def _sagas_list(args: argparse.Namespace) -> int:
    from app.ops import sagas

    rows, unreadable = asyncio.run(sagas.pending(_target(args), older_than_s=args.stuck_older_than))
    _print({"pending": rows, "unreadable": unreadable}, args.json, sagas.list_text(rows, unreadable))
    return 0


def _sagas_inspect(args: argparse.Namespace) -> int:
    from app.ops import sagas

    doc = asyncio.run(sagas.inspect(_target(args), args.transfer_id))
    _print(doc, args.json, sagas.inspect_text(doc))
    return 0


def _sagas_retry(args: argparse.Namespace) -> int:
    from app.ops import sagas

    if bool(args.transfer_ids) == args.all_stuck:
        raise OpsError("name transfer ids, or give --all-stuck (not both)")
    asyncio.run(sagas.retry(_target(args), transfer_ids=args.transfer_ids, all_stuck=args.all_stuck,
                            older_than_s=args.stuck_older_than, yes=args.yes))
    return 0


def _webhooks_list(args: argparse.Namespace) -> int:
    from app.ops import webhooks

    rows, unreadable = asyncio.run(webhooks.endpoints(_target(args), client=args.client,
                                                      disabled_only=args.disabled))
    _print({"endpoints": rows, "unreadable": unreadable}, args.json, webhooks.list_text(rows, unreadable))
    return 0


def _webhooks_retry(args: argparse.Namespace) -> int:
    from app.ops import webhooks

    asyncio.run(webhooks.retry(_target(args), args.endpoint_id, enable=False, yes=args.yes))
    return 0


def _webhooks_enable(args: argparse.Namespace) -> int:
    from app.ops import webhooks

    asyncio.run(webhooks.retry(_target(args), args.endpoint_id, enable=True, yes=args.yes))
    return 0


def _audit(args: argparse.Namespace) -> int:
    from app.ops.audit import as_json, audit, record

    dsns = _target(args).shard_dsns
    try:
        report = asyncio.run(audit(dsns, full=args.full))
    except (OSError, TimeoutError, asyncpg.PostgresError) as exc:
        raise OpsError(f"a shard could not be read ({type(exc).__name__}); `txroute ops status` shows which, "
                       "and the audit needs every shard") from None
    print(json.dumps(as_json(report), indent=2) if args.json else report.text())
    unwritten = asyncio.run(record(report, dsns))
    if unwritten:
        print(f"warning: audit result not recorded in {', '.join(unwritten)}", file=sys.stderr)
    return 0 if report.clean else 1


def _drain(args: argparse.Namespace) -> int:
    from app.ops.drain import set_drain

    return 0 if asyncio.run(set_drain(_target(args), args.region, drain=True, reason=args.reason,
                                      yes=args.yes)) else 1


def _undrain(args: argparse.Namespace) -> int:
    from app.ops.drain import set_drain

    return 0 if asyncio.run(set_drain(_target(args), args.region, drain=False, reason="", yes=args.yes)) else 1


def _restart(args: argparse.Namespace) -> int:
    from app.ops.restart import restart

    return 0 if restart(_target(args), args.service, yes=args.yes) else 1


def _sessions(args: argparse.Namespace) -> int:
    from app.ops import sessions

    target = _target(args)
    if args.terminate_blockers:
        asyncio.run(sessions.terminate_blockers(target, older_than_s=args.older_than, yes=args.yes))
        return 0
    rows, unreadable = asyncio.run(sessions.sessions(target, older_than_s=args.older_than))
    print(sessions.text(rows, unreadable))
    return 0


def _idempotency(args: argparse.Namespace) -> int:
    from app.ops import idempotency

    rows, unreadable = asyncio.run(idempotency.keys(_target(args), client=args.client, key=args.key))
    print(idempotency.text(args.client, rows, unreadable))
    return 0


def _rotate_keys(args: argparse.Namespace) -> int:
    from app.ops.keys import rotate

    return 0 if rotate(_target(args), finish=args.finish, yes=args.yes) else 1
