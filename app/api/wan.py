"""Simulated WAN latency for the local stack (`txroute up --wan-latency 40ms`): a SIMULATION, off by default.

Every call from one region to another (router to a remote region, region to region) waits half the
configured round-trip time before it is sent and half after its answer, so one cross-region round trip
costs the configured time, as it would between real regions.
"""

from __future__ import annotations

import asyncio


async def one_way(rtt_ms: int) -> None:
    if rtt_ms > 0:
        await asyncio.sleep(rtt_ms / 2000)
