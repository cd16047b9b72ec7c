"""Forwarding to a region: one pool of kept-alive connections per region (bounded, explicit connect and read
timeouts) of the project's lean HTTP/1.1 client (app/api/http1.py). Not httpx: under concurrency it was 7x
slower than aiohttp as a proxy's client here (NOTES: Forwarding); not aiohttp either any more: its client
cost ~340 us of CPU per call against ~50 us for http1's, the largest item of the router's own work.

Every region is reached over TLS (app/security/tls.py): the connection verifies the region's certificate with
the context it is given (the internal CA, or the system trust store), and a region whose certificate does not
verify is never sent a byte of the request (NotConnected).

Failures, by class, at this boundary:

    NotConnected     the connection was never established (refused, connect timeout, TLS handshake or
                     certificate verification failed, no free pooled connection in time): the request was
                     not sent, so any request may be retried
    NoAnswer         the request may have been sent but no complete answer came (reset, read timeout):
                     its effect is unknown, so a POST is not retried here; the client retries with its
                     Idempotency-Key
"""

from __future__ import annotations

import ssl
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from app import limits, telemetry
from app.api import wan
from app.api.http1 import AnswerFailed, ConnectFailed, Pool


class UpstreamError(Exception):
    def __init__(self, region: str, cause: BaseException) -> None:
        self.region = region
        self.error_type = type(cause).__name__
        super().__init__(f"{region}: {self.error_type}")


class NotConnected(UpstreamError):
    """The request never left: no connection to the region could be made."""


class NoAnswer(UpstreamError):
    """The request may have reached the region; no complete answer came back."""


@dataclass(frozen=True, slots=True)
class Answer:
    status: int
    headers: list[tuple[bytes, bytes]]
    body: bytes


# Response headers passed back to the client; everything else (server, date, hop-by-hop) is the router's.
_PASSED_BACK = ("content-type", "location", "idempotent-replayed", "retry-after", "allow")


class Upstreams:
    """One connection pool per region, opened in the lifespan of the service that calls them (the router's,
    or a region's for its peers) and closed with it."""

    def __init__(
        self,
        urls: Mapping[str, str],
        *,
        tls: ssl.SSLContext,
        connections_max: int = limits.UPSTREAM_CONNECTIONS_MAX,
        connect_timeout_s: float = limits.UPSTREAM_CONNECT_TIMEOUT_S,
        read_timeout_s: float = limits.UPSTREAM_READ_TIMEOUT_S,
        local_region: str | None = None,
        wan_latency_ms: int = 0,
    ) -> None:
        self.urls = {region: url.rstrip("/") for region, url in urls.items()}
        # Simulated WAN (local stack only, app.api.wan): calls to regions other than ours pay this round trip.
        self._local_region = local_region
        self._wan_latency_ms = wan_latency_ms
        self._connections_max = connections_max
        self._tls = tls
        self._connect_timeout_s = connect_timeout_s
        self._read_timeout_s = read_timeout_s
        self._pools: dict[str, Pool] = {}
        # Labelled histogram children by (region, status): the label lookup costs more than the observation.
        self._durations: dict[tuple[str, str], Any] = {}

    async def open(self) -> None:
        for region, url in self.urls.items():
            self._pools[region] = Pool(
                url, tls=self._tls, connections_max=self._connections_max,
                connect_timeout_s=self._connect_timeout_s, read_timeout_s=self._read_timeout_s,
            )

    async def close(self) -> None:
        for pool in self._pools.values():
            pool.close()
        self._pools.clear()

    @property
    def is_open(self) -> bool:
        return bool(self._pools)

    def knows(self, region: str) -> bool:
        return region in self._pools

    async def send(
        self,
        region: str,
        method: str,
        path_qs: str,
        *,
        headers: Mapping[str, str],
        body: bytes | None,
        timeout_s: float | None = None,
    ) -> Answer:
        """One call to `region`; `timeout_s` bounds the wait for its answer (default: the read timeout)."""
        started = time.perf_counter()
        status = "none"
        try:
            with telemetry.client_span(region, method) as span:
                answer = await self._send(region, method, path_qs, headers, body, timeout_s)
                status = str(answer.status)
                if span is not None:
                    span.set_attribute("http.response.status_code", answer.status)
                return answer
        finally:
            duration = self._durations.get((region, status))
            if duration is None:
                duration = self._durations[(region, status)] = telemetry.METRICS.upstream.labels(
                    region, status, self._local_region or "")
            duration.observe(time.perf_counter() - started)

    async def _send(
        self, region: str, method: str, path_qs: str, headers: Mapping[str, str], body: bytes | None,
        timeout_s: float | None,
    ) -> Answer:
        pool = self._pools[region]
        # The call carries the trace context: this call's span when tracing, else the request's trace id.
        headers = dict(headers)
        telemetry.inject(headers)
        wan_ms = self._wan_latency_ms if region != self._local_region else 0
        if wan_ms:
            await wan.one_way(wan_ms)
        try:
            response = await pool.request(method, path_qs, headers=headers, body=body, timeout_s=timeout_s)
        except ConnectFailed as exc:
            raise NotConnected(region, exc) from None
        except AnswerFailed as exc:
            raise NoAnswer(region, exc) from None
        if wan_ms:
            await wan.one_way(wan_ms)
        passed = [(name.encode(), value.encode("latin-1"))
                  for name in _PASSED_BACK if (value := response.headers.get(name)) is not None]
        return Answer(response.status, passed, response.body)
