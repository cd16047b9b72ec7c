"""Forwarding to a region: one pooled aiohttp client per region (keep-alive, bounded pool, explicit connect
and read timeouts). aiohttp, not httpx: under concurrency httpx was 7x slower as a proxy's client here
(NOTES: Forwarding).

Every region is reached over TLS (app/security/tls.py): the session verifies the region's certificate with
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

import aiohttp

from app import limits, telemetry
from app.api import wan


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
_NEVER_CONNECTED = (aiohttp.ClientConnectorError, aiohttp.ConnectionTimeoutError)
_NO_ANSWER = (aiohttp.ClientError, TimeoutError)


class Upstreams:
    """One `ClientSession` per region, opened in the router's lifespan and closed with it."""

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
        self._timeout = aiohttp.ClientTimeout(
            total=None, connect=connect_timeout_s, sock_connect=connect_timeout_s, sock_read=read_timeout_s
        )
        self._sessions: dict[str, aiohttp.ClientSession] = {}

    async def open(self) -> None:
        for region, url in self.urls.items():
            connector = aiohttp.TCPConnector(
                limit=self._connections_max,
                limit_per_host=self._connections_max,
                keepalive_timeout=limits.UPSTREAM_KEEPALIVE_S,
                ttl_dns_cache=60,
                ssl=self._tls,
            )
            self._sessions[region] = aiohttp.ClientSession(
                base_url=url,
                connector=connector,
                timeout=self._timeout,
                auto_decompress=False,
                skip_auto_headers=("User-Agent", "Accept-Encoding", "Accept"),
                raise_for_status=False,
            )

    async def close(self) -> None:
        for session in self._sessions.values():
            await session.close()
        self._sessions.clear()

    @property
    def is_open(self) -> bool:
        return bool(self._sessions)

    def knows(self, region: str) -> bool:
        return region in self._sessions

    async def send(
        self,
        region: str,
        method: str,
        path_qs: str,
        *,
        headers: Mapping[str, str],
        body: bytes | None,
        timeout: aiohttp.ClientTimeout | None = None,  # noqa: ASYNC109 - aiohttp's own per-call timeout
    ) -> Answer:
        started = time.perf_counter()
        status = "none"
        try:
            with telemetry.client_span(region, method) as span:
                answer = await self._send(region, method, path_qs, headers, body, timeout)
                status = str(answer.status)
                if span is not None:
                    span.set_attribute("http.response.status_code", answer.status)
                return answer
        finally:
            telemetry.METRICS.upstream.labels(region, status, self._local_region or "").observe(
                time.perf_counter() - started
            )

    async def _send(
        self, region: str, method: str, path_qs: str, headers: Mapping[str, str], body: bytes | None,
        timeout: aiohttp.ClientTimeout | None,  # noqa: ASYNC109 - aiohttp's own per-call timeout
    ) -> Answer:
        session = self._sessions[region]
        # The call carries the trace context: this call's span when tracing, else the request's trace id.
        headers = dict(headers)
        telemetry.inject(headers)
        wan_ms = self._wan_latency_ms if region != self._local_region else 0
        await wan.one_way(wan_ms)
        try:
            async with session.request(
                method, path_qs, data=body, headers=headers, allow_redirects=False, timeout=timeout
            ) as response:
                data = await response.read()
                passed = [
                    (name.encode(), value.encode())
                    for name in _PASSED_BACK
                    if (value := response.headers.get(name)) is not None
                ]
            await wan.one_way(wan_ms)
            return Answer(response.status, passed, data)
        except _NEVER_CONNECTED as exc:
            raise NotConnected(region, exc) from None
        except _NO_ANSWER as exc:
            raise NoAnswer(region, exc) from None
