"""The slot-move change log's shortcut (migration 0023): a writing transaction that found no move running skips the
log for its remaining rows, so a move's begin must wait for that transaction to commit (the copy, whose snapshot
follows the begin, then sees its rows), and a write after the begin is logged again."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable

import asyncpg

from app.topology.ids import parse_account_id
from app.topology.model import Topology
from tests.helpers import ApiClient, new_key, poll_until, shard_of, source_move_spec

# A no-op write: the row trigger fires, nothing changes.
TOUCH = "update accounts set metadata = metadata where id = $1"


async def test_a_move_begins_only_after_the_writers_that_skipped_the_log_committed_and_later_writes_are_logged(
    api: ApiClient, topology: Topology, shard_dsn: Callable[[str], str]
) -> None:
    account = await api.new_account()
    slot = parse_account_id(account).slot
    shard = shard_of(topology, account)
    move = "mv_gatetest" + new_key()[-12:]
    spec = source_move_spec(topology, slot, move)
    writer = await asyncpg.connect(shard_dsn(shard))
    mover = await asyncpg.connect(shard_dsn(shard))
    begun: dict[str, object] = {}
    try:
        mover_pid = await mover.fetchval("select pg_backend_pid()")
        await mover.execute("set lock_timeout = '20s'")
        writing = writer.transaction()
        await writing.start()
        await writer.execute(TOUCH, account)  # finds no move: the rest of this transaction skips the log
        begin = asyncio.create_task(
            mover.fetchval("select txr_move_begin($1::jsonb)::text", json.dumps(spec)))

        async def begin_waits_on_the_gate() -> bool:
            return bool(await writer.fetchval(
                """select exists (select 1 from pg_locks where pid = $1 and locktype = 'advisory' and not granted)""",
                mover_pid))

        await poll_until(begin_waits_on_the_gate, what="the move's begin waiting for the writer's transaction")
        assert not begin.done(), "expected the begin to wait while the writer's transaction is open"
        await writer.execute(TOUCH, account)
        logged_unseen = await writer.fetchval("select count(*) from slot_move_changes where move_id = $1", move)
        await writing.commit()
        begun = json.loads(await asyncio.wait_for(begin, timeout=20))
        assert begun["ok"], begun
        await writer.execute(TOUCH, account)  # a new transaction: the move is running, so this row is logged
        logged = await writer.fetch(
            "select tbl, key from slot_move_changes where move_id = $1 order by id", move)
    finally:
        if begun.get("ok"):
            await mover.execute("select txr_move_unfreeze($1, 'cancelled', 'test')", move)
        await writer.close()
        await mover.close()
    assert logged_unseen == 0, "expected no move recorded before the writer committed"
    assert [(r["tbl"], json.loads(r["key"])) for r in logged] == [("accounts", {"id": account})], (
        f"expected the write after the begin in the change log, got {logged}")
