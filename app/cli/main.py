"""`txroute`: the command-line entry point. Each subcommand is a thin layer over a module that does the work."""

from __future__ import annotations

import argparse
import json
import signal
import sys
import threading
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from app import limits
from app.cli.durations import duration_s
from app.local import stack as local_stack
from app.local.postgres import PostgresError
from app.topology.loader import TopologyError


def main(argv: Sequence[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    if not hasattr(args, "run"):
        parser.print_help()
        return 2
    try:
        return int(args.run(args))
    except (local_stack.StackError, PostgresError, TopologyError, TimeoutError) as exc:
        print(f"txroute: {exc}", file=sys.stderr)
        return 1


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="txroute", description="txroute: multi-region transaction routing")
    sub = parser.add_subparsers(title="commands")

    up = sub.add_parser("up", help="start the local stack: one PostgreSQL and one service per region")
    up.add_argument("--detach", action="store_true", help="return once every part is ready")
    up.add_argument(
        "--wan-latency", type=_duration_ms, default=0, metavar="RTT",
        help="SIMULATE a WAN round trip between regions, e.g. 40ms (off by default)",
    )
    up.add_argument(
        "--ports", choices=("fixed", "auto"), default="fixed",
        help="auto: choose a free port for every part (recorded in stack.json, shown by `status`)",
    )
    _stack_options(up)
    up.set_defaults(run=_up)

    down = sub.add_parser("down", help="stop the local stack")
    down.add_argument("--purge", action="store_true", help="also delete the local data (.state/)")
    _stack_options(down)
    down.set_defaults(run=_down)

    status = sub.add_parser("status", help="each region, shard, process and its health")
    status.add_argument("--json", action="store_true", help="machine-readable output")
    _stack_options(status)
    status.set_defaults(run=_status)

    token = sub.add_parser("token", help="print a client token signed by the local stack's dev issuer key")
    token.add_argument("--client", required=True, help="the client id (the token's sub)")
    token.add_argument(
        "--scope", action="append", default=None,
        help="a scope to grant (repeatable; default: all of accounts:read accounts:write transfers:write funds:write)",
    )
    token.add_argument("--ttl", type=int, default=3600, help="lifetime in seconds (default 3600; at most 86400)")
    token.add_argument("--state-dir", type=Path, default=None, help="where the stack's keys live (.state/)")
    token.set_defaults(run=_token)

    audit = sub.add_parser("audit", help="reconcile every shard; exits 1 on any violation")
    audit.add_argument("--json", action="store_true", help="machine-readable output")
    audit.add_argument("--full", action="store_true",
                       help="recompute every shard's whole history (default: from each shard's checkpoint)")
    audit.add_argument(
        "--dsn", action="append", default=[], metavar="SHARD=DSN",
        help="audit these shard databases instead of the local stack's (repeat per shard)",
    )
    _stack_options(audit)
    audit.set_defaults(run=_audit)

    bench = sub.add_parser("bench", help="benchmarks that print figures beside a baseline")
    bench.add_argument(
        "name", choices=["ledger", "router", "saga", "ratelimit", "audit", "batch", "move", "events"],
        help="ledger: transfers/s and latency vs pgbench tpcb-like; router: transfers via the router vs direct; "
        "batch: transfers/s in batches of 100 through the router (atomic and not) vs pgbench tpcb-like; "
        "saga: cross-region vs same-shard latency under a simulated RTT, and the relay's drain rate; "
        "ratelimit: the router's per-client rate-limit check, ns per request; "
        "audit: txroute audit's run time on one shard of --entries entries, full and incremental; "
        "move: a slot move of --accounts accounts and --entries entries under 8 writers through the router "
        "(freeze, copy rate, unaffected slots' throughput during the move over before, errors, audit); "
        "events: webhook delivery latency commit -> receipt p50/p99 under --clients posting transfers, and the "
        "events/s one client reads paging its feed",
    )
    bench.add_argument("--entries", type=int, default=1_000_000,
                       help="audit: entries seeded in the shard; move: in the moving range (default 1M)")
    bench.add_argument("--delta", type=int, default=10_000, help="audit: entries added before the incremental run")
    bench.add_argument("--json", action="store_true",
                       help="ledger, router, saga, audit, batch, move, events: the last line is one JSON object of "
                       "figures")
    bench.add_argument("--generator", choices=["auto", "wrk", "python"], default="auto",
                       help="ledger, router, saga: the load generator: wrk (installed with apt-get when absent, "
                       "as root), else the Python one with a warning (auto); or force one")
    bench.add_argument("--profile", type=Path, default=None, metavar="FILE",
                       help="ledger, router: sample the service (router: the router) with py-spy during the "
                       "measurement (collapsed stacks to FILE) and print the top functions")
    bench.add_argument("--pin", action="store_true",
                       help="router: run the router and the region on different cores (taskset)")
    bench.add_argument("--rtt", type=_duration_ms, default=40, help="saga: simulated RTT between regions (40ms)")
    bench.add_argument("--backlog", type=int, default=2_000, help="saga: messages in the relay backlog (2000)")
    bench.add_argument("--clients", type=int, default=8, help="concurrent clients (default 8)")
    bench.add_argument("--seconds", type=float, default=10.0,
                       help="duration of each measurement; move: of the baseline before the move (default 10)")
    bench.add_argument("--accounts", type=int, default=None,
                       help="accounts the transfers move between (default 100); move: in the moving range (100k)")
    bench.add_argument("--across-regions", action="store_true",
                       help="move: to a shard of another region (default: another shard of the same region)")
    bench.add_argument(
        "--internal-tls", choices=["on", "off", "both"], default="on",
        help="router: the router -> region hop over TLS (on, as deployed), plaintext (off), or both in one "
        "run with TLS's added p50 and p99 (both)",
    )
    bench.set_defaults(run=_bench)

    from app.ops import cli as ops_cli  # `txroute ops ...`: the runbooks' commands (runbooks/)

    ops_cli.add_parser(sub)
    from app.placement import cli as slots_cli  # `txroute slots ...`: slot moves (issue 11)

    slots_cli.add_parser(sub)
    from app.ops import placement_cli  # `txroute regions evacuate`: a region's slots to another region

    placement_cli.add_regions_parser(sub)
    return parser


def _stack_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--state-dir", type=Path, default=None, help="where clusters, keys and logs live (.state/)")
    p.add_argument("--regions-dir", type=Path, default=None, help="the topology folder (regions/)")
    # Unset: `up` uses the defaults; the other commands use the ports the running (or last) stack recorded.
    p.add_argument("--region-port-base", type=int, default=None,
                   help=f"first region's port, then +1 per region (default {local_stack.REGION_PORT_BASE_DEFAULT})")
    p.add_argument("--pg-port-base", type=int, default=None,
                   help=f"first region's PostgreSQL port, then +1 (default {local_stack.PG_PORT_BASE_DEFAULT})")
    p.add_argument("--router-port", type=int, default=None,
                   help=f"the router's port (default {local_stack.ROUTER_PORT_DEFAULT})")
    p.add_argument("--router-region", default=None, help="the region the local router runs in (default: the first)")


def _duration_ms(text: str) -> int:
    """'40ms', '0.04s' or '40' (milliseconds)."""
    ms = duration_s(text, bare_unit="ms") * 1000
    if not 0 <= ms <= limits.WAN_LATENCY_MS_MAX:
        raise argparse.ArgumentTypeError(f"the WAN latency must be in 0..{limits.WAN_LATENCY_MS_MAX} ms")
    return int(ms)


def _config(args: argparse.Namespace, *, recorded: bool) -> local_stack.StackConfig:
    """The stack the command means: with `recorded`, and no port flag given, the one stack.json records."""
    state = args.state_dir or local_stack.state_dir()
    flags = (args.region_port_base, args.pg_port_base, args.router_port)
    if recorded and all(flag is None for flag in flags):
        found = local_stack.recorded_config(state)
        if found is not None:
            return found

    def given(flag: int | None, default: int) -> int:
        return default if flag is None else flag

    return local_stack.StackConfig(
        state=state,
        regions_dir=args.regions_dir,
        region_port_base=given(args.region_port_base, local_stack.REGION_PORT_BASE_DEFAULT),
        pg_port_base=given(args.pg_port_base, local_stack.PG_PORT_BASE_DEFAULT),
        router_port=given(args.router_port, local_stack.ROUTER_PORT_DEFAULT),
        router_region=args.router_region,
        wan_latency_ms=getattr(args, "wan_latency", 0),
    )


def _stack(args: argparse.Namespace) -> local_stack.Stack:
    return local_stack.plan(_config(args, recorded=True))


def _up(args: argparse.Namespace) -> int:
    config = _config(args, recorded=False)
    reservation = None
    if args.ports == "auto":
        if any(flag is not None for flag in (args.region_port_base, args.pg_port_base, args.router_port)):
            raise local_stack.StackError("--ports auto chooses every port: drop the --*-port* flags")
        reservation = local_stack.reserve_auto_ports(config)
    try:
        stack = local_stack.plan(config)
        print(f"starting {len(stack.topology.regions)} regions (state in {stack.config.state}) ...", flush=True)
        local_stack.up(stack)
    finally:
        if reservation is not None:
            reservation.release()  # every part listens on its port now (or the stack was stopped)
    _print_status(stack)
    if args.detach:
        print("running in the background; stop it with `txroute down`")
        return 0
    print("running; press Ctrl-C to stop", flush=True)
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    stop.wait()
    print("stopping ...", flush=True)
    local_stack.down(stack)
    return 0


def _down(args: argparse.Namespace) -> int:
    stopped = local_stack.down(_stack(args), purge=args.purge)
    print("stopped: " + (", ".join(stopped) if stopped else "nothing was running"))
    if args.purge:
        print("local data deleted")
    return 0


def _status(args: argparse.Namespace) -> int:
    stack = _stack(args)
    if args.json:
        rows, _ = _status_rows(stack)
        print(json.dumps(rows, indent=2))
    else:
        _print_status(stack)
    return 0


def _status_rows(stack: local_stack.Stack) -> tuple[list[dict[str, Any]], Any]:
    """`local_stack.status` with each shard's recorded slots (`recorded`: its slot_ownership rows, None when
    its database cannot be read) beside the slots regions/ gives it, and the drift between the two."""
    import asyncio

    from app.ops import placement
    from app.ops.target import local_target

    rows = local_stack.status(stack)
    if not any(row.get("postgres", {}).get("running") for row in rows):
        return rows, None
    claims, unreadable = asyncio.run(placement.recorded_claims(local_target(stack)))
    for row in rows:
        for shard in row.get("shards", []):
            recorded = claims.get(shard["shard"])
            shard["recorded"] = None if recorded is None else [
                f"{r['slot_lo']}-{r['slot_hi']} {r['state']}" for r in recorded]
    return rows, placement.plan(stack.topology, claims, unreadable)


def _print_status(stack: local_stack.Stack) -> None:
    from app.ops import placement

    rows, drift = _status_rows(stack)
    for row in rows:
        health = "ready" if row["ready"] else ("running" if row["pid"] else "stopped")
        print(f"{row['name']:<24} {row['url']:<24} pid={row['pid'] or '-':<8} {health}")
        if "postgres" in row:
            pg = row["postgres"]
            print(f"  postgres 127.0.0.1:{pg['port']:<6} {'running' if pg['running'] else 'stopped'}")
            for shard in row["shards"]:
                recorded = shard.get("recorded")
                seen = "" if "recorded" not in shard else (
                    " recorded=" + (",".join(recorded) or "none") if recorded is not None else " recorded=?")
                desired = ",".join(shard["slots"]) or "none"
                print(f"  shard {shard['shard']:<10} db={shard['database']:<16} slots={desired}{seen}")
    if drift is not None:
        print("placement (regions/ against the shard databases):")
        print("\n".join("  " + line for line in placement.text(drift).splitlines()))


def _token(args: argparse.Namespace) -> int:
    from app.security.keys import DevKeys, load_private_key
    from app.security.scopes import PUBLIC_SCOPES
    from app.security.tokens import CLIENT_ID, mint_client_token

    if not CLIENT_ID.match(args.client):
        raise local_stack.StackError("--client must be 1..64 of letters, digits, '.', '_' or '-'")
    keys = DevKeys((args.state_dir or local_stack.state_dir()) / "keys")
    if not keys.client_private.exists():
        raise local_stack.StackError(f"no dev keys in {keys.folder}: run `txroute up` first")
    scopes = set(args.scope or PUBLIC_SCOPES)
    unknown = scopes - PUBLIC_SCOPES
    if unknown:
        raise local_stack.StackError(f"unknown scope(s) {sorted(unknown)}; known: {sorted(PUBLIC_SCOPES)}")
    if not 1 <= args.ttl <= limits.CLIENT_TOKEN_LIFETIME_MAX_S:
        raise local_stack.StackError(f"--ttl must be in 1..{limits.CLIENT_TOKEN_LIFETIME_MAX_S} seconds "
                                     "(the router refuses longer-lived client tokens)")
    key = load_private_key(str(keys.client_private), what="dev client key")
    kid = local_stack.DEV_CLIENT_KID
    token = mint_client_token(key, issuer=local_stack.DEV_CLIENT_ISSUER, client=args.client, scopes=scopes,
                              lifetime_s=args.ttl, kid=kid)
    print(token)
    return 0


def _audit(args: argparse.Namespace) -> int:
    import asyncio

    from app.ops.audit import as_json, audit, record

    if args.dsn:
        dsns = dict(item.split("=", 1) for item in args.dsn)
    else:
        dsns = local_stack.shard_dsns(_stack(args))
    report = asyncio.run(audit(dsns, full=args.full))
    print(json.dumps(as_json(report), indent=2) if args.json else report.text())
    # The result is kept in each shard for the regions' metrics (txroute_last_audit_clean) and its alert.
    unwritten = asyncio.run(record(report, dsns))
    if unwritten:
        print(f"warning: audit result not recorded in {', '.join(unwritten)}", file=sys.stderr)
    return 0 if report.clean else 1


def _bench(args: argparse.Namespace) -> int:
    if args.name == "move":
        from benchmarks import move

        return move.run(accounts=args.accounts or 100_000, entries=args.entries, clients=args.clients,
                        seconds=args.seconds, across_regions=args.across_regions, as_json=args.json)
    args.accounts = args.accounts or 100
    if args.name == "batch":
        from benchmarks import batch

        return batch.run(clients=args.clients, seconds=args.seconds, accounts=args.accounts, as_json=args.json)
    if args.name == "events":
        from benchmarks import events

        return events.run(clients=args.clients, seconds=args.seconds, accounts=args.accounts, as_json=args.json)
    if args.name == "audit":
        from benchmarks import audit as audit_bench

        return audit_bench.run(entries=args.entries, delta=args.delta, as_json=args.json)
    if args.name == "saga":
        from benchmarks import saga

        return saga.run(clients=args.clients, seconds=args.seconds, accounts=min(args.accounts, 1_000),
                        rtt_ms=args.rtt, backlog=args.backlog, generator=args.generator, as_json=args.json)
    if args.name == "ratelimit":
        from benchmarks import ratelimit

        return ratelimit.run()
    if args.name == "router":
        from benchmarks import router

        return router.run(clients=args.clients, seconds=args.seconds, accounts=args.accounts,
                          internal_tls=args.internal_tls, pin=args.pin, generator=args.generator, as_json=args.json,
                          profile=args.profile)
    from benchmarks import ledger

    return ledger.run(clients=args.clients, seconds=args.seconds, accounts=args.accounts,
                      generator=args.generator, as_json=args.json, profile=args.profile)


if __name__ == "__main__":
    raise SystemExit(main())
