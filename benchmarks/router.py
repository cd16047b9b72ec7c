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
import shutil
import time
import uuid
from collections.abc import Callable

import aiohttp

from app.local.postgres import Cluster, clusters_root, ensure_pg_user, find_pg_bin
from app.local.processes import REGION_FACTORY, ROUTER_FACTORY, ServiceProcess, asgi_command, free_port
from app.local.stack import state_dir
from app.topology.loader import load_topology
from benchmarks.client import auth_headers, client_headers, region_env, router_env
from benchmarks.ledger import BENCH_PG_SETTINGS, REGION, REQUEST_TIMEOUT_S, Figures, _open_accounts_in_one_shard

Headers = Callable[[str], dict[str, str]]


def run(*, clients: int, seconds: float, accounts: int) -> int:
    assert 1 <= clients <= 256 and 1 <= seconds <= 600 and 2 <= accounts <= 10_000
    run_as = ensure_pg_user()
    folder = clusters_root(state_dir(), run_as) / "bench-router"
    shutil.rmtree(folder, ignore_errors=True)
    cluster = Cluster(folder, free_port(), run_as, find_pg_bin())
    cluster.init()
    cluster.start(settings=BENCH_PG_SETTINGS)
    region_port, router_port = free_port(), free_port()
    region = ServiceProcess(
        name="bench-region",
        argv=asgi_command(REGION_FACTORY, region_port),
        env={
            "TXROUTE_REGION": REGION,
            "TXROUTE_DATABASE_URL": f"postgresql://postgres@127.0.0.1:{cluster.port}",
            "TXROUTE_DATABASE_PASSWORD": cluster.password(),
            **region_env(),
        },
        port=region_port,
        log_file=folder / "region.log",
    )
    # Every region of the topology points at the one service: the workload only touches REGION's shards.
    urls = {r.name: region.url for r in load_topology().regions}
    router = ServiceProcess(
        name="bench-router",
        argv=asgi_command(ROUTER_FACTORY, router_port),
        env={"TXROUTE_REGION": REGION, "TXROUTE_REGION_URLS": json.dumps(urls), **router_env()},
        port=router_port,
        log_file=folder / "router.log",
    )
    try:
        region.start()
        router.start()
        region.wait_ready()
        router.wait_ready()
        print(f"txroute bench router: {clients} clients, {seconds:.0f} s each, {accounts} accounts, one shard")
        direct, routed = asyncio.run(_both(region.url, router.url, clients=clients, seconds=seconds, accounts=accounts))
    finally:
        router.stop()
        region.stop()
        cluster.stop()
    print(direct.line())
    print(routed.line())
    ratio = routed.per_second / direct.per_second if direct.per_second else float("nan")
    print(
        f"router cost: {ratio:.2f} x direct throughput ({(1 - ratio) * 100:.0f}% less); "
        f"+{routed.percentile(0.50) - direct.percentile(0.50):.2f} ms at p50, "
        f"+{routed.percentile(0.99) - direct.percentile(0.99):.2f} ms at p99"
    )
    return 0 if direct.errors == 0 and routed.errors == 0 else 1


async def _both(
    region_url: str, router_url: str, *, clients: int, seconds: float, accounts: int
) -> tuple[Figures, Figures]:
    client_id = "bench-" + uuid.uuid4().hex[:8]
    timeout = aiohttp.ClientTimeout(total=REQUEST_TIMEOUT_S)
    async with aiohttp.ClientSession(region_url, timeout=timeout) as http:
        ids = await _open_accounts_in_one_shard(http, client_id, accounts)
        for account in ids:
            await _post(http, "/v1/deposits", auth_headers(client_id),
                        {"account": account, "amount": 10**12, "currency": "EUR"})
    # A warm-up for each path (connections, caches), then the measured runs.
    await _workload("warm-up", region_url, auth_headers(client_id), ids, clients=clients, seconds=1.0)
    await _workload("warm-up", router_url, client_headers(client_id), ids, clients=clients, seconds=1.0)
    direct = await _workload("direct to the region", region_url, auth_headers(client_id), ids,
                             clients=clients, seconds=seconds)
    routed = await _workload("through the router", router_url, client_headers(client_id), ids,
                             clients=clients, seconds=seconds)
    return direct, routed


async def _workload(
    name: str, url: str, headers: dict[str, str], ids: list[str], *, clients: int, seconds: float
) -> Figures:
    timeout = aiohttp.ClientTimeout(total=REQUEST_TIMEOUT_S)
    connector = aiohttp.TCPConnector(limit=clients + 4)
    latencies: list[float] = []
    counters = {"ok": 0, "errors": 0}
    async with aiohttp.ClientSession(url, timeout=timeout, connector=connector) as http:
        deadline = time.monotonic() + seconds

        async def worker(n: int) -> None:
            i = n
            while time.monotonic() < deadline:
                a, b = ids[i % len(ids)], ids[(i * 7 + 3) % len(ids)]
                i += clients
                if a == b:
                    continue
                started = time.perf_counter()
                status = await _post(http, "/v1/transfers", headers,
                                     {"debit_account": a, "credit_account": b, "amount": 1, "currency": "EUR"})
                latencies.append((time.perf_counter() - started) * 1000)
                counters["ok" if status == 201 else "errors"] += 1

        started = time.monotonic()
        await asyncio.gather(*(worker(n) for n in range(clients)))
        elapsed = time.monotonic() - started
    return Figures(name, counters["ok"], counters["errors"], elapsed, latencies)


async def _post(http: aiohttp.ClientSession, path: str, headers: dict[str, str], body: dict[str, object]) -> int:
    async with http.post(path, json=body, headers={**headers, "idempotency-key": uuid.uuid4().hex}) as r:
        await r.read()
        return r.status


def main() -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.router", description=__doc__)
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--accounts", type=int, default=100)
    args = parser.parse_args()
    return run(clients=args.clients, seconds=args.seconds, accounts=args.accounts)


if __name__ == "__main__":
    raise SystemExit(main())
