"""Per-client rate limits at the router (DESIGN D8): one token bucket per verified client id.

A bucket holds at most `burst` tokens and refills at `rate_per_s`; a request takes one token or is refused
with 429 `rate_limited` and a `Retry-After` (whole seconds, at least 1) saying when the next token will be
there. Refused requests take nothing, so a client that waits as told always gets through.

The check runs after the client's token is verified (so only real client ids are tracked) and before the
body is read or anything is forwarded (so a refused request costs the router almost nothing).

Limits are per router process: N routers (or N processes of one) let a client through at up to N times the
configured rate. Each process runs one event loop and the check never awaits, so no lock is needed.

Memory is bounded: at most `clients_max` buckets are tracked, in least-recently-used order. To admit a new
client when full, the least recently used bucket is dropped. Dropping a bucket that has refilled completely
loses nothing (a new bucket starts full too), and the least recently used one is the likeliest to have; it
is lossy only when every tracked client was seen within `burst / rate_per_s` seconds. Even then, a client
cannot use eviction to refill its own bucket cheaply: it must first make `clients_max` other verified
clients send requests, each of which its own bucket allows anyway, and it cannot pick someone else's bucket
to reset: only the longest idle one goes.
"""

from __future__ import annotations

import logging
import math
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass

from app import limits, telemetry
from app.errors import Problem

log = logging.getLogger("txroute.router")

REASON_CLIENT_RATE = "client_rate"  # the metrics' and the problem's `limit` for this limiter


@dataclass(slots=True)
class TokenBucket:
    """Tokens left at `updated_s` (a monotonic clock's reading); refilled lazily on each `take`."""

    tokens: float
    updated_s: float
    # When this client's refusal was last logged (the log says who is throttled without a line per refusal).
    logged_s: float = -math.inf


class ClientRateLimiter:
    """Token buckets by client id; `check(client)` answers or raises 429. See the module docstring."""

    def __init__(
        self,
        *,
        rate_per_s: float,
        burst: int,
        clients_max: int = limits.RATE_LIMIT_CLIENTS_MAX,
        clock: Callable[[], float] = time.monotonic,
        region: str = "",
    ) -> None:
        assert rate_per_s > 0 and burst >= 1 and clients_max >= 1, (rate_per_s, burst, clients_max)
        self.rate_per_s = rate_per_s
        self.burst = burst
        self.clients_max = clients_max
        self._clock = clock
        self._buckets: OrderedDict[str, TokenBucket] = OrderedDict()
        self._refused = telemetry.METRICS.rate_limited.labels(REASON_CLIENT_RATE, region)

    def __len__(self) -> int:
        return len(self._buckets)

    def retry_after_s(self, client: str) -> int | None:
        """Take a token for `client`: None when the request may go on, else whole seconds (>= 1) until the
        bucket holds a token again."""
        now = self._clock()
        buckets = self._buckets
        bucket = buckets.get(client)
        if bucket is None:
            if len(buckets) >= self.clients_max:
                buckets.popitem(last=False)  # the least recently used: see the module docstring
            bucket = buckets[client] = TokenBucket(float(self.burst), now)
        else:
            buckets.move_to_end(client)
            elapsed_s = now - bucket.updated_s
            if elapsed_s > 0:
                bucket.tokens = min(float(self.burst), bucket.tokens + elapsed_s * self.rate_per_s)
                bucket.updated_s = now
        if bucket.tokens >= 1.0:
            bucket.tokens -= 1.0
            return None
        wait_s = (1.0 - bucket.tokens) / self.rate_per_s
        if now - bucket.logged_s >= limits.RATE_LIMIT_LOG_INTERVAL_S:
            bucket.logged_s = now
            log.warning("client_throttled", extra={"client": client, "limit": REASON_CLIENT_RATE})
        return max(1, math.ceil(wait_s))

    def check(self, client: str) -> None:
        """Raise 429 `rate_limited` with Retry-After when `client` is over its rate."""
        retry_after_s = self.retry_after_s(client)
        if retry_after_s is not None:
            self._refused.inc()
            raise Problem(
                "rate_limited",
                f"client {client} is over its rate of {self.rate_per_s:g} requests/s (burst {self.burst}); "
                f"retry after {retry_after_s} s",
                extra={"limit": REASON_CLIENT_RATE},
                headers={"retry-after": str(retry_after_s)},
            )
