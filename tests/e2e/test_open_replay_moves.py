"""A retried `POST /v1/accounts` across slot moves (issue 11, exactly once): real PostgreSQL clusters, region
services and a router as processes, the mover moving single slots.

The region places a new account at the first slot of the key's probe sequence that it owns now
(app.topology.placement), and the account's idempotency record moves with that slot. Proved here: a retry
with the same key gets the first answer again, marked replayed, and no second account exists in any shard,
after the key's slot moved to another shard of the region, then to another region and on to a third, and after
a slot that comes earlier in the key's sequence moved into the region; while the region holding the slot
cannot be asked, the retry is refused and nothing is opened.
"""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from typing import Any

import asyncpg
import httpx

from app.topology.ids import new_account_id, parse_account_id
from app.topology.model import Topology
from app.topology.placement import owned_slots, placement_slot, probe_sequence
from tests.e2e.conftest import RouterApi
from tests.e2e.test_events_slot_move import _move, moving_world  # noqa: F401 - the fixture
from tests.e2e.test_slot_moves import RETRY_FOR_S, RETRY_INTERVAL_S
from tests.helpers import new_client_id, new_key, poll_until
from tests.keys import SessionKeys

REGION = "eu-west-1"
ELSEWHERE = "eun1-a"  # a shard of another region
FURTHER = "use1-a"  # a shard of a third region
# What a client retries: held answers the router gave up on, a key still in flight (its own other retry). Never
# `misdirected`: a 421 is between regions and routers.
RETRIED_CODES_ALLOWED = {"slot_moving", "idempotency_key_in_flight"}


async def _accounts_of(world: Any, client: str) -> set[str]:
    """Every customer account of `client` in every shard database (a moved account's archived row on its old
    shard has the same id, so each account counts once)."""
    found: set[str] = set()
    for dsn in world.shard_dsns().values():
        conn = await asyncpg.connect(dsn)
        try:
            rows = await conn.fetch("select id from accounts where owner_client = $1 and kind = 'customer'", client)
        finally:
            await conn.close()
        found.update(r["id"] for r in rows)
    return found


async def _open(api: RouterApi, key: str, retried: Counter[str], currency: str = "EUR") -> httpx.Response:
    """What a client does: retries its open with the same key while the answer says to retry (counted by code)."""
    give_up = time.monotonic() + RETRY_FOR_S
    while True:
        response = await api.open_account(currency, key=key, region=REGION)
        code = response.json().get("code") if response.status_code >= 400 else None
        if code not in RETRIED_CODES_ALLOWED:
            return response
        retried[str(code)] += 1
        assert time.monotonic() < give_up, f"expected an answer within {RETRY_FOR_S}s, last: {response.text}"
        await asyncio.sleep(RETRY_INTERVAL_S)


async def _replayed(api: RouterApi, key: str, first: httpx.Response, what: str) -> None:
    again = await _open(api, key, Counter())
    assert again.status_code == 201 and again.json()["id"] == first.json()["id"], (
        f"expected the first account {first.json()['id']} again {what}, got {again.status_code}: {again.text}")
    assert again.headers.get("idempotent-replayed") == "true", (
        f"expected the retry {what} marked Idempotent-Replayed: true, got headers {dict(again.headers)}")


async def test_a_retried_open_replays_after_its_slot_moves_within_the_region_then_to_other_regions(
    moving_world: Any, topology: Topology, keys: SessionKeys,  # noqa: F811
) -> None:
    async with httpx.AsyncClient(base_url=moving_world.router.url, timeout=30) as http:
        client = new_client_id("openkey")
        api = RouterApi(http, client, keys.client_token(client))
        key = new_key()
        first = await api.open_account(key=key, region=REGION)
        assert first.status_code == 201, first.text
        slot = parse_account_id(first.json()["id"]).slot

        await _move(moving_world, topology, slot)
        await _replayed(api, key, first, "after its slot moved to the region's other shard")

        await _move(moving_world, topology, slot, ELSEWHERE)
        # Two retries at once, as a client whose first answer was lost may send them: both get the one account.
        await asyncio.gather(*(_replayed(api, key, first, f"after its slot moved on to {ELSEWHERE} in another region")
                               for _ in range(2)))
        other = await _open(api, key, Counter(), currency="USD")
        assert other.status_code == 422 and other.json()["code"] == "idempotency_key_reused", (
            f"expected another request under the key refused as its reuse after the move, got {other.text}")

        # Moved on again: the region's own record names eu-north-1, which names the slot's next owner.
        await _move(moving_world, topology, slot, FURTHER)
        await _replayed(api, key, first, f"after its slot moved on again to {FURTHER}")

        assert await _accounts_of(moving_world, client) == {first.json()["id"]}, (
            "expected exactly one account for the client's one key across all shards")


async def test_a_retried_open_replays_after_a_slot_earlier_in_its_probe_sequence_moves_into_the_region(
    moving_world: Any, topology: Topology, keys: SessionKeys,  # noqa: F811
) -> None:
    owned = owned_slots(topology, REGION)
    client = new_client_id("openkey")
    # A key whose first probe is a slot of another region, so the account lands on a later probe.
    key = next(k for k in (new_key() for _ in range(1_000)) if not owned[next(probe_sequence(client, k))])
    earlier = next(probe_sequence(client, key))
    async with httpx.AsyncClient(base_url=moving_world.router.url, timeout=30) as http:
        api = RouterApi(http, client, keys.client_token(client))
        first = await api.open_account(key=key, region=REGION)
        assert first.status_code == 201, first.text
        assert parse_account_id(first.json()["id"]).slot == placement_slot(client, key, owned) != earlier

        await _move(moving_world, topology, earlier, "euw1-a")

        async def region_owns_it() -> bool:
            # Routed to the slot's new owner, which answers for it (404: no such account) once it knows the slot.
            response = await api.account(new_account_id(earlier))
            return response.status_code == 404 and response.json()["code"] == "account_not_found"

        await poll_until(region_owns_it, timeout_s=30, what=f"{REGION} answering for slot {earlier}")
        await _replayed(api, key, first, f"after slot {earlier}, earlier in the key's sequence, moved into {REGION}")

        assert await _accounts_of(moving_world, client) == {first.json()["id"]}, (
            "expected exactly one account for the client's one key across all shards")


async def test_a_retried_open_is_refused_not_opened_again_while_the_region_holding_its_slot_cannot_be_asked(
    moving_world: Any, topology: Topology, keys: SessionKeys,  # noqa: F811
) -> None:
    async with httpx.AsyncClient(base_url=moving_world.router.url, timeout=30) as http:
        client = new_client_id("openkey")
        api = RouterApi(http, client, keys.client_token(client))
        key = new_key()
        first = await api.open_account(key=key, region=REGION)
        assert first.status_code == 201, first.text
        await _move(moving_world, topology, parse_account_id(first.json()["id"]).slot, ELSEWHERE)

        moving_world.services["eu-north-1"].kill()
        refused = await _open(api, key, Counter())
        assert refused.status_code == 503 and refused.json()["code"] == "region_unavailable", (
            f"expected 503 region_unavailable while the slot's region cannot be asked, got {refused.text}")
        assert await _accounts_of(moving_world, client) == {first.json()["id"]}, "expected nothing opened"

        moving_world.restart("eu-north-1")
        await _replayed(api, key, first, "once the slot's region answers again")
        assert await _accounts_of(moving_world, client) == {first.json()["id"]}, (
            "expected exactly one account for the client's one key across all shards")
