"""The region's webhook worker (app/events/delivery.py) against shard databases of its own: two clusters, each
one shard owning every slot, so a test may stop one without disturbing the session's regions (whose workers
never see these databases). Receivers are real HTTP servers on loopback; events are written by the ledger's
own function (txr_event_write, migration 0011)."""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import asyncpg
import pytest
from aiohttp import web

from app import limits
from app.events.delivery import WebhookWorker
from app.events.urls import UrlPolicy
from app.events.webhooks import new_endpoint_id
from app.local.postgres import Cluster
from app.store import shard as shard_module
from app.store.shard import ShardStore
from app.topology.model import Shard, SlotRange, Topology
from tests.conftest import TEST_PG_SETTINGS, copy_cluster
from tests.helpers import new_client_id, poll_until

SHARDS = ("wh-a", "wh-b")
LOCAL = UrlPolicy(allow_loopback=True)


@dataclass
class Receiver:
    url: str = ""
    held: set[str] = field(default_factory=set)  # paths that answer only once `released` is set (a slow receiver)
    released: asyncio.Event = field(default_factory=asyncio.Event)
    received: list[tuple[str, str, float]] = field(default_factory=list)  # (path, webhook-id, monotonic time)
    arrived: list[tuple[str, str]] = field(default_factory=list)  # (path, webhook-id) as requests come in

    async def handle(self, request: web.Request) -> web.Response:
        self.arrived.append((request.path, request.headers["webhook-id"]))
        if request.path in self.held:
            await self.released.wait()
        self.received.append((request.path, request.headers["webhook-id"], time.monotonic()))
        return web.Response(status=200)

    def ids(self, path: str) -> set[str]:
        return {event for p, event, _ in self.received if p == path}


@pytest.fixture
async def receiver() -> AsyncIterator[Receiver]:
    found = Receiver()
    app = web.Application()
    app.router.add_post("/{tail:.*}", found.handle)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    found.url = f"http://127.0.0.1:{port}"
    try:
        yield found
    finally:
        found.released.set()
        await runner.cleanup()


@dataclass
class Rig:
    clusters: dict[str, Cluster]
    stores: dict[str, ShardStore]

    def dsn(self, shard: str) -> str:
        return self.clusters[shard].dsn(Shard(shard, "eu-west-1", (SlotRange(0, 4095),)).database)

    async def sql(self, shard: str, statement: str, *args: Any) -> Any:
        conn = await asyncpg.connect(self.dsn(shard))
        try:
            return await conn.fetchval(statement, *args)
        finally:
            await conn.close()

    async def event(self, shard: str, client: str, resource: str = "acc_test") -> str:
        """One event written as the ledger writes it; its id."""
        await self.sql(shard, "select txr_event_write('account.opened', $1, 7, $2, '{}'::jsonb)", client, resource)
        event_id: str = await self.sql(
            shard, "select id from events where client = $1 order by xid desc, seq desc limit 1", client)
        return event_id

    async def endpoint(self, shard: str, client: str, url: str) -> str:
        endpoint_id = new_endpoint_id(7)
        await self.sql(
            shard, "insert into webhook_endpoints (id, slot, client, url, secret) values ($1, 7, $2, $3, $4)",
            endpoint_id, client, url, "whsec_" + "A" * 43 + "=")
        return endpoint_id

    def worker(self, topology: Topology, stores: dict[str, ShardStore] | None = None,
               policy: UrlPolicy = LOCAL) -> WebhookWorker:
        return WebhookWorker(region="eu-west-1", topology=topology, stores=stores or self.stores, peers=None,
                             minter=None, policy=policy, schedule_s=(0.5, 0.5, 1, 1, 2))


@pytest.fixture
async def rig(work_dir: Path, pg_template: Cluster) -> AsyncIterator[Rig]:
    folder = work_dir / f"webhook-rig-{uuid.uuid4().hex[:8]}"
    clusters: dict[str, Cluster] = {}
    stores: dict[str, ShardStore] = {}
    try:
        for name in SHARDS:
            cluster = copy_cluster(pg_template, folder / name)
            clusters[name] = cluster
            await asyncio.to_thread(cluster.provision, [Shard(name, "eu-west-1", (SlotRange(0, 4095),))])
        rig = Rig(clusters, stores)
        for name in SHARDS:
            pool = await asyncpg.create_pool(rig.dsn(name), min_size=0, max_size=4, timeout=2,
                                             init=shard_module._init_connection)
            assert pool is not None
            stores[name] = ShardStore(name, pool, workers=1)
        yield rig
    finally:
        for store in stores.values():
            await store.close()
        for cluster in clusters.values():
            cluster.stop(mode="immediate")


async def _running(worker: WebhookWorker) -> asyncio.Task[None]:
    return asyncio.create_task(worker.run_forever())


async def _stop(task: asyncio.Task[None]) -> None:
    task.cancel()
    async with asyncio.timeout(30):  # a worker that does not stop when cancelled is a failure, not a hang
        await asyncio.gather(task, return_exceptions=True)


async def test_one_shard_down_leaves_the_other_shards_deliveries_going(
    rig: Rig, receiver: Receiver, topology: Topology
) -> None:
    # Endpoints homed on each shard; the down shard comes first in the worker's order, as in the issue.
    down, up = "wh-b", "wh-a"
    client_up, client_down = new_client_id(), new_client_id()
    await rig.endpoint(up, client_up, f"{receiver.url}/up")
    await rig.endpoint(down, client_down, f"{receiver.url}/down")
    worker = rig.worker(topology, {down: rig.stores[down], up: rig.stores[up]})
    task = await _running(worker)
    try:
        async with asyncio.timeout(150):  # each step is bounded; this names the step of a hang
            first = {await rig.event(up, client_up), await rig.event(down, client_up)}
            await poll_until(lambda: _has(receiver, "/up", first), timeout_s=20, what="both shards' events delivered")
            await asyncio.to_thread(rig.clusters[down].stop, mode="immediate")
            skipped_before = _shard_errors(down)
            later = {await rig.event(up, client_up) for _ in range(3)}
            await poll_until(lambda: _has(receiver, "/up", first | later), timeout_s=20,
                             what="the healthy shard's events delivered while the other shard's database is stopped")
            assert _shard_errors(down) > skipped_before, "expected the skipped shard counted in the metric"
            await asyncio.to_thread(rig.clusters[down].start, settings=TEST_PG_SETTINGS)
            back = await rig.event(down, client_up)
            await poll_until(lambda: _has(receiver, "/up", first | later | {back}), timeout_s=30,
                             what="the shard's events delivered again once its database is back")
    finally:
        await _stop(task)
    ids = [event for path, event, _ in receiver.received if path == "/up"]
    assert sorted(ids) == sorted(first | later | {back}), f"expected each event once, got {ids}"


def _shard_errors(shard: str) -> float:
    from app import telemetry

    return sum(s.value for family in telemetry.METRICS.webhook_shard_errors.collect() for s in family.samples
               if s.name == "txroute_webhook_shard_errors_total" and s.labels["shard"] == shard)


async def _has(receiver: Receiver, path: str, events: set[str]) -> bool:
    return events <= receiver.ids(path)


async def test_a_slow_endpoint_with_a_large_backlog_does_not_delay_another_endpoints_deliveries(
    rig: Rig, receiver: Receiver, topology: Topology
) -> None:
    shard = "wh-a"
    slow_client, quick_client = new_client_id("slow"), new_client_id("quick")
    await rig.endpoint(shard, slow_client, f"{receiver.url}/slow")
    await rig.endpoint(shard, quick_client, f"{receiver.url}/quick")
    receiver.held.add("/slow")
    # More than the rows 0011's claim looked at (4 x the worker's room), all older than the quick endpoint's event.
    backlog = 4 * limits.WEBHOOK_IN_FLIGHT_MAX + 100
    await rig.sql(shard, "select count(txr_event_write('account.opened', $1, 7, 'acc_' || i, '{}'::jsonb)) "
                         "from generate_series(1, $2) i", slow_client, backlog)
    task = await _running(rig.worker(topology, {shard: rig.stores[shard]}))
    try:
        async def slow_queued_and_busy() -> bool:
            queued = await rig.sql(shard, "select count(*) from webhook_deliveries where state = 'pending'")
            busy = sum(1 for p, _ in receiver.arrived if p == "/slow")
            return queued == backlog and busy >= limits.WEBHOOK_IN_FLIGHT_PER_ENDPOINT_MAX

        await poll_until(slow_queued_and_busy, timeout_s=30,
                         what="the slow endpoint's backlog queued and its in-flight room used")
        quick = await rig.event(shard, quick_client)
        started = time.monotonic()
        await poll_until(lambda: _has(receiver, "/quick", {quick}), timeout_s=10,
                         what="the quick endpoint's event delivered while the slow one holds its backlog")
        waited = time.monotonic() - started
    finally:
        await _stop(task)
    assert not receiver.ids("/slow"), "expected the slow receiver to have answered nothing yet"
    assert waited < 10, f"expected the quick endpoint's delivery within 10 s, took {waited:.1f} s"


async def test_results_of_sends_ending_together_take_a_bounded_share_of_the_shards_pool(
    rig: Rig, receiver: Receiver, topology: Topology, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A held receiver released at once ends a full endpoint's sends together; their results are written through
    the shard's pool, which postings share, at most WEBHOOK_RECORD_CONCURRENCY_MAX at a time, and all of them."""
    shard = "wh-a"
    client = new_client_id("burst")
    await rig.endpoint(shard, client, f"{receiver.url}/burst")
    receiver.held.add("/burst")
    count = limits.WEBHOOK_IN_FLIGHT_PER_ENDPOINT_MAX
    await _write_events(rig, shard, client, count)
    store = rig.stores[shard]
    real_call = store.webhook_call
    writing, most = 0, 0

    async def counted(op: str, *args: Any, **kwargs: Any) -> Any:
        nonlocal writing, most
        if op != "webhook_attempted":
            return await real_call(op, *args, **kwargs)
        writing += 1
        most = max(most, writing)
        try:
            await asyncio.sleep(0.05)  # each write held a moment, so writes that overlap are seen to
            return await real_call(op, *args, **kwargs)
        finally:
            writing -= 1

    monkeypatch.setattr(store, "webhook_call", counted)
    task = await _running(rig.worker(topology, {shard: store}))
    try:
        async def all_in_flight() -> bool:
            return sum(1 for p, _ in receiver.arrived if p == "/burst") == count

        await poll_until(all_in_flight, timeout_s=30, what="every send of the endpoint in flight at the held receiver")
        receiver.released.set()

        async def all_recorded() -> bool:
            done = await rig.sql(shard, "select count(*) from webhook_deliveries where state = 'delivered'")
            return bool(done == count)

        await poll_until(all_recorded, timeout_s=30, what="every delivery recorded as delivered")
    finally:
        await _stop(task)
    assert len(receiver.ids("/burst")) == count
    assert 1 <= most <= limits.WEBHOOK_RECORD_CONCURRENCY_MAX, (
        f"expected at most {limits.WEBHOOK_RECORD_CONCURRENCY_MAX} result writes at once, saw {most}")


async def _write_events(rig: Rig, shard: str, client: str, count: int, event_type: str = "account.opened") -> None:
    await rig.sql(shard, "select count(txr_event_write($3, $1, 7, 'acc_' || i, '{}'::jsonb)) "
                         "from generate_series(1, $2) i", client, count, event_type)


async def _head(rig: Rig, shard: str, client: str) -> str:
    position: str = await rig.sql(
        shard, "select xid::text || '.' || seq from events where client = $1 order by xid desc, seq desc limit 1",
        client)
    return position


async def test_a_new_endpoint_starts_at_the_heads_and_its_first_pass_queues_the_newest_event(
    rig: Rig, receiver: Receiver, topology: Topology
) -> None:
    client = new_client_id()
    for shard in SHARDS:
        await _write_events(rig, shard, client, 450)  # retained history from before the endpoint
    home = "wh-a"
    endpoint = await rig.endpoint(home, client, f"{receiver.url}/new")
    fresh = await rig.event("wh-b", client)
    worker = rig.worker(topology)
    queued = await worker.ingest_once()
    events = await rig.sql(home, "select array_agg(event_id) from webhook_deliveries where endpoint_id = $1",
                           endpoint)
    assert queued == 1 and events == [fresh], (
        f"expected the first pass to queue only the event written after the endpoint, got {queued}: {events}")
    raw = await rig.sql(home, "select feed_position::text from webhook_endpoints where id = $1", endpoint)
    positions = json.loads(raw)
    assert positions["wh-b"] == await _head(rig, "wh-b", client), positions
    assert set(positions) == set(SHARDS), f"expected a position for every shard after one pass, got {positions}"
    later = await rig.event("wh-a", client)
    assert await worker.ingest_once() == 1
    assert await worker.ingest_once() == 0, "expected a pass with nothing new to queue nothing"
    events = await rig.sql(home, "select array_agg(event_id order by event_id) from webhook_deliveries "
                                 "where endpoint_id = $1", endpoint)
    assert sorted(events) == sorted([fresh, later]), events


async def test_a_types_filtered_read_moves_the_cursor_past_what_it_read_and_never_skips_or_repeats(
    rig: Rig, topology: Topology
) -> None:
    from app.events import feed
    from app.events.delivery import read_pages

    client = new_client_id()
    shard = "wh-a"
    stores = {shard: rig.stores[shard]}
    await _write_events(rig, shard, client, 2_500)  # none of them of the type read
    types = ["transfer.returned"]

    async def page(positions: dict[str, str]) -> tuple[list[dict[str, Any]], dict[str, str], bool]:
        pages = await read_pages(stores, client, positions, types, 100)
        return feed.merge(positions, pages, 100)

    positions: dict[str, str] = {}
    calls = 0
    more = True
    while more:
        items, positions, more = await page(positions)
        calls += 1
        assert not items, f"expected no transfer.returned yet, got {items}"
        assert calls <= 4, "expected the 2,500 events of other types read past in at most 3 bounded pages and one"
    assert positions[shard] == await _head(rig, shard, client), (
        "expected the cursor at the last event read, so the next call does not read the history again")
    await _write_events(rig, shard, client, 10)
    await _write_events(rig, shard, client, 1, "transfer.returned")
    wanted = await rig.sql(shard, "select id from events where client = $1 and type = 'transfer.returned'", client)
    await _write_events(rig, shard, client, 10)
    items, positions, more = await page(positions)
    assert [e["id"] for e in items] == [wanted] and not more, items
    assert positions[shard] == await _head(rig, shard, client)
    items, positions, more = await page(positions)
    assert items == [] and not more, "expected the event once, and nothing after it"


async def test_a_name_public_at_registration_and_private_at_connection_is_refused_at_connection(
    rig: Rig, topology: Topology, monkeypatch: pytest.MonkeyPatch
) -> None:
    import socket

    from app.events.urls import check_url

    answers = iter(["93.184.215.14"])  # the first answer public, every later one private (DNS rebinding)
    loop = asyncio.get_running_loop()
    real = loop.getaddrinfo
    asked: list[str] = []

    async def rebinding(host: str, port: int, *args: Any, **kwargs: Any) -> Any:
        if host != "hooks.rebind.test":
            return await real(host, port, *args, **kwargs)
        address = next(answers, "10.0.0.1")
        asked.append(address)
        return [(socket.AF_INET, socket.SOCK_STREAM, 6, "", (address, port))]

    monkeypatch.setattr(loop, "getaddrinfo", rebinding)
    deployed = UrlPolicy(allow_loopback=False)
    url = "https://hooks.rebind.test/hook"
    await check_url(url, deployed)  # registration: the name resolves to a public address, accepted
    shard = "wh-a"
    client = new_client_id()
    endpoint = await rig.endpoint(shard, client, url)
    event = await rig.event(shard, client)
    worker = rig.worker(topology, {shard: rig.stores[shard]}, deployed)
    try:
        assert await worker.ingest_once() == 1
        assert await worker.send_once() == 1
        await asyncio.gather(*worker._tasks)
    finally:
        if worker._session is not None:
            await worker._session.close()
    assert asked[:2] == ["93.184.215.14", "10.0.0.1"], f"expected the connection to resolve again, got {asked}"
    error = await rig.sql(shard, "select error from webhook_attempts where endpoint_id = $1 and event_id = $2",
                          endpoint, event)
    assert error == "url_refused", f"expected the connection refused by the address check, got {error!r}"
