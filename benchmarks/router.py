"""`txroute bench router` (or `python -m benchmarks.router`): the router's cost. The same transfer workload
is sent straight to a regional service (with the internal token the router would send) and through the
router (with a client token), in one run, and both are printed with the router's cost as a throughput ratio
and as added milliseconds at p50 and p99.

Everything is started here: a fresh durable cluster, one regional service and one router (granian, one
worker each), and the load from this process (aiohttp, C concurrent clients, one request at a time each).
All share this machine's cores, so the router's CPU is taken from the region's and the load's: on separate
hosts its cost would be the added latency only.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import uuid

from app.local.processes import ROUTER_FACTORY, ServiceProcess, asgi_command, free_port
from app.topology.loader import load_topology
from benchmarks.client import auth_headers, client_headers, router_env
from benchmarks.common import (
    WARM_UP_S,
    Figures,
    fresh_cluster,
    open_accounts,
    pairs_within,
    region_service,
    transfer_workload,
)

REGION = "eu-west-1"


def run(*, clients: int, seconds: float, accounts: int) -> int:
    print(f"txroute bench router: {clients} clients, {seconds:.0f} s each, {accounts} accounts, one shard")
    direct, routed = measure(clients=clients, seconds=seconds, accounts=accounts)
    print(direct.line())
    print(routed.line())
    ratio = routed.per_second / direct.per_second if direct.per_second else float("nan")
    print(
        f"router cost: {ratio:.2f} x direct throughput ({(1 - ratio) * 100:.0f}% less); "
        f"+{routed.percentile(0.50) - direct.percentile(0.50):.2f} ms at p50, "
        f"+{routed.percentile(0.99) - direct.percentile(0.99):.2f} ms at p99"
    )
    return 0 if direct.errors == 0 and routed.errors == 0 else 1


def measure(*, clients: int, seconds: float, accounts: int) -> tuple[Figures, Figures]:
    """(straight to the region, through the router) for the same workload, in one run."""
    assert 1 <= clients <= 256 and 1 <= seconds <= 600 and 2 <= accounts <= 10_000
    cluster = fresh_cluster("bench-router")
    region = region_service(REGION, cluster, cluster.folder / "region.log")
    # Every region of the topology points at the one service: the workload only touches REGION's shards.
    urls = {r.name: region.url for r in load_topology().regions}
    router_port = free_port()
    router = ServiceProcess(
        name="bench-router",
        argv=asgi_command(ROUTER_FACTORY, router_port),
        env={"TXROUTE_REGION": REGION, "TXROUTE_REGION_URLS": json.dumps(urls), **router_env()},
        port=router_port,
        log_file=cluster.folder / "router.log",
    )
    try:
        region.start()
        router.start()
        region.wait_ready()
        router.wait_ready()
        return asyncio.run(_both(region.url, router.url, clients=clients, seconds=seconds, accounts=accounts))
    finally:
        router.stop()
        region.stop()
        cluster.stop()


async def _both(
    region_url: str, router_url: str, *, clients: int, seconds: float, accounts: int
) -> tuple[Figures, Figures]:
    client_id = "bench-" + uuid.uuid4().hex[:8]
    pick = pairs_within(await open_accounts(region_url, client_id, accounts))
    direct_headers, routed_headers = auth_headers(client_id), client_headers(client_id)
    # A warm-up for each path (connections, caches), then the measured runs.
    await transfer_workload("warm-up", region_url, direct_headers, pick, clients=clients, seconds=WARM_UP_S)
    await transfer_workload("warm-up", router_url, routed_headers, pick, clients=clients, seconds=WARM_UP_S)
    direct = await transfer_workload("direct to the region", region_url, direct_headers, pick,
                                     clients=clients, seconds=seconds)
    routed = await transfer_workload("through the router", router_url, routed_headers, pick,
                                     clients=clients, seconds=seconds)
    return direct, routed


def main() -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.router", description=__doc__)
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--accounts", type=int, default=100)
    args = parser.parse_args()
    return run(clients=args.clients, seconds=args.seconds, accounts=args.accounts)


if __name__ == "__main__":
    raise SystemExit(main())
