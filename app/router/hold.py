"""Holding requests whose slot is moving (DESIGN D13), the way vtgate buffers during a Vitess reshard.

For the short freeze before a slot range changes owner, the region answers any request touching it with
`503 slot_moving` and writes nothing. A router that gets that answer does not pass it on at once: it holds
the request and sends it again, after a backoff doubling from SLOT_MOVING_BACKOFF_MS_MIN to _MAX and at once
when the shard map is refreshed, until an answer other than slot_moving comes or the hold (default
SLOT_MOVING_HOLD_S_DEFAULT, TXROUTE_SLOT_MOVING_HOLD_S) has passed. A 421 during the hold means the switch
landed: the attempt refreshes the map and asks the new owner (app/router/app.py `_to_owner`); a 421 that
the map cannot explain yet keeps the request held. So a client sees latency, not an error.

Resending is safe: a slot_moving or 421 answer wrote nothing, and every write carries its Idempotency-Key.
Each attempt carries a hop token minted for it and bound to the same request, so no token outlives a hold.

Past the hold the client is answered `503 slot_moving` with Retry-After; past SLOT_MOVING_HELD_REQUESTS_MAX
requests held at once, at once. Every hold is counted by outcome (`txroute_router_held_requests_total`) and
timed (`txroute_router_hold_duration_seconds`).
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable

from app import limits, telemetry
from app.api.upstreams import Answer
from app.errors import slot_moving
from app.router.shardmap import ShardMapCache

# One more try of the held request at its slot's current owner.
Attempt = Callable[[], Awaitable[Answer]]


def is_slot_moving(answer: Answer) -> bool:
    """A region's 503 slot_moving (problem+json bodies carry their code; a 503 is small)."""
    return answer.status == 503 and b'"slot_moving"' in answer.body


class SlotMovingHold:
    """Holds requests answered slot_moving; one per router process."""

    def __init__(self, *, shardmap: ShardMapCache, hold_s: float, region: str) -> None:
        assert 0 <= hold_s <= limits.SLOT_MOVING_HOLD_S_MAX, hold_s
        self.shardmap = shardmap
        self.hold_s = hold_s
        self.region = region
        self.held = 0  # requests held right now

    async def hold(self, attempt: Attempt) -> Answer:
        """Try `attempt` until it answers other than slot_moving (or 421), or the hold has passed."""
        metrics = telemetry.METRICS
        if self.held >= limits.SLOT_MOVING_HELD_REQUESTS_MAX:
            metrics.held_requests.labels("overflow", self.region).inc()
            raise slot_moving(f"the account's slot is moving and this router holds {self.held} requests already")
        self.held += 1
        metrics.held_now.labels(self.region).inc()
        started = time.monotonic()
        deadline = started + self.hold_s
        backoff_s = limits.SLOT_MOVING_BACKOFF_MS_MIN / 1000
        outcome = "error"  # a region that could not be reached during the hold raises its own problem
        try:
            while (remaining_s := deadline - time.monotonic()) > 0:
                await self.shardmap.wait_refreshed(self.shardmap.current.version, min(backoff_s, remaining_s))
                backoff_s = min(backoff_s * 2, limits.SLOT_MOVING_BACKOFF_MS_MAX / 1000)
                answer = await attempt()
                if answer.status != 421 and not is_slot_moving(answer):
                    outcome = "released"
                    return answer
            outcome = "timeout"
            raise slot_moving(f"the account's slot is still moving after {self.hold_s:g} s")
        finally:
            self.held -= 1
            metrics.held_now.labels(self.region).dec()
            metrics.held_requests.labels(outcome, self.region).inc()
            metrics.hold_duration.labels(outcome, self.region).observe(time.monotonic() - started)
