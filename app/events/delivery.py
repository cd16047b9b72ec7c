"""The region's webhook worker (issue 13): queues each endpoint's events as deliveries and sends them.

    ingest   for every enabled endpoint homed on this region's shards, read the client's events after the
             endpoint's feed position from every shard (this region's directly, other regions' over their
             internal API, `/internal/events`, with a saga token) and queue them in webhook_deliveries; the
             position advances in the same transaction (txr_webhook_ingest), so each event is queued once
    send     claim due deliveries (leased: a crash makes them due again) and POST each with the Standard
             Webhooks headers, at most WEBHOOK_IN_FLIGHT_PER_ENDPOINT_MAX at once per endpoint and
             WEBHOOK_IN_FLIGHT_MAX in all, so a slow endpoint holds up only its own deliveries

An attempt ends one of three ways: 2xx delivered; 410 Gone disables the endpoint; anything else (another
status, the WEBHOOK_TIMEOUT_S timeout, a refused connection or address) is retried on the schedule
(WEBHOOK_RETRY_SCHEDULE_S with jitter) and, once it is over, fails the delivery and disables the endpoint with
its reason (the alert and `txroute ops webhooks` take it from there). Every attempt carries the same
webhook-id (the event id) and the same body; the schedule lives in the database and survives restarts.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import time
from collections.abc import Sequence
from datetime import datetime
from typing import Any
from urllib.parse import urlencode

import aiohttp
import msgspec

from app import limits, telemetry
from app.api.upstreams import UpstreamError, Upstreams
from app.events import signing
from app.events.feed import ShardPage, encode_cursor, valid_position
from app.events.urls import GuardedResolver, UrlPolicy, UrlRefused, check_url, refused_at_connection
from app.events.webhooks import retry_delay_s
from app.security.tokens import BoundRequest, SagaTokenMinter, request_target
from app.store.shard import ShardStore, ShardUnavailable
from app.topology.model import Topology

log = logging.getLogger("txroute.webhooks")

INTERNAL_EVENTS_PATH = "/internal/events"


async def read_pages(
    stores: dict[str, ShardStore], client: str, positions: dict[str, str], types: list[str] | None, limit: int,
    *, skip_unavailable_in: str | None = None, since: datetime | None = None,
) -> list[ShardPage]:
    """One page of the client's events from each of these shards, after its position. A shard that cannot be
    read in time fails the whole read (the client's feed answers 503), unless `skip_unavailable_in` names the
    region (the webhook worker's reads): then that shard is left out (`shard_unavailable`), its position does not
    move, and it is read again on a later pass, while the other shards' events go on being delivered. A shard
    missing from `positions` is read from its beginning, or with `since` (a webhook endpoint's creation) from
    its first event created since (ShardStore.events_page)."""

    async def one(name: str, store: ShardStore) -> ShardPage | None:
        try:
            async with asyncio.timeout(limits.EVENTS_FEED_DB_TIMEOUT_S):
                read = await store.events_page(client, positions.get(name), types, limit, since=since)
        except (ShardUnavailable, TimeoutError) as exc:
            if skip_unavailable_in is None:
                raise
            shard_unavailable(skip_unavailable_in, name, "feed_read", exc)
            return None
        return ShardPage(name, read.items, read.more, read.scanned)

    pages = await asyncio.gather(*(one(name, store) for name, store in stores.items()))
    return [page for page in pages if page is not None]


def shard_unavailable(region: str, shard: str, stage: str, exc: BaseException) -> None:
    """A shard (or a peer region, `shard` then names it) could not be read or written in time for the webhook
    worker at `stage`: logged with a stable event name and counted; the worker goes on with the others."""
    log.warning("webhook_shard_unavailable",
                extra={"shard": shard, "stage": stage, "error_type": type(exc).__name__})
    telemetry.METRICS.webhook_shard_errors.labels(region, shard, stage).inc()


def pages_json(pages: Sequence[ShardPage]) -> dict[str, Any]:
    return {"shards": [{"shard": p.shard, "more": p.more, "scanned": p.scanned,
                        "items": [{"position": pos, "event": e} for pos, e in p.items]} for p in pages]}


def pages_from_json(doc: dict[str, Any]) -> list[ShardPage]:
    """A region's pages; `scanned` is checked like a cursor's position (a region before it sends none)."""
    pages = []
    for s in doc["shards"]:
        scanned = s.get("scanned")
        if scanned is not None and not valid_position(scanned):
            raise ValueError(f"a region sent an invalid scanned position for {s['shard']}")
        pages.append(ShardPage(s["shard"], [(i["position"], i["event"]) for i in s["items"]], bool(s["more"]),
                               scanned))
    return pages


class WebhookWorker:
    def __init__(
        self,
        *,
        region: str,
        topology: Topology,
        stores: dict[str, ShardStore],
        peers: Upstreams | None,
        minter: SagaTokenMinter | None,
        policy: UrlPolicy,
        schedule_s: Sequence[float],
    ) -> None:
        self.region = region
        self.topology = topology
        self.stores = stores
        self.peers = peers
        self.minter = minter
        self.policy = policy
        self.schedule_s = tuple(schedule_s)
        self._in_flight: dict[str, int] = {}
        self._tasks: set[asyncio.Task[None]] = set()
        self._session: aiohttp.ClientSession | None = None
        # Set when an attempt ends or events were queued: the sender claims again at once instead of polling.
        self._wake = asyncio.Event()
        # Attempts' results are written through the shards' pools, which postings share: however many sends end
        # at once (up to WEBHOOK_IN_FLIGHT_MAX, e.g. a pass of slow endpoints timing out together), at most this
        # many of their writes wait for or hold a connection.
        self._record_gate = asyncio.Semaphore(limits.WEBHOOK_RECORD_CONCURRENCY_MAX)

    # Ingest -----------------------------------------------------------------------------------------

    async def ingest_once(self) -> int:
        """Queue the new events of every enabled endpoint of this region; returns how many were queued. A shard
        that cannot be read or written is skipped (logged, counted, tried again next pass): the endpoints of the
        other shards, and the other shards' events of every endpoint, go on."""
        added = 0
        for name, store in self.stores.items():
            try:
                async with asyncio.timeout(limits.EVENTS_FEED_DB_TIMEOUT_S):
                    endpoints = await store.webhook_rows(
                        "webhook_endpoints_enabled",
                        """select id, client, event_types, feed_position, created_at from webhook_endpoints
                           where state = 'enabled' order by id""",
                    )
            except (ShardUnavailable, TimeoutError) as exc:
                shard_unavailable(self.region, name, "endpoints", exc)
                continue
            for endpoint in endpoints:
                try:
                    added += await self._ingest_endpoint(store, endpoint)
                except (ShardUnavailable, TimeoutError) as exc:  # its own shard: the position stays, read again
                    shard_unavailable(self.region, name, "ingest", exc)
        return added

    async def _ingest_endpoint(self, store: ShardStore, endpoint: Any) -> int:
        positions: dict[str, str] = dict(endpoint["feed_position"])
        types = list(endpoint["event_types"]) if endpoint["event_types"] else None
        limit = limits.WEBHOOK_INGEST_PAGE_MAX
        pages = await read_pages(self.stores, endpoint["client"], positions, types, limit,
                                 skip_unavailable_in=self.region, since=endpoint["created_at"])
        for region in sorted({s.region for s in self.topology.shards} - {self.region}):
            remote = await self._remote_pages(region, endpoint["client"], positions, types, limit,
                                              endpoint["created_at"])
            if remote is not None:
                pages.extend(remote)
        since = endpoint["created_at"]
        queued: list[dict[str, Any]] = []
        moved: dict[str, str] = {}
        for page in pages:
            to = page.scanned or (page.items[-1][0] if page.items else None)
            if to is None or to == positions.get(page.shard):
                continue
            moved[page.shard] = to
            for _, event in page.items:
                if _parse_ts(event["created_at"]) >= since.timestamp():
                    queued.append({"id": event["id"], "type": event["type"], "created_at": event["created_at"],
                                   "body": msgspec.json.encode(event).decode()})
        if not moved:
            return 0
        return int(await store.webhook_call(
            "webhook_ingest", "select txr_webhook_ingest($1, $2::jsonb, $3::jsonb)", endpoint["id"], moved, queued,
        ))

    async def _remote_pages(
        self, region: str, client: str, positions: dict[str, str], types: list[str] | None, limit: int,
        since: datetime,
    ) -> list[ShardPage] | None:
        """Another region's pages for this client, or None when it cannot be read now (tried again next pass)."""
        if self.peers is None or self.minter is None or not self.peers.knows(region):
            return None
        query = {"client": client, "after": encode_cursor(positions), "limit": str(limit),
                 "since": since.isoformat()}
        if types:
            query["types"] = ",".join(types)
        qs = urlencode(query)
        token = self.minter.token(region, BoundRequest("GET", request_target(INTERNAL_EVENTS_PATH, qs), b""))
        try:
            answer = await self.peers.send(
                region, "GET", f"{INTERNAL_EVENTS_PATH}?{qs}", headers={"authorization": f"Bearer {token}"},
                body=None, timeout_s=limits.WEBHOOK_PEER_TIMEOUT_S,
            )
        except UpstreamError as exc:
            shard_unavailable(self.region, region, "peer_read", exc)
            return None
        if answer.status != 200:
            log.warning("webhook_peer_feed_refused", extra={"peer": region, "status": answer.status})
            telemetry.METRICS.webhook_shard_errors.labels(self.region, region, "peer_refused").inc()
            return None
        return pages_from_json(msgspec.json.decode(answer.body))

    # Send -------------------------------------------------------------------------------------------

    async def send_once(self) -> int:
        """Claim what is due (within the in-flight bounds) and start sending it; returns how many were claimed.
        A shard whose claim fails or times out is skipped (logged, counted): the others' deliveries go on."""
        claimed = 0
        for name, store in self.stores.items():
            room = limits.WEBHOOK_IN_FLIGHT_MAX - len(self._tasks)
            if room <= 0:
                break
            rooms: dict[str, int] = {"*": limits.WEBHOOK_IN_FLIGHT_PER_ENDPOINT_MAX}
            rooms.update({e: limits.WEBHOOK_IN_FLIGHT_PER_ENDPOINT_MAX - n for e, n in self._in_flight.items()})
            try:
                async with asyncio.timeout(limits.WEBHOOK_CLAIM_TIMEOUT_S):
                    rows = await store.webhook_rows(
                        "webhook_claim", "select * from txr_webhook_claim($1::jsonb, $2, $3)",
                        rooms, room, limits.WEBHOOK_CLAIM_LEASE_MS,
                    )
            except (ShardUnavailable, TimeoutError) as exc:
                shard_unavailable(self.region, name, "claim", exc)
                continue
            for row in rows:
                claimed += 1
                endpoint = row["endpoint_id"]
                self._in_flight[endpoint] = self._in_flight.get(endpoint, 0) + 1
                task = asyncio.create_task(self._deliver(store, dict(row)), name=f"webhook-{name}")
                self._tasks.add(task)
                task.add_done_callback(functools.partial(self._done, endpoint))
        return claimed

    def _done(self, endpoint: str, task: asyncio.Task[None]) -> None:
        self._tasks.discard(task)
        self._wake.set()
        left = self._in_flight.get(endpoint, 1) - 1
        if left > 0:
            self._in_flight[endpoint] = left
        else:
            self._in_flight.pop(endpoint, None)

    async def _deliver(self, store: ShardStore, row: dict[str, Any]) -> None:
        body = row["body"].encode()
        secrets_ = [row["secret"]] + ([row["previous_secret"]] if row["previous_secret"] else [])
        headers = signing.headers(secrets_, row["event_id"], int(time.time()), body)
        started = time.perf_counter()
        status: int | None = None
        reason: str | None = None
        try:
            await check_url(row["url"], self.policy, resolve=False)  # an IP literal is never resolved
            async with self._http().post(row["url"], data=body, headers=headers, allow_redirects=False) as answer:
                status = answer.status
                await answer.content.read(limits.WEBHOOK_RESPONSE_BYTES_MAX)
        except UrlRefused:
            reason = "url_refused"
        except TimeoutError:
            reason = "timeout"
        except (aiohttp.ClientError, OSError) as exc:
            reason = "url_refused" if refused_at_connection(exc) else "connection"
        latency_ms = int((time.perf_counter() - started) * 1000)
        m = telemetry.METRICS
        m.webhook_latency.labels(self.region).observe(latency_ms / 1000)
        if status is not None and 200 <= status < 300:
            m.webhook_attempts.labels(self.region, "delivered").inc()
            await self._record(store, row, status, latency_ms, None, "delivered", 0, None)
            return
        if reason is None:
            reason = "gone" if status == 410 else f"status_{status // 100 if status else 0}xx"
        m.webhook_attempts.labels(self.region, "failed").inc()
        m.webhook_failures.labels(self.region, reason).inc()
        error = f"HTTP {status}" if status is not None else reason
        if status == 410:
            m.webhook_endpoints_disabled_total.labels(self.region, "gone").inc()
            await self._record(store, row, status, latency_ms, error, "failed", 0,
                               "the endpoint answered 410 Gone")
            return
        delay_s = self._delay_s(row["attempts"])
        if delay_s is None:
            m.webhook_endpoints_disabled_total.labels(self.region, "failing").inc()
            await self._record(store, row, status, latency_ms, error, "failed", 0,
                               f"{row['attempts']} attempts failed, the last with {error}")
            return
        await self._record(store, row, status, latency_ms, error, "retry", int(delay_s * 1000), None)

    def _delay_s(self, attempts: int) -> float | None:
        return retry_delay_s(attempts, self.schedule_s)

    async def _record(
        self, store: ShardStore, row: dict[str, Any], status: int | None, latency_ms: int, error: str | None,
        outcome: str, delay_ms: int, disable: str | None,
    ) -> None:
        try:
            async with self._record_gate:
                await store.webhook_call(
                    "webhook_attempted", "select txr_webhook_attempted($1, $2, $3, $4, $5, $6, $7, $8, $9)",
                    row["endpoint_id"], row["event_id"], row["attempts"], status, latency_ms, error, outcome,
                    delay_ms, disable,
                )
        except ShardUnavailable:
            # Not recorded: the lease ends and the delivery is sent again (at least once).
            log.warning("webhook_record_failed", extra={"endpoint": row["endpoint_id"]})
        if disable is not None:
            log.warning("webhook_endpoint_disabled", extra={"endpoint": row["endpoint_id"], "reason": disable})

    def _http(self) -> aiohttp.ClientSession:
        if self._session is None:
            connector = aiohttp.TCPConnector(
                # No bound per host: the worker bounds each endpoint (_in_flight), and endpoints that share a
                # host (two clients of one receiving service) must not wait for each other's slow answers.
                resolver=GuardedResolver(self.policy), limit=limits.WEBHOOK_IN_FLIGHT_MAX, limit_per_host=0,
                ttl_dns_cache=None, use_dns_cache=False,
            )
            self._session = aiohttp.ClientSession(
                connector=connector, timeout=aiohttp.ClientTimeout(total=limits.WEBHOOK_TIMEOUT_S),
                auto_decompress=False,
            )
        return self._session

    # Loops ------------------------------------------------------------------------------------------

    async def run_forever(self) -> None:
        """Two loops: ingest reads the feeds, send claims and sends; a slow feed read never delays sending."""
        ingest = asyncio.create_task(self._ingest_forever(), name="webhook-ingest")
        try:
            await self._send_forever()
        finally:
            ingest.cancel()
            await asyncio.gather(ingest, return_exceptions=True)
            for task in list(self._tasks):
                task.cancel()
            await asyncio.gather(*self._tasks, return_exceptions=True)
            if self._session is not None:
                await self._session.close()

    async def _ingest_forever(self) -> None:
        while True:
            queued = 0
            try:
                queued = await self.ingest_once()
                if queued:
                    self._wake.set()
            except Exception as exc:  # the worker outlives any one failure; the database keeps the state
                log.error("webhook_ingest_error", extra={"error_type": type(exc).__name__})
            if not queued:  # a pass that queued events reads on at once: there may be more
                await asyncio.sleep(limits.WEBHOOK_IDLE_POLL_MS / 1000)

    async def _send_forever(self) -> None:
        while True:
            self._wake.clear()
            try:
                await self.send_once()
            except Exception as exc:  # the worker outlives any one failure; the database keeps the state
                log.error("webhook_send_error", extra={"error_type": type(exc).__name__})
            # Until an attempt ends or events are queued, at most the idle poll (retries fall due by time).
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), limits.WEBHOOK_IDLE_POLL_MS / 1000)


def _parse_ts(text: str) -> float:
    return datetime.fromisoformat(text.replace("Z", "+00:00")).timestamp()
