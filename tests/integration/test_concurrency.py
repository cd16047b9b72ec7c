"""Hundreds of concurrent transfers in both directions among a few accounts of one shard: every one is
either posted or refused for funds, and the ledger ends exactly as the posted ones, applied serially, say."""

from __future__ import annotations

import asyncio
import random
from collections import Counter
from collections.abc import Callable

import asyncpg

from app.topology.model import Topology
from tests.helpers import ApiClient, account_in_shard, accounts_in_one_shard, assert_shard_conserved

TRANSFERS = 400
OPENING_BALANCE = 1_000
OVERDRAFT_LIMIT = 300  # the last account may go this far below zero, the others not at all


async def test_concurrent_transfers_both_ways_post_exactly_the_successful_ones(
    api: ApiClient, topology: Topology, shard_dsn: Callable[[str], str]
) -> None:
    shard, accounts = await accounts_in_one_shard(api, topology, 3)
    limited = await account_in_shard(api, topology, shard, overdraft_limit=OVERDRAFT_LIMIT)
    accounts.append(limited)
    limits_by_account = {a: 0 for a in accounts} | {limited: OVERDRAFT_LIMIT}
    for account in accounts:
        await api.funded(account, OPENING_BALANCE)

    rng = random.Random(20261127)
    pairs = [(a, b) for a in accounts for b in accounts if a != b]  # A->B and B->A both
    plan = [(*rng.choice(pairs), rng.randint(1, 250)) for _ in range(TRANSFERS)]
    responses = await asyncio.gather(*(api.transfer(d, c, amount) for d, c, amount in plan))

    statuses = Counter(r.status_code for r in responses)
    codes = Counter(r.json().get("code") for r in responses if r.status_code != 201)
    assert set(statuses) <= {201, 422}, f"expected only 201 and 422, got {statuses} with codes {codes}"
    assert set(codes) <= {"insufficient_funds"}, f"expected refusals only for funds, got {codes}"
    assert statuses[201] > TRANSFERS // 4, f"expected most transfers posted, got {statuses}"

    expected = dict.fromkeys(accounts, OPENING_BALANCE)
    posted_ids = []
    for (debit, credit, amount), response in zip(plan, responses, strict=True):
        if response.status_code == 201:
            body = response.json()
            assert (body["debit_account"], body["credit_account"], body["amount"]) == (debit, credit, amount)
            expected[debit] -= amount
            expected[credit] += amount
            posted_ids.append(body["id"])
    assert len(set(posted_ids)) == len(posted_ids), "expected a distinct transfer id per posted transfer"

    for account in accounts:
        balance = await api.balance(account)
        assert balance == expected[account], f"expected {account} at {expected[account]}, got {balance}"
        assert balance >= -limits_by_account[account], f"expected {account} within its limit, got {balance}"
        entries = await api.all_entries(account)
        assert sum(e["amount"] for e in entries) == balance, f"expected {account}'s entries to sum to its balance"
        assert entries[0]["balance_after"] == balance, "expected the newest entry to carry the balance"

    dsn = shard_dsn(shard)
    conn = await asyncpg.connect(dsn)
    try:
        rows = await conn.fetch(
            "select transfer_id, sum(amount) as total, count(*) as n from entries "
            "where transfer_id = any($1::text[]) group by transfer_id",
            posted_ids,
        )
        refused_rows = await conn.fetchval("select count(*) from transfers where client = $1", api.client_id)
    finally:
        await conn.close()
    assert len(rows) == len(posted_ids), f"expected entries for all {len(posted_ids)} posted transfers, got {len(rows)}"
    assert all(r["total"] == 0 and r["n"] == 2 for r in rows), "expected two entries summing to zero per transfer"
    deposits = len(accounts)
    assert refused_rows == len(posted_ids) + deposits, "expected no transfer row for a refused transfer"
    await assert_shard_conserved(dsn)


async def test_transfers_racing_on_one_account_never_overdraw_it(
    api: ApiClient, topology: Topology, shard_dsn: Callable[[str], str]
) -> None:
    """Fifty withdrawals-by-transfer of 30 from an account holding 1000: exactly 33 can post."""
    shard, (source, sink) = await accounts_in_one_shard(api, topology, 2)
    await api.funded(source, 1_000)
    responses = await asyncio.gather(*(api.transfer(source, sink, 30) for _ in range(50)))
    statuses = Counter(r.status_code for r in responses)
    assert statuses == Counter({201: 33, 422: 17}), f"expected 33 posted and 17 refused, got {statuses}"
    assert await api.balance(source) == 1_000 - 33 * 30
    assert await api.balance(sink) == 33 * 30
    await assert_shard_conserved(shard_dsn(shard))
