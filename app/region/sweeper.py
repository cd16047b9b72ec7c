"""The hold sweeper (DESIGN D14): records `expired` for holds whose time has come, per shard of the region.

Expiry takes effect at its time without it (reads and postings count only the holds whose time has not come,
migration 0009); the sweeper gives the reservation back in `accounts.held`, writes the transition's history and
makes the hold's stored responses say `expired`. Each round is one transaction of at most HOLD_SWEEP_BATCH_MAX
holds; a full round is followed at once by another, else the sweeper waits HOLD_SWEEP_INTERVAL_MS.
"""

from __future__ import annotations

import asyncio
import logging

import asyncpg

from app import limits
from app.store.shard import ShardStore, ShardUnavailable

log = logging.getLogger("txroute.holds")


async def sweep_forever(stores: dict[str, ShardStore]) -> None:
    await asyncio.gather(*(_sweep_shard(store) for store in stores.values()))


async def sweep_once(store: ShardStore) -> int:
    """One round on one shard; returns how many holds it expired."""
    return await store.expire_holds(limit=limits.HOLD_SWEEP_BATCH_MAX)


async def _sweep_shard(store: ShardStore) -> None:
    while True:
        expired = 0
        try:
            expired = await sweep_once(store)
            if expired:
                log.info("holds_expired", extra={"shard": store.name, "count": expired})
        except (ShardUnavailable, asyncpg.PostgresError) as exc:  # the next round tries again
            log.warning("hold_sweep_failed", extra={"shard": store.name, "error_type": type(exc).__name__})
        except Exception as exc:  # the sweeper must outlive any one failure; the holds wait in the table
            log.error("hold_sweep_error", extra={"shard": store.name, "error_type": type(exc).__name__})
        if expired < limits.HOLD_SWEEP_BATCH_MAX:
            await asyncio.sleep(limits.HOLD_SWEEP_INTERVAL_MS / 1000)
