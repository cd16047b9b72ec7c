"""Events are written by the ledger's own transactions (migration 0011): one per state change, the resource's
body as GET returns it, and none for the credit side of a cross-shard transfer."""

from __future__ import annotations

import re
from collections.abc import Callable

import asyncpg

from app.topology.model import Topology
from tests.helpers import ApiClient, shard_of

_EVENT_ID = re.compile(r"^evt_[0-9a-f]{3}[0-7][0-9A-HJKMNP-TV-Z]{25}$")


async def _events(dsn: str, resource: str) -> list[asyncpg.Record]:
    conn = await asyncpg.connect(dsn)
    try:
        return list(await conn.fetch(
            "select id, type, client, slot, data::text as data from events where resource_id = $1 order by xid, seq",
            resource,
        ))
    finally:
        await conn.close()


async def test_a_local_transfer_writes_account_opened_and_transfer_posted_in_its_transaction(
    api: ApiClient, topology: Topology, shard_dsn: Callable[[str], str]
) -> None:
    account = await api.new_account()
    response = await api.deposit(account, 500)
    assert response.status_code == 201, response.text
    transfer = response.json()
    dsn = shard_dsn(shard_of(topology, account))
    opened = await _events(dsn, account)
    assert [e["type"] for e in opened] == ["account.opened"], f"expected one account.opened, got {opened}"
    assert opened[0]["client"] == api.client_id
    assert _EVENT_ID.match(opened[0]["id"]) and opened[0]["id"][4:7] == account[4:7], opened[0]["id"]
    posted = await _events(dsn, transfer["id"])
    assert [e["type"] for e in posted] == ["transfer.posted"], f"expected one transfer.posted, got {posted}"
    assert '"state": "posted"' in posted[0]["data"]
