"""`txroute bench events`: what the event feed serves and how long a webhook takes from commit to receipt
(issue 13), on a local stack started here, as `bench batch` starts its own: a fresh durable cluster (fsync and
synchronous_commit on), one regional service (its webhook worker on, loopback receivers allowed as `txroute up`
allows them) and one router in front of it.

    delivery   a receiver (aiohttp, in this process, on 127.0.0.1) is registered as the client's webhook
               endpoint through the router; C clients then post transfers through the router for `--seconds`
               (one transfer.posted event each). The latency of a delivery is its receipt time at the receiver
               minus the event's created_at (the database clock inside the posting's transaction, a moment
               before its commit; same machine, same clock): commit to receipt, at p50 and p99, over every
               event of the run.
    feed       one client pages its whole feed (limit 100, the maximum) from the start, ROUNDS times: events
               per second read. The region is asked directly and its shard pages are merged here as the router
               merges them (app/events/feed.py), since the router would ask this one region once per region of
               the topology.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import statistics
import time
import uuid
from datetime import datetime
from urllib.parse import urlencode

import aiohttp
from aiohttp import web

from app.events import feed
from app.events.delivery import pages_from_json
from app.events.webhooks import home_slot
from app.topology.loader import load_topology
from benchmarks.client import Direct, Routed
from benchmarks.common import (
    REQUEST_TIMEOUT_S,
    Figures,
    client_tls,
    fresh_cluster,
    open_accounts,
    pairs_within,
    post_json,
    print_json,
    region_service,
    transfer_workload,
)
from benchmarks.router import router_for

REGION = "eu-west-1"
ROUNDS = 3
DELIVERY_WAIT_S = 120.0  # after the load, for the last deliveries to arrive


def run(*, clients: int, seconds: float, accounts: int, as_json: bool = False) -> int:
    assert 1 <= clients <= 64 and 1 <= seconds <= 600 and 2 <= accounts <= 10_000
    print(f"txroute bench events: {clients} clients posting transfers for {seconds:.0f} s through the router, "
          f"{accounts} accounts on one shard, one webhook endpoint on loopback; then the feed paged {ROUNDS} times")
    cluster = fresh_cluster("bench-events")
    region = region_service(REGION, cluster, cluster.folder / "region.log", TXROUTE_WEBHOOK_ALLOW_LOOPBACK="1")
    router = router_for(region, cluster.folder / "router.log")
    try:
        region.start()
        region.wait_ready()
        router.start()
        router.wait_ready()
        client_id = _client_homed_in(REGION)
        ids = asyncio.run(open_accounts(region.url, client_id, accounts))
        transfers, received, feed_rates, feed_events = asyncio.run(
            _measure(region.url, router.url, client_id, ids, clients=clients, seconds=seconds))
    finally:
        router.stop()
        region.stop()
        cluster.stop()
    latencies = Figures("delivery", len(received), 0, seconds, received)
    missing = transfers.ops - len(received)
    rate = statistics.median(feed_rates)
    print(transfers.line())
    print(f"{'commit -> receipt':<30} p50 {latencies.percentile(0.50):>7.1f} ms  p99 "
          f"{latencies.percentile(0.99):>7.1f} ms  delivered {len(received)} of {transfers.ops}")
    print(f"{'feed, pages of 100':<30} {rate:>9.0f} events/s (median of {ROUNDS}: "
          f"{', '.join(f'{r:.0f}' for r in feed_rates)}), {feed_events} events")
    if as_json:
        print_json({
            "feed_events_per_second": round(rate, 1), "feed_events": feed_events,
            "delivery_p50_ms": round(latencies.percentile(0.50), 1),
            "delivery_p99_ms": round(latencies.percentile(0.99), 1),
            "delivered": len(received), "transfers": transfers.ops, "transfer_errors": transfers.errors,
            "clients": clients,
        })
    return 0 if missing == 0 and transfers.errors == 0 else 1


def _client_homed_in(region: str) -> str:
    """A client id whose webhook endpoints live in `region` (the only region started here)."""
    topology = load_topology()
    while True:
        client_id = "bench-" + uuid.uuid4().hex[:8]
        if topology.shard_for_slot(home_slot(client_id)).region == region:
            return client_id


async def _measure(
    region_url: str, router_url: str, client_id: str, ids: list[str], *, clients: int, seconds: float
) -> tuple[Figures, list[float], list[float], int]:
    arrived: dict[str, float] = {}  # event id -> commit-to-receipt ms (the first receipt)
    expected = [0]  # set once the load is over: how many transfers posted
    complete = asyncio.Event()

    async def receive(request: web.Request) -> web.Response:
        at = time.time()
        event = json.loads(await request.read())
        created = datetime.fromisoformat(event["created_at"].replace("Z", "+00:00")).timestamp()
        arrived.setdefault(event["id"], (at - created) * 1000)
        if expected[0] and len(arrived) >= expected[0]:
            complete.set()
        return web.Response(status=200)

    app = web.Application()
    app.router.add_post("/hook", receive)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    try:
        routed = Routed(client_id)
        timeout = aiohttp.ClientTimeout(total=REQUEST_TIMEOUT_S)
        async with aiohttp.ClientSession(router_url, timeout=timeout,
                                         connector=aiohttp.TCPConnector(ssl=client_tls())) as http:
            status, answer = await post_json(http, "/v1/webhook-endpoints", routed,
                                             {"url": f"http://127.0.0.1:{port}/hook"})
            assert status == 201, answer
        transfers = await transfer_workload("transfers (1 event each)", router_url, routed, pairs_within(ids),
                                            clients=clients, seconds=seconds)
        expected[0] = transfers.ops
        if len(arrived) < transfers.ops:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(complete.wait(), DELIVERY_WAIT_S)
    finally:
        await runner.cleanup()
    rates: list[float] = []
    total = 0
    for _ in range(ROUNDS):
        total, elapsed = await _walk_feed(region_url, Direct(client_id))
        rates.append(total / elapsed)
    return transfers, list(arrived.values()), rates, total


async def _walk_feed(url: str, auth: Direct) -> tuple[int, float]:
    """Every event of the client, pages of 100 from the start, merged as the router merges; (count, seconds)."""
    positions: dict[str, str] = {}
    count = 0
    timeout = aiohttp.ClientTimeout(total=REQUEST_TIMEOUT_S)
    started = time.perf_counter()
    async with aiohttp.ClientSession(url, timeout=timeout, connector=aiohttp.TCPConnector(ssl=client_tls())) as http:
        while True:
            path = "/v1/events?" + urlencode({"after": feed.encode_cursor(positions), "limit": "100"})
            async with http.get(path, headers=auth.headers("GET", path, b"", None)) as response:
                assert response.status == 200, await response.text()
                pages = pages_from_json(json.loads(await response.read()))
            items, positions, more = feed.merge(positions, pages, 100)
            count += len(items)
            if not more:
                return count, time.perf_counter() - started
