"""Liveness and readiness of a regional process (what ECS and the load balancers probe).

`/healthz` is liveness: the process runs and its event loop answers. It touches no database, so a database
failover (about 35 s for a Multi-AZ cluster) or a saturated pool never gets a healthy task killed.

`/readyz` is readiness: every shard of the region answered a check on a connection of its own (not the
pool's, so a busy pool does not fail it) and is migrated, and the region's drain flag has been read. The
checks run in the background every READINESS_CHECK_PERIOD_S, each bounded by READINESS_CHECK_TIMEOUT_S; the
route only reads the cached result, and a result older than READINESS_RESULT_AGE_S_MAX counts as not ready.
A process whose database is unreachable at start starts anyway, answers 503 not_ready, and becomes ready
when the database answers, instead of crash-looping.
"""

from __future__ import annotations

import asyncio
import logging
import time

from app import limits
from app.api.schemas import RegionReadiness
from app.region.service import RegionLedger

log = logging.getLogger("txroute.region")


class Readiness:
    def __init__(self, ledger: RegionLedger) -> None:
        self._ledger = ledger
        self._shards: dict[str, bool] = dict.fromkeys(ledger.stores, False)
        self._checked_at: float | None = None

    async def check(self) -> None:
        """Check every shard at once; then read the drain flag if it was never read (it needs the shards)."""
        stores = self._ledger.stores
        results = await asyncio.gather(*(store.ready() for store in stores.values()))
        self._shards = dict(zip(stores, results, strict=True))
        self._checked_at = time.monotonic()
        if all(results) and not self._ledger.drain_known:
            await self._ledger.refresh_drain()

    async def check_forever(self) -> None:
        while True:
            was_ready = self.ready
            try:
                await self.check()
            except Exception as exc:  # the checker must outlive any one failure; the result goes stale
                log.error("readiness_check_error", extra={"error_type": type(exc).__name__})
            if self.ready != was_ready:
                log.warning("readiness_changed", extra={"ready": self.ready, "shards": self._shards})
            await asyncio.sleep(limits.READINESS_CHECK_PERIOD_S)

    @property
    def ready(self) -> bool:
        fresh = self._checked_at is not None and (
            time.monotonic() - self._checked_at <= limits.READINESS_RESULT_AGE_S_MAX
        )
        return fresh and bool(self._shards) and all(self._shards.values()) and self._ledger.drain_known

    def answer(self) -> tuple[int, RegionReadiness]:
        ready = self.ready
        return (200 if ready else 503), RegionReadiness(status="ready" if ready else "not_ready",
                                                        shards=dict(self._shards))
