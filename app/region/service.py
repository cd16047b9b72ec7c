"""The regional ledger service's use cases: one method per command, no HTTP types.

It decides which of this region's shards a request belongs to (DESIGN D1, D2), refuses what this region
does not own, builds the posting and hands it to the shard's store. Outcomes are the ledger's own.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

import asyncpg

from app import limits
from app.api.schemas import CaptureRequest, FundsRequest, OpenAccountRequest, TransferRequest
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
from app.topology.model import Topology
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
        # The live ownership (issue 11): slot -> the local shard that owns it or has it frozen, and slot ->
        # (region, shard) it moved to, as this region's shard databases record them. Until first read, the
        # topology decides (the databases fence every request anyway).
        self._local: dict[int, str] = {}
        self._moved: dict[int, tuple[str, str]] = {}
        self.ownership_known = False
        self._refreshed_on_miss_at = float("-inf")
        self._stale = False  # a database named a new owner: re-read before routing again

    # Ownership --------------------------------------------------------------------------------------

    async def refresh_ownership(self) -> None:
        """Re-read the slot claims of every local shard; an unreachable shard keeps what was read before."""
        local = dict(self._local)
        moved = dict(self._moved)
        for name, store in self.stores.items():
            try:
                claims = await store.slot_claims()
            except ShardUnavailable:
                continue
            for slot in [s for s, owner in local.items() if owner == name]:
                del local[slot]
            for claim in claims:
                for slot in range(claim["slot_lo"], claim["slot_hi"] + 1):
                    if claim["state"] in ("owned", "moving"):
                        local[slot] = name
                        moved.pop(slot, None)
                    elif claim["state"] == "moved" and local.get(slot) in (None, name):
                        local.pop(slot, None)
                        moved[slot] = (claim["owner_region"], claim["owner_shard"])
        self._local, self._moved = local, moved
        if local:
            self._owned = tuple(slot in local for slot in range(len(self._owned)))
        self.ownership_known = True

    def owner_of(self, slot: int) -> tuple[str, str]:
        """(region, shard) that owns `slot` as far as this region knows: its own shards' records first (a
        slot moved away names its new owner), else the topology."""
        local = self._local.get(slot)
        if local is not None:
            return self.region, local
        moved = self._moved.get(slot)
        if moved is not None:
            return moved
        shard = self.topology.shard_for_slot(slot)
        return shard.region, shard.name

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

    async def store_for_slot(self, slot: int) -> ShardStore:
        """The store of the shard owning `slot`, or 421 naming the owner when it is not in this region. A slot
        this region does not know as its own is looked up again in its databases first (at most once per
        SLOT_OWNERSHIP_REFRESH_ON_MISS_MS): a router sent here by a just-switched move finds it owned."""
        if self._stale:
            self._stale = False
            await self.refresh_ownership()
        region, shard = self.owner_of(slot)
        if region != self.region or shard not in self.stores:
            now = time.monotonic()
            if now - self._refreshed_on_miss_at >= limits.SLOT_OWNERSHIP_REFRESH_ON_MISS_MS / 1000:
                self._refreshed_on_miss_at = now
                await self.refresh_ownership()
                region, shard = self.owner_of(slot)
        if region != self.region or shard not in self.stores:
            raise misdirected(slot, region, shard)
        return self.stores[shard]

    def ownership_changed(self) -> None:
        """Read the ownership map again before the next request is routed."""
        self._stale = True

    def learn(self, slot: int, region: str, shard: str) -> None:
        """A shard database answered that `slot` moved to (region, shard): route it there from now on, and read
        the whole map again before the next request (its neighbours moved with it)."""
        self._stale = True
        if region == self.region and shard in self.stores:
            self._local[slot] = shard
            self._moved.pop(slot, None)
        else:
            self._local.pop(slot, None)
            self._moved[slot] = (region, shard)

    def _placement(self, client: str, key: str) -> tuple[str, int]:
        """Where an account opened with this key lives: a pure function of (client, key) and the slots this
        region owns (app.topology.placement), so a retried request lands on the shard that holds its
        idempotency record and replays instead of opening twice, also after shards are added."""
        slot = placement_slot(client, key, self._owned)
        return self.owner_of(slot)[1], slot

    # Commands ---------------------------------------------------------------------------------------

    async def open_account(self, client: str, key: str, request: OpenAccountRequest) -> Outcome:
        region = request.region or self.region
        if region != self.region:
            raise Problem(
                "misdirected",
                f"accounts in {region} are opened by region {region}",
                extra={"owner_region": region},
            )
        if not any(self._owned):
            raise Problem("invalid_request", f"region {region} owns no slots yet and opens no accounts")
        _, slot = self._placement(client, key)
        body: dict[str, Any] = {
            "currency": str(request.currency), "region": region, "overdraft_limit": request.overdraft_limit,
        }
        if request.metadata is not None:  # so a request without metadata keeps its fingerprint of before
            body["metadata"] = request.metadata
        return await (await self.store_for_slot(slot)).open_account(
            {
                "client": client,
                "key": key,
                "fingerprint": fingerprint("open_account", body),
                "id": new_account_id(slot),
                "slot": slot,
                "currency": body["currency"],
                "overdraft_limit": request.overdraft_limit,
                "metadata": request.metadata,
            }
        )

    async def deposit(self, client: str, key: str, request: FundsRequest) -> Outcome:
        return await self._funds(PostingKind.DEPOSIT, client, key, request)

    async def withdraw(self, client: str, key: str, request: FundsRequest) -> Outcome:
        return await self._funds(PostingKind.WITHDRAWAL, client, key, request)

    async def _funds(self, kind: PostingKind, client: str, key: str, request: FundsRequest) -> Outcome:
        store, posting = await self.funds_posting(kind, client, key, request)
        return await _post(store, posting)

    async def funds_posting(
        self, kind: PostingKind, client: str, key: str, request: FundsRequest
    ) -> tuple[ShardStore, Posting]:
        """The posting of a deposit or withdrawal and the store of its shard (a single request or a batch item)."""
        if request.hold is not None and kind is PostingKind.DEPOSIT:
            raise Problem("hold_not_supported", "a deposit cannot be held; hold a transfer or a withdrawal")
        account = _body_account(request.account)
        store = await self.store_for_slot(account.slot)
        settlement = settlement_account_id(store.name, str(request.currency))
        debit, credit = (settlement, account.text) if kind is PostingKind.DEPOSIT else (account.text, settlement)
        return store, Posting(
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
            metadata=request.metadata,
            hold_expires_in_s=request.hold.expires_in_s if request.hold is not None else None,
            unique_reference=_unique_reference(request),
        )

    async def transfer(self, client: str, key: str, request: TransferRequest) -> Outcome:
        store, posting = await self.transfer_posting(client, key, request)
        outcome = await _post(store, posting)
        if outcome.message is not None and self.saga is not None:
            return await self.saga.fast_path(store, outcome, outcome.message)
        return outcome

    async def transfer_posting(self, client: str, key: str, request: TransferRequest) -> tuple[ShardStore, Posting]:
        """The posting of a transfer and the store of its debit shard (a single request or a batch item)."""
        debit = _body_account(request.debit_account)
        credit = _body_account(request.credit_account)
        if debit.text == credit.text:
            raise Problem("same_account", "debit_account and credit_account must differ")
        store = await self.store_for_slot(debit.slot)
        credit_region, credit_shard = self.owner_of(credit.slot)
        saga = None
        hold_expires_in_s = request.hold.expires_in_s if request.hold is not None else None
        if credit_shard != store.name and hold_expires_in_s is None:
            # A saga (DESIGN D6): the credit side is booked by its own shard, once this side has committed. If
            # the credit slot has moved meanwhile, its old owner answers 421 and the relay re-addresses it.
            saga = SagaLeg(
                transit=transit_account_id(store.name, credit_shard, str(request.currency)),
                credit_shard=credit_shard,
                credit_region=credit_region,
                credit_slot=credit.slot,
                relay_delay_ms=limits.SAGA_RELAY_FIRST_DELAY_MS,
            )
        return store, Posting(
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
            metadata=request.metadata,
            hold_expires_in_s=hold_expires_in_s,
            # A hold moves nothing yet: a credit on another shard is checked when its capture is applied.
            credit_remote=hold_expires_in_s is not None and credit_shard != store.name,
            unique_reference=_unique_reference(request),
        )

    # Holds and closing (DESIGN D14) -----------------------------------------------------------------

    async def capture(self, client: str, key: str, transfer: ParsedId, request: CaptureRequest) -> Outcome:
        """Post all or part of a hold. Its credit on another shard (where it lives now: slots move) makes the
        capture the debit side of a saga, answered like a cross-shard transfer (201 posted or 202 pending)."""
        store = await self.store_for_slot(transfer.slot)
        doc: dict[str, Any] = {
            "client": client, "key": key, "id": transfer.text, "slot": transfer.slot, "amount": request.amount,
            "fingerprint": fingerprint("capture", {"id": transfer.text, "amount": request.amount}),
        }
        hold = await store.hold_of(transfer.text, client)
        if hold is not None and hold["kind"] == PostingKind.TRANSFER.value:
            credit = parse_account_id(hold["credit_account"])
            credit_region, credit_shard = self.owner_of(credit.slot)
            if credit_shard != store.name:
                doc.update(
                    credit=credit.text,
                    transit=transit_account_id(store.name, credit_shard, hold["currency"]),
                    credit_shard=credit_shard,
                    credit_region=credit_region,
                    credit_slot=credit.slot,
                    relay_delay_ms=limits.SAGA_RELAY_FIRST_DELAY_MS,
                )
        outcome = await store.capture(doc)
        if outcome.message is not None and self.saga is not None:
            return await self.saga.fast_path(store, outcome, outcome.message)
        return outcome

    async def void(self, client: str, key: str, transfer: ParsedId) -> Outcome:
        store = await self.store_for_slot(transfer.slot)
        return await store.void({
            "client": client, "key": key, "id": transfer.text, "slot": transfer.slot,
            "fingerprint": fingerprint("void", {"id": transfer.text}),
        })

    async def close_account(self, client: str, key: str, account: ParsedId) -> Outcome:
        store = await self.store_for_slot(account.slot)
        return await store.close_account({
            "client": client, "key": key, "id": account.text, "slot": account.slot,
            "fingerprint": fingerprint("close_account", {"id": account.text}),
        })


async def _post(store: ShardStore, posting: Posting) -> Outcome:
    """Group commit, or a transaction of its own for a posting whose reference must be unique (its check and
    its posting share the account's lock; migration 0010)."""
    if posting.unique_reference:
        return await store.post_exclusive(posting)
    return await store.post(posting)


def _unique_reference(request: TransferRequest | FundsRequest) -> bool:
    if request.unique_reference and request.reference is None:
        raise Problem("invalid_request", "unique_reference needs a reference")
    return request.unique_reference


def misdirected(slot: int, region: str, shard: str) -> Problem:
    return Problem(
        "misdirected",
        f"slot {slot} belongs to shard {shard} in region {region}",
        extra={"slot": slot, "owner_region": region, "owner_shard": shard},
    )


def _body_account(text: str) -> ParsedId:
    # The schema checked the pattern, but msgspec matches it with `re.search`, where `$` also matches before
    # a trailing newline ("acc_...\n"); the strict parse refuses that, and the refusal is the client's error.
    try:
        return parse_account_id(text)
    except InvalidId:
        raise Problem("invalid_account_id", f"{text[:40]!r} is not a valid account id") from None


# Fields added after requests were first stored: left out of the fingerprint while unset, so a request stored
# before they existed still replays instead of reading as another request under the same key.
_OPTIONAL_FIELDS = frozenset({"metadata", "hold"})


def _fields(request: Any) -> dict[str, Any]:
    return {
        f: str(v) if f == "currency" else v
        for f in request.__struct_fields__
        for v in [getattr(request, f)]
        if not (v is None and f in _OPTIONAL_FIELDS)
    }
