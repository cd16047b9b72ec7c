"""Where slot moves (migration 0008) meet batches (0010) and events (0011), against the running regions and
their databases. A range is frozen as the mover freezes it (txr_move_begin, txr_move_freeze on the source) and
unfrozen again (txr_move_unfreeze), as in test_slot_freeze.py: what a request meets during a freeze, and what a
saga settled under the freeze leaves behind."""

from __future__ import annotations

import contextlib
import json
from collections.abc import AsyncIterator, Callable
from typing import Any

import asyncpg

from app.local.postgres import Cluster
from app.placement import mover as mover_module
from app.store.slotdata import SLOT_TABLES
from app.topology.ids import new_transfer_id, parse_account_id
from app.topology.model import Topology
from tests.events_support import committed_events
from tests.helpers import ApiClient, account_in_shard, new_key, poll_until, shard_of, source_move_spec


async def freeze(topology: Topology, conn: asyncpg.Connection, shard: str, slot: int) -> str:
    """Freeze `slot` on `shard` as the source side of a move (which `unfreeze` cancels); returns the move's id."""
    move = "mv_review" + new_key()[-12:]
    spec = source_move_spec(topology, slot, move)
    assert spec["source_shard"] == shard, (spec, shard)
    begun = json.loads(await conn.fetchval("select txr_move_begin($1::jsonb)::text", json.dumps(spec)))
    assert begun["ok"], begun
    await conn.execute("select txr_move_freeze($1)", move)
    return move


async def unfreeze(conn: asyncpg.Connection, move: str) -> None:
    await conn.execute("select txr_move_unfreeze($1, 'cancelled', 'test')", move)


@contextlib.asynccontextmanager
async def frozen(topology: Topology, dsn: str, shard: str, slot: int) -> AsyncIterator[asyncpg.Connection]:
    """Slot `slot` frozen on `shard`: yields a connection to the shard's database; owned again afterwards."""
    conn = await asyncpg.connect(dsn)
    try:
        move = await freeze(topology, conn, shard, slot)
        try:
            yield conn
        finally:
            await unfreeze(conn, move)
    finally:
        await conn.close()


def _deposit(account: str, amount: int, **extra: Any) -> dict[str, Any]:
    return {"type": "deposit", "account": account, "amount": amount, "currency": "EUR", **extra}


async def test_an_atomic_batch_on_a_frozen_slot_answers_503_stores_nothing_and_posts_once_unfrozen(
    api: ApiClient, topology: Topology, shard_dsn: Callable[[str], str]
) -> None:
    account = await api.new_account()
    shard, slot = shard_of(topology, account), parse_account_id(account).slot
    key = new_key()
    batch = {"atomic": True, "items": [_deposit(account, 100), _deposit(account, 200)]}
    async with frozen(topology, shard_dsn(shard), shard, slot) as conn:
        during = await api.post("/v1/batches", batch, key=key)
        stored = await conn.fetchval("select count(*) from idempotency where client = $1", api.client_id)
    after = await api.post("/v1/batches", batch, key=key)
    assert during.status_code == 503 and during.json()["code"] == "slot_moving", (
        f"expected 503 slot_moving for an atomic batch on a frozen slot, got {during.status_code} {during.text}")
    # The account's opening is the client's only stored answer: nothing of the batch was written while frozen.
    assert stored == 1, f"expected nothing stored for the batch while its slot was frozen, found {stored - 1} rows"
    assert after.status_code == 201, f"expected the same batch to post once unfrozen, got {after.text}"
    assert await api.balance(account) == 300


async def test_an_atomic_batch_stores_its_answer_under_its_first_items_slot_posted_or_refused(
    api: ApiClient, topology: Topology, shard_dsn: Callable[[str], str]
) -> None:
    """The stored answer moves with the slot it records (migration 0008): a refused batch's too, or a replay
    after a move would execute it again on the new owner."""
    account = await api.new_account()
    slot = parse_account_id(account).slot
    posted_key, refused_key = new_key(), new_key()
    posted = await api.post("/v1/batches", {"atomic": True, "items": [_deposit(account, 100)]}, key=posted_key)
    refused = await api.post("/v1/batches", {"atomic": True, "items": [
        _deposit(account, 5),
        {"type": "withdrawal", "account": account, "amount": 1_000, "currency": "EUR"},
    ]}, key=refused_key)
    assert posted.status_code == 201, posted.text
    assert refused.status_code == 422 and refused.json()["code"] == "batch_refused", refused.text
    conn = await asyncpg.connect(shard_dsn(shard_of(topology, account)))
    try:
        slots = dict(await conn.fetch(
            "select key, slot from idempotency where client = $1 and key = any($2::text[])",
            api.client_id, [posted_key, refused_key]))
    finally:
        await conn.close()
    assert slots == {posted_key: slot, refused_key: slot}, (
        f"expected both batch answers stored under slot {slot}, got {slots}")


async def test_a_unique_reference_refusal_on_a_frozen_slot_answers_503_and_stores_nothing(
    api: ApiClient, topology: Topology, shard_dsn: Callable[[str], str]
) -> None:
    account = await api.new_account()
    shard, slot = shard_of(topology, account), parse_account_id(account).slot
    first = await api.post("/v1/deposits", {"account": account, "amount": 10, "currency": "EUR",
                                            "reference": "inv-1", "unique_reference": True})
    assert first.status_code == 201, first.text
    key = new_key()
    async with frozen(topology, shard_dsn(shard), shard, slot) as conn:
        during = await api.post("/v1/deposits", {"account": account, "amount": 10, "currency": "EUR",
                                                 "reference": "inv-1", "unique_reference": True}, key=key)
        stored = await conn.fetchval(
            "select count(*) from idempotency where client = $1 and key = $2", api.client_id, key)
    assert during.status_code == 503 and during.json()["code"] == "slot_moving", (
        f"expected 503 slot_moving on a frozen slot, got {during.status_code} {during.text}")
    assert stored == 0, "expected no answer stored while the slot was frozen"


async def test_a_saga_settled_while_its_debit_slot_is_frozen_writes_its_transfer_posted_event(
    api: ApiClient, topology: Topology, shard_dsn: Callable[[str], str], pg_clusters: dict[str, Cluster]
) -> None:
    """The mover waits, under the freeze, for the sagas debited from the range to settle: their settlement is
    the range's last change on the source, and its event must be written there."""
    shards = topology.region("eu-west-1").shards
    debit = await account_in_shard(api, topology, shards[0].name)
    credit = await account_in_shard(api, topology, shards[1].name)
    await api.funded(debit, 100)
    credit_slot, debit_slot = parse_account_id(credit).slot, parse_account_id(debit).slot
    debit_db = await asyncpg.connect(shard_dsn(shards[0].name))
    credit_db = await asyncpg.connect(shard_dsn(shards[1].name))
    try:
        credit_move = await freeze(topology, credit_db, shards[1].name, credit_slot)
        try:
            sent = await api.transfer(debit, credit, 40)
            assert sent.status_code == 202, f"expected the saga pending while its credit slot is frozen: {sent.text}"
            transfer = sent.json()["id"]
            debit_move = await freeze(topology, debit_db, shards[0].name, debit_slot)
        finally:
            await unfreeze(credit_db, credit_move)
        try:
            async def settled() -> bool:
                return await debit_db.fetchval("select state from transfers where id = $1", transfer) == "posted"

            await poll_until(settled, timeout_s=60, what="the saga settled on its frozen debit slot")
        finally:
            await unfreeze(debit_db, debit_move)
    finally:
        await debit_db.close()
        await credit_db.close()
    events = [e for e in await committed_events(pg_clusters, topology, api.client_id) if e["resource"] == transfer]
    assert [e["type"] for e in events] == ["transfer.pending", "transfer.posted"], (
        f"expected the saga's pending and posted events, got {events}")


async def test_a_saga_to_the_target_of_its_debit_ranges_move_is_applied_when_the_copy_of_its_row_came_first(
    api: ApiClient, topology: Topology, shard_dsn: Callable[[str], str]
) -> None:
    """A move copies its range's transfers to its target, the debit side of a saga from the range among them.
    When the saga's credit account is on the target and the copy came before the message, the credit side's
    insert failed on the id at every delivery (a 500, then a dead letter; the saga stayed pending and the move's
    freeze aborted). The copy becomes the credit side's row, as when the message comes first (migration 0029), and
    keeps the history copied with it (migration 0033: 0029 deleted it, the source kept it, and the move's verify
    aborted on the difference)."""
    shards = topology.region("eu-west-1").shards
    debit = await account_in_shard(api, topology, shards[0].name)
    credit = await account_in_shard(api, topology, shards[1].name)
    transfer = new_transfer_id(parse_account_id(debit).slot)
    target = await asyncpg.connect(shard_dsn(shards[1].name))
    # The message is made up (nothing was debited on the source), so everything this test writes is rolled back:
    # the clusters are shared, and a credit left behind is money created for every later audit to find.
    undo = target.transaction()
    await undo.start()
    try:
        await target.execute(  # the move's copy of the debit side's row, and its history, on the target
            """insert into transfers (id, client, kind, debit_account, credit_account, amount, currency, state,
                                      debit_shard, credit_shard, moved_from)
               values ($1, $2, 'transfer', $3, $4, 40, 'EUR', 'pending', $5, $6, $5)""",
            transfer, api.client_id, debit, credit, shards[0].name, shards[1].name)
        await target.execute("insert into transfer_events (transfer_id, seq, state) values ($1, 1, 'pending')",
                             transfer)
        message = {"transfer_id": transfer, "client": api.client_id, "debit_account": debit, "credit_account": credit,
                   "credit_slot": parse_account_id(credit).slot, "amount": 40, "currency": "EUR",
                   "source_shard": shards[0].name, "reference": None}
        answer = json.loads(await target.fetchval("select txr_saga_apply($1::jsonb)::text", json.dumps(message)))
        row = await target.fetchrow("select state, moved_from from transfers where id = $1", transfer)
        entries = await target.fetchval("select count(*) from entries where transfer_id = $1", transfer)
        history = [tuple(r) for r in await target.fetch(
            "select seq, state from transfer_events where transfer_id = $1 order by seq", transfer)]
        balance = await target.fetchval("select balance from accounts where id = $1", credit)
    finally:
        await undo.rollback()
        await target.close()
    assert answer["outcome"] == "applied", answer
    assert (row["state"], row["moved_from"], entries, balance) == ("posted", None, 2, 40), (dict(row), entries, balance)
    assert history == [(1, "pending")], f"expected the copied history kept as the source has it, got {history}"


async def test_a_sagas_credit_row_on_its_debit_ranges_move_target_ends_the_same_whichever_came_first(
    api: ApiClient, topology: Topology, shard_dsn: Callable[[str], str]
) -> None:
    """Two sagas from a moving range to the move's target, one whose message comes before the copy of its
    debit-side row (the credit row stands; the copy's import joins the debit side's columns to it: slotdata
    `own_merged`) and one whose copy comes first (the copy becomes the credit row: migration 0033). Both rows end
    alike but for their id and reference: posted, no longer copies, and with the debit side's columns, so a unique
    reference stays unique on the new owner whichever order the move met (the row here is a captured hold's, with
    metadata: columns 0009 made immutable, which 0035 lets a credit row fill in once)."""
    shards = topology.region("eu-west-1").shards
    source, target_shard = shards[0].name, shards[1].name
    debit = await account_in_shard(api, topology, source)
    credit = await account_in_shard(api, topology, target_shard)
    slot = parse_account_id(debit).slot
    message_first, copy_first = new_transfer_id(slot), new_transfer_id(slot)
    transfers = next(t for t in SLOT_TABLES if t.name == "transfers")
    target = await asyncpg.connect(shard_dsn(target_shard))
    undo = target.transaction()  # made-up sagas (nothing debited): everything written here is rolled back
    await undo.start()
    try:
        columns = await mover_module._columns(target, "transfers")

        def source_row(transfer: str) -> str:  # the debit side's row as the copy reads it on the source
            row: dict[str, Any] = dict.fromkeys(columns)
            row.update(id=transfer, client=api.client_id, kind="transfer", debit_account=debit,
                       credit_account=credit, amount=40, currency="EUR", reference="inv-" + transfer,
                       reference_unique=True, state="pending", debit_shard=source, credit_shard=target_shard,
                       idempotency_key="key-1", metadata={"order": "42"}, created_at="2026-01-02T03:04:05+00:00",
                       hold_amount=50, hold_expires_at="2026-01-03T03:04:05+00:00", resolution_key="key-2")
            return json.dumps([row])

        async def apply(transfer: str) -> None:
            message = {"transfer_id": transfer, "client": api.client_id, "debit_account": debit,
                       "credit_account": credit, "credit_slot": parse_account_id(credit).slot, "amount": 40,
                       "currency": "EUR", "source_shard": source, "reference": "inv-" + transfer}
            answer = json.loads(await target.fetchval("select txr_saga_apply($1::jsonb)::text", json.dumps(message)))
            assert answer["outcome"] == "applied", answer

        await apply(message_first)
        await mover_module._import(target, transfers, columns, source_row(message_first), source)
        await mover_module._import(target, transfers, columns, source_row(copy_first), source)
        await apply(copy_first)
        rows = {r["id"]: json.loads(r["row"]) for r in await target.fetch(
            "select id, (to_jsonb(t) - 'id' - 'reference')::text as row from transfers t where id = any($1::text[])",
            [message_first, copy_first])}
    finally:
        await undo.rollback()
        await target.close()
    assert rows[message_first] == rows[copy_first], f"expected both orders to end alike: {rows}"
    row = rows[message_first]
    assert (row["state"], row["moved_from"], row["reference_unique"], row["metadata"], row["hold_amount"]) == (
        "posted", None, True, {"order": "42"}, 50), row
