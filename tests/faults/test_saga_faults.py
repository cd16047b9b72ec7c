"""Faults during sagas, each followed by recovery: then every transfer is terminal, none is applied twice and
`txroute audit` is clean. Each test runs in a world of its own (clusters and processes it may kill)."""

from __future__ import annotations

import asyncio
from typing import Any

import asyncpg

from tests.helpers import ApiClient, new_client_id, poll_until

FAULTS_OFF = {"TXROUTE_FAULT_SKIP_FAST_PATH": "", "TXROUTE_FAULT_RELAY_PAUSED": ""}


async def _state(api: ApiClient, transfer_id: str) -> str:
    response = await api.get(f"/v1/transfers/{transfer_id}")
    return str(response.json()["state"]) if response.status_code == 200 else f"http {response.status_code}"


async def _all_posted(api: ApiClient, transfer_ids: list[str], *, timeout_s: float = 60) -> None:
    async def done() -> bool:
        return all([await _state(api, t) == "posted" for t in transfer_ids])

    await poll_until(done, timeout_s=timeout_s, what=f"all {len(transfer_ids)} transfers posted")


async def _inbox_counts(dsn: str) -> dict[str, int]:
    conn = await asyncpg.connect(dsn)
    try:
        rows = await conn.fetch(
            "select i.transfer_id, count(e.id) as entries from inbox i "
            "left join entries e on e.transfer_id = i.transfer_id group by i.transfer_id"
        )
    finally:
        await conn.close()
    return {r["transfer_id"]: r["entries"] for r in rows}


async def _assert_applied_once(world: Any, region: str, transfer_ids: list[str]) -> None:
    applied: dict[str, int] = {}
    for shard in world.topology.region(region).shards:
        applied.update(await _inbox_counts(world.clusters[region].dsn(shard.database)))
    for transfer_id in transfer_ids:
        assert applied.get(transfer_id) == 2, (
            f"expected transfer {transfer_id} applied once at {region} (one inbox row, two entries), "
            f"got {applied.get(transfer_id)} entries"
        )


async def test_source_killed_after_its_commit_and_before_delivery_delivers_after_restart(make_world):
    world = make_world({"eu-west-1": {"TXROUTE_FAULT_SKIP_FAST_PATH": "1", "TXROUTE_FAULT_RELAY_PAUSED": "1"}})
    client = new_client_id("kill-src")
    async with world.http("eu-west-1") as h1, world.http("us-east-1") as h2:
        src, dst = ApiClient(h1, client), ApiClient(h2, client)
        a, b = await src.new_account(), await dst.new_account()
        await src.funded(a, 500)
        ids = []
        for _ in range(3):
            response = await src.transfer(a, b, 100)
            assert response.status_code == 202, f"expected 202 pending with delivery held back: {response.text}"
            assert response.headers["location"] == f"/v1/transfers/{response.json()['id']}"
            ids.append(response.json()["id"])
        assert await dst.balance(b) == 0, "expected nothing delivered before the crash"
        world.services["eu-west-1"].kill()  # SIGKILL: the outbox is all that is left of the messages
        world.restart("eu-west-1", **FAULTS_OFF)
        await _all_posted(src, ids)
        assert (await src.balance(a), await dst.balance(b)) == (200, 300)
    await _assert_applied_once(world, "us-east-1", ids)
    report = await world.audit()
    assert report.clean, report.text()


async def test_destination_killed_while_applying_ends_with_each_transfer_applied_once(make_world):
    world = make_world()
    client = new_client_id("kill-dst")
    async with world.http("eu-north-1") as h1, world.http("us-east-1") as h2:
        src, dst = ApiClient(h1, client), ApiClient(h2, client)
        a, b = await src.new_account(), await dst.new_account()
        await src.funded(a, 10_000)

        async def send() -> Any:
            return await src.transfer(a, b, 10)

        burst = [asyncio.create_task(send()) for _ in range(40)]
        await asyncio.sleep(0.05)  # let part of the burst reach the destination before it dies
        world.services["us-east-1"].kill()
        responses = await asyncio.gather(*burst)
        assert all(r.status_code in (201, 202) for r in responses), [r.text for r in responses if r.status_code >= 300]
        world.restart("us-east-1")
        ids = [r.json()["id"] for r in responses]
        await _all_posted(src, ids)
        assert await dst.balance(b) == 400, "expected 40 x 10 credited exactly once"
        assert await src.balance(a) == 10_000 - 400
    await _assert_applied_once(world, "us-east-1", ids)
    report = await world.audit()
    assert report.clean, report.text()


async def test_destination_database_stopped_for_a_while_then_every_transfer_posts(make_world):
    world = make_world()
    client = new_client_id("pg-down")
    async with world.http("eu-west-1") as h1, world.http("eu-north-1") as h2:
        src, dst = ApiClient(h1, client), ApiClient(h2, client)
        a, b = await src.new_account(), await dst.new_account()
        await src.funded(a, 1_000)
        world.stop_postgres("eu-north-1")
        read = await dst.account(b)
        assert read.status_code == 503 and read.json()["code"] == "shard_unavailable", read.text
        assert read.headers.get("retry-after"), "expected Retry-After on 503"
        responses = [await src.transfer(a, b, 100) for _ in range(3)]
        assert [r.status_code for r in responses] == [202, 202, 202], [r.text for r in responses]
        world.start_postgres("eu-north-1")
        ids = [r.json()["id"] for r in responses]
        await _all_posted(src, ids)
        assert (await src.balance(a), await dst.balance(b)) == (700, 300)
    await _assert_applied_once(world, "eu-north-1", ids)
    report = await world.audit()
    assert report.clean, report.text()


async def test_source_database_stopped_refuses_writes_with_503_and_changes_nothing(make_world):
    world = make_world()
    client = new_client_id("pg-src-down")
    async with world.http("eu-west-1") as h1:
        src = ApiClient(h1, client)
        a = await src.new_account()
        await src.funded(a, 100)
        world.stop_postgres("eu-west-1")
        response = await src.withdraw(a, 40, key="k-during-outage")
        assert response.status_code == 503 and response.json()["code"] == "shard_unavailable", response.text
        world.start_postgres("eu-west-1")

        async def readable() -> bool:
            return (await src.account(a)).status_code == 200

        await poll_until(readable, timeout_s=30, what="the shard readable again")
        assert await src.balance(a) == 100, "expected the refused withdrawal to have changed nothing"
        retried = await src.withdraw(a, 40, key="k-during-outage")
        assert retried.status_code == 201, f"expected the client's retry with its key to succeed: {retried.text}"
        assert await src.balance(a) == 60
    report = await world.audit()
    assert report.clean, report.text()


async def test_relay_messages_dropped_duplicated_and_reordered_still_post_each_transfer_once(make_world):
    chaos = {
        "TXROUTE_FAULT_SKIP_FAST_PATH": "1",
        "TXROUTE_FAULT_DROP_REQUEST": "0.3",
        "TXROUTE_FAULT_DROP_ANSWER": "0.3",
        "TXROUTE_FAULT_DUPLICATE": "0.5",
        "TXROUTE_FAULT_REORDER": "1",
    }
    world = make_world({"eu-west-1": chaos})
    client = new_client_id("chaos")
    async with world.http("eu-west-1") as h1, world.http("us-east-1") as h2, world.http("eu-north-1") as h3:
        src, east, north = ApiClient(h1, client), ApiClient(h2, client), ApiClient(h3, client)
        a, b, c = await src.new_account(), await east.new_account(), await north.new_account()
        await src.funded(a, 10_000)
        responses = await asyncio.gather(*(src.transfer(a, b if i % 2 else c, 1 + i) for i in range(30)))
        assert all(r.status_code == 202 for r in responses), [r.text for r in responses if r.status_code != 202]
        ids = [r.json()["id"] for r in responses]
        await _all_posted(src, ids, timeout_s=90)
        to_b = sum(1 + i for i in range(30) if i % 2)
        to_c = sum(1 + i for i in range(30) if not i % 2)
        assert (await east.balance(b), await north.balance(c)) == (to_b, to_c), "expected each credit exactly once"
        assert await src.balance(a) == 10_000 - to_b - to_c
    await _assert_applied_once(world, "us-east-1", ids[1::2])
    await _assert_applied_once(world, "eu-north-1", ids[0::2])
    report = await world.audit()
    assert report.clean, report.text()
