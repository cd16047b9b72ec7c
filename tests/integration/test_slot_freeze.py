"""The freeze of a slot move (issue 11, migration 0008) as a region answers it: while a range is `moving`, every
request for it is answered 503 `slot_moving` with Retry-After and writes nothing; once unfrozen, the same request
succeeds. And every per-slot table of the registry (app/store/slotdata.py) has its change-log trigger."""

from __future__ import annotations

import json
from collections.abc import Callable

import asyncpg

from app.store.slotdata import SLOT_TABLES
from app.topology.ids import parse_account_id
from app.topology.model import Topology
from tests.helpers import ApiClient, accounts_in_one_shard, new_key, shard_of, source_move_spec


async def test_a_frozen_slot_answers_503_slot_moving_writes_nothing_and_takes_the_retry_once_unfrozen(
    api: ApiClient, topology: Topology, shard_dsn: Callable[[str], str]
) -> None:
    account = await api.new_account()
    slot = parse_account_id(account).slot
    shard = shard_of(topology, account)
    move = "mv_freezetest" + new_key()[-12:]
    spec = source_move_spec(topology, slot, move)
    conn = await asyncpg.connect(shard_dsn(shard))
    try:
        begun = json.loads(await conn.fetchval("select txr_move_begin($1::jsonb)::text", json.dumps(spec)))
        assert begun["ok"], begun
        await conn.execute("select txr_move_freeze($1)", move)
        key = new_key()
        frozen = await api.deposit(account, 500, key=key)
        read = await api.account(account)
        written = await conn.fetchval("select count(*) from transfers where credit_account = $1", account)
        await conn.execute("select txr_move_unfreeze($1, 'cancelled', 'test')", move)
        after = await api.deposit(account, 500, key=key)
        ownership = await conn.fetch(
            "select state from slot_ownership where $1 between slot_lo and slot_hi", slot)
    finally:
        await conn.close()
    assert frozen.status_code == 503, f"expected 503 while frozen, got {frozen.status_code} {frozen.text}"
    assert frozen.json()["code"] == "slot_moving", frozen.text
    assert frozen.headers["retry-after"] == "1", frozen.headers
    assert read.status_code == 503 and read.json()["code"] == "slot_moving", f"expected reads frozen too: {read.text}"
    assert written == 0, f"expected nothing written for a frozen slot, found {written} transfers"
    assert after.status_code == 201, f"expected the retry to succeed once unfrozen, got {after.text}"
    assert await api.balance(account) == 500
    assert [r["state"] for r in ownership] == ["owned"], ownership


async def test_every_per_slot_table_writes_the_change_log_the_catch_up_reads(
    topology: Topology, shard_dsn: Callable[[str], str]
) -> None:
    conn = await asyncpg.connect(shard_dsn(topology.region("eu-west-1").shards[0].name))
    try:
        rows = await conn.fetch(
            """select c.relname as table_name, t.tgname, encode(t.tgargs, 'escape') as args,
                      (t.tgtype & 8) <> 0 as on_delete
               from pg_trigger t join pg_class c on c.oid = t.tgrelid
               join pg_proc p on p.oid = t.tgfoid where p.proname = 'txr_move_log'""")
    finally:
        await conn.close()
    triggers = {r["table_name"]: r["args"].split("\\000")[:-1] for r in rows}
    on_delete = {r["table_name"] for r in rows if r["on_delete"]}
    for table in SLOT_TABLES:
        expected = [table.slot_by, table.slot_column, *table.key]
        assert triggers.get(table.name) == expected, (
            f"expected {table.name} to log its changes with txr_move_log{tuple(expected)}, got "
            f"{triggers.get(table.name)}")
        assert table.name in on_delete, f"expected {table.name}'s change log to fire on delete too (0036)"


async def test_writes_are_logged_while_a_move_of_their_slot_logs_and_only_then(
    api: ApiClient, topology: Topology, shard_dsn: Callable[[str], str]
) -> None:
    """Migration 0047: the change log answers first whether any move logs on the shard. A deposit to an account
    of the moving slot is logged (account, transfer and stored answer); a deposit to another slot of
    the same shard during the move is not; once the move has ended, neither is."""
    shard, (moving, other) = await accounts_in_one_shard(api, topology, 2)
    slot = parse_account_id(moving).slot
    assert parse_account_id(other).slot != slot, "expected two slots (placement hashes the key)"
    move = "mv_logtest" + new_key()[-12:].lower()
    spec = source_move_spec(topology, slot, move)
    logged_sql = "select tbl, key::text from slot_move_changes where move_id = $1 order by id"
    conn = await asyncpg.connect(shard_dsn(shard))
    try:
        quiet_before = await conn.fetchval("select count(*) from slot_move_changes")
        idle = await api.deposit(moving, 100)
        quiet_after = await conn.fetchval("select count(*) from slot_move_changes")
        begun = json.loads(await conn.fetchval("select txr_move_begin($1::jsonb)::text", json.dumps(spec)))
        assert begun["ok"], begun
        logged_key = new_key()
        during = await api.deposit(moving, 200, key=logged_key)
        elsewhere = await api.deposit(other, 300)
        logged = [(r["tbl"], json.loads(r["key"])) for r in await conn.fetch(logged_sql, move)]
        await conn.execute("select txr_move_freeze($1)", move)
        await conn.execute("select txr_move_unfreeze($1, 'cancelled', 'test')", move)
        ended_before = await conn.fetchval("select count(*) from slot_move_changes")
        ended = await api.deposit(moving, 400)
        ended_after = await conn.fetchval("select count(*) from slot_move_changes")
    finally:
        await conn.execute("delete from slot_move_changes where move_id = $1", move)
        await conn.close()
    for response in (idle, during, elsewhere, ended):
        assert response.status_code == 201, f"expected each deposit posted, got {response.status_code} {response.text}"
    assert quiet_after == quiet_before, f"expected nothing logged without a move: {quiet_before} -> {quiet_after}"
    transfer = during.json()["id"]
    assert ("transfers", {"id": transfer}) in logged, f"expected the moving slot's transfer logged: {logged}"
    assert ("accounts", {"id": moving}) in logged, f"expected the moving slot's account logged: {logged}"
    assert ("idempotency", {"client": api.client_id, "key": logged_key}) in logged, logged
    other_transfer = elsewhere.json()["id"]
    assert not [k for _, k in logged if other in k.values() or other_transfer in k.values()], (
        f"expected nothing logged for a slot the move does not cover: {logged}")
    assert ended_after == ended_before, f"expected nothing logged once the move ended: {ended_before} -> {ended_after}"


async def test_webhook_rows_of_a_slot_the_shard_does_not_own_are_left_alone_by_its_worker_and_operators(
    api: ApiClient, topology: Topology, shard_dsn: Callable[[str], str]
) -> None:
    """Migration 0021: a frozen source (and a move's target, which never owns the range before the switch) writes
    no webhook row of the range: not the worker's feed position or attempt, not the retention cleanup, not an
    operator's enable or retry. The verify under the freeze relies on it (app/placement/mover.py verify_changed)."""
    account = await api.new_account()
    slot = parse_account_id(account).slot
    shard = shard_of(topology, account)
    move = "mv_whfence" + new_key()[-12:].lower()
    endpoint = "whe_fence" + new_key()[-12:]
    spec = source_move_spec(topology, slot, move)
    event = [{"id": "evt_new", "type": "transfer.posted", "body": "{}", "created_at": "2026-11-28T00:00:00Z"}]
    rows_sql = """select (select to_jsonb(w) from webhook_endpoints w where id = $1)::text,
                         (select jsonb_agg(to_jsonb(d) order by event_id) from webhook_deliveries d
                          where endpoint_id = $1)::text,
                         (select count(*) from webhook_attempts where endpoint_id = $1)"""
    conn = await asyncpg.connect(shard_dsn(shard))
    try:
        await conn.execute("""insert into webhook_endpoints (id, slot, client, url, secret)
                              values ($1, $2, $3, 'https://example.invalid/hook', 'whsec_test')""",
                           endpoint, slot, api.client_id)
        await conn.execute("""insert into webhook_deliveries (endpoint_id, slot, event_id, event_type, body,
                                                              event_created_at, state, created_at)
                              values ($1, $2, 'evt_old', 'transfer.posted', '{}', now() - interval '60 days',
                                      'failed', now() - interval '60 days')""", endpoint, slot)
        begun = json.loads(await conn.fetchval("select txr_move_begin($1::jsonb)::text", json.dumps(spec)))
        assert begun["ok"], begun
        await conn.execute("select txr_move_freeze($1)", move)
        before = tuple(await conn.fetchrow(rows_sql, endpoint))
        frozen = {
            "set_state": await conn.fetchval("select txr_webhook_set_state($1, 'disabled', 'test')", endpoint),
            "ingest": await conn.fetchval("select txr_webhook_ingest($1, $2::jsonb, $3::jsonb)", endpoint,
                                          json.dumps({shard: "1"}), json.dumps(event)),
            "retry": await conn.fetchval("select txr_webhook_retry($1)", endpoint),
        }
        await conn.execute("select txr_webhook_attempted($1, 'evt_old', 2, 500, 10, 'boom', 'retry', 1000, null)",
                           endpoint)
        await conn.fetchval("select txr_webhook_cleanup(now() - interval '30 days', 1000)")
        during = tuple(await conn.fetchrow(rows_sql, endpoint))
        await conn.execute("select txr_move_unfreeze($1, 'cancelled', 'test')", move)
        owned_set_state = await conn.fetchval("select txr_webhook_set_state($1, 'disabled', 'test')", endpoint)
        await conn.fetchval("select txr_webhook_cleanup(now() - interval '30 days', 1000)")
        owned = tuple(await conn.fetchrow(rows_sql, endpoint))
    finally:
        await conn.execute("delete from webhook_endpoints where id = $1", endpoint)
        await conn.close()
    assert frozen == {"set_state": False, "ingest": 0, "retry": 0}, f"expected nothing written while frozen: {frozen}"
    assert during == before, f"expected the frozen slot's webhook rows unchanged:\n{before}\n{during}"
    assert owned_set_state is True, "expected the owner's operator to disable its endpoint once unfrozen"
    assert '"disabled"' in owned[0] and owned[1] is None, f"expected disabled and the old delivery cleaned: {owned}"
