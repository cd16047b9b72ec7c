"""The regional ledger service's use cases: one method per command, no HTTP types.

It decides which of this region's shards a request belongs to (DESIGN D1, D2), refuses what this region
does not own, builds the posting and hands it to the shard's store. Outcomes are the ledger's own.
"""

from __future__ import annotations

import datetime
import time
from collections import defaultdict
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import asyncpg

from app import limits
from app.api.schemas import CaptureRequest, FundsRequest, OpenAccountRequest, TransferRequest
from app.errors import Problem, slot_moving
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
from app.topology.placement import owned_slots, probe_sequence


@dataclass(frozen=True, slots=True)
class StoredAnswer:
    """What a region holds under (client, key) at one slot: the stored answer (status and body, and the
    fingerprint of the request that stored it), nothing (status None), or where the slot moved on."""

    slot: int
    fingerprint: str | None = None
    status: int | None = None
    body: dict[str, Any] | None = None
    moved_to: tuple[str, str] | None = None  # (region, shard)
    in_flight: bool = False  # a request with the key is being processed where the slot lives
    # The slot is on its way to the shard the region names for it (a move's switch-in has not committed there;
    # its copies of the stored answers may be incomplete): whether it holds an answer is not known yet.
    arriving: bool = False


# (region, client, key, slots) -> that region's answers for those slots; raises Problem when it cannot be asked.
AskPeer = Callable[[str, str, str, list[int]], Awaitable[list[StoredAnswer]]]


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
        # Moves that switched slots here from another region, per local shard (an unreachable shard keeps what
        # was read before): (lo, hi, switched_at). Such a slot is owned now but not all along, so a key's earlier
        # open may have landed past it. `_arrived_at`: each slot's latest arrival; `_first_arrival_at`: the
        # earliest of them all, when every slot the region owns or gave away came by a move (before it the
        # region owned nothing and opened nothing), else None.
        self._arrivals: dict[str, list[tuple[int, int, datetime.datetime]]] = {}
        self._arrived_at: dict[int, datetime.datetime] = {}
        self._first_arrival_at: datetime.datetime | None = None
        # Asks another region for the answers it holds under (client, key) at slots that moved there from here
        # (set by the composition root: the peers' pool and the region-to-region token).
        self.ask_peer: AskPeer | None = None
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
                self._arrivals[name] = await store.slot_arrivals()
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
        self._learn_arrivals()
        self.ownership_known = True

    def _learn_arrivals(self) -> None:
        """`_arrived_at` and `_first_arrival_at` from the arrivals read (after `_owned` and `_moved`)."""
        arrived_at: dict[int, datetime.datetime] = {}
        for lo, hi, at in (arrival for rows in self._arrivals.values() for arrival in rows):
            for slot in range(lo, hi + 1):
                if slot not in arrived_at or at > arrived_at[slot]:
                    arrived_at[slot] = at
        self._arrived_at = arrived_at
        had = [slot for slot in range(len(self._owned)) if self._owned[slot]] + list(self._moved)
        if arrived_at and all(slot in arrived_at for slot in had):
            self._first_arrival_at = min(at for rows in self._arrivals.values() for _, _, at in rows)
        else:
            self._first_arrival_at = None

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
            await self._refresh_on_miss()
            region, shard = self.owner_of(slot)
        if region != self.region or shard not in self.stores:
            raise misdirected(slot, region, shard)
        return self.stores[shard]

    async def _refresh_on_miss(self) -> None:
        now = time.monotonic()
        if now - self._refreshed_on_miss_at >= limits.SLOT_OWNERSHIP_REFRESH_ON_MISS_MS / 1000:
            self._refreshed_on_miss_at = now
            await self.refresh_ownership()

    def ownership_changed(self) -> None:
        """Read the ownership map again before the next request is routed."""
        self._stale = True

    def learn(self, slot: int, region: str, shard: str) -> None:
        """A shard database answered that `slot` moved to (region, shard): route it there from now on, and read
        the whole map again before the next request (its neighbours moved with it)."""
        self._stale = True
        here = region == self.region and shard in self.stores
        if here:
            self._local[slot] = shard
            self._moved.pop(slot, None)
        else:
            self._local.pop(slot, None)
            self._moved[slot] = (region, shard)
        if self._owned[slot] != here:  # placement reads the slot set: keep it the same view
            self._owned = tuple(here if s == slot else owned for s, owned in enumerate(self._owned))

    def _placement(self, client: str, key: str) -> tuple[int, list[int]]:
        """Where an account opened with this key lives now, and where an earlier open of it may have stored its
        answer. The slot is the first of the key's probe sequence (app.topology.placement) that this region
        owns: a pure function of (client, key) and the region's slot set, so splitting shards inside the region
        changes nothing (the slot's records go with it to its new shard).

        A move across regions changes the slot set, and with it the slot (issue 11): the answer of an earlier
        open stays at the slot it was opened at, which may have left since, or come after a slot that arrived.
        So the walk goes on along the sequence past the slot placed, collecting the slots where that answer may
        be: those this region owns but received by a move, and those it owned and gave away (`_moved`), up to
        the first slot it owns that has been its own since before any open here could have been placed past it:
        owned all along, or (in a region whose every slot came by a move) owned since the first move brought
        the region any slot. An open before now landed there at the latest. Slots never this region's are
        skipped. When a key's sequence meets no move before its first slot (nearly every key, after a few
        moves), the list is empty and the open costs what it always did: its own check of the key."""
        placed: int | None = None
        earlier: list[int] = []
        seen: set[int] = set()
        # Past the probes only slots this region owns or gave away can count: the fallback ranks just those.
        relevant = (slot for slot in range(len(self._owned)) if self._owned[slot] or slot in self._moved)
        for slot in probe_sequence(client, key, among=relevant):
            if slot in seen:
                continue
            seen.add(slot)
            if self._owned[slot]:
                if placed is None:
                    placed = slot
                else:
                    earlier.append(slot)
                arrived_at = self._arrived_at.get(slot)
                if arrived_at is None or (self._first_arrival_at is not None and arrived_at <= self._first_arrival_at):
                    break
            elif slot in self._moved:
                earlier.append(slot)
        assert placed is not None, "the region owns at least one slot"
        return placed, earlier

    async def _earlier_answer(self, client: str, key: str, fingerprint_: str, slots: list[int]) -> Outcome | None:
        """The answer stored under (client, key) at the first of `slots` (in the key's order) that holds one,
        wherever that slot lives now; None when none does. The same request gets its answer replayed, another
        request under the key is refused as `txr_idempotency_check` refuses it. A slot that moved on is followed
        to its next owner, at most OPEN_REPLAY_HOPS_MAX times; an owner that cannot be asked makes the open a
        503: whether it holds the answer is unknown, and opening anyway could open twice."""
        stored: dict[int, StoredAnswer] = {}
        where = {slot: self.owner_of(slot)[0] for slot in slots}
        for _ in range(limits.OPEN_REPLAY_HOPS_MAX):
            by_region: dict[str, list[int]] = defaultdict(list)
            for slot, region in where.items():
                by_region[region].append(slot)
            where = {}
            for region, region_slots in by_region.items():
                for answer in await self._answers_in(region, client, key, region_slots):
                    if answer.in_flight:
                        raise Problem("idempotency_key_in_flight", "a request with this Idempotency-Key is still "
                                      "being processed; retry it shortly")
                    if answer.arriving:  # as for a frozen slot: routers hold it and send it again
                        raise slot_moving(f"slot {answer.slot}, where this Idempotency-Key may have been used "
                                          "before, is moving; nothing was written")
                    if answer.moved_to is not None:
                        where[answer.slot] = answer.moved_to[0]
                    elif answer.status is not None:
                        stored[answer.slot] = answer
            if not where:
                break
        if where:
            # The regions' views of a slot that just moved disagree for a moment: answered like a frozen slot
            # (routers hold it and send it again), never by opening.
            raise slot_moving(f"slot {min(where)}, where this Idempotency-Key may have been used before, has "
                              "just moved; nothing was written")
        first = next((stored[slot] for slot in slots if slot in stored), None)
        if first is None:
            return None
        if first.fingerprint != fingerprint_:
            return Outcome(422, {"code": "idempotency_key_reused",
                                 "detail": "this Idempotency-Key was already used for a different request"})
        assert first.status is not None and first.body is not None
        return Outcome(first.status, first.body, replayed=True)

    async def _answers_in(self, region: str, client: str, key: str, slots: list[int]) -> list[StoredAnswer]:
        if region == self.region:
            return await self.stored_answers(client, key, slots)
        if self.ask_peer is None:
            raise Problem("region_unavailable", f"region {region} holds slots this Idempotency-Key may have been "
                          "used at, and this region cannot ask it; nothing was written")
        answers: list[StoredAnswer] = []
        for i in range(0, len(slots), limits.OPEN_REPLAY_SLOTS_PER_CALL_MAX):
            answers += await self.ask_peer(region, client, key, slots[i:i + limits.OPEN_REPLAY_SLOTS_PER_CALL_MAX])
        return answers

    async def stored_answers(self, client: str, key: str, slots: list[int]) -> list[StoredAnswer]:
        """What this region's shards hold under (client, key) at each slot, or where the slot went (this
        region's own view, for a slot none of its shards claims: the asker follows it there)."""
        if any(self.owner_of(slot)[0] != self.region for slot in slots):
            # A slot that just arrived may not be known here yet. Read now, not at most every
            # SLOT_OWNERSHIP_REFRESH_ON_MISS_MS: a walk's hops follow each other within milliseconds, and an
            # answer from a view a moment old would send the asker back and forth until its hops run out.
            await self.refresh_ownership()
        by_shard: dict[str, list[int]] = defaultdict(list)
        answers: list[StoredAnswer] = []
        for slot in slots:
            region, shard = self.owner_of(slot)
            if region == self.region and shard in self.stores:
                by_shard[shard].append(slot)
            else:
                answers.append(StoredAnswer(slot, moved_to=(region, shard)))
        for shard, shard_slots in by_shard.items():
            for row in await self.stores[shard].stored_answers(client, key, shard_slots):
                slot = int(row["slot"])
                if not row["free"]:
                    answers.append(StoredAnswer(slot, in_flight=True))
                elif row["state"] == "moved":
                    self.learn(slot, row["owner_region"], row["owner_shard"])
                    answers.append(StoredAnswer(slot, moved_to=(row["owner_region"], row["owner_shard"])))
                elif row["state"] in ("owned", "moving") and row["fingerprint"] is not None:
                    answers.append(StoredAnswer(slot, fingerprint=row["fingerprint"], status=int(row["status_code"]),
                                                body=row["body"]))
                elif row["state"] is None:
                    # No claim at all: a move's target before its switch-in commits (the range's answers are
                    # being copied here), or a view of the region's a moment old. Never "nothing stored".
                    answers.append(StoredAnswer(slot, arriving=True))
                else:  # owned and nothing stored
                    answers.append(StoredAnswer(slot))
        return answers

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
        body: dict[str, Any] = {
            "currency": str(request.currency), "region": region, "overdraft_limit": request.overdraft_limit,
        }
        if request.metadata is not None:  # so a request without metadata keeps its fingerprint of before
            body["metadata"] = request.metadata
        doc_fingerprint = fingerprint("open_account", body)
        if len(self._arrivals) < len(self.stores):
            # Which slots arrived by a move decides where an earlier answer may be: read from every shard first.
            await self.refresh_ownership()
            if len(self._arrivals) < len(self.stores):
                raise ShardUnavailable(f"region {self.region}: a shard's slot ownership has not been read yet")
        for _ in range(limits.OPEN_PLACEMENT_ATTEMPTS_MAX):
            if self._stale:
                self._stale = False
                await self.refresh_ownership()
            slot, earlier = self._placement(client, key)
            if earlier:
                prior = await self._earlier_answer(client, key, doc_fingerprint, earlier)
                if prior is not None:
                    return prior
            try:
                store = await self.store_for_slot(slot)
            except Problem as problem:
                if problem.code != "misdirected":
                    raise
                continue  # the view changed under the placement (store_for_slot has read it again): place again
            outcome = await store.open_account(
                {
                    "client": client,
                    "key": key,
                    "fingerprint": doc_fingerprint,
                    "id": new_account_id(slot),
                    "slot": slot,
                    "currency": body["currency"],
                    "overdraft_limit": request.overdraft_limit,
                    "metadata": request.metadata,
                }
            )
            if outcome.status != 421:
                return outcome
            # The slot's database says it moved after this region placed the key there, or claims it not yet (a
            # move's switch-in): this region's view was a moment behind. Nothing was written; learn where it
            # went (or read the claims again) and place again, so the walk asks its new owner.
            if "owner_shard" in outcome.body:
                self.learn(slot, str(outcome.body["owner_region"]), str(outcome.body["owner_shard"]))
            else:
                self._stale = True
        # Never the internal 421 to a client: the placement is changing under a move, as for a frozen slot.
        raise slot_moving("the slot this account is placed on is changing owner; nothing was written")

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
