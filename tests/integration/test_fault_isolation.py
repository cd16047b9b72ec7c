"""Fault isolation in group commit (issue 10, DESIGN D11): one account whose row a stuck database session
holds must cost only the postings that need that account, and a request that goes away must never take a
posting worker with it."""

from __future__ import annotations

import asyncio
import random
import secrets
from collections import Counter
from collections.abc import Callable
from typing import Any

import asyncpg
import httpx
import pytest

from app import limits
from app.ledger.postings import Posting, PostingKind, fingerprint, settlement_account_id
from app.region.saga import DeliveryFailed, Saga, Undeliverable
from app.store import shard as shard_module
from app.store.shard import AccountBusy, Outcome, ShardStore, ShardUnavailable, SlotMoved, TenantQueueFull
from app.topology.ids import new_transfer_id, parse_account_id
from app.topology.model import Topology
from tests.helpers import (
    ApiClient,
    accounts_in_one_shard,
    assert_shard_conserved,
    new_client_id,
    new_key,
    poll_until,
)

OPENING_BALANCE = 10_000
OTHER_TRANSFERS = 240
STUCK_POSTINGS = 12


async def _lock_row(dsn: str, account: str) -> tuple[asyncpg.Connection, asyncpg.transaction.Transaction]:
    """Another session takes the account's row lock and keeps its transaction open (a stuck session)."""
    conn = await asyncpg.connect(dsn)
    tx = conn.transaction()
    await tx.start()
    locked = await conn.fetchval("select id from accounts where id = $1 for update", account)
    assert locked == account, f"expected to lock {account}"
    return conn, tx


async def test_a_stuck_account_costs_only_its_own_postings_and_answers_account_busy(
    api: ApiClient, topology: Topology, shard_dsn: Callable[[str], str]
) -> None:
    shard, accounts = await accounts_in_one_shard(api, topology, 9)
    stuck, others = accounts[0], accounts[1:]
    for account in accounts:
        await api.funded(account, OPENING_BALANCE)
    dsn = shard_dsn(shard)
    holder, held = await _lock_row(dsn, stuck)
    try:
        rng = random.Random(20261128)
        plan = [(*rng.sample(others, 2), rng.randint(1, 20)) for _ in range(OTHER_TRANSFERS)]
        stuck_keys = [new_key() for _ in range(STUCK_POSTINGS)]
        # The stuck account's postings are sent among the others', so they share batches with them.
        stuck_calls = [
            api.withdraw(stuck, 5, key=key) if i % 2 else api.transfer(others[i % len(others)], stuck, 5, key=key)
            for i, key in enumerate(stuck_keys)
        ]
        other_calls = [api.transfer(d, c, amount) for d, c, amount in plan]
        tasks = [asyncio.ensure_future(c) for c in other_calls[: OTHER_TRANSFERS // 2]]
        stuck_tasks = [asyncio.ensure_future(c) for c in stuck_calls]
        tasks += [asyncio.ensure_future(c) for c in other_calls[OTHER_TRANSFERS // 2:]]

        other_responses = await asyncio.gather(*tasks)
        failures = Counter(f"{r.status_code} {r.json().get('code')}" for r in other_responses if r.status_code != 201)
        assert not failures, f"expected every posting on the other accounts to succeed, got {failures}"

        # The lock is still held: each of the stuck account's postings is answered on its own, 409 account_busy.
        stuck_responses: list[httpx.Response] = await asyncio.gather(*stuck_tasks)
        for response in stuck_responses:
            assert response.status_code == 409 and response.json()["code"] == "account_busy", (
                f"expected 409 account_busy while the row is locked, got {response.status_code} {response.text}"
            )
            assert response.headers.get("retry-after"), "expected Retry-After on account_busy"
    finally:
        await held.rollback()
        await holder.close()

    # account_busy is not stored as the key's answer: the same request, retried, now succeeds.
    retried = await api.withdraw(stuck, 5, key=stuck_keys[1])
    assert retried.status_code == 201, f"expected the retried withdrawal to post, got {retried.text}"
    assert retried.headers.get("idempotent-replayed") is None, "expected a first answer, not a replay"

    expected = dict.fromkeys(accounts, OPENING_BALANCE)
    for debit, credit, amount in plan:
        expected[debit] -= amount
        expected[credit] += amount
    expected[stuck] -= 5
    for account in accounts:
        balance = await api.balance(account)
        assert balance == expected[account], f"expected {account} at {expected[account]}, got {balance}"
    await assert_shard_conserved(dsn)


async def _store(shard: str, dsn: str, *, client_postings_max: int = limits.TENANT_QUEUE_POSTINGS_MAX) -> ShardStore:
    """A shard store of this test's own, with one posting worker, on a pool as the service makes it (the
    connection setup is the store's; the login here is the test cluster's owner)."""
    pool = await asyncpg.create_pool(dsn, min_size=1, max_size=4, init=shard_module._init_connection)
    assert pool is not None
    return ShardStore(shard, pool, workers=1, client_postings_max=client_postings_max)


def _deposit(api: ApiClient, shard: str, account: str, amount: int, *, debit: str | None = None) -> Posting:
    slot = parse_account_id(account).slot
    return Posting(
        kind=PostingKind.DEPOSIT, id=new_transfer_id(slot), slot=slot, client=api.client_id, key=new_key(),
        fingerprint=fingerprint("deposit", {"account": account, "amount": amount}),
        debit=debit or settlement_account_id(shard, "EUR"), credit=account, amount=amount, currency="EUR",
        reference=None,
    )


async def test_a_cancelled_request_does_not_kill_a_posting_worker(
    api: ApiClient, topology: Topology, shard_dsn: Callable[[str], str]
) -> None:
    """One worker only, so a dead worker would leave every later posting unanswered."""
    shard, (locked, other) = await accounts_in_one_shard(api, topology, 2)
    dsn = shard_dsn(shard)
    store = await _store(shard, dsn)
    holder, held = await _lock_row(dsn, locked)
    try:
        # One batch: a posting that waits for the locked row, and one that fails inside the database (its
        # debit names no account: an assertion in the posting function). The second's request goes away
        # while the batch is in flight; the worker must still answer the first and take the next batch.
        waiting = asyncio.ensure_future(store.post(_deposit(api, shard, locked, 7)))
        doomed = asyncio.ensure_future(store.post(_deposit(api, shard, other, 3, debit="set_nowhere_EUR")))
        cancelled_early = asyncio.ensure_future(store.post(_deposit(api, shard, other, 11)))
        cancelled_early.cancel()

        async def taken() -> bool:
            return store._queue.empty()

        await poll_until(taken, timeout_s=5, what="the worker to take the batch")
        doomed.cancel()
        await held.rollback()  # the waiting posting, retried alone, can now take its lock
        outcome = await asyncio.wait_for(waiting, 10)
        assert outcome.status == 201, f"expected the waiting deposit posted once its row was free, got {outcome}"

        after: Outcome = await asyncio.wait_for(store.post(_deposit(api, shard, other, 5)), 10)
        assert after.status == 201, f"expected a posting after the cancellations to succeed, got {after}"
        assert doomed.cancelled() and cancelled_early.cancelled()
    finally:
        if holder.is_in_transaction():
            await held.rollback()
        await holder.close()
        await store.close()
    assert await api.balance(locked) == 7
    assert await api.balance(other) == 5, "expected neither cancelled deposit nor the failing one to post"
    await assert_shard_conserved(dsn)


async def test_a_posting_blocked_alone_too_fails_with_account_busy_and_nothing_stored(
    api: ApiClient, topology: Topology, shard_dsn: Callable[[str], str]
) -> None:
    shard, (locked,) = await accounts_in_one_shard(api, topology, 1)
    dsn = shard_dsn(shard)
    store = await _store(shard, dsn)
    holder, held = await _lock_row(dsn, locked)
    posting = _deposit(api, shard, locked, 9)
    try:
        try:
            await store.post(posting)
            raise AssertionError("expected AccountBusy while the row is locked")
        except AccountBusy:
            pass
        await held.rollback()
        outcome = await store.post(posting)
        assert (outcome.status, outcome.replayed) == (201, False), f"expected the same posting to post, got {outcome}"
    finally:
        if holder.is_in_transaction():
            await held.rollback()
        await holder.close()
        await store.close()
    assert await api.balance(locked) == 9


async def test_a_clients_queue_share_is_held_until_a_timed_out_posting_leaves_the_database(
    api: ApiClient, topology: Topology, shard_dsn: Callable[[str], str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """A waiter past POSTING_ANSWER_TIMEOUT_S is answered ShardUnavailable while its posting may still be in
    commit: the client's share of the queue must stay taken until the database call ends, not be handed back
    when the waiter gives up (else a client whose postings time out keeps adding more to a stuck shard)."""
    shard, (locked, other) = await accounts_in_one_shard(api, topology, 2)
    dsn = shard_dsn(shard)
    monkeypatch.setattr(limits, "POSTING_ANSWER_TIMEOUT_S", 0.5)
    monkeypatch.setattr(limits, "POSTING_BATCH_LOCK_PATIENCE_MS", 4_000)  # in commit well past the timeout
    store = await _store(shard, dsn, client_postings_max=1)
    holder, held = await _lock_row(dsn, locked)
    try:
        try:
            await store.post(_deposit(api, shard, locked, 7))
            raise AssertionError("expected ShardUnavailable once the answer's deadline passed")
        except ShardUnavailable:
            pass
        waiting = await holder.fetchval(
            "select count(*) from pg_stat_activity where wait_event_type = 'Lock' and datname = current_database()"
        )
        assert waiting == 1, "expected the timed-out posting still in commit, waiting for the row"
        try:
            await store.post(_deposit(api, shard, other, 3))
            raise AssertionError("expected TenantQueueFull while the client's timed-out posting is in commit")
        except TenantQueueFull:
            pass
        await held.rollback()

        async def share_free() -> bool:
            return not store._queued_by_client

        await poll_until(share_free, timeout_s=10, what="the share to be released once the posting committed")
        after = await asyncio.wait_for(store.post(_deposit(api, shard, other, 5)), 10)
        assert after.status == 201, f"expected the client to post again once its posting left, got {after}"
    finally:
        if holder.is_in_transaction():
            await held.rollback()
        await holder.close()
        await store.close()
    assert await api.balance(locked) == 7, "expected the timed-out posting committed (its outcome was unknown)"
    assert await api.balance(other) == 5, "expected the refused posting not posted"
    await assert_shard_conserved(dsn)


async def test_a_shard_out_of_connections_is_unavailable_and_never_poisons_a_saga_message(
    api: ApiClient, topology: Topology, shard_dsn: Callable[[str], str]
) -> None:
    """A shard that refuses new connections (53300 too_many_connections: max_connections or the role's limit
    reached by other processes) heals by waiting: a posting is answered 503 shard_unavailable (not a raw
    database error, a 500) and a saga delivery is a failure that heals, never one that counts towards its
    dead letter (a few seconds at the connection limit must not dead-letter every message of a region)."""
    shard, (account,) = await accounts_in_one_shard(api, topology, 1)
    dsn = shard_dsn(shard)
    role = f"capped_{secrets.token_hex(4)}"
    owner = await asyncpg.connect(dsn)
    try:
        await owner.execute(f"create role {role} login password 'capped' connection limit 0")
        capped_dsn = dsn.replace(dsn.split("//", 1)[1].split("@", 1)[0], f"{role}:capped", 1)
        pool = await asyncpg.create_pool(capped_dsn, min_size=0, max_size=2, init=shard_module._init_connection)
        assert pool is not None
        store = ShardStore(shard, pool, workers=1)
        try:
            try:
                await store.post(_deposit(api, shard, account, 7))
                raise AssertionError("expected ShardUnavailable from a shard refusing connections")
            except ShardUnavailable:
                pass
            saga = Saga(region=topology.shard(shard).region, stores={shard: store}, peers=None, minter=None)
            # As the ledger writes it (0002): from another shard, whose message names its source.
            source = next(s.name for s in topology.shards if s.name != shard)
            message = {"transfer_id": new_transfer_id(parse_account_id(account).slot), "destination_shard": shard,
                       "destination_region": topology.shard(shard).region, "source_shard": source}
            try:
                await saga.deliver(store, message)
                raise AssertionError("expected the delivery to fail while the shard refuses connections")
            except DeliveryFailed as exc:
                assert not isinstance(exc, Undeliverable), f"expected a failure that heals, got poison: {exc}"
        finally:
            await store.close()
    finally:
        await owner.execute(f"drop role if exists {role}")
        await owner.close()
    assert await api.balance(account) == 0, "expected nothing posted"


async def test_a_retry_of_a_committed_posting_replays_its_answer_while_its_account_is_busy(
    api: ApiClient, topology: Topology, shard_dsn: Callable[[str], str]
) -> None:
    """account_busy says nothing was posted: a retry of a request that did commit (its first answer lost) must
    get its stored answer instead, or its client would post the money again under a new key."""
    shard, (locked,) = await accounts_in_one_shard(api, topology, 1)
    dsn = shard_dsn(shard)
    store = await _store(shard, dsn)
    posting = _deposit(api, shard, locked, 9)
    holder = held = None
    try:
        first = await store.post(posting)
        assert (first.status, first.replayed) == (201, False), f"expected the deposit posted, got {first}"
        holder, held = await _lock_row(dsn, locked)
        again = await store.post(posting)
        assert (again.status, again.replayed) == (201, True), f"expected the stored answer replayed, got {again}"
        assert again.body["id"] == first.body["id"], f"expected the same transfer, got {again.body}"
        try:
            await store.post(_deposit(api, shard, locked, 4))
            raise AssertionError("expected AccountBusy for a new posting while the row is locked")
        except AccountBusy:
            pass
    finally:
        if held is not None and holder is not None:
            await held.rollback()
            await holder.close()
        await store.close()
    assert await api.balance(locked) == 9, "expected the deposit posted once"


async def _one_slot_in_state(make_world: Callable[..., Any], topology: Topology, state: str
                             ) -> tuple[ApiClient, str, str, str, list[str]]:
    """A world, four funded accounts of one shard, and the first one's slot (alone in its range) recorded
    `state` by that shard as a move records it ('moving': frozen; 'moved': switched away; 'unowned': no
    ownership at all, as on a move's target until its switch-in commits). Returns the API client, the shard,
    its DSN, that account and the others outside its slot."""
    world = make_world()
    region = topology.regions[0].name
    async with world.http(region) as http:
        api = world.api(region, new_client_id("fence"), http)
        shard, accounts = await accounts_in_one_shard(api, topology, 4)
        account = accounts[0]
        others = [a for a in accounts[1:] if parse_account_id(a).slot != parse_account_id(account).slot]
        assert len(others) >= 2, f"expected two accounts outside the first account's slot, got {accounts}"
        for one in accounts:
            await api.funded(one, OPENING_BALANCE)
    dsn = world.shard_dsns()[shard]
    slot = parse_account_id(account).slot
    conn = await asyncpg.connect(dsn)
    try:
        await conn.execute("select txr_slot_split($1, $1)", slot)
        if state == "unowned":
            await conn.execute("delete from slot_ownership where slot_lo = $1", slot)
        elif state == "moved":
            await conn.execute("""update slot_ownership set state = 'moved', owner_shard = 'elsewhere',
                                  owner_region = 'elsewhere-1', epoch = epoch + 1 where slot_lo = $1""", slot)
        else:
            await conn.execute("update slot_ownership set state = $2 where slot_lo = $1", slot, state)
    finally:
        await conn.close()
    return api, shard, dsn, account, others


def _transfer(api: ApiClient, debit: str, credit: str, amount: int) -> Posting:
    debit_slot = parse_account_id(debit).slot
    return Posting(
        kind=PostingKind.TRANSFER, id=new_transfer_id(debit_slot), slot=debit_slot, client=api.client_id,
        key=new_key(), fingerprint=fingerprint("transfer", {"debit": debit, "credit": credit, "n": amount}),
        debit=debit, credit=credit, amount=amount, currency="EUR", reference=None,
    )


async def _balances(dsn: str, accounts: list[str]) -> dict[str, int]:
    conn = await asyncpg.connect(dsn)
    try:
        return dict(await conn.fetch("select id, balance from accounts where id = any($1::text[])", accounts))
    finally:
        await conn.close()


async def test_a_posting_fenced_by_a_switched_move_costs_only_itself_in_its_group_commit(
    make_world: Callable[..., Any], topology: Topology,
) -> None:
    """A region whose ownership map is stale right after a move's switch posts a same-shard transfer into an
    account whose slot moved away: the moved-account fence (SQLSTATE TXR02) aborts the group commit's
    transaction. Only that posting may be refused (SlotMoved: 503 slot_moving, which routers hold and retry);
    the others of its batch are posted. (Seen in CI as whole batches answered 503 shard_unavailable.)"""
    api, shard, dsn, fenced, others = await _one_slot_in_state(make_world, topology, "moved")
    store = await _store(shard, dsn)
    try:
        # Queued in one loop turn before the store's one worker runs: they form one group commit.
        answers = await asyncio.gather(
            store.post(_transfer(api, others[0], others[1], 7)),
            store.post(_transfer(api, others[1], fenced, 5)),
            store.post(_transfer(api, others[1], others[0], 3)),
            return_exceptions=True,
        )
    finally:
        await store.close()
    first, into_moved, last = answers
    assert isinstance(into_moved, SlotMoved), (
        f"expected SlotMoved for the posting into the moved slot, got {into_moved!r}")
    for answer in (first, last):
        assert isinstance(answer, Outcome) and answer.status == 201, (
            f"expected the batch's other postings posted, got {answer!r}")
    expected = {others[0]: OPENING_BALANCE - 7 + 3, others[1]: OPENING_BALANCE + 7 - 3}
    balances = await _balances(dsn, [fenced, *others[:2]])
    assert balances == {**expected, fenced: OPENING_BALANCE}, f"expected only the two postings applied, got {balances}"
    await assert_shard_conserved(dsn)


async def test_a_posting_into_an_account_the_switch_holds_is_answered_slot_moving_without_waiting(
    make_world: Callable[..., Any], topology: Topology,
) -> None:
    """Under a move's freeze the switch holds the range's account rows while it books them out: seconds under
    load. A posting into such an account waited for it (its batch's patience, then alone), and was answered 409
    account_busy, which routers pass to the client (issue 11: "clients see latency, not errors"); later
    slot_moving, still after the wait, on every resend of a held request. It is answered 503 slot_moving naming
    the slot before any lock is asked for (migration 0025): its router holds it and resends it once the switch
    has landed. A row held outside any moving range is still waited for, then answered account_busy."""
    api, shard, dsn, frozen, others = await _one_slot_in_state(make_world, topology, "moving")
    store = await _store(shard, dsn)
    held = [await _lock_row(dsn, frozen), await _lock_row(dsn, others[0])]  # the switch; a stuck session
    try:
        into_frozen, into_stuck = await asyncio.gather(
            store.post(_transfer(api, others[1], frozen, 5)),
            store.post(_transfer(api, others[1], others[0], 3)),
            return_exceptions=True,
        )
        # Never waited for: a posting that waits out its patience leaves its account remembered as busy.
        waited = {account: store._known_busy(account) for account in (frozen, others[0])}
    finally:
        for holder, tx in held:
            await tx.rollback()
            await holder.close()
        await store.close()
    assert isinstance(into_frozen, Outcome), f"expected the refusal as an answer, got {into_frozen!r}"
    assert (into_frozen.status, into_frozen.body.get("code"), into_frozen.body.get("slot")) == (
        503, "slot_moving", parse_account_id(frozen).slot), f"expected 503 slot_moving naming the slot: {into_frozen}"
    assert waited == {frozen: False, others[0]: True}, f"expected only the stuck row waited for: {waited}"
    assert isinstance(into_stuck, AccountBusy), f"expected AccountBusy outside the frozen range, got {into_stuck!r}"
    balances = await _balances(dsn, [frozen, *others[:2]])
    assert balances == dict.fromkeys([frozen, *others[:2]], OPENING_BALANCE), f"expected nothing posted: {balances}"


async def test_a_posting_for_a_slot_the_shard_does_not_own_yet_is_answered_without_waiting_for_its_account(
    make_world: Callable[..., Any], topology: Topology,
) -> None:
    """A move's target owns the range only once its switch-in commits, and the switch-in holds the range's
    account rows while it books them in. A posting that reached the target meanwhile (its region had read the
    source's `moved`) waited out its patience on those rows and was answered 409 account_busy, since nothing
    on the target says `moving`. It is answered 421 misdirected at once (migration 0025), which its router
    holds until its map names the owner."""
    api, shard, dsn, account, others = await _one_slot_in_state(make_world, topology, "unowned")
    store = await _store(shard, dsn)
    holder, tx = await _lock_row(dsn, account)  # the switch-in
    try:
        answer = await store.post(_transfer(api, account, others[0], 5))
        waited = store._known_busy(account)
    finally:
        await tx.rollback()
        await holder.close()
        await store.close()
    assert (answer.status, answer.body.get("code"), answer.body.get("slot")) == (
        421, "misdirected", parse_account_id(account).slot), f"expected 421 misdirected naming the slot: {answer}"
    assert not waited, "expected the posting answered without waiting for the held account"
    balances = await _balances(dsn, [account, others[0]])
    assert balances == dict.fromkeys([account, others[0]], OPENING_BALANCE), f"expected nothing posted: {balances}"
    await assert_shard_conserved(dsn)
