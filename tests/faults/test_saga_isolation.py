"""Fault isolation of sagas (issue 10): a message that can never be settled is dead-lettered after a bounded
number of failures, stays visible to operators and keeps its money in transit; a destination region that
hangs holds up only the messages addressed to it. Each test runs in a world of its own."""

from __future__ import annotations

import asyncio
import json
import re
import ssl
from typing import Any

import asyncpg

from app import limits
from app.ops import sagas
from app.ops.target import Target
from tests.helpers import ApiClient, new_client_id, poll_until, shard_of
from tests.tls import session_tls

SKIP_FAST_PATH = {"TXROUTE_FAULT_SKIP_FAST_PATH": "1"}


async def _outbox_row(dsn: str, transfer_id: str) -> asyncpg.Record:
    conn = await asyncpg.connect(dsn)
    try:
        row = await conn.fetchrow(
            "select attempts, failures, dead_lettered_at, delivered_at, last_error from outbox where transfer_id = $1",
            transfer_id,
        )
    finally:
        await conn.close()
    assert row is not None, f"expected an outbox row for {transfer_id}"
    return row


async def _close_account(dsn: str, account: str) -> None:
    conn = await asyncpg.connect(dsn)
    try:
        await conn.execute("update accounts set status = 'closed' where id = $1", account)
    finally:
        await conn.close()


def _gauge(metrics_text: str, name: str, shard: str) -> float:
    m = re.search(rf'^{name}{{[^}}]*shard="{shard}"[^}}]*}} (\S+)$', metrics_text, re.MULTILINE)
    assert m, f"expected {name} for shard {shard} in /metrics"
    return float(m.group(1))


async def test_a_return_past_the_payers_limit_is_dead_lettered_after_bounded_failures_and_stays_in_transit(
    make_world: Any,
) -> None:
    world = make_world({"eu-west-1": {**SKIP_FAST_PATH, "TXROUTE_FAULT_RELAY_PAUSED": "1"}})
    client = new_client_id("poison")
    async with world.http("eu-west-1") as h1, world.http("us-east-1") as h2:
        src, dst = ApiClient(h1, client), ApiClient(h2, client)
        a, closed, healthy = await src.new_account(), await dst.new_account(), await dst.new_account()
        source_shard = shard_of(world.topology, a)
        source_dsn = world.clusters["eu-west-1"].dsn(world.topology.shard(source_shard).database)
        await _close_account(world.clusters["us-east-1"].dsn(world.topology.shard(shard_of(world.topology, closed))
                                                              .database), closed)
        await src.funded(a, 1_000)
        response = await src.transfer(a, closed, 100)
        assert response.status_code == 202, f"expected 202 pending with delivery held back: {response.text}"
        poison = response.json()["id"]
        # The payer's balance rises while the message waits: returning the 100 would now exceed 2^53-1.
        await src.funded(a, limits.AMOUNT_MINOR_MAX - 50 - 900)
        world.restart("eu-west-1", TXROUTE_FAULT_RELAY_PAUSED="")  # the relay runs; the fast path stays off

        async def dead_lettered() -> bool:
            return (await _outbox_row(source_dsn, poison))["dead_lettered_at"] is not None

        await poll_until(dead_lettered, timeout_s=60, what="the poison message dead-lettered")
        row = await _outbox_row(source_dsn, poison)
        assert row["failures"] == limits.SAGA_POISON_FAILURES_MAX, f"expected exactly the bounded failures: {row}"
        attempts = row["attempts"]

        # A later message of the same shard goes through the same relay: once it is posted, the relay has
        # claimed again and again, and never the dead letter.
        later = await src.transfer(a, healthy, 10)
        assert later.status_code == 202, later.text

        async def later_posted() -> bool:
            return (await src.get(f"/v1/transfers/{later.json()['id']}")).json()["state"] == "posted"

        await poll_until(later_posted, timeout_s=30, what="a healthy transfer posted by the relay")
        row = await _outbox_row(source_dsn, poison)
        assert (row["attempts"], row["delivered_at"]) == (attempts, None), f"expected no attempt after: {row}"
        shown = (await src.get(f"/v1/transfers/{poison}")).json()
        assert shown["state"] == "pending", f"expected the dead-lettered transfer still pending: {shown}"
        assert await src.balance(a) == limits.AMOUNT_MINOR_MAX - 50 - 10, "expected no return and no double debit"
        metrics = (await h1.get("/metrics")).text
        assert _gauge(metrics, "txroute_saga_dead_letters", source_shard) == 1, "expected the dead letter counted"

    target = Target(world.topology, world.shard_dsns(), [], {})
    rows, unreadable = await sagas.pending(target)
    assert not unreadable
    (listed,) = [r for r in rows if r["transfer_id"] == poison]
    assert listed["dead_lettered"] and listed["failures"] == limits.SAGA_POISON_FAILURES_MAX, listed
    assert "DEAD-LETTER" in sagas.list_text(rows, unreadable)
    inspected = sagas.inspect_text(await sagas.inspect(target, poison))
    assert "DEAD-LETTER" in inspected, inspected
    # Nothing is lost: the audit counts the dead letter's money in flight, in its transit account.
    report = await world.audit()
    assert report.clean, report.text()

    # Its cause fixed (the payer spends, so the return fits under 2^53-1), `ops sagas retry` revives it: the
    # relay delivers it again, the credit side answers its first outcome (refused) and the money comes back once.
    async with world.http("eu-west-1") as h1:
        src = ApiClient(h1, client)
        spent = await src.withdraw(a, 1_000)
        assert spent.status_code == 201, spent.text
        made_due = await sagas.retry(target, transfer_ids=[poison], all_stuck=False, older_than_s=0.0, yes=True)
        assert made_due == 1, f"expected the dead letter made due, got {made_due}"

        async def returned() -> bool:
            return (await src.get(f"/v1/transfers/{poison}")).json()["state"] == "returned"

        await poll_until(returned, timeout_s=30, what="the revived dead letter returned")
        assert await src.balance(a) == limits.AMOUNT_MINOR_MAX - 50 - 10 - 1_000 + 100, "expected one return"
    row = await _outbox_row(source_dsn, poison)
    assert row["delivered_at"] is not None and row["failures"] == 0, f"expected it settled and not dead: {row}"
    report = await world.audit()
    assert report.clean, report.text()


async def _hanging_server() -> tuple[asyncio.Server, str]:
    """An HTTPS server (the session's region certificate) that accepts requests and never answers them: a
    region that hangs after the TLS handshake."""

    async def swallow(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while await reader.read(65_536):
            pass
        writer.close()

    tls = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    tls.load_cert_chain(session_tls().cert_file, session_tls().key_file)
    server = await asyncio.start_server(swallow, "127.0.0.1", 0, ssl=tls)
    port = server.sockets[0].getsockname()[1]
    return server, f"https://127.0.0.1:{port}"


async def test_a_hanging_destination_region_holds_up_only_its_own_messages(make_world: Any) -> None:
    world = make_world({"eu-west-1": SKIP_FAST_PATH})
    server, hanging_url = await _hanging_server()
    try:
        urls = {region: service.url for region, service in world.services.items()}
        world.restart("eu-west-1", TXROUTE_REGION_URLS=json.dumps({**urls, "us-east-1": hanging_url}))
        client = new_client_id("fair")
        async with world.http("eu-west-1") as h1, world.http("us-east-1") as h2, world.http("eu-north-1") as h3:
            src, east, north = ApiClient(h1, client), ApiClient(h2, client), ApiClient(h3, client)
            a, b, c = await src.new_account(), await east.new_account(), await north.new_account()
            await src.funded(a, 10_000)
            # More messages to the hanging region than the relay sends to one region at once, all older
            # than the messages to the healthy one.
            stuck = limits.SAGA_RELAY_IN_FLIGHT_PER_DESTINATION_MAX + 8
            to_east = [await src.transfer(a, b, 1) for _ in range(stuck)]
            to_north = [await src.transfer(a, c, 7) for _ in range(5)]
            assert all(r.status_code == 202 for r in to_east + to_north), "expected every transfer pending"

            async def north_credited() -> bool:
                return await north.balance(c) == 5 * 7

            # Well under the hanging deliveries' own timeout (2 x SAGA_DELIVERY_TIMEOUT_S): a relay that
            # waited for them before claiming more could not have delivered these in time.
            await poll_until(north_credited, timeout_s=limits.SAGA_DELIVERY_TIMEOUT_S * 1.6,
                             what="the healthy region's messages delivered while another region hangs")
            states = [(await src.get(f"/v1/transfers/{r.json()['id']}")).json()["state"] for r in to_north]
            assert states == ["posted"] * 5, f"expected the healthy region's transfers posted, got {states}"
            assert await east.balance(b) == 0, "expected nothing delivered to the region that hangs"
    finally:
        server.close()
