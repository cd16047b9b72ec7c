"""The lookups are index range scans (issue 12): an account's transfers, first page and a page after a cursor
with every filter, and the client's transfers by reference, each planned from the statement the store runs.
The test tables are small, where a sequential scan is cheaper, so the plans are asked for with sequential
scans priced out."""

from __future__ import annotations

import datetime as dt
from collections.abc import Callable

import asyncpg

from app.store.shard import REFERENCE_SQL, TransfersQuery, account_transfers_sql
from app.topology.model import Topology
from tests.helpers import ApiClient, accounts_in_one_shard


async def plan_of(dsn: str, sql: str, *args: object) -> str:
    conn = await asyncpg.connect(dsn)
    try:
        await conn.execute("set enable_seqscan = off")
        return "\n".join(r[0] for r in await conn.fetch("explain (costs off) " + sql, *args))
    finally:
        await conn.close()


async def test_an_accounts_transfers_and_a_reference_lookup_are_index_range_scans_without_a_sort(
    api: ApiClient, topology: Topology, shard_dsn: Callable[[str], str]
) -> None:
    shard, (a, b) = await accounts_in_one_shard(api, topology, 2)
    await api.funded(a, 10)
    moved = await api.transfer(a, b, 3, reference="inv-1")
    assert moved.status_code == 201, moved.text
    at = dt.datetime.fromisoformat(moved.json()["created_at"])
    pages = {
        "first page": TransfersQuery(limit=50),
        "a page after a cursor, with every filter": TransfersQuery(
            limit=50, from_at=at - dt.timedelta(days=1), to_at=at + dt.timedelta(days=1), state="posted",
            before_at=at, before_id=moved.json()["id"]),
    }
    for name, page in pages.items():
        sql, args = account_transfers_sql(a, api.client_id, page)
        plan = await plan_of(shard_dsn(shard), sql, *args)
        assert "Index Scan using transfers_debit_account" in plan, f"{name}: {plan}"
        assert "Index Scan using transfers_credit_account" in plan, f"{name}: {plan}"
        # The two sides come in index order and are merged; nothing is sorted, nothing scanned whole.
        assert "Merge Append" in plan and "Seq Scan" not in plan and not sorts(plan), f"{name}: {plan}"
        if page.before_at is not None:
            cursor = [line for line in plan.splitlines() if "ROW(created_at, id) <" in line]
            assert len(cursor) == 2 and all("Index Cond" in line for line in cursor), f"cursor not indexed: {plan}"
    plan = await plan_of(shard_dsn(shard), REFERENCE_SQL, api.client_id, "inv-1", 50)
    assert "Index Scan using transfers_client_reference" in plan and not sorts(plan), plan


def sorts(plan: str) -> bool:
    """Whether the plan has a Sort node (a Merge Append's own `Sort Key` merges sorted inputs; it is no sort)."""
    return any(line.strip().removeprefix("->").strip().startswith("Sort") and "Sort Key" not in line
               for line in plan.splitlines())
