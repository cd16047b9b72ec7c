"""The relay's batches (issue 14): many saga messages per call to the credit region, applied there in one
transaction and settled at the source in one, each message with an outcome of its own. Against real region
processes and PostgreSQL: the test plays the part of a relay (a saga token of the source region, the batch
route) where it needs a batch the real relay would not send on cue. Each test runs in a world of its own.
The fast path's single messages that meet at their credit shard are grouped the same way (app/store/grouped.py):
those tests call the shard stores themselves, so the messages arrive together on cue."""

from __future__ import annotations

import asyncio
import json
from typing import Any

import asyncpg

from app import limits
from app.security.tokens import BoundRequest
from app.store import shard as shard_module
from app.store.shard import ShardStore
from app.topology.ids import new_transfer_id
from tests.helpers import ApiClient, ledger_snapshot, new_client_id, poll_until, shard_of
from tests.keys import SessionKeys

SOURCE, DESTINATION = "eu-west-1", "us-east-1"
BATCH_PATH = "/internal/saga/apply-batch"
HELD_BACK = {"TXROUTE_FAULT_SKIP_FAST_PATH": "1", "TXROUTE_FAULT_RELAY_PAUSED": "1"}
FAULTS_OFF = {"TXROUTE_FAULT_SKIP_FAST_PATH": "", "TXROUTE_FAULT_RELAY_PAUSED": ""}


async def _query(dsn: str, sql: str, *args: Any) -> list[asyncpg.Record]:
    conn = await asyncpg.connect(dsn)
    try:
        return list(await conn.fetch(sql, *args))
    finally:
        await conn.close()


async def _outbox_messages(dsn: str, transfer_ids: list[str]) -> list[dict[str, Any]]:
    """The messages the source shard wrote for these transfers, in their order (what the relay would send)."""
    rows = await _query(dsn, "select transfer_id, message from outbox where transfer_id = any($1::text[])",
                        transfer_ids)
    by_id = {r["transfer_id"]: json.loads(r["message"]) if isinstance(r["message"], str) else r["message"]
             for r in rows}
    assert sorted(by_id) == sorted(transfer_ids), "expected one outbox message per pending transfer"
    return [by_id[t] for t in transfer_ids]


async def _send_batch(world: Any, keys: SessionKeys, messages: list[dict[str, Any]],
                      *, caller: str = SOURCE) -> list[dict[str, Any]]:
    body = json.dumps({"messages": messages}).encode()
    token = keys.saga_token(caller, DESTINATION, BoundRequest("POST", BATCH_PATH, body))
    async with world.http(DESTINATION) as http:
        response = await http.post(BATCH_PATH, content=body, headers={"authorization": "Bearer " + token,
                                                                       "content-type": "application/json"})
    assert response.status_code == 200, f"expected 200 with a result per message: {response.text}"
    results = response.json()["results"]
    assert len(results) == len(messages), f"expected one result per message, in order: {results}"
    return list(results)


async def _pending_transfers(src: ApiClient, debit: str, credit: str, count: int, amount: int) -> list[str]:
    ids: list[str] = []
    for start in range(0, count, 10):
        size = min(count, start + 10) - start
        responses = await asyncio.gather(*(src.transfer(debit, credit, amount) for _ in range(size)))
        assert all(r.status_code == 202 for r in responses), [r.text for r in responses if r.status_code != 202]
        ids += [r.json()["id"] for r in responses]
    return ids


async def _destination_state(world: Any) -> dict[str, Any]:
    dsns = [world.clusters[DESTINATION].dsn(s.database) for s in world.topology.region(DESTINATION).shards]
    return {dsn: await ledger_snapshot(dsn) for dsn in dsns}


async def _inbox_entries(world: Any, transfer_ids: list[str]) -> dict[str, int]:
    """Per transfer applied at the destination: its entries there (an inbox row with no entries: refused)."""
    found: dict[str, int] = {}
    for shard in world.topology.region(DESTINATION).shards:
        rows = await _query(
            world.clusters[DESTINATION].dsn(shard.database),
            "select i.transfer_id, count(e.id) as n from inbox i left join entries e on e.transfer_id = i.transfer_id "
            "where i.transfer_id = any($1::text[]) group by i.transfer_id", transfer_ids)
        for r in rows:
            assert r["transfer_id"] not in found, f"expected {r['transfer_id']} applied on one shard only"
            found[r["transfer_id"]] = r["n"]
    return found


async def _states(src: ApiClient, transfer_ids: list[str]) -> list[str]:
    return [(await src.get(f"/v1/transfers/{t}")).json()["state"] for t in transfer_ids]


async def test_a_batch_with_duplicates_applies_each_message_once_and_the_same_batch_again_changes_nothing(
    make_world: Any, keys: SessionKeys,
) -> None:
    world = make_world({SOURCE: HELD_BACK})
    client = new_client_id("batch-dup")
    async with world.http(SOURCE) as h1, world.http(DESTINATION) as h2:
        src, dst = ApiClient(h1, client), ApiClient(h2, client)
        a, b = await src.new_account(), await dst.new_account()
        await src.funded(a, 10_000)
        ids = await _pending_transfers(src, a, b, 12, 25)
        source_dsn = world.shard_dsns()[shard_of(world.topology, a)]
        messages = await _outbox_messages(source_dsn, ids)
        # Every message once, then three of them again (in another order) in the same batch.
        batch = [*messages, messages[5], messages[0], messages[11]]
        first = await _send_batch(world, keys, batch)
        assert [r["outcome"] for r in first] == ["applied"] * len(batch), first
        assert [bool(r.get("duplicate")) for r in first] == [False] * 12 + [True] * 3, (
            f"expected the repeats inside the batch answered as duplicates: {first}")
        assert await dst.balance(b) == 12 * 25, "expected each message credited once"
        before = await _destination_state(world)
        again = await _send_batch(world, keys, batch)
        assert all(r["outcome"] == "applied" and r.get("duplicate") for r in again), again
        assert await _destination_state(world) == before, "expected the same batch again to change nothing"

        # The relay then delivers the same messages (it never saw these answers): each settles once.
        world.restart(SOURCE, **FAULTS_OFF)

        async def posted() -> bool:
            return await _states(src, ids) == ["posted"] * len(ids)

        await poll_until(posted, timeout_s=30, what="every transfer posted by the relay")
        assert (await src.balance(a), await dst.balance(b)) == (10_000 - 12 * 25, 12 * 25)
    assert await _inbox_entries(world, ids) == dict.fromkeys(ids, 2), "expected one inbox row, two entries each"
    report = await world.audit()
    assert report.clean, report.text()


async def test_each_message_of_a_mixed_batch_gets_its_own_outcome_and_a_failing_one_fails_alone(
    make_world: Any, keys: SessionKeys,
) -> None:
    world = make_world({SOURCE: HELD_BACK})
    client = new_client_id("batch-mixed")
    async with world.http(SOURCE) as h1, world.http(DESTINATION) as h2:
        src, dst = ApiClient(h1, client), ApiClient(h2, client)
        a, b, closed = await src.new_account(), await dst.new_account(), await dst.new_account()
        await src.funded(a, 1_000)
        deposited = await dst.deposit(b, 5)
        assert deposited.status_code == 201, deposited.text
        (ok,) = await _pending_transfers(src, a, b, 1, 100)
        (to_closed,) = await _pending_transfers(src, a, closed, 1, 30)
        assert (await dst.close(closed)).status_code in (200, 201), "expected the credit account closed"
        source_dsn = world.shard_dsns()[shard_of(world.topology, a)]
        good, refused = await _outbox_messages(source_dsn, [ok, to_closed])
        north = world.topology.region("eu-north-1").shards[0]
        # Not vouched for: the source shard belongs to another region than the caller.
        forged = {**good, "transfer_id": new_transfer_id(good["credit_slot"]), "source_shard": north.name}
        # Addressed to a slot this region does not own: 421 naming its owner.
        elsewhere = {**good, "transfer_id": new_transfer_id(north.slots[0].lo), "credit_slot": north.slots[0].lo}
        # Fails in the database (a bug or a broken constraint): its id is a transfer the credit shard already
        # has (the deposit to b), so recording it breaks the transfers' primary key.
        deposit = deposited.json()["id"]
        breaking = {**good, "transfer_id": deposit}
        before = await _destination_state(world)
        results = await _send_batch(world, keys, [forged, good, breaking, refused, elsewhere])
        assert results[0]["status"] == 403 and results[0]["body"]["code"] == "forbidden", results[0]
        assert results[1] == {"outcome": "applied"}, results[1]
        assert results[2]["status"] == 500 and results[2]["body"]["code"] == "internal_error", results[2]
        assert results[3]["outcome"] == "refused" and results[3]["reason"] == "account_closed", results[3]
        assert results[4]["status"] == 421 and results[4]["body"]["owner_region"] == "eu-north-1", results[4]
        assert await dst.balance(b) == 5 + 100, "expected only the good message credited"
        applied = await _inbox_entries(world, [forged["transfer_id"], ok, deposit, to_closed,
                                               elsewhere["transfer_id"]])
        assert applied == {ok: 2, to_closed: 0}, f"expected only the good and the refused message recorded: {applied}"
        after = await _destination_state(world)
        changed = {account for dsn in before for account in after[dsn]
                   if before[dsn].get(account) != after[dsn][account]}
        assert b in changed and closed not in changed, f"expected the closed account untouched: {changed}"

        world.restart(SOURCE, **FAULTS_OFF)

        async def settled() -> bool:
            return await _states(src, [ok, to_closed]) == ["posted", "returned"]

        await poll_until(settled, timeout_s=30, what="the applied transfer posted and the refused one returned")
        assert await src.balance(a) == 1_000 - 100, "expected the refused 30 returned to the payer"
    report = await world.audit()
    assert report.clean, report.text()


async def test_a_relay_killed_after_the_credit_side_applied_its_batch_delivers_each_message_exactly_once(
    make_world: Any, keys: SessionKeys,
) -> None:
    world = make_world({SOURCE: HELD_BACK})
    client = new_client_id("batch-kill")
    count = limits.SAGA_RELAY_BATCH_MESSAGES_MAX + 30  # more than one batch
    async with world.http(SOURCE) as h1, world.http(DESTINATION) as h2:
        src, dst = ApiClient(h1, client), ApiClient(h2, client)
        a, b = await src.new_account(), await dst.new_account()
        await src.funded(a, 100_000)
        ids = await _pending_transfers(src, a, b, count, 3)
        source_dsn = world.shard_dsns()[shard_of(world.topology, a)]
        messages = await _outbox_messages(source_dsn, ids)
        # A relay sent its first batch and died before it read the answer: the credit side applied it, the
        # source settled none of it. The real relay process is killed too (SIGKILL), then started again.
        first = await _send_batch(world, keys, messages[: limits.SAGA_RELAY_BATCH_MESSAGES_MAX])
        assert all(r == {"outcome": "applied"} for r in first), first
        assert await _states(src, ids[:3]) == ["pending"] * 3
        world.services[SOURCE].kill()
        world.restart(SOURCE, **FAULTS_OFF)

        async def posted() -> bool:
            rows = await _query(source_dsn, "select count(*) as n from outbox where transfer_id = any($1::text[]) "
                                            "and delivered_at is not null", ids)
            return bool(rows[0]["n"] == count)

        await poll_until(posted, timeout_s=60, what=f"all {count} messages delivered and settled")
        assert set(await _states(src, ids)) == {"posted"}
        assert (await src.balance(a), await dst.balance(b)) == (100_000 - 3 * count, 3 * count)
    assert await _inbox_entries(world, ids) == dict.fromkeys(ids, 2), "expected each message applied exactly once"
    report = await world.audit()
    assert report.clean, report.text()


async def test_the_batch_route_refuses_a_call_without_a_saga_token_of_its_body_and_applies_nothing(
    make_world: Any, keys: SessionKeys,
) -> None:
    world = make_world({SOURCE: HELD_BACK})
    client = new_client_id("batch-token")
    async with world.http(SOURCE) as h1, world.http(DESTINATION) as h2:
        src, dst = ApiClient(h1, client), ApiClient(h2, client)
        a, b = await src.new_account(), await dst.new_account()
        await src.funded(a, 100)
        ids = await _pending_transfers(src, a, b, 2, 10)
        source_dsn = world.shard_dsns()[shard_of(world.topology, a)]
        messages = await _outbox_messages(source_dsn, ids)
        body = json.dumps({"messages": messages}).encode()
        other = json.dumps({"messages": messages[:1]}).encode()
        cases = {
            "no token": {},
            "a token for another body": {"authorization": "Bearer " + keys.saga_token(
                SOURCE, DESTINATION, BoundRequest("POST", BATCH_PATH, other))},
            "a token for the one-message route": {"authorization": "Bearer " + keys.saga_token(
                SOURCE, DESTINATION, BoundRequest("POST", "/internal/saga/apply", body))},
            "a token addressed to another region": {"authorization": "Bearer " + keys.saga_token(
                SOURCE, "eu-north-1", BoundRequest("POST", BATCH_PATH, body))},
        }
        for what, headers in cases.items():
            response = await h2.post(BATCH_PATH, content=body, headers={**headers, "content-type": "application/json"})
            assert response.status_code == 401, f"{what}: expected 401, got {response.status_code} {response.text}"
        too_many = [messages[0]] * (limits.SAGA_RELAY_BATCH_MESSAGES_MAX + 1)
        body = json.dumps({"messages": too_many}).encode()
        token = keys.saga_token(SOURCE, DESTINATION, BoundRequest("POST", BATCH_PATH, body))
        response = await h2.post(BATCH_PATH, content=body, headers={"authorization": "Bearer " + token,
                                                                     "content-type": "application/json"})
        assert response.status_code == 400, f"expected a batch past the bound refused: {response.text}"
        assert await dst.balance(b) == 0, "expected nothing applied"
    assert await _inbox_entries(world, ids) == {}, "expected nothing recorded in the inbox"


async def _store(world: Any, shard: str) -> ShardStore:
    """A shard store of the test's own on that shard (the connection setup is the service's)."""
    pool = await asyncpg.create_pool(world.shard_dsns()[shard], min_size=1, max_size=4,
                                     init=shard_module._init_connection)
    assert pool is not None
    return ShardStore(shard, pool, workers=1)


async def _account_on(api: ApiClient, world: Any, shard: str) -> str:
    for _ in range(40):
        account = await api.new_account()
        if shard_of(world.topology, account) == shard:
            return account
    raise AssertionError(f"expected an account opened on {shard} within 40 tries")


async def _transactions(dsn: str, table: str, transfer_ids: list[str]) -> int:
    """How many transactions wrote these transfers' rows of `table` (inbox)."""
    rows = await _query(dsn, f"select count(distinct xmin::text) as n from {table} where transfer_id = any($1::text[])",
                        transfer_ids)
    return int(rows[0]["n"])


async def test_single_messages_that_meet_at_their_credit_shard_are_applied_in_one_transaction_each_its_own(
    make_world: Any,
) -> None:
    world = make_world({SOURCE: HELD_BACK})
    client = new_client_id("grouped")
    async with world.http(SOURCE) as h1, world.http(DESTINATION) as h2:
        src, dst = ApiClient(h1, client), ApiClient(h2, client)
        a, b = await src.new_account(), await dst.new_account()
        credit_shard, debit_shard = shard_of(world.topology, b), shard_of(world.topology, a)
        closed = await _account_on(dst, world, credit_shard)
        await src.funded(a, 1_000)
        ids = await _pending_transfers(src, a, b, 6, 10)
        (to_closed,) = await _pending_transfers(src, a, closed, 1, 30)
        assert (await dst.close(closed)).status_code in (200, 201), "expected the credit account closed"
        transfers = [*ids, to_closed]
        messages = await _outbox_messages(world.shard_dsns()[debit_shard], transfers)

        credit = await _store(world, credit_shard)
        try:
            # The six, the refused one and a repeat of the first, all at once: one transaction for all.
            results = await asyncio.gather(*(credit.saga_apply_one(m) for m in [*messages, messages[0]]))
        finally:
            await credit.close()
        assert [r["outcome"] for r in results[:6]] == ["applied"] * 6, results
        assert results[6]["outcome"] == "refused" and results[6]["reason"] == "account_closed", results[6]
        assert results[7]["outcome"] == "applied" and results[7].get("duplicate"), (
            f"expected the repeat answered as a duplicate: {results[7]}")
        assert await _transactions(world.shard_dsns()[credit_shard], "inbox", transfers) == 1, (
            "expected the messages that met applied in one transaction")
        assert await dst.balance(b) == 60, "expected each message credited once"

        debit = await _store(world, debit_shard)
        try:
            answers = [(t, r["outcome"], r.get("reason")) for t, r in zip(transfers, results, strict=False)]
            bodies = await asyncio.gather(*(debit.saga_settle(*answer) for answer in answers))
        finally:
            await debit.close()
        assert [body["state"] for body in bodies] == ["posted"] * 6 + ["returned"], bodies
        assert bodies[6]["reason"] == "account_closed", bodies[6]
        assert await _states(src, transfers) == ["posted"] * 6 + ["returned"]
        assert await src.balance(a) == 1_000 - 60, "expected the refused 30 returned to the payer"
        replay = await src.get(f"/v1/transfers/{ids[0]}")
        assert replay.json()["state"] == "posted", replay.text
    assert await _inbox_entries(world, transfers) == {**dict.fromkeys(ids, 2), to_closed: 0}
    report = await world.audit()
    assert report.clean, report.text()


async def test_a_single_message_that_fails_in_the_database_fails_alone_and_the_others_met_with_it_apply(
    make_world: Any,
) -> None:
    world = make_world({SOURCE: HELD_BACK})
    client = new_client_id("grouped-fail")
    async with world.http(SOURCE) as h1, world.http(DESTINATION) as h2:
        src, dst = ApiClient(h1, client), ApiClient(h2, client)
        a, b = await src.new_account(), await dst.new_account()
        credit_shard = shard_of(world.topology, b)
        await src.funded(a, 1_000)
        deposited = await dst.deposit(b, 5)
        assert deposited.status_code == 201, deposited.text
        ids = await _pending_transfers(src, a, b, 4, 10)
        messages = await _outbox_messages(world.shard_dsns()[shard_of(world.topology, a)], ids)
        # Its id is a transfer the credit shard already has (the deposit), so recording it breaks a primary key.
        breaking = {**messages[0], "transfer_id": deposited.json()["id"]}
        credit = await _store(world, credit_shard)
        try:
            results = await asyncio.gather(*(credit.saga_apply_one(m) for m in [messages[0], breaking, *messages[1:]]),
                                           return_exceptions=True)
        finally:
            await credit.close()
        assert isinstance(results[1], asyncpg.UniqueViolationError), f"expected the breaking one's own error: {results}"
        assert [r["outcome"] for r in [results[0], *results[2:]] if isinstance(r, dict)] == ["applied"] * 4, results
        assert await dst.balance(b) == 5 + 40, "expected the four others credited once each"
    assert await _inbox_entries(world, ids) == dict.fromkeys(ids, 2)
