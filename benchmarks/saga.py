"""`txroute bench saga`: what a cross-region transfer costs, and how fast the relay drains a backlog.

With a SIMULATED round-trip time R between regions (default 40 ms, the local stack's `--wan-latency`), the
same transfer workload runs twice in one run: between accounts of one shard (no saga) and from eu-west-1 to
us-east-1 (a saga on the fast path: one round trip to the credit side before the answer). Expected: the
cross-region p50 is about R plus the same-shard p50 plus a few milliseconds.

Then the relay: the source region is restarted with its relay paused and its fast path off, a backlog of
transfers is committed, and the source restarted normally; the figure is messages delivered per second
while the backlog drains, counted from the moment the restarted source answers ready (each delivery pays R;
the relay sends batches of up to SAGA_RELAY_BATCH_MESSAGES_MAX messages per credit shard, up to
SAGA_RELAY_IN_FLIGHT_PER_DESTINATION_MAX messages at once per destination region).
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid

import asyncpg

from app import limits
from app.topology.loader import load_topology
from benchmarks.client import Direct
from benchmarks.common import (
    WARM_UP_S,
    Figures,
    fresh_cluster,
    open_accounts,
    pairs_within,
    print_json,
    region_service,
    transfer_workload,
    use_generator,
)

SOURCE, DESTINATION = "eu-west-1", "us-east-1"
DRAIN_POLL_S = 0.05
DRAIN_TIMEOUT_S = 300.0


def run(*, clients: int, seconds: float, accounts: int, rtt_ms: int, backlog: int, generator: str = "auto",
        as_json: bool = False) -> int:
    assert 1 <= clients <= 256 and 1 <= seconds <= 600 and 2 <= accounts <= 1_000
    assert 0 <= rtt_ms <= limits.WAN_LATENCY_MS_MAX and 1 <= backlog <= 100_000
    use_generator(generator)
    clusters = {r: fresh_cluster(f"bench-saga-{r}") for r in (SOURCE, DESTINATION)}
    wan = {"TXROUTE_WAN_LATENCY_MS": str(rtt_ms)}
    services = {r: region_service(r, c, c.folder / "region.log", **wan) for r, c in clusters.items()}
    urls = json.dumps({r: s.url for r, s in services.items()})
    for service in services.values():
        service.env["TXROUTE_REGION_URLS"] = urls
    try:
        for service in services.values():
            service.start()
        for service in services.values():
            service.wait_ready()
        print(f"txroute bench saga: simulated RTT {rtt_ms} ms between regions, {clients} clients, "
              f"{seconds:.0f} s each, {accounts} accounts per side")
        same, cross = asyncio.run(_latency(services[SOURCE].url, services[DESTINATION].url,
                                           clients=clients, seconds=seconds, accounts=accounts))
        print(same.line())
        print(cross.line())
        added = cross.percentile(0.5) - same.percentile(0.5)
        print(f"cross-region p50 - same-shard p50 = {added:.1f} ms for a simulated RTT of {rtt_ms} ms "
              f"(overhead beyond one round trip: {added - rtt_ms:+.1f} ms)")
        drained = _drain(services, clusters[SOURCE], backlog=backlog)
        print(f"{drained.name:<30} {drained.per_second:>9.0f}/s  ({drained.ops} messages in {drained.seconds:.1f} s, "
              f"batches of up to {limits.SAGA_RELAY_BATCH_MESSAGES_MAX}, each paying the {rtt_ms} ms RTT; up to "
              f"{limits.SAGA_RELAY_IN_FLIGHT_PER_DESTINATION_MAX} in flight per shard and destination)")
        if as_json:
            print_json({"overhead_ms": round(added - rtt_ms, 2), "relay_per_s": round(drained.per_second, 1),
                        "rtt_ms": rtt_ms, "cross_p50_ms": round(cross.percentile(0.5), 2),
                        "same_p50_ms": round(same.percentile(0.5), 2), "clients": clients})
    finally:
        for service in services.values():
            service.stop()
        for cluster in clusters.values():
            cluster.stop()
    return 0 if same.errors == 0 and cross.errors == 0 else 1


async def _latency(source_url: str, destination_url: str, *, clients: int, seconds: float,
                   accounts: int) -> tuple[Figures, Figures]:
    client_id = "bench-" + uuid.uuid4().hex[:8]
    auth = Direct(client_id)
    sources = await open_accounts(source_url, client_id, accounts)
    destinations = await open_accounts(destination_url, client_id, accounts)
    same_pick = pairs_within(sources)

    def cross_pick(i: int) -> tuple[str, str]:
        return sources[i % len(sources)], destinations[(i * 7 + 3) % len(destinations)]

    await transfer_workload("warm-up", source_url, auth, cross_pick, clients=clients, seconds=WARM_UP_S)
    same = await transfer_workload("same shard", source_url, auth, same_pick, clients=clients, seconds=seconds)
    cross = await transfer_workload(f"cross-region ({SOURCE} -> {DESTINATION})", source_url, auth, cross_pick,
                                    clients=clients, seconds=seconds)
    return same, cross


def _drain(services: dict, source_cluster: object, *, backlog: int) -> Figures:  # type: ignore[type-arg]
    from app.local.postgres import Cluster

    assert isinstance(source_cluster, Cluster)
    source = services[SOURCE]
    source.stop()
    source.env.update(TXROUTE_FAULT_RELAY_PAUSED="1", TXROUTE_FAULT_SKIP_FAST_PATH="1")
    source.start()
    source.wait_ready()
    client_id = "bench-" + uuid.uuid4().hex[:8]

    async def fill() -> None:
        sources = await open_accounts(source.url, client_id, 10)
        destinations = await open_accounts(services[DESTINATION].url, client_id, 10)
        await transfer_workload(
            "backlog", source.url, Direct(client_id),
            lambda i: (sources[i % 10], destinations[(i // 10) % 10]),
            clients=16, seconds=max(1.0, backlog / 400), ok=(202,),
        )

    asyncio.run(fill())
    dsns = [source_cluster.dsn(s.database) for s in load_topology().region(SOURCE).shards]
    asyncio.run(_pending(dsns, make_due=True))
    source.stop()
    for name in ("TXROUTE_FAULT_RELAY_PAUSED", "TXROUTE_FAULT_SKIP_FAST_PATH"):
        source.env.pop(name)
    source.start()
    source.wait_ready()
    # The relay starts with the process, before it answers ready: only what is left from here is counted.
    started = time.monotonic()
    pending = asyncio.run(_pending(dsns))
    while (left := asyncio.run(_pending(dsns))) > 0:
        assert time.monotonic() - started < DRAIN_TIMEOUT_S, f"{left} messages still pending"
        time.sleep(DRAIN_POLL_S)
    elapsed = time.monotonic() - started
    return Figures(f"relay drain of {pending} messages", pending, 0, elapsed, [])


async def _pending(dsns: list[str], *, make_due: bool = False) -> int:
    total = 0
    for dsn in dsns:
        conn = await asyncpg.connect(dsn)
        try:
            if make_due:
                await conn.execute("update outbox set next_attempt_at = now() where delivered_at is null")
            total += int(await conn.fetchval("select count(*) from outbox where delivered_at is null"))
        finally:
            await conn.close()
    return total
