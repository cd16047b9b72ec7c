"""`txroute ops drain|undrain <region>`: stop (or resume) new writes for a region's accounts.

The flag is written to every shard database of the region (migration 0003), where the data is: the region
re-reads it every REGION_DRAIN_POLL_S and refuses public writes with 503 `region_draining` + Retry-After;
every router re-reads it every SHARDMAP_REFRESH_PERIOD_S (and on a region's 503) and answers those writes
itself. Reads continue, and internal saga messages are still applied, so sagas in flight finish.
"""

from __future__ import annotations

import asyncio
import time

import asyncpg
import httpx

from app import limits
from app.ops.target import OpsError, Target, confirm, each_shard

ROUTERS_LEARN_TIMEOUT_S = 3 * limits.SHARDMAP_REFRESH_PERIOD_S + 5.0
DRAIN_REASON_CHARS_MAX = 200


async def set_drain(target: Target, region: str, *, drain: bool, reason: str, yes: bool) -> bool:
    shards = target.shards_of(region)
    if not shards:
        raise OpsError(f"no shard database of region {region} is configured (--dsn)")
    if len(reason) > DRAIN_REASON_CHARS_MAX:
        raise OpsError(f"--reason may hold at most {DRAIN_REASON_CHARS_MAX} characters")
    verb = "drain" if drain else "undrain"
    effect = (
        "new writes (opens, deposits, withdrawals, transfers) for its accounts are refused with 503 "
        f"region_draining and Retry-After {limits.REGION_DRAINING_RETRY_AFTER_S}s by the region within "
        f"{limits.REGION_DRAIN_POLL_S:g}s and by every router within {limits.SHARDMAP_REFRESH_PERIOD_S:g}s; "
        "reads and sagas in flight continue"
        if drain else "the region and every router take new writes for its accounts again"
    )
    plan = [f"{verb} region {region}: record it in shard databases {', '.join(shards)}", effect]
    if target.router_urls:
        plan.append(f"wait up to {ROUTERS_LEARN_TIMEOUT_S:g}s until routers {', '.join(target.router_urls)} report it")
    if not confirm(plan, yes):
        return True

    async def write(conn: asyncpg.Connection, shard: str) -> None:
        # Through the ledger's function (migration 0005), so the service role may run it as well as the owner.
        await conn.execute("select txr_region_drain($1)", (reason or "drained by txroute ops drain") if drain else None)

    results = await each_shard(target, write, shards)
    failed = [f"{r.shard}: {r.error}" for r in results if r.error]
    if failed:
        print(f"FAILED to record the {verb} in: {'; '.join(failed)}")
        print("the shards written above are changed; run the command again once those are reachable")
        return False
    print(f"recorded: region {region} {'drained' if drain else 'undrained'} in {', '.join(shards)}")
    return await _wait_routers(target, region, drain)


async def _wait_routers(target: Target, region: str, drain: bool) -> bool:
    pending = list(target.router_urls)
    deadline = time.monotonic() + ROUTERS_LEARN_TIMEOUT_S
    async with httpx.AsyncClient(timeout=2.0, verify=target.tls()) as http:
        while pending and time.monotonic() < deadline:
            for url in list(pending):
                try:
                    draining = (await http.get(url + "/readyz")).json().get("draining", [])
                except (httpx.HTTPError, ValueError):
                    continue
                if (region in draining) == drain:
                    pending.remove(url)
                    print(f"router {url}: {'draining' if drain else 'serving'} {region}")
            if pending:
                await asyncio.sleep(0.2)
    for url in pending:
        print(f"WARNING router {url} did not report it within {ROUTERS_LEARN_TIMEOUT_S:g}s "
              "(the region itself refuses writes regardless)")
    return not pending
