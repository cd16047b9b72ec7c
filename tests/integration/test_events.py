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


async def _region_feed(api: ApiClient) -> list[dict[str, object]]:
    """This region's part of the client's feed (the router merges the regions'), every page."""
    from app.events.feed import encode_cursor

    events: list[dict[str, object]] = []
    positions: dict[str, str] = {}
    for _ in range(100):
        response = await api.get("/v1/events", params={"after": encode_cursor(positions), "limit": 100})
        assert response.status_code == 200, response.text
        pages = response.json()["shards"]
        for page in pages:
            for item in page["items"]:
                events.append(item["event"])
                positions[page["shard"]] = item["position"]
        if not any(page["more"] for page in pages):
            return events
    raise AssertionError("expected the region's feed to end within 100 pages")


async def test_holds_and_closing_write_held_captured_voided_expired_and_account_closed(
    api: ApiClient, topology: Topology, shard_dsn: Callable[[str], str]
) -> None:
    from tests.helpers import accounts_in_one_shard, poll_until

    _, (payer, payee, spare) = await accounts_in_one_shard(api, topology, 3)
    await api.funded(payer, 1_000)
    held = [await api.hold(payer, payee, 100, expires_in_s=expires) for expires in (3600, 3600, 1)]
    assert all(h.status_code == 201 and h.json()["state"] == "held" for h in held), [h.text for h in held]
    captured, voided, expiring = (h.json()["id"] for h in held)
    assert (await api.capture(captured, 60)).status_code == 201
    assert (await api.void(voided)).status_code == 200
    closed = await api.close(spare)
    assert closed.status_code == 200, closed.text

    async def types_of() -> dict[str, list[str]]:
        found: dict[str, list[str]] = {}
        for event in await _region_feed(api):
            data = event["data"]
            assert isinstance(data, dict)
            found.setdefault(str(data["id"]), []).append(str(event["type"]))
        return found

    async def expired() -> bool:
        return "transfer.expired" in (await types_of()).get(expiring, [])

    await poll_until(expired, timeout_s=30, what="the sweeper to expire the hold and write transfer.expired")
    found = await types_of()
    assert found[captured] == ["transfer.held", "transfer.captured"], found[captured]
    assert found[voided] == ["transfer.held", "transfer.voided"], found[voided]
    assert found[expiring] == ["transfer.held", "transfer.expired"], found[expiring]
    assert found[spare] == ["account.opened", "account.closed"], found[spare]
    dsn = shard_dsn(shard_of(topology, payer))
    captured_event = [e for e in await _events(dsn, captured) if e["type"] == "transfer.captured"]
    assert '"state": "posted"' in captured_event[0]["data"], "expected the capture's data to be the posted transfer"
