"""Cross-shard transfers as a saga (DESIGN D6): delivery of the outbox, the fast path and the relay.

    commit (source shard)   debit source, credit transit, transfer `pending`, outbox message, stored response
    deliver                 the credit shard applies the message once (txr_saga_apply, inbox keyed by id);
                            a shard of this region is called directly, another region over its internal API
    settle (source shard)   `applied` posts the transfer; `refused` returns the money (txr_saga_settle)

The fast path delivers right after the commit and waits at most SAGA_FAST_PATH_WAIT_MS. The relay delivers
whatever is still in the outbox, at least once, with bounded exponential backoff and jitter; it starts from
the outbox table, so a message survives any crash of this process.

Fault isolation (issue 10). The relay claims and sends per destination region, at most
SAGA_RELAY_IN_FLIGHT_PER_DESTINATION_MAX in flight to each, so a region that hangs holds up only its own
messages. A delivery fails in one of two ways:

    DeliveryFailed    waiting can heal it (a region or database unreachable, a timeout, a moved slot, a
                      refused token): retried with backoff for as long as it takes; the backlog alert watches
    Undeliverable     waiting cannot (the credit side answers that the message is malformed or fails on it;
                      the source cannot settle the answer, e.g. a return past the source's 2^53-1 limit):
                      counted, and dead-lettered after SAGA_POISON_FAILURES_MAX; its money stays in transit
Each message carries the trace context of the request that committed it; every delivery links to it.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import random
from dataclasses import dataclass, field
from typing import Any

import asyncpg
import msgspec
from opentelemetry.trace import SpanContext

from app import limits, telemetry
from app.api.upstreams import Answer, UpstreamError, Upstreams
from app.config import FaultSettings
from app.security.tokens import BoundRequest, SagaTokenMinter
from app.store.shard import Outcome, ShardStore, ShardUnavailable

log = logging.getLogger("txroute.saga")

APPLY_PATH = "/internal/saga/apply"


class DeliveryFailed(Exception):
    """The message's outcome is not known yet; the relay will try again."""


class Undeliverable(DeliveryFailed):
    """A failure that waiting cannot heal: the relay counts it, and dead-letters the message after
    SAGA_POISON_FAILURES_MAX of them."""


# Answers of the credit region that say the message itself is at fault (malformed, or failing there): retrying
# cannot help. Others (401/403 keys, 404 a route missing mid-deploy, 421 a moved slot, 429, 5xx but 500) can
# heal and are only retried.
_POISON_STATUSES = frozenset({400, 413, 415, 422, 500})
# Database errors that heal by trying again (the store already retried them a few times).
_TRANSIENT_DB_ERRORS = (asyncpg.SerializationError, asyncpg.DeadlockDetectedError)


@dataclass
class Saga:
    region: str
    stores: dict[str, ShardStore]  # this region's shards
    peers: Upstreams | None  # the other regions' services
    minter: SagaTokenMinter | None  # signs this region's saga calls (saga key; routers never hold it)
    faults: FaultSettings = field(default_factory=FaultSettings)
    # Every region messages may be addressed to (this one included: a transfer between two of its shards).
    destinations: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if not self.destinations:
            self.destinations = (self.region, *(self.peers.urls if self.peers is not None else ()))

    # The fast path ----------------------------------------------------------------------------------

    async def fast_path(self, store: ShardStore, pending: Outcome, message: dict[str, Any]) -> Outcome:
        """Deliver a just-committed message and settle it, within the bound; else answer 202 pending.

        The debit side has committed: whatever goes wrong from here (a peer that refuses, answers garbage or
        is slow; a settlement that fails) the client gets the stored 202 pending, never an error, and the
        relay finishes the saga from the outbox."""
        if self.faults.skip_fast_path:
            return pending
        try:
            async with asyncio.timeout(limits.SAGA_FAST_PATH_WAIT_MS / 1000):
                body = await self.deliver(store, message)
        except (TimeoutError, DeliveryFailed, ShardUnavailable):
            return pending
        except Exception as exc:  # after the commit nothing may turn into a 500; the relay retries
            log.error("saga_fast_path_error", extra={"transfer_id": message.get("transfer_id"),
                                                     "error_type": type(exc).__name__})
            return pending
        return Outcome(201, body)

    # Delivery ---------------------------------------------------------------------------------------

    async def deliver(
        self, store: ShardStore, message: dict[str, Any], *, origin: SpanContext | None = None
    ) -> dict[str, Any]:
        """Send one message to its credit shard and settle its answer; returns the transfer's body.

        Its trace is its own, linked to the request that committed the message: the current span on the fast
        path, `origin` (stored with the message) when the relay redelivers long after that request."""
        attributes = {"txroute.region": self.region, "txroute.shard": store.name,
                      "txroute.peer_region": str(message.get("destination_region", "")),
                      "txroute.transfer_id": str(message["transfer_id"])}
        with telemetry.linked_root_span("saga deliver", attributes, origin=origin):
            result = await self._apply(store, message)
            # Once the credit side has answered, the settlement must finish even if our caller stops waiting.
            try:
                body = await asyncio.shield(
                    store.saga_settle(message["transfer_id"], result["outcome"], result.get("reason"))
                )
            except _TRANSIENT_DB_ERRORS as exc:
                raise DeliveryFailed(f"settling {result['outcome']}: sqlstate {exc.sqlstate}") from None
            except asyncpg.PostgresError as exc:
                # Not a lost connection (that is ShardUnavailable): the settlement itself cannot be written.
                raise Undeliverable(f"settling {result['outcome']} failed: sqlstate {exc.sqlstate}") from None
        telemetry.METRICS.saga_deliveries.labels(self.region, str(result["outcome"])).inc()
        return body

    async def _apply(self, store: ShardStore, message: dict[str, Any]) -> dict[str, Any]:
        """Apply at the credit shard; a 421 naming another owner (the slot moved, issue 11) re-addresses the
        message there, in the outbox too, and tries once more."""
        result = await self._apply_once(message)
        owner = _moved_to(result)
        if owner is not None and owner != (message["destination_region"], message["destination_shard"]):
            region, shard = owner
            await store.outbox_readdress(message["transfer_id"], shard=shard, region=region)
            log.info("saga_readdressed", extra={"transfer_id": message["transfer_id"], "shard": shard,
                                                "region": region})
            message.update(destination_shard=shard, destination_region=region)
            result = await self._apply_once(message)
        return self._check(result)

    async def _apply_once(self, message: dict[str, Any]) -> dict[str, Any]:
        local = self.stores.get(message["destination_shard"])
        if local is not None:
            # Its credit slot may have moved into its own source shard (issue 11): that shard applies it itself.
            own = message["destination_shard"] == message["source_shard"]
            try:
                result = await (local.saga_apply_own(message) if own else local.saga_apply(message))
            except ShardUnavailable as exc:
                raise DeliveryFailed(str(exc)) from None
            except _TRANSIENT_DB_ERRORS as exc:
                raise DeliveryFailed(f"credit shard: sqlstate {exc.sqlstate}") from None
            except asyncpg.PostgresError as exc:  # what the other region answers as 500
                raise Undeliverable(f"credit shard failed: sqlstate {exc.sqlstate}") from None
            return result
        return await self._apply_remote(message)

    async def _apply_remote(self, message: dict[str, Any]) -> dict[str, Any]:
        region = message["destination_region"]
        if self.peers is None or self.minter is None or not self.peers.knows(region):
            raise DeliveryFailed(f"no route to region {region} (TXROUTE_REGION_URLS / TXROUTE_SAGA_PRIVATE_KEY)")
        body = msgspec.json.encode({k: v for k, v in message.items() if k != "destination_region"})
        token = self.minter.token(region, BoundRequest("POST", APPLY_PATH, body))
        faults = self.faults
        if faults.drop_request and random.random() < faults.drop_request:
            raise DeliveryFailed("fault injection: request dropped")
        answer = await self._post(region, token, body)
        if faults.duplicate and random.random() < faults.duplicate:
            answer = await self._post(region, token, body)
        if faults.drop_answer and random.random() < faults.drop_answer:
            raise DeliveryFailed("fault injection: answer dropped")
        if answer.status in _POISON_STATUSES:
            raise Undeliverable(f"region {region} answered {answer.status}")
        if answer.status == 421:  # the slot is not that region's: its problem names the owner when it moved
            try:
                problem = msgspec.json.decode(answer.body)
            except msgspec.DecodeError:
                problem = None
            if isinstance(problem, dict):
                return {"status": 421, "body": problem}
        if answer.status != 200:
            raise DeliveryFailed(f"region {region} answered {answer.status}")
        try:
            result = msgspec.json.decode(answer.body)
        except msgspec.DecodeError:
            raise DeliveryFailed(f"region {region} answered a body that is not JSON") from None
        if not isinstance(result, dict):
            raise DeliveryFailed(f"region {region} answered JSON that is not an object")
        return result

    async def _post(self, region: str, token: str, body: bytes) -> Answer:
        assert self.peers is not None
        try:
            return await self.peers.send(
                region, "POST", APPLY_PATH,
                headers={"authorization": f"Bearer {token}", "content-type": "application/json"},
                body=body,
            )
        except UpstreamError as exc:
            raise DeliveryFailed(str(exc)) from None

    @staticmethod
    def _check(result: dict[str, Any]) -> dict[str, Any]:
        if result.get("outcome") not in ("applied", "refused"):
            # 421 from the credit shard's fence: the slot moved; retry once the topology says where.
            raise DeliveryFailed(f"credit shard answered {result.get('status', 'unexpectedly')}")
        return result

    # The relay --------------------------------------------------------------------------------------

    async def relay_forever(self) -> None:
        if self.faults.relay_paused:
            log.warning("relay_paused_by_fault_injection")
            return
        await asyncio.gather(*(_Relay(self, store).run() for store in self.stores.values()))

    async def relay_one(self, store: ShardStore, row: Any) -> None:
        """Deliver one claimed message; on failure reschedule it (with backoff) or, after
        SAGA_POISON_FAILURES_MAX failures that cannot heal, dead-letter it. Never raises but on cancellation."""
        message = dict(row["message"], destination_region=row["destination_region"])
        origin = telemetry.span_context(row["traceparent"])
        try:
            async with asyncio.timeout(limits.SAGA_DELIVERY_TIMEOUT_S * 2):
                await self.deliver(store, message, origin=origin)
            return
        except (DeliveryFailed, TimeoutError, ShardUnavailable) as exc:
            failure: Exception = exc
        except Exception as exc:  # a bug: retried like a failure that heals (never dead-letters by itself)
            log.error("relay_delivery_error", extra={"shard": store.name, "error_type": type(exc).__name__})
            failure = exc
        poison = isinstance(failure, Undeliverable)
        delay_ms = backoff_ms(int(row["attempts"]))
        telemetry.METRICS.saga_retries.labels(self.region, store.name).inc()
        log.info("relay_retry", extra={"transfer_id": row["transfer_id"], "attempts": row["attempts"],
                                       "delay_ms": delay_ms, "error_type": type(failure).__name__,
                                       "poison": poison})
        try:
            dead = await store.outbox_failed(row["transfer_id"], delay_ms=delay_ms, error=str(failure), poison=poison)
        except (ShardUnavailable, asyncpg.PostgresError) as exc:  # its lease ends and it is claimed again
            log.warning("relay_reschedule_failed", extra={"shard": store.name, "error_type": type(exc).__name__})
            return
        if dead:
            telemetry.METRICS.saga_dead_lettered.labels(self.region, store.name).inc()
            log.error("saga_dead_lettered", extra={"transfer_id": row["transfer_id"], "shard": store.name,
                                                   "error": str(failure)[:200]})


class _Relay:
    """The relay of one shard: claims due messages per destination region, each with room for at most
    SAGA_RELAY_IN_FLIGHT_PER_DESTINATION_MAX deliveries in flight, and sends each on a task of its own; a
    slow region fills only its own room. Claims again as soon as a delivery ends, or after an idle poll."""

    def __init__(self, saga: Saga, store: ShardStore) -> None:
        self.saga = saga
        self.store = store
        self.in_flight = dict.fromkeys(saga.destinations, 0)
        self.tasks: set[asyncio.Task[None]] = set()
        self.wake = asyncio.Event()

    async def run(self) -> None:
        try:
            while True:
                claimed = await self._claim()
                if claimed == 0:
                    self.wake.clear()
                    try:
                        async with asyncio.timeout(limits.SAGA_RELAY_IDLE_POLL_MS / 1000):
                            await self.wake.wait()
                    except TimeoutError:
                        pass
        finally:
            for task in self.tasks:
                task.cancel()
            await asyncio.gather(*self.tasks, return_exceptions=True)

    async def _claim(self) -> int:
        cap = limits.SAGA_RELAY_IN_FLIGHT_PER_DESTINATION_MAX
        room = {region: cap - n for region, n in self.in_flight.items() if n < cap}
        if not room:
            return 0
        try:
            rows = await self.store.outbox_claim(room, lease_ms=limits.SAGA_RELAY_LEASE_MS)
        except ShardUnavailable:
            return 0
        except Exception as exc:  # the relay must outlive any one failure; the outbox keeps the work
            log.error("relay_error", extra={"shard": self.store.name, "error_type": type(exc).__name__})
            return 0
        if self.saga.faults.reorder:
            rows = random.sample(rows, len(rows))
        for row in rows:
            region = row["destination_region"]
            self.in_flight[region] += 1
            task = asyncio.create_task(self.saga.relay_one(self.store, row), name=f"relay-{self.store.name}")
            self.tasks.add(task)
            task.add_done_callback(functools.partial(self._done, region))
        return len(rows)

    def _done(self, region: str, task: asyncio.Task[None]) -> None:
        self.tasks.discard(task)
        self.in_flight[region] -= 1
        self.wake.set()


def _moved_to(result: dict[str, Any]) -> tuple[str, str] | None:
    """(region, shard) a 421 answer names as the slot's owner, if any."""
    body = result.get("body")
    if result.get("status") != 421 or not isinstance(body, dict):
        return None
    region, shard = body.get("owner_region"), body.get("owner_shard")
    if not isinstance(region, str) or not isinstance(shard, str):
        return None
    return region, shard


def backoff_ms(attempts: int) -> int:
    """Exponential in the attempts so far, capped, with full jitter over its upper half."""
    ceiling = min(limits.SAGA_RELAY_BACKOFF_MAX_MS, limits.SAGA_RELAY_BACKOFF_BASE_MS * 2 ** min(attempts, 20))
    return int(ceiling / 2 + random.random() * ceiling / 2)
