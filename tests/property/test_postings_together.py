"""A batch's plain postings are posted together (migration 0046, txr_post_set), and every item of the batch
must be answered, and must change the shard, exactly as posting its items one by one does.

Two shard databases are provisioned side by side with the same accounts. Each example is a random batch over a
few accounts: transfers, deposits and withdrawals, with accounts shared between items or not, refusals of
every kind (funds, a missing or another client's account, another currency, a closed account, the largest
balance), keys used before (a replay, a reused key) or twice in the batch, holds and unique references. Twin A
gets the batch in one `txr_post` call; twin B gets its items one by one, each through `txr_post_one` after
`txr_system_bound_refusal`, which is what `txr_post` did for every item before 0046. The answers, the accounts,
the transfers, the entries (with each balance_after), the stored outcomes and the events of the two twins must
agree after every example, every account's entries must chain (each balance_after the running sum of its
amounts), and both twins must conserve money. The same holds for `txr_post_together` (atomic batches and
unique references) against `txr_post_item` one by one.
"""

from __future__ import annotations

import dataclasses
import json
import uuid
from collections.abc import AsyncIterator
from typing import Any

import asyncpg
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from app.ledger.postings import Posting, PostingKind, settlement_account_id
from app.local.postgres import SERVICE_ROLE, Cluster
from app.local.processes import ServiceProcess
from app.store.provision import provision_shard
from app.topology.ids import new_account_id, new_transfer_id
from app.topology.model import Shard, Topology
from tests.helpers import assert_shard_conserved
from tests.integration.conftest import HOME_REGION

SHARD = "euw1-a"
CLIENT = "together"
LARGEST = 9_007_199_254_740_991
# The customer accounts both twins hold, by role. Index 0 to OPEN - 1 are open EUR accounts of CLIENT; the others are
# refused as a posting's account in their own way.
OPEN = 8
CLOSED, USD, FOREIGN, MISSING, NEAR_LARGEST = "closed", "usd", "foreign", "missing", "near_largest"


@dataclasses.dataclass
class Twins:
    a: asyncpg.Connection
    b: asyncpg.Connection
    dsns: tuple[str, str]
    shard: str
    slot: int
    accounts: dict[Any, str]  # index 0..OPEN-1 or a role above -> account id
    keys: list[tuple[str, str]]  # (key, fingerprint) of every item sent so far


async def _open(conns: list[asyncpg.Connection], *, client: str, account: str, slot: int, currency: str) -> None:
    request = {"client": client, "key": f"open-{account}", "fingerprint": "f", "id": account, "slot": slot,
               "currency": currency, "overdraft_limit": 0, "metadata": None}
    for conn in conns:
        outcome = json.loads(await conn.fetchval("select txr_open_account($1::jsonb)", json.dumps(request)))
        assert outcome["status"] == 201, outcome


# What each caller did for every item before migration 0046 (their lock passes aside: nothing else runs here).
ONE_BY_ONE = {
    "txr_post": "select coalesce(txr_system_bound_refusal($1::jsonb), txr_post_one($1::jsonb))",
    "txr_post_together": "select txr_post_item($1::jsonb)",
}
BATCH_CALL = {
    "txr_post": "select txr_post($1::jsonb, 200, 1000)",
    "txr_post_together": "select txr_post_together($1::jsonb, 200)",
}


async def _one_by_one(conn: asyncpg.Connection, item: dict[str, Any], caller: str = "txr_post") -> dict[str, Any]:
    return json.loads(await conn.fetchval(ONE_BY_ONE[caller], json.dumps(item)))


@pytest.fixture(scope="module")
async def twins(
    pg_clusters: dict[str, Cluster], topology: Topology, region_services: dict[str, ServiceProcess]
) -> AsyncIterator[Twins]:
    """Two shards provisioned as the regions' are (region_services has created the service role)."""
    cluster = pg_clusters[HOME_REGION]
    base = topology.shard(SHARD)
    shards = [Shard(f"together-{uuid.uuid4().hex[:8]}-{side}", HOME_REGION, base.slots) for side in "ab"]
    for shard in shards:
        await provision_shard(cluster.owner_endpoint(), shard, service_role=SERVICE_ROLE)
    dsns = (cluster.dsn(shards[0].database), cluster.dsn(shards[1].database))
    conns = [await asyncpg.connect(dsn) for dsn in dsns]
    try:
        # Both twins must post under the same shard name: their settlement accounts are named after it.
        for conn in conns:
            await conn.execute("update shard_info set shard = $1", shards[0].name)
        slot = base.slots[0].lo
        accounts: dict[Any, str] = {i: new_account_id(slot) for i in range(OPEN)}
        accounts.update({role: new_account_id(slot) for role in (CLOSED, USD, FOREIGN, MISSING, NEAR_LARGEST)})
        for index in [*range(OPEN), CLOSED, NEAR_LARGEST]:
            await _open(conns, client=CLIENT, account=accounts[index], slot=slot, currency="EUR")
        await _open(conns, client=CLIENT, account=accounts[USD], slot=slot, currency="USD")
        await _open(conns, client="someone-else", account=accounts[FOREIGN], slot=slot, currency="EUR")
        twins = Twins(conns[0], conns[1], dsns, shards[0].name, slot, accounts, [])
        for conn in conns:
            await conn.execute("update accounts set status = 'closed', closed_at = now() where id = $1",
                               accounts[CLOSED])
        funding = [_posting(twins, "deposit", None, index, 1_000) for index in range(OPEN)]
        funding.append(_posting(twins, "deposit", None, NEAR_LARGEST, LARGEST - 5))
        for item in funding:
            for conn in conns:
                assert (await _one_by_one(conn, item))["status"] == 201
        yield twins
    finally:
        for conn in conns:
            await conn.close()
        admin = await asyncpg.connect(cluster.dsn("postgres"))
        try:
            for shard in shards:
                await admin.execute(f'drop database if exists "{shard.database}" with (force)')
        finally:
            await admin.close()


def _posting(twins: Twins, kind: str, debit: Any, credit: Any, amount: int, *, key: tuple[str, str] | None = None,
             hold: bool = False, unique_reference: bool = False, metadata: bool = False) -> dict[str, Any]:
    settlement = settlement_account_id(twins.shard, "EUR")
    key, fingerprint = key or (uuid.uuid4().hex, uuid.uuid4().hex)
    twins.keys.append((key, fingerprint))
    reference = f"ref-{uuid.uuid4().hex[:6]}" if unique_reference or metadata else None
    return Posting(
        kind=PostingKind(kind), id=new_transfer_id(twins.slot), slot=twins.slot, client=CLIENT, key=key,
        fingerprint=fingerprint,
        debit=settlement if kind == "deposit" else twins.accounts[debit],
        credit=settlement if kind == "withdrawal" else twins.accounts[credit],
        amount=amount, currency="EUR", reference=reference,
        metadata={"order": "42"} if metadata else None,
        hold_expires_in_s=300 if hold else None, unique_reference=unique_reference,
    ).as_json()


# Mostly open accounts, so that many items post and several share the settlement account.
accounts = st.one_of(st.integers(0, OPEN - 1), st.integers(0, OPEN - 1), st.integers(0, OPEN - 1),
                     st.sampled_from([CLOSED, USD, FOREIGN, MISSING, NEAR_LARGEST]))
item_specs = st.fixed_dictionaries({
    "kind": st.sampled_from(["transfer", "transfer", "deposit", "withdrawal"]),
    "debit": accounts,
    "credit": accounts,
    "amount": st.one_of(st.integers(1, 600), st.sampled_from([5, 6, LARGEST])),
    # a key sent before, replayed (same fingerprint) or reused (another): by position in twins.keys
    "earlier_key": st.one_of(st.none(), st.tuples(st.integers(0, 10_000), st.booleans())),
    "twice": st.integers(0, 12),  # 0: this item's key and body are sent twice in the batch
    "special": st.sampled_from([None, None, None, "hold", "unique_reference", "metadata"]),
})


def _batch(twins: Twins, specs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    items = []
    for spec in specs:
        debit, credit = spec["debit"], spec["credit"]
        if spec["kind"] == "transfer" and debit == credit:
            credit = (debit + 1) % OPEN if isinstance(debit, int) else 0
        key = None
        if spec["earlier_key"] is not None and twins.keys:
            position, same = spec["earlier_key"]
            old_key, old_fingerprint = twins.keys[position % len(twins.keys)]
            key = (old_key, old_fingerprint if same else uuid.uuid4().hex)
        special = spec["special"]
        if special == "hold" and spec["kind"] == "deposit":
            special = None
        item = _posting(twins, spec["kind"], debit, credit, spec["amount"], key=key, hold=special == "hold",
                        unique_reference=special == "unique_reference", metadata=special == "metadata")
        items.append(item)
        if spec["twice"] == 0:
            items.append(dict(item))
    return items


def _without_times(outcome: Any) -> Any:
    if isinstance(outcome, dict):
        return {k: _without_times(v) for k, v in outcome.items() if not k.endswith("_at")}
    if isinstance(outcome, list):
        return [_without_times(v) for v in outcome]
    return outcome


STATE_QUERIES = {
    "accounts": "select id, balance, held, version, status from accounts order by id",
    "transfers": """select id, client, kind, debit_account, credit_account, amount, currency, reference, state,
                           credit_shard, idempotency_key, metadata, hold_amount, reference_unique
                    from transfers order by id""",
    "entries": "select transfer_id, account_id, amount, balance_after from entries order by transfer_id, amount",
    "idempotency": """select client, key, fingerprint, status_code, body - 'created_at' as body, slot
                      from idempotency order by client, key""",
    "events": "select type, resource_id, data - 'created_at' as data from events order by resource_id, type",
}


async def _state(conn: asyncpg.Connection) -> dict[str, list[Any]]:
    def value(v: Any) -> Any:  # jsonb arrives as text: compared parsed, without its times
        return _without_times(json.loads(v)) if isinstance(v, str) and v[:1] == "{" else v

    return {name: [tuple(value(v) for v in row) for row in await conn.fetch(sql)]
            for name, sql in STATE_QUERIES.items()}


async def _set_path_calls(
    conn: asyncpg.Connection, batch: list[dict[str, Any]], caller: str = "txr_post"
) -> tuple[list[Any], int]:
    """txr_post's answers, and how many times it called txr_post_set (by pg_stat_xact_user_functions, which
    may also count earlier transactions' calls not yet flushed: hence the difference)."""
    calls_sql = "select coalesce(sum(calls), 0) from pg_stat_xact_user_functions where funcname = 'txr_post_set'"
    async with conn.transaction():
        await conn.execute("set local track_functions = 'pl'")
        before = await conn.fetchval(calls_sql)
        answers = json.loads(await conn.fetchval(BATCH_CALL[caller], json.dumps(batch)))
        calls = await conn.fetchval(calls_sql) - before
    return answers, calls


@settings(max_examples=40, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(specs=st.lists(item_specs, min_size=1, max_size=12), caller=st.sampled_from(["txr_post", "txr_post_together"]))
async def test_a_batch_answers_and_writes_what_its_items_one_by_one_do(
    twins: Twins, specs: list[dict[str, Any]], caller: str
) -> None:
    batch = _batch(twins, specs)
    together, _ = await _set_path_calls(twins.a, batch, caller)
    one_by_one = [await _one_by_one(twins.b, item, caller) for item in batch]
    assert len(together) == len(batch)
    for index, (got, expected) in enumerate(zip(together, one_by_one, strict=True)):
        assert _without_times(got) == _without_times(expected), f"item {index}: {batch[index]}"
    state_a, state_b = await _state(twins.a), await _state(twins.b)
    for name in STATE_QUERIES:
        assert state_a[name] == state_b[name], f"the twins' {name} differ after {len(batch)} items"
    for conn in (twins.a, twins.b):
        assert await _chain_breaks(conn) == []
    for dsn in twins.dsns:
        await assert_shard_conserved(dsn)


async def _chain_breaks(conn: asyncpg.Connection) -> list[asyncpg.Record]:
    """Entries whose balance_after is not their account's running sum, in entry order."""
    return await conn.fetch(
        """select account_id, id, balance_after, running from (
               select account_id, id, balance_after,
                      sum(amount) over (partition by account_id order by id) as running from entries) e
           where balance_after <> running""")


async def test_plain_items_take_the_set_path_and_the_settlement_chain_reads_in_batch_order(twins: Twins) -> None:
    """Deposits and withdrawals share the settlement account, transfers share customer accounts (the last one
    refused for funds the earlier ones took); each entry's balance_after is the running sum in batch order, and
    the set path ran once for the run (so the property above compared it, not the old path twice)."""
    for n in range(8):  # accounts of this test's own, whatever the property test left behind
        twins.accounts[("t", n)] = new_account_id(twins.slot)
        await _open([twins.a, twins.b], client=CLIENT, account=twins.accounts[("t", n)], slot=twins.slot,
                    currency="EUR")
    k = [("t", n) for n in range(8)]
    settlement = settlement_account_id(twins.shard, "EUR")
    before = await twins.a.fetchval("select balance from accounts where id = $1", settlement)
    batch = [_posting(twins, "deposit", None, k[0], 7), _posting(twins, "deposit", None, k[1], 10),
             _posting(twins, "withdrawal", k[1], None, 3), _posting(twins, "deposit", None, k[2], 11),
             _posting(twins, "deposit", None, k[3], 5), _posting(twins, "transfer", k[3], k[4], 1),
             _posting(twins, "deposit", None, k[5], 50), _posting(twins, "transfer", k[5], k[6], 50),
             _posting(twins, "transfer", k[6], k[7], 50), _posting(twins, "transfer", k[5], k[7], 1)]
    answers, calls = await _set_path_calls(twins.a, batch)
    assert calls == 1
    assert [a["status"] for a in answers] == [201] * 9 + [422], answers
    assert answers[-1]["body"]["code"] == "insufficient_funds"
    chain = await twins.a.fetch(
        "select e.amount, e.balance_after from entries e where e.account_id = $1 and e.transfer_id = any($2::text[]) "
        "order by e.id", settlement, [item["id"] for item in batch])
    assert [(r["amount"], r["balance_after"]) for r in chain] == [
        (-7, before - 7), (-10, before - 17), (3, before - 14), (-11, before - 25), (-5, before - 30),
        (-50, before - 80)]
    for item, answer in zip(batch, answers, strict=True):  # twin B one by one: the same answers and state
        assert _without_times(await _one_by_one(twins.b, item)) == _without_times(answer)
    state_a, state_b = await _state(twins.a), await _state(twins.b)
    for name in STATE_QUERIES:
        assert state_a[name] == state_b[name], f"the twins' {name} differ"


async def test_a_run_with_a_slot_not_owned_here_is_left_whole_to_the_one_by_one_path(
    twins: Twins, topology: Topology
) -> None:
    """txr_post_set posts nothing of a run when one of its slots is not owned here (a freeze elsewhere may have
    split the ownership row under it): the caller then posts the whole run one by one, in batch order."""
    for n in range(3):
        twins.accounts[("r", n)] = new_account_id(twins.slot)
        await _open([twins.a], client=CLIENT, account=twins.accounts[("r", n)], slot=twins.slot, currency="EUR")
    batch = [_posting(twins, "deposit", None, ("r", 0), 5), _posting(twins, "deposit", None, ("r", 1), 5),
             _posting(twins, "deposit", None, ("r", 2), 5)]
    elsewhere = next(r.lo for s in topology.shards if s.name != SHARD for r in s.slots)
    batch[1]["slot"] = elsewhere
    transfers_before = await twins.a.fetchval("select count(*) from transfers")
    answer = json.loads(await twins.a.fetchval("select txr_post_set($1::jsonb, array[0, 1, 2])", json.dumps(batch)))
    assert answer == {}
    assert await twins.a.fetchval("select count(*) from transfers") == transfers_before
    answers, calls = await _set_path_calls(twins.a, batch)
    assert calls == 0  # txr_post found the slot not owned first: the item is answered 421, the others alone
    assert [a["status"] for a in answers] == [201, 421, 201], answers


async def test_a_batch_of_two_goes_one_by_one(twins: Twins) -> None:
    """Below three items the set path costs more than it saves: txr_post does not call it."""
    batch = [_posting(twins, "transfer", 0, 1, 1), _posting(twins, "transfer", 2, 3, 1)]
    answers, calls = await _set_path_calls(twins.a, batch)
    assert calls == 0
    for item, answer in zip(batch, answers, strict=True):
        assert _without_times(await _one_by_one(twins.b, item)) == _without_times(answer)
