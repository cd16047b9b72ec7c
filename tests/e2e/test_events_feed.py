"""The event feed through the router (issue 13): every event type the API causes, one transfer.posted per
cross-region transfer, tenant isolation, a validated cursor, and pages that never skip or repeat while three
regions write."""

from __future__ import annotations

import asyncio
from collections import Counter

from app.local.postgres import Cluster
from app.topology.model import Topology
from tests.e2e.conftest import RouterApi
from tests.events_support import committed_events, feed_page, walk_feed
from tests.helpers import accounts_in_one_shard, new_client_id, poll_until
from tests.keys import SessionKeys


async def _transfer_state(api: RouterApi, transfer_id: str) -> str:
    response = await api.get(f"/v1/transfers/{transfer_id}")
    assert response.status_code == 200, response.text
    return str(response.json()["state"])


async def test_the_feed_lists_the_events_the_api_calls_caused_once_each_with_the_resource_as_get_returns_it(
    client_api: RouterApi, topology: Topology, pg_clusters: dict[str, Cluster],
) -> None:
    regions = [r.name for r in topology.regions]
    home, (source, local_peer) = await accounts_in_one_shard(client_api, topology, 2)
    remote_region = next(r for r in regions if r != topology.shard(home).region)
    remote = (await client_api.open_account("EUR", region=remote_region)).json()["id"]
    remote_usd = (await client_api.open_account("USD", region=remote_region)).json()["id"]
    await client_api.funded(source, 1_000)
    local = await client_api.transfer(source, local_peer, 100)
    crossing = await client_api.transfer(source, remote, 200)
    refused = await client_api.transfer(source, remote_usd, 300)  # the credit side refuses: currency_mismatch
    assert local.status_code == 201 and crossing.status_code in (201, 202) and refused.status_code in (201, 202)
    for transfer, final in ((crossing, "posted"), (refused, "returned")):
        tid = transfer.json()["id"]

        async def settled(tid: str = tid, final: str = final) -> bool:
            return await _transfer_state(client_api, tid) == final

        await poll_until(settled, timeout_s=30, what=f"transfer {tid} {final}")

    events, _ = await walk_feed(client_api, limit=3)
    by_resource: dict[str, list[str]] = {}
    for event in events:
        assert event["client"] == client_api.client_id
        by_resource.setdefault(event["data"]["id"], []).append(event["type"])
    for account in (source, local_peer, remote, remote_usd):
        assert by_resource[account] == ["account.opened"], f"expected one account.opened for {account}"
    assert by_resource[local.json()["id"]] == ["transfer.posted"]
    assert by_resource[crossing.json()["id"]] == ["transfer.pending", "transfer.posted"], (
        "expected a cross-region transfer to be announced pending then posted once, not once per side")
    assert by_resource[refused.json()["id"]] == ["transfer.pending", "transfer.returned"]
    returned = next(e for e in events if e["type"] == "transfer.returned")
    assert returned["data"]["reason"] == "currency_mismatch" and returned["data"]["state"] == "returned"
    assert returned["id"].startswith("evt_") and returned["slot"] == int(returned["id"][4:7], 16)
    posted = await client_api.get(f"/v1/transfers/{local.json()['id']}")
    expected = {k: v for k, v in posted.json().items() if k != "history"}
    assert next(e for e in events if e["data"]["id"] == local.json()["id"])["data"] == expected
    ids = [e["id"] for e in events]
    assert len(ids) == len(set(ids)), "expected no event twice"
    committed = await committed_events(pg_clusters, topology, client_api.client_id)
    assert sorted(ids) == sorted(e["id"] for e in committed), "expected the feed to list exactly what committed"
    only_returned, _ = await walk_feed(client_api, types="transfer.returned")
    assert [e["type"] for e in only_returned] == ["transfer.returned"]


async def test_a_client_never_sees_another_clients_events(
    client_api: RouterApi, keys: SessionKeys,
) -> None:
    await client_api.funded(await client_api.new_account(), 10)
    other_id = new_client_id("other")
    other = RouterApi(client_api.http, other_id, keys.client_token(other_id))
    await other.new_account()
    mine, _ = await walk_feed(client_api)
    theirs, _ = await walk_feed(other)
    assert mine and theirs
    assert {e["client"] for e in mine} == {client_api.client_id}
    assert {e["client"] for e in theirs} == {other_id}, "expected client B's feed to hold none of A's events"


async def test_a_malformed_cursor_is_a_400_with_a_stable_code(client_api: RouterApi) -> None:
    for bad in ("not-base64!", "eyJ4Ijo1fQ", "W10", "x" * 900):
        response = await client_api.get("/v1/events", params={"after": bad})
        assert response.status_code == 400, f"expected 400 for cursor {bad[:20]!r}, got {response.status_code}"
        assert response.json()["code"] == "invalid_cursor"
    for params in ({"limit": "0"}, {"limit": "101"}, {"types": "nope"}):
        response = await client_api.get("/v1/events", params=params)
        assert response.status_code == 400 and response.json()["code"] == "invalid_request", response.text


async def test_pages_read_while_three_regions_write_never_skip_or_repeat_an_event(
    client_api: RouterApi, topology: Topology, pg_clusters: dict[str, Cluster],
) -> None:
    regions = [r.name for r in topology.regions]
    writing = True
    seen: list[dict[str, object]] = []
    # Per account, its resources in the order they committed: the account, then each deposit (each awaited, so
    # each committed before the next began).
    written: dict[str, list[str]] = {}

    async def writer(region: str) -> None:
        account = (await client_api.open_account("EUR", region=region)).json()["id"]
        written[account] = [account]
        for _ in range(15):
            response = await client_api.deposit(account, 1)
            assert response.status_code == 201, response.text
            written[account].append(response.json()["id"])

    async def reader() -> str | None:
        cursor = None
        while writing:
            page = await feed_page(client_api, after=cursor, limit=7)
            seen.extend(page["items"])
            cursor = page["next_cursor"]
        return cursor

    read = asyncio.create_task(reader())
    await asyncio.gather(*(writer(r) for r in regions * 2))
    writing = False
    cursor = await read
    committed = await committed_events(pg_clusters, topology, client_api.client_id)
    # Writes have ended: the same cursor chain must now reach every committed event (an event a page skipped
    # would never come, and this would time out). An event is listed once no older transaction is running.
    async def caught_up() -> bool:
        nonlocal cursor
        page = await feed_page(client_api, after=cursor, limit=7)
        seen.extend(page["items"])
        cursor = page["next_cursor"]
        return {e["id"] for e in seen} >= {e["id"] for e in committed}

    await poll_until(caught_up, timeout_s=30, what="the feed to list every committed event")
    ids = [str(e["id"]) for e in seen]
    duplicates = [i for i, n in Counter(ids).items() if n > 1]
    assert not duplicates, f"expected no event twice, got {duplicates[:5]}"
    assert set(ids) == {e["id"] for e in committed}, (
        f"expected the pages to hold exactly the committed events: {len(set(ids))} read, {len(committed)} committed")
    # Per account, the feed lists its events in the order they committed: account.opened, then every deposit on
    # it in the order the writer saw each commit.
    assert len(written) == len(regions) * 2
    for account, resources in written.items():
        mine = set(resources)
        listed = [str(e["data"]["id"]) for e in seen if isinstance(e["data"], dict) and e["data"]["id"] in mine]
        assert listed == resources, (
            f"expected account {account}'s events in commit order, got positions "
            f"{[resources.index(r) for r in listed]}")

