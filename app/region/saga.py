"""Cross-shard transfers as a saga (DESIGN D6): delivery of the outbox, the fast path and the relay.

    commit (source shard)   debit source, credit transit, transfer `pending`, outbox message, stored response
    deliver                 the credit shard applies the message once (txr_saga_apply, inbox keyed by id);
                            a shard of this region is called directly, another region over its internal API
    settle (source shard)   `applied` posts the transfer; `refused` returns the money (txr_saga_settle)

The fast path delivers right after the commit and waits at most SAGA_FAST_PATH_WAIT_MS. The relay delivers
whatever is still in the outbox, at least once, with bounded exponential backoff and jitter; it starts from
the outbox table, so a message survives any crash of this process.
"""

from __future__ import annotations

import asyncio
import logging
import random
from dataclasses import dataclass, field
from typing import Any

import msgspec

from app import limits, telemetry
from app.api.upstreams import Answer, UpstreamError, Upstreams
from app.config import FaultSettings
from app.security.tokens import BoundRequest, SagaTokenMinter
from app.store.shard import Outcome, ShardStore, ShardUnavailable

log = logging.getLogger("txroute.saga")

APPLY_PATH = "/internal/saga/apply"


class DeliveryFailed(Exception):
    """The message's outcome is not known yet; the relay will try again."""


@dataclass
class Saga:
    region: str
    stores: dict[str, ShardStore]  # this region's shards
    peers: Upstreams | None  # the other regions' services
    minter: SagaTokenMinter | None  # signs this region's saga calls (saga key; routers never hold it)
    faults: FaultSettings = field(default_factory=FaultSettings)

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

    async def deliver(self, store: ShardStore, message: dict[str, Any]) -> dict[str, Any]:
        """Send one message to its credit shard and settle its answer; returns the transfer's body.

        Its trace is its own, linked to the request that committed the message (when delivered by the fast
        path): delivery outlives that request, and the relay may redeliver long after it."""
        attributes = {"txroute.region": self.region, "txroute.shard": store.name,
                      "txroute.peer_region": str(message.get("destination_region", "")),
                      "txroute.transfer_id": str(message["transfer_id"])}
        with telemetry.linked_root_span("saga deliver", attributes):
            result = await self._apply(message)
            # Once the credit side has answered, the settlement must finish even if our caller stops waiting.
            body = await asyncio.shield(
                store.saga_settle(message["transfer_id"], result["outcome"], result.get("reason"))
            )
        telemetry.METRICS.saga_deliveries.labels(self.region, str(result["outcome"])).inc()
        return body

    async def _apply(self, message: dict[str, Any]) -> dict[str, Any]:
        local = self.stores.get(message["destination_shard"])
        if local is not None:
            try:
                result = await local.saga_apply(message)
            except ShardUnavailable as exc:
                raise DeliveryFailed(str(exc)) from None
            return self._check(result)
        return self._check(await self._apply_remote(message))

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
        await asyncio.gather(*(self._relay_shard(store) for store in self.stores.values()))

    async def _relay_shard(self, store: ShardStore) -> None:
        while True:
            try:
                delivered = await self.relay_once(store)
            except ShardUnavailable:
                delivered = 0
            except Exception as exc:  # the relay must outlive any one failure; the outbox keeps the work
                log.error("relay_error", extra={"shard": store.name, "error_type": type(exc).__name__})
                delivered = 0
            if delivered == 0:
                await asyncio.sleep(limits.SAGA_RELAY_IDLE_POLL_MS / 1000)

    async def relay_once(self, store: ShardStore) -> int:
        """Claim due messages of one shard and deliver them; returns how many were claimed."""
        rows = await store.outbox_claim(limit=limits.SAGA_RELAY_BATCH_MAX, lease_ms=limits.SAGA_RELAY_LEASE_MS)
        if self.faults.reorder:
            rows = random.sample(rows, len(rows))
        await asyncio.gather(*(self._relay_one(store, row) for row in rows))
        return len(rows)

    async def _relay_one(self, store: ShardStore, row: Any) -> None:
        message = dict(row["message"], destination_region=row["destination_region"])
        try:
            async with asyncio.timeout(limits.SAGA_DELIVERY_TIMEOUT_S * 2):
                await self.deliver(store, message)
        except (DeliveryFailed, TimeoutError, ShardUnavailable) as exc:
            delay_ms = backoff_ms(int(row["attempts"]))
            telemetry.METRICS.saga_retries.labels(self.region, store.name).inc()
            log.info("relay_retry", extra={"transfer_id": row["transfer_id"], "attempts": row["attempts"],
                                           "delay_ms": delay_ms, "error_type": type(exc).__name__})
            await store.outbox_reschedule(row["transfer_id"], delay_ms=delay_ms, error=str(exc))


def backoff_ms(attempts: int) -> int:
    """Exponential in the attempts so far, capped, with full jitter over its upper half."""
    ceiling = min(limits.SAGA_RELAY_BACKOFF_MAX_MS, limits.SAGA_RELAY_BACKOFF_BASE_MS * 2 ** min(attempts, 20))
    return int(ceiling / 2 + random.random() * ceiling / 2)
