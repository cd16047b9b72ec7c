"""Cross-shard transfers as a saga (DESIGN D6): delivery of the outbox, the fast path and the relay.

    commit (source shard)   debit source, credit transit, transfer `pending`, outbox message, stored response
    deliver                 the credit shard applies the message once (txr_saga_apply, inbox keyed by id);
                            a shard of this region is called directly, another region over its internal API
    settle (source shard)   `applied` posts the transfer; `refused` returns the money (txr_saga_settle)

The fast path delivers right after the commit and waits at most SAGA_FAST_PATH_WAIT_MS. The relay delivers
whatever is still in the outbox, at least once, with bounded exponential backoff and jitter; it starts from
the outbox table, so a message survives any crash of this process.

Batches (issue 14). The relay sends the messages it claimed for one credit shard together, at most
SAGA_RELAY_BATCH_MESSAGES_MAX per call (/internal/saga/apply-batch, or the local shard directly): the credit
shard applies them in one transaction and this shard settles their answers in one (migration 0017). Each
message keeps an outcome of its own: a refusal returns its money, a 421 naming its slot's new owner sends it
alone down the one-message path (re-addressed in the outbox), a failure reschedules it alone. A message that
makes its batch's transaction fail (a bug, a broken constraint) is found by splitting the batch in halves
until it is alone (`isolated`, app/store/grouped.py), as the posting group commit does; the others are applied.

Single messages group at their credit shard too: the fast path's apply is sent with whatever other single
messages for that shard arrive meanwhile, in one transaction (`ShardStore.saga_apply_one`, app/store/grouped.py):
concurrent cross-shard transfers between two shards otherwise queue one by one on their transit account's row
lock, each through its own commit. Settles are not grouped: they share no row, and grouped settles cost the
debit shard more CPU than one transaction each (measured).

Fault isolation (issue 10). The relay claims and sends per destination region, at most
SAGA_RELAY_IN_FLIGHT_PER_DESTINATION_MAX messages in flight to each, so a region that hangs holds up only its
own messages. A delivery fails in one of two ways:

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
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import asyncpg
import msgspec
from opentelemetry.trace import SpanContext

from app import limits, telemetry
from app.api.upstreams import Answer, UpstreamError, Upstreams
from app.config import FaultSettings
from app.security.tokens import BoundRequest, SagaTokenMinter
from app.store.shard import Outcome, ShardStore, ShardUnavailable, SlotMoved

log = logging.getLogger("txroute.saga")

APPLY_PATH = "/internal/saga/apply"
APPLY_BATCH_PATH = "/internal/saga/apply-batch"


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
TRANSIENT_DB_ERRORS = (asyncpg.SerializationError, asyncpg.DeadlockDetectedError)


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
            except TRANSIENT_DB_ERRORS as exc:
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
                result = await (local.saga_apply_own(message) if own else local.saga_apply_one(message))
            except ShardUnavailable as exc:
                raise DeliveryFailed(str(exc)) from None
            except TRANSIENT_DB_ERRORS as exc:
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

    async def _post(self, region: str, token: str, body: bytes, *, path: str = APPLY_PATH) -> Answer:
        assert self.peers is not None
        try:
            return await self.peers.send(
                region, "POST", path,
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

    # Batches (issue 14) -----------------------------------------------------------------------------

    async def deliver_batch(
        self, store: ShardStore, messages: list[dict[str, Any]], origins: Sequence[SpanContext | None]
    ) -> list[dict[str, Any] | Exception | None]:
        """Send messages of one credit shard in one call and settle their answers in one transaction.
        Returns per message the transfer's body once settled, an exception when it failed (to reschedule),
        or None when its slot moved (to deliver alone, re-addressed, on the one-message path)."""
        assert messages and len({(m["destination_region"], m["destination_shard"]) for m in messages}) == 1
        attributes = {"txroute.region": self.region, "txroute.shard": store.name,
                      "txroute.peer_region": str(messages[0]["destination_region"]),
                      "txroute.batch_size": str(len(messages))}
        if len(messages) == 1:
            attributes["txroute.transfer_id"] = str(messages[0]["transfer_id"])
        out: list[dict[str, Any] | Exception | None] = [None] * len(messages)
        with telemetry.linked_root_span("saga deliver", attributes, origins=origins):
            applied = await self._apply_batch(messages)
            answers: list[dict[str, Any]] = []
            indexes: list[int] = []
            for i, result in enumerate(applied):
                if isinstance(result, Exception):
                    out[i] = result
                elif _moved_to(result) is None:
                    try:
                        self._check(result)
                    except DeliveryFailed as exc:
                        out[i] = exc
                        continue
                    answers.append({"transfer_id": messages[i]["transfer_id"], "outcome": result["outcome"],
                                    "reason": result.get("reason")})
                    indexes.append(i)
            if answers:
                # Once the credit side has answered, the settlement must finish even if our caller stops waiting.
                for i, settled in zip(indexes, await asyncio.shield(self._settle_batch(store, answers)), strict=True):
                    out[i] = settled
        for answer, i in zip(answers, indexes, strict=True):
            if not isinstance(out[i], Exception):
                telemetry.METRICS.saga_deliveries.labels(self.region, str(answer["outcome"])).inc()
        return out

    async def _settle_batch(
        self, store: ShardStore, answers: list[dict[str, Any]]
    ) -> list[dict[str, Any] | Exception]:
        try:
            settled = await store.saga_settle_isolated(answers)
        except ShardUnavailable as exc:
            return [DeliveryFailed(str(exc))] * len(answers)
        return [_delivery_failure(r, "settling") if isinstance(r, Exception) else r for r in settled]

    async def _apply_batch(self, messages: list[dict[str, Any]]) -> list[dict[str, Any] | Exception]:
        local = self.stores.get(messages[0]["destination_shard"])
        if local is None:
            return await self._apply_remote_batch(messages)
        try:
            applied = await local.saga_apply_isolated(messages)
        except ShardUnavailable as exc:
            return [DeliveryFailed(str(exc))] * len(messages)
        return [_delivery_failure(r, "credit shard") if isinstance(r, Exception) else r for r in applied]

    async def _apply_remote_batch(self, messages: list[dict[str, Any]]) -> list[dict[str, Any] | Exception]:
        """One call of the credit region's batch route; a whole answer that says the call itself is at fault
        (400, 413, 422, 500) is met by splitting the batch, so only a message that fails alone is poison."""
        region = messages[0]["destination_region"]
        if self.peers is None or self.minter is None or not self.peers.knows(region):
            failed = DeliveryFailed(f"no route to region {region} (TXROUTE_REGION_URLS / TXROUTE_SAGA_PRIVATE_KEY)")
            return [failed] * len(messages)
        body = msgspec.json.encode(
            {"messages": [{k: v for k, v in m.items() if k != "destination_region"} for m in messages]}
        )
        if len(body) > limits.SAGA_RELAY_BATCH_BODY_BYTES_MAX and len(messages) > 1:
            return await self._apply_remote_halves(messages)
        token = self.minter.token(region, BoundRequest("POST", APPLY_BATCH_PATH, body))
        faults = self.faults
        try:
            if faults.drop_request and random.random() < faults.drop_request:
                raise DeliveryFailed("fault injection: request dropped")
            answer = await self._post(region, token, body, path=APPLY_BATCH_PATH)
            if faults.duplicate and random.random() < faults.duplicate:
                answer = await self._post(region, token, body, path=APPLY_BATCH_PATH)
            if faults.drop_answer and random.random() < faults.drop_answer:
                raise DeliveryFailed("fault injection: answer dropped")
        except DeliveryFailed as exc:
            return [exc] * len(messages)
        if answer.status in _POISON_STATUSES:
            if len(messages) > 1:
                log.error("saga_batch_refused_splitting", extra={"region": region, "status": answer.status,
                                                                 "batch_size": len(messages)})
                return await self._apply_remote_halves(messages)
            return [Undeliverable(f"region {region} answered {answer.status}")]
        results = _batch_results(answer.body, len(messages)) if answer.status == 200 else None
        if results is None:
            return [DeliveryFailed(f"region {region} answered {answer.status} with no result per message")
                    ] * len(messages)
        return [_remote_result(region, result) for result in results]

    async def _apply_remote_halves(self, messages: list[dict[str, Any]]) -> list[dict[str, Any] | Exception]:
        half = len(messages) // 2
        return [*await self._apply_remote_batch(messages[:half]), *await self._apply_remote_batch(messages[half:])]

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
        await self._failed(store, row, failure)

    async def relay_batch(self, store: ShardStore, rows: list[Any]) -> None:
        """Deliver claimed messages of one credit shard together (`deliver_batch`); each that failed is
        rescheduled on its own, each whose slot moved is delivered alone. Never raises but on cancellation."""
        messages = [dict(row["message"], destination_region=row["destination_region"]) for row in rows]
        origins = [telemetry.span_context(row["traceparent"]) for row in rows]
        results: list[dict[str, Any] | Exception | None]
        try:
            async with asyncio.timeout(limits.SAGA_DELIVERY_TIMEOUT_S * 2):
                results = list(await self.deliver_batch(store, messages, origins))
        except (DeliveryFailed, TimeoutError, ShardUnavailable) as exc:
            results = [exc] * len(rows)
        except Exception as exc:  # a bug: retried like a failure that heals (never dead-letters by itself)
            log.error("relay_delivery_error", extra={"shard": store.name, "error_type": type(exc).__name__})
            results = [exc] * len(rows)
        for row, result in zip(rows, results, strict=True):
            if result is None:
                await self.relay_one(store, row)
            elif isinstance(result, Exception):
                await self._failed(store, row, result)

    async def _failed(self, store: ShardStore, row: Any, failure: Exception) -> None:
        """Reschedule a message whose delivery failed (with backoff), or, after SAGA_POISON_FAILURES_MAX
        failures that cannot heal, dead-letter it."""
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
    SAGA_RELAY_IN_FLIGHT_PER_DESTINATION_MAX messages in flight, and sends them in batches of one credit shard
    (at most SAGA_RELAY_BATCH_MESSAGES_MAX each), each batch on a task of its own; a slow region fills only its
    own room. Claims again as soon as a delivery ends, or after an idle poll."""

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
        for region, batch in _batches(rows):
            self.in_flight[region] += len(batch)
            if batch[0]["message"]["destination_shard"] == batch[0]["message"]["source_shard"]:
                # Its credit slot moved into its own source shard (issue 11): that shard applies it alone.
                work = self.saga.relay_one(self.store, batch[0])
            else:
                work = self.saga.relay_batch(self.store, batch)
            task = asyncio.create_task(work, name=f"relay-{self.store.name}")
            self.tasks.add(task)
            task.add_done_callback(functools.partial(self._done, region, len(batch)))
        return len(rows)

    def _done(self, region: str, messages: int, task: asyncio.Task[None]) -> None:
        self.tasks.discard(task)
        self.in_flight[region] -= messages
        self.wake.set()


def _batches(rows: list[Any]) -> list[tuple[str, list[Any]]]:
    """Claimed rows grouped by credit shard, in batches of at most SAGA_RELAY_BATCH_MESSAGES_MAX; a message
    whose credit shard is its own source shard goes alone."""
    groups: dict[tuple[str, str], list[Any]] = {}
    alone: list[tuple[str, list[Any]]] = []
    for row in rows:
        message = row["message"]
        if message["destination_shard"] == message["source_shard"]:
            alone.append((row["destination_region"], [row]))
        else:
            groups.setdefault((row["destination_region"], message["destination_shard"]), []).append(row)
    cap = limits.SAGA_RELAY_BATCH_MESSAGES_MAX
    return alone + [(region, group[i:i + cap]) for (region, _), group in groups.items()
                    for i in range(0, len(group), cap)]


def _delivery_failure(exc: Exception, what: str) -> DeliveryFailed:
    """A message's database failure as the relay treats it: heals (retry) or poison (counted)."""
    if isinstance(exc, (*TRANSIENT_DB_ERRORS, SlotMoved)):
        return DeliveryFailed(f"{what}: {type(exc).__name__}")
    if isinstance(exc, asyncpg.PostgresError):
        return Undeliverable(f"{what} failed: sqlstate {exc.sqlstate}")
    return DeliveryFailed(f"{what}: {type(exc).__name__}")


def _batch_results(body: bytes, count: int) -> list[dict[str, Any]] | None:
    """The per-message results of a batch answer, or None when it is not `count` objects."""
    try:
        doc = msgspec.json.decode(body)
    except msgspec.DecodeError:
        return None
    results = doc.get("results") if isinstance(doc, dict) else None
    if not isinstance(results, list) or len(results) != count or not all(isinstance(r, dict) for r in results):
        return None
    return results


def _remote_result(region: str, result: dict[str, Any]) -> dict[str, Any] | Exception:
    """One message's result in a batch answer: an outcome, a 421 naming the slot's owner, or a failure
    classed as the one-message route's answer of that status would be."""
    status = result.get("status")
    if status is None or (status == 421 and _moved_to(result) is not None):
        return result
    if status in _POISON_STATUSES:
        return Undeliverable(f"region {region} answered {status} for the message")
    return DeliveryFailed(f"region {region} answered {status} for the message")


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
