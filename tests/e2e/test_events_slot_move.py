"""Events and webhook endpoints across a slot move (issues 11 and 13): the mover's copies write no event, the
feed lists every event once before and after, and an endpoint whose home slot moved goes on being delivered by
its new shard."""

from __future__ import annotations

import os
from collections import Counter
from collections.abc import Callable, Iterator
from typing import Any

import asyncpg
import httpx
import pytest

from app.events.webhooks import home_slot
from app.ops.target import Target, deployed_target
from app.placement.mover import Mover, MoverStopped
from app.topology.ids import parse_account_id
from app.topology.model import Topology
from tests.e2e.conftest import ROUTER_REGION, RouterApi, router_process
from tests.e2e.test_webhooks import Receiver, receiver  # noqa: F401 - the fixture
from tests.events_support import walk_feed
from tests.helpers import new_client_id, poll_until
from tests.keys import SessionKeys


@pytest.fixture
def moving_world(make_world: Callable[..., Any], topology: Topology, keys: SessionKeys) -> Iterator[Any]:
    env = {"TXROUTE_WEBHOOK_ALLOW_LOOPBACK": "1"}
    world = make_world({r.name: dict(env) for r in topology.regions})
    router = router_process("router-moves", ROUTER_REGION, {r: s.url for r, s in world.services.items()}, keys,
                            world.folder / "logs")
    router.start()
    try:
        router.wait_ready()
        world.router = router
        yield world
    finally:
        router.stop()
        if os.environ.get("TXROUTE_TEST_SHOW_LOGS"):
            for log in sorted((world.folder / "logs").glob("*.log")):
                print(log.name, log.read_text()[-20_000:])


def _target(world: Any) -> Target:
    """The world's shards and regions, as `txroute slots` reaches a deployed stack."""
    return deployed_target(
        endpoints=[f"{r}={s.url}" for r, s in world.services.items()],
        dsns=[f"{s}={d}" for s, d in world.shard_dsns().items()], dsn_file=None, regions_dir=None)


def _other_shard(topology: Topology, slot: int) -> str:
    """The shard of the slot's region (as regions/ places it) that regions/ does not give the slot."""
    source = topology.shard_for_slot(slot)
    return next(s.name for s in topology.region(source.region).shards if s.name != source.name)


async def _move(world: Any, topology: Topology, slot: int, to: str | None = None) -> str:
    """Move one slot to `to` (default: the other shard of its region); returns the new shard."""
    to = to or _other_shard(topology, slot)
    mover = Mover(_target(world), progress=lambda *_: None)
    spec = await mover.spec(slot, slot, to)
    await mover.begin(spec)
    assert await mover.run(spec) == "done", f"expected the move of slot {slot} to {to} to complete"
    return to


async def test_a_slot_move_neither_repeats_nor_loses_events_and_its_endpoint_is_delivered_by_the_new_shard(
    moving_world: Any, receiver: Receiver, topology: Topology, keys: SessionKeys,  # noqa: F811
) -> None:
    async with httpx.AsyncClient(base_url=moving_world.router.url, timeout=30) as http:
        client = new_client_id()
        api = RouterApi(http, client, keys.client_token(client))
        registered = await api.post("/v1/webhook-endpoints", {"url": f"{receiver.url}/ok"})
        assert registered.status_code == 201, registered.text
        endpoint = registered.json()
        account = await api.new_account()
        await api.funded(account, 100)

        await _move(moving_world, topology, parse_account_id(account).slot)
        await _move(moving_world, topology, home_slot(client))
        await api.funded(account, 50)

        events, _ = await walk_feed(api)
        counts = Counter((e["type"], e["data"]["id"]) for e in events)
        assert all(n == 1 for (t, _), n in counts.items() if t == "account.opened"), (
            f"expected one account.opened per account after the move: {counts}")
        assert counts[("account.opened", account)] == 1
        assert [n for (t, _), n in counts.items() if t == "transfer.posted"] == [1, 1], (
            f"expected each deposit posted once, none copied by the move: {counts}")
        assert all(e["client"] == client for e in events)

        async def delivered() -> bool:
            return {r.headers["webhook-id"] for r in receiver.on("/ok", status=200)} >= {e["id"] for e in events}

        await poll_until(delivered, timeout_s=60, what="every event delivered, the last by the endpoint's new shard")
        again = await api.get(f"/v1/webhook-endpoints/{endpoint['id']}")
        assert again.status_code == 200 and again.json()["state"] == "enabled", again.text


async def test_a_webhook_endpoint_deleted_while_its_home_slot_moves_stays_deleted_on_the_new_shard(
    moving_world: Any, receiver: Receiver, topology: Topology, keys: SessionKeys,  # noqa: F811
) -> None:
    async with httpx.AsyncClient(base_url=moving_world.router.url, timeout=30) as http:
        client = new_client_id()
        api = RouterApi(http, client, keys.client_token(client))
        kept, deleted = [(await api.post("/v1/webhook-endpoints", {"url": f"{receiver.url}/{name}"})).json()
                         for name in ("kept", "deleted")]
        slot = home_slot(client)
        to = _other_shard(topology, slot)
        target = _target(moving_world)
        spec = await Mover(target, progress=lambda *_: None).spec(slot, slot, to)
        await Mover(target, progress=lambda *_: None).begin(spec)
        # The range is copied (both endpoints are on the target now); the client deletes one before the switch.
        with pytest.raises(MoverStopped):
            await Mover(target, progress=lambda *_: None, stop_after="catching_up").run(spec)
        gone = await http.delete(f"/v1/webhook-endpoints/{deleted['id']}", headers=api.headers())
        assert gone.status_code in (200, 204), gone.text
        assert await Mover(target, progress=lambda *_: None).run(spec) == "done"

        listed = (await api.get("/v1/webhook-endpoints")).json()["items"]
        assert [e["id"] for e in listed] == [kept["id"]], f"expected only the endpoint not deleted, got {listed}"
        assert (await api.get(f"/v1/webhook-endpoints/{deleted['id']}")).status_code == 404
        conn = await asyncpg.connect(moving_world.shard_dsns()[to])
        try:
            rows = await conn.fetchval("select count(*) from webhook_endpoints where id = $1", deleted["id"])
        finally:
            await conn.close()
        assert rows == 0, "expected the deleted endpoint's row gone from the new shard"
