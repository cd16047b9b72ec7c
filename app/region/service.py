"""The regional ledger service's use cases: one method per command, no HTTP types.

It decides which of this region's shards a request belongs to (DESIGN D1, D2), refuses what this region
does not own, builds the posting and hands it to the shard's store. Outcomes are the ledger's own.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import asyncpg

from app import limits
from app.api.schemas import FundsRequest, OpenAccountRequest, TransferRequest
from app.errors import Problem
from app.ledger.postings import (
    Posting,
    PostingKind,
    SagaLeg,
    fingerprint,
    settlement_account_id,
    transit_account_id,
)
from app.region.saga import Saga
from app.store.shard import Outcome, ShardStore, ShardUnavailable
from app.topology.ids import InvalidId, ParsedId, new_account_id, new_transfer_id, parse_account_id
from app.topology.model import Shard, Topology
from app.topology.placement import owned_slots, placement_slot


@dataclass
class RegionLedger:
    region: str
    topology: Topology
    stores: dict[str, ShardStore]
    saga: Saga | None = None
    # Set while the region is drained (`txroute ops drain`): the reason recorded in its shard databases.
    # Re-read every REGION_DRAIN_POLL_S, so a router with a stale map still cannot write here for longer.
    draining: str | None = None
    # Whether the flag was ever read (readiness waits for it: a drained region must not start taking writes).
    drain_known: bool = False

    def __post_init__(self) -> None:
        self.shards = self.topology.region(self.region).shards
        self._owned = owned_slots(self.topology, self.region)
        assert {s.name for s in self.shards} == set(self.stores), "one store per shard of the region"

    # Draining ---------------------------------------------------------------------------------------

    async def refresh_drain(self) -> str | None:
        """Re-read the drain flag from every shard (drained if any shard says so); an unreachable shard
        leaves the flag as it was."""
        states = []
        for store in self.stores.values():
            try:
                async with store.pool.acquire(timeout=limits.DB_CONNECT_TIMEOUT_S) as conn:
                    states.append(await conn.fetchrow("select draining_since, drain_reason from shard_info"))
            except (OSError, TimeoutError, asyncpg.PostgresError, asyncpg.InterfaceError):
                return self.draining
        drained = [s for s in states if s is not None and s["draining_since"] is not None]
        self.draining = (drained[0]["drain_reason"] or "drained") if drained else None
        self.drain_known = True
        return self.draining

    def refuse_writes_if_draining(self) -> None:
        if not self.drain_known:
            # Started while its databases were unreachable: until the flag is read, it may be drained.
            raise ShardUnavailable(f"region {self.region}: its drain flag has not been read yet")
        if self.draining is not None:
            retry_after = str(limits.REGION_DRAINING_RETRY_AFTER_S)
            raise Problem(
                "region_draining",
                f"region {self.region} takes no new writes for now ({self.draining}); retry after "
                f"{retry_after} s with the same Idempotency-Key",
                extra={"region": self.region},
                headers={"retry-after": retry_after},
            )

    # Routing inside the region ----------------------------------------------------------------------

    def store_for_slot(self, slot: int) -> ShardStore:
        """The store of the shard owning `slot`, or 421 naming the owner when it is not in this region."""
        shard = self.topology.shard_for_slot(slot)
        if shard.region != self.region:
            raise misdirected(slot, shard)
        return self.stores[shard.name]

    def _placement(self, client: str, key: str) -> tuple[Shard, int]:
        """Where an account opened with this key lives: a pure function of (client, key) and the slots this
        region owns (app.topology.placement), so a retried request lands on the shard that holds its
        idempotency record and replays instead of opening twice, also after shards are added."""
        slot = placement_slot(client, key, self._owned)
        return self.topology.shard_for_slot(slot), slot

    # Commands ---------------------------------------------------------------------------------------

    async def open_account(self, client: str, key: str, request: OpenAccountRequest) -> Outcome:
        region = request.region or self.region
        if region != self.region:
            raise Problem(
                "misdirected",
                f"accounts in {region} are opened by region {region}",
                extra={"owner_region": region},
            )
        shard, slot = self._placement(client, key)
        body = {"currency": str(request.currency), "region": region, "overdraft_limit": request.overdraft_limit}
        return await self.stores[shard.name].open_account(
            {
                "client": client,
                "key": key,
                "fingerprint": fingerprint("open_account", body),
                "id": new_account_id(slot),
                "slot": slot,
                "currency": body["currency"],
                "overdraft_limit": request.overdraft_limit,
            }
        )

    async def deposit(self, client: str, key: str, request: FundsRequest) -> Outcome:
        return await self._funds(PostingKind.DEPOSIT, client, key, request)

    async def withdraw(self, client: str, key: str, request: FundsRequest) -> Outcome:
        return await self._funds(PostingKind.WITHDRAWAL, client, key, request)

    async def _funds(self, kind: PostingKind, client: str, key: str, request: FundsRequest) -> Outcome:
        account = _body_account(request.account)
        store = self.store_for_slot(account.slot)
        settlement = settlement_account_id(store.name, str(request.currency))
        debit, credit = (settlement, account.text) if kind is PostingKind.DEPOSIT else (account.text, settlement)
        return await store.post(
            Posting(
                kind=kind,
                id=new_transfer_id(account.slot),
                slot=account.slot,
                client=client,
                key=key,
                fingerprint=fingerprint(kind.value, _fields(request)),
                debit=debit,
                credit=credit,
                amount=request.amount,
                currency=str(request.currency),
                reference=request.reference,
            )
        )

    async def transfer(self, client: str, key: str, request: TransferRequest) -> Outcome:
        debit = _body_account(request.debit_account)
        credit = _body_account(request.credit_account)
        if debit.text == credit.text:
            raise Problem("same_account", "debit_account and credit_account must differ")
        store = self.store_for_slot(debit.slot)
        credit_shard = self.topology.shard_for_slot(credit.slot)
        saga = None
        if credit_shard.name != store.name:
            # A saga (DESIGN D6): the credit side is booked by its own shard, once this side has committed.
            saga = SagaLeg(
                transit=transit_account_id(store.name, credit_shard.name, str(request.currency)),
                credit_shard=credit_shard.name,
                credit_region=credit_shard.region,
                credit_slot=credit.slot,
                relay_delay_ms=limits.SAGA_RELAY_FIRST_DELAY_MS,
            )
        outcome = await store.post(
            Posting(
                kind=PostingKind.TRANSFER,
                id=new_transfer_id(debit.slot),
                slot=debit.slot,
                client=client,
                key=key,
                fingerprint=fingerprint("transfer", _fields(request)),
                debit=debit.text,
                credit=credit.text,
                amount=request.amount,
                currency=str(request.currency),
                reference=request.reference,
                saga=saga,
            )
        )
        if outcome.message is not None and self.saga is not None:
            return await self.saga.fast_path(store, outcome, outcome.message)
        return outcome


def misdirected(slot: int, owner: Shard) -> Problem:
    return Problem(
        "misdirected",
        f"slot {slot} belongs to shard {owner.name} in region {owner.region}",
        extra={"slot": slot, "owner_region": owner.region, "owner_shard": owner.name},
    )


def _body_account(text: str) -> ParsedId:
    # The schema checked the pattern, but msgspec matches it with `re.search`, where `$` also matches before
    # a trailing newline ("acc_...\n"); the strict parse refuses that, and the refusal is the client's error.
    try:
        return parse_account_id(text)
    except InvalidId:
        raise Problem("invalid_account_id", f"{text[:40]!r} is not a valid account id") from None


def _fields(request: Any) -> dict[str, Any]:
    return {f: str(v) if f == "currency" else v for f in request.__struct_fields__ for v in [getattr(request, f)]}
