"""Routers and slot moves, with real regions and databases (issue 11): a range frozen in its shard database as the
mover freezes it holds the router's requests until it is unfrozen; a whole move (app/placement/mover.py) of an
account's slot to another region under a stream of deposits through the router ends with every deposit posted
once, no error answered to the client, the account served by its new region, and the audit clean; evacuating a
region moves each of its shard ranges and its accounts stay served with their balances."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path

import asyncpg
import httpx
import pytest

from app.local.postgres import Cluster
from app.local.processes import ServiceProcess
from app.local.stack import cluster_shard_dsns
from app.ops.target import Target
from app.placement.mover import Mover
from app.topology.ids import parse_account_id
from app.topology.model import Topology
from tests.e2e.conftest import RouterApi, router_process
from tests.helpers import HTTP_TIMEOUT_S, new_client_id, new_key, poll_until, shard_of, source_move_spec
from tests.keys import HopAuth, SessionKeys
from tests.observability.test_metrics import scrape, value
from tests.tls import session_tls
from tests.world import World

REGION = "eu-west-1"
HELD = "txroute_router_held_requests_total"


def _router(name: str, services: dict[str, ServiceProcess], keys: SessionKeys, log_dir: Path) -> ServiceProcess:
    process = router_process(name, REGION, {r: s.url for r, s in services.items()}, keys, log_dir)
    process.start()
    process.wait_ready()
    return process


@pytest.fixture
def session_router(region_services: dict[str, ServiceProcess], keys: SessionKeys, work_dir: Path,
                   ) -> Iterator[ServiceProcess]:
    process = _router("router-freeze", region_services, keys, work_dir / "logs")
    try:
        yield process
    finally:
        process.stop()


@pytest.fixture
async def api(session_router: ServiceProcess, keys: SessionKeys) -> AsyncIterator[RouterApi]:
    client = new_client_id()
    async with httpx.AsyncClient(base_url=session_router.url, timeout=HTTP_TIMEOUT_S) as http:
        yield RouterApi(http, client, keys.client_token(client))


async def test_a_range_frozen_in_its_database_holds_the_request_until_it_is_unfrozen(
    api: RouterApi, session_router: ServiceProcess, topology: Topology, pg_clusters: dict[str, Cluster],
    region_services: dict[str, ServiceProcess],
) -> None:
    account = (await api.open_account("EUR", region=REGION)).json()["id"]
    slot, shard = parse_account_id(account).slot, shard_of(topology, account)
    move = "mv_holdtest" + new_key()[-12:]
    spec = source_move_spec(topology, slot, move, target=next(s for s in topology.shards if s.region != REGION))
    conn = await asyncpg.connect(cluster_shard_dsns(topology, pg_clusters)[shard])
    try:
        # As the mover freezes a range (migration 0008): the slot's ownership becomes `moving`.
        assert json.loads(await conn.fetchval("select txr_move_begin($1::jsonb)::text", json.dumps(spec)))["ok"]
        await conn.execute("select txr_move_freeze($1)", move)
        assert await conn.fetchval(
            "select state from slot_ownership where $1 between slot_lo and slot_hi", slot) == "moving"
        before = await scrape(session_router.url)
        pending = asyncio.create_task(api.deposit(account, 250, key=new_key()))

        async def held() -> bool:
            return value(await scrape(session_router.url), "txroute_router_requests_on_hold") >= 1

        await poll_until(held, timeout_s=1.5, what="the router to hold the deposit")
        assert not pending.done(), "expected the deposit held while its slot is frozen"
        # The region reports the move and its freeze from its shard's slot_moves rows.
        seen = await scrape(region_services[REGION].url)
        assert value(seen, "txroute_slot_moves_in_progress", shard=shard, phase="frozen") == 1, (
            "expected the region to report one move of the shard in phase frozen")
        assert value(seen, "txroute_slot_move_phase_age_seconds", shard=shard, phase="frozen") > 0
        unfrozen_at = time.monotonic()
        await conn.execute("select txr_move_unfreeze($1, 'cancelled', 'hold test')", move)
    finally:
        await conn.close()
    answer = await asyncio.wait_for(pending, HTTP_TIMEOUT_S)
    print(f"deposit answered {1000 * (time.monotonic() - unfrozen_at):.0f} ms after the unfreeze")
    assert answer.status_code == 201, f"expected the held deposit to post after the unfreeze: {answer.text}"
    assert await api.balance(account) == 250, "expected exactly one posting of 250"
    after = await scrape(session_router.url)
    assert value(after, HELD, outcome="released") - value(before, HELD, outcome="released") == 1
    region = await scrape(region_services[REGION].url)
    assert value(region, "txroute_slot_moves_in_progress", shard=shard) == 0, "expected the cancelled move gone"
    assert value(region, "txroute_slot_move_freeze_duration_seconds_count") >= 1, (
        "expected the cancelled move's freeze observed once its freeze ended")


async def test_a_batch_item_on_a_frozen_range_is_held_with_its_batch_until_the_range_is_unfrozen(
    api: RouterApi, session_router: ServiceProcess, topology: Topology, pg_clusters: dict[str, Cluster],
) -> None:
    """A non-atomic batch gets no item answered 503 slot_moving for a short freeze: the router holds the frozen
    items as it holds a single request, and sends only them again (the others posted once)."""
    frozen = (await api.open_account("EUR", region=REGION)).json()["id"]
    slot, shard = parse_account_id(frozen).slot, shard_of(topology, frozen)
    other = (await api.open_account("EUR", region="us-east-1")).json()["id"]
    move = "mv_batchhold" + new_key()[-12:]
    spec = source_move_spec(topology, slot, move, target=next(s for s in topology.shards if s.region != REGION))
    items = [{"type": "deposit", "account": other, "amount": 40, "currency": "EUR"},
             {"type": "deposit", "account": frozen, "amount": 25, "currency": "EUR"}]
    conn = await asyncpg.connect(cluster_shard_dsns(topology, pg_clusters)[shard])
    try:
        assert json.loads(await conn.fetchval("select txr_move_begin($1::jsonb)::text", json.dumps(spec)))["ok"]
        await conn.execute("select txr_move_freeze($1)", move)
        before = await scrape(session_router.url)
        pending = asyncio.create_task(api.post("/v1/batches", {"atomic": False, "items": items}, key=new_key()))

        async def held() -> bool:
            return value(await scrape(session_router.url), "txroute_router_requests_on_hold") >= 1

        await poll_until(held, timeout_s=1.5, what="the router to hold the batch's frozen item")
        assert not pending.done(), "expected the batch held while one of its items' slot is frozen"
        await conn.execute("select txr_move_unfreeze($1, 'cancelled', 'batch hold test')", move)
    finally:
        await conn.close()
    answer = await asyncio.wait_for(pending, HTTP_TIMEOUT_S)
    assert answer.status_code == 200, answer.text
    assert [item["status"] for item in answer.json()["items"]] == [201, 201], (
        f"expected both items posted once the range is unfrozen, got {answer.text}")
    assert (await api.balance(other), await api.balance(frozen)) == (40, 25), "expected each item posted once"
    after = await scrape(session_router.url)
    assert value(after, HELD, outcome="released") - value(before, HELD, outcome="released") == 1


@pytest.fixture
def world(make_world: Callable[..., World]) -> World:
    return make_world()


@pytest.fixture
def world_router(world: World, keys: SessionKeys) -> Iterator[ServiceProcess]:
    process = _router("router-move", world.services, keys, world.folder / "logs")
    try:
        yield process
    finally:
        process.stop()


async def test_an_accounts_slot_moves_to_another_region_under_deposits_through_the_router_with_no_client_error(
    world: World, world_router: ServiceProcess, keys: SessionKeys,
) -> None:
    client = new_client_id()
    async with httpx.AsyncClient(base_url=world_router.url, timeout=HTTP_TIMEOUT_S) as http:
        api = RouterApi(http, client, keys.client_token(client))
        account = (await api.open_account("EUR", region=REGION)).json()["id"]
        await api.funded(account, 1_000)
        slot = parse_account_id(account).slot
        target = world.topology.region("us-east-1").shards[0].name
        answers: list[tuple[int, float]] = []
        moved = asyncio.Event()

        retried: list[float] = []  # 503 slot_moving answers the client resent (a freeze outlasted the hold)

        async def deposits() -> None:
            # Until the move is done, then a few more that must reach the new owner. A client meeting 503
            # slot_moving (nothing written) sends the same request again, with the same Idempotency-Key.
            after = 0
            while after < 5:
                key, started = new_key(), time.monotonic()
                answer = await api.deposit(account, 1, key=key)
                while answer.status_code == 503 and answer.json()["code"] == "slot_moving":
                    retried.append(time.monotonic() - started)
                    answer = await api.deposit(account, 1, key=key)
                answers.append((answer.status_code, time.monotonic() - started))
                assert answer.status_code == 201, f"expected no client error during the move: {answer.text}"
                after += moved.is_set()

        writer = asyncio.create_task(deposits())
        await poll_until(lambda: _answered(answers, 3), timeout_s=30, what="deposits flowing before the move")
        mover = Mover(_target(world, world_router), progress=lambda line: None)
        spec = await mover.spec(slot, slot, target)
        await mover.begin(spec)
        assert await mover.run(spec) == "done"
        moved.set()
        await asyncio.wait_for(writer, 120)

        assert await api.balance(account) == 1_000 + len(answers), "expected every acknowledged deposit once"
        async with world.http("us-east-1") as direct:
            read = await direct.get(f"/v1/accounts/{account}", auth=HopAuth(client))
        assert read.status_code == 200, f"expected us-east-1 to serve the moved account: {read.text}"
    report = await world.audit()
    assert report.clean, report.text()
    source = await scrape(world.services[REGION].url)
    assert value(source, "txroute_slot_move_freeze_duration_seconds_count", region=REGION) == 1, (
        "expected the source region to observe the move's freeze once")
    assert value(source, "txroute_slot_moves_in_progress") == 0
    freeze_s = value(source, "txroute_slot_move_freeze_duration_seconds_sum", region=REGION)
    held = await scrape(world_router.url)
    slowest = max(seconds for _, seconds in answers)
    print(f"{len(answers)} deposits through the move, freeze {1000 * freeze_s:.0f} ms, slowest deposit "
          f"(holds and resends included) {1000 * slowest:.0f} ms, {len(retried)} slot_moving resent; "
          f"router held {value(held, HELD):.0f} request(s), "
          f"{value(held, HELD, outcome='released'):.0f} released")


async def _answered(answers: list[tuple[int, float]], count: int) -> bool:
    return len(answers) >= count


async def test_evacuating_a_region_moves_each_shard_range_and_its_accounts_stay_served_with_their_balances(
    world: World, world_router: ServiceProcess, keys: SessionKeys,
) -> None:
    from app.ops.evacuate import evacuate, plan_evacuation
    from app.ops.placement import plan, recorded_claims

    client = new_client_id()
    target = _target(world, world_router)
    async with httpx.AsyncClient(base_url=world_router.url, timeout=HTTP_TIMEOUT_S) as http:
        api = RouterApi(http, client, keys.client_token(client))
        accounts = [(await api.open_account("EUR", region="eu-north-1")).json()["id"] for _ in range(6)]
        for i, account in enumerate(accounts):
            await api.funded(account, 100 + i)
        evacuation = await plan_evacuation(target, "eu-north-1", "eu-west-1")
        assert evacuation.moves == ((0, 682, "eun1-a", "euw1-a"), (683, 1365, "eun1-b", "euw1-b")), evacuation
        assert evacuation.plan()[0].startswith("txroute slots move 0-682 --to euw1-a")
        assert await evacuate(target, evacuation, progress=lambda line: None)
        for i, account in enumerate(accounts):
            assert await api.balance(account) == 100 + i, f"expected {account} served with its balance"
        # The receiving shards of this world never opened a EUR account: the move brings the settlement account
        # with the first one (migration 0012), so deposits to every evacuated account post.
        for account in accounts:
            paid = await api.deposit(account, 1)
            assert paid.status_code == 201, f"expected writes for an evacuated account at its new home: {paid.text}"
        refused = await api.open_account("EUR", region="eu-north-1")

        async def learnt() -> bool:  # the router learns the evacuated region owns nothing at its next refresh
            return (await api.open_account("EUR", region="eu-north-1")).status_code == 400

        await poll_until(learnt, timeout_s=10, what="the router to refuse accounts in the evacuated region")
    claims, unreadable = await recorded_claims(target)
    drift = plan(world.topology, claims, unreadable)
    assert [(m.lo, m.hi, m.source, m.target) for m in drift.moves] == [
        (0, 682, "euw1-a", "eun1-a"), (683, 1365, "euw1-b", "eun1-b")], "expected the files' drift named"
    again = await plan_evacuation(target, "eu-north-1", "eu-west-1")
    assert again.moves == () and "owns no slots" in again.plan()[0], "expected nothing left to evacuate"
    report = await world.audit()
    assert report.clean, report.text()
    print(f"evacuated eu-north-1; an account open there right after answered {refused.status_code}")


def _target(world: World, router: ServiceProcess) -> Target:
    return Target(topology=world.topology, shard_dsns=world.shard_dsns(), router_urls=[router.url],
                  region_urls={r: s.url for r, s in world.services.items()}, ca_file=session_tls().ca_file)
