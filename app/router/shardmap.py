"""The router's shard map: slot -> region, a 4096-entry table read on every request with no I/O.

It starts from `regions/` and is corrected from the regions' own claims (`/internal/shardmap`, DESIGN D2)
when a region answers 421. A region that cannot be asked keeps its slots as they were; a slot is moved only
by a region that claims it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import Any

from app import limits
from app.topology.model import SLOT_COUNT, Topology

log = logging.getLogger("txroute.router.shardmap")

# Fetches one region's claims; raises on any failure (the caller keeps that region's slots as they were).
FetchClaims = Callable[[str], Awaitable[Mapping[str, Any]]]


@dataclass(frozen=True, slots=True)
class ShardMap:
    regions: tuple[str, ...]  # slot -> region name
    version: int = 1
    # Regions drained by `txroute ops drain`: their accounts' writes are answered 503 region_draining here.
    draining: frozenset[str] = frozenset()

    def __post_init__(self) -> None:
        assert len(self.regions) == SLOT_COUNT, len(self.regions)

    @classmethod
    def from_topology(cls, topology: Topology) -> ShardMap:
        return cls(tuple(topology.shard_for_slot(slot).region for slot in range(SLOT_COUNT)))

    def region_for_slot(self, slot: int) -> str:
        return self.regions[slot]

    def with_claims(self, claims: Mapping[str, Mapping[str, Any]]) -> ShardMap:
        """This map corrected by each answering region's `/internal/shardmap` document."""
        table = list(self.regions)
        draining = set(self.draining)
        for region, document in claims.items():
            if document.get("draining"):
                draining.add(region)
            else:
                draining.discard(region)
            for shard in document.get("shards", []):
                for claim in shard.get("slots", []):
                    if claim.get("state") != "owned":
                        continue
                    lo, hi = int(claim["slot_lo"]), int(claim["slot_hi"])
                    if not 0 <= lo <= hi < SLOT_COUNT:
                        raise ValueError(f"region {region} claims slots {lo}-{hi}, outside 0..{SLOT_COUNT - 1}")
                    table[lo : hi + 1] = [region] * (hi - lo + 1)
        return ShardMap(tuple(table), self.version + 1, frozenset(draining))


class ShardMapCache:
    """The current map, refreshed at most once per interval and by one task at a time."""

    def __init__(self, initial: ShardMap, regions: tuple[str, ...], fetch: FetchClaims) -> None:
        self.current = initial
        self._regions = regions
        self._fetch = fetch
        self._lock = asyncio.Lock()
        self._refreshed_at = float("-inf")
        # Set (and replaced) by every refresh: requests held for a moving slot wait on it (app/router/hold.py).
        self._refreshed = asyncio.Event()

    def region_for_slot(self, slot: int) -> str:
        return self.current.region_for_slot(slot)

    async def wait_refreshed(self, seen_version: int, timeout_s: float) -> None:
        """Return when the map is newer than `seen_version` (a refresh landed), or after `timeout_s`."""
        if self.current.version != seen_version:
            return
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(timeout_s):
                await self._refreshed.wait()

    async def refresh_forever(self, period_s: float) -> None:
        """Re-read every region's claims each `period_s`, so a drain (which no request to this router need
        reveal) is learnt within that bound."""
        assert period_s > 0, period_s
        while True:
            await asyncio.sleep(period_s)
            try:
                await self.refresh(seen_version=self.current.version)
            except Exception as exc:  # the loop must outlive any one failure; the map stays as it was
                log.error("shardmap_refresh_error", extra={"error_type": type(exc).__name__})

    async def refresh(self, *, seen_version: int) -> ShardMap:
        """Refresh unless someone did since the caller read `seen_version`, or did so moments ago."""
        async with self._lock:
            recent = time.monotonic() - self._refreshed_at < limits.SHARDMAP_REFRESH_INTERVAL_S_MIN
            if self.current.version != seen_version or recent:
                return self.current
            results = await asyncio.gather(*(self._fetch(r) for r in self._regions), return_exceptions=True)
            claims = {}
            for region, result in zip(self._regions, results, strict=True):
                if isinstance(result, BaseException):
                    log.warning("shardmap_region_unreachable", extra={"upstream": region,
                                                                      "error_type": type(result).__name__})
                else:
                    claims[region] = result
            try:
                self.current = self.current.with_claims(claims)
            except (ValueError, KeyError, TypeError) as exc:
                log.error("shardmap_claims_invalid", extra={"error_type": type(exc).__name__})
            self._refreshed_at = time.monotonic()
            woken, self._refreshed = self._refreshed, asyncio.Event()
            woken.set()
            log.debug("shardmap_refreshed", extra={"version": self.current.version, "regions": len(claims)})
            return self.current
