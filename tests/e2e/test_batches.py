"""Batches through the global endpoint (issue 12, DESIGN D15): three regions as processes, each with its own
PostgreSQL, and a router in front. Atomic batches keep to one shard and post all or nothing; non-atomic
batches span regions and answer each item on its own, also while a region is down."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import httpx

from app.local.processes import ServiceProcess
from app.topology.model import Topology
from app.topology.placement import batch_home_slot
from tests.e2e.conftest import ROUTER_REGION, RouterApi
from tests.helpers import accounts_in_one_shard, new_key, shard_of

DOWN = "eu-north-1"


async def post_batch(api: RouterApi, items: list[dict[str, Any]], *, atomic: bool, key: str) -> httpx.Response:
    return await api.post("/v1/batches", {"atomic": atomic, "items": items}, key=key)


def transfer(debit: str, credit: str, amount: int, **extra: Any) -> dict[str, Any]:
    return {"type": "transfer", "debit_account": debit, "credit_account": credit, "amount": amount,
            "currency": "EUR", **extra}


def funds(kind: str, account: str, amount: int, **extra: Any) -> dict[str, Any]:
    return {"type": kind, "account": account, "amount": amount, "currency": "EUR", **extra}


async def balances(api: RouterApi, accounts: list[str]) -> dict[str, tuple[int, int]]:
    """Each account's balance and number of entries."""
    return {a: (await api.balance(a), len(await api.all_entries(a))) for a in accounts}


async def test_an_atomic_batch_with_one_refused_item_leaves_every_balance_unchanged(
    client_api: RouterApi, topology: Topology
) -> None:
    _, (a, b, c) = await accounts_in_one_shard(client_api, topology, 3)
    await client_api.funded(a, 1_000)
    before = await balances(client_api, [a, b, c])
    items = [transfer(a, b, 300), funds("deposit", c, 50), transfer(b, c, 100), funds("withdrawal", a, 701)]
    refused = await post_batch(client_api, items, atomic=True, key=new_key())
    assert refused.status_code == 422, f"expected 422 batch_refused, got {refused.status_code} {refused.text}"
    body = refused.json()
    assert body["code"] == "batch_refused", body
    codes = [item["code"] for item in body["items"]]
    # Judged in order: the withdrawal finds 700 left after the first transfer, and asks 701.
    assert codes == ["batch_item_not_posted"] * 3 + ["insufficient_funds"], codes
    assert await balances(client_api, [a, b, c]) == before, "expected no item of a refused atomic batch to post"


async def test_an_atomic_batch_posts_every_item_and_its_replay_is_exact(
    client_api: RouterApi, topology: Topology
) -> None:
    _, (a, b) = await accounts_in_one_shard(client_api, topology, 2)
    items = [funds("deposit", a, 500), transfer(a, b, 200, reference="r-1"), funds("withdrawal", b, 50)]
    key = new_key()
    first = await post_batch(client_api, items, atomic=True, key=key)
    assert first.status_code == 201, first.text
    assert [i["status"] for i in first.json()["items"]] == [201, 201, 201], first.text
    again = await post_batch(client_api, items, atomic=True, key=key)
    assert again.status_code == 201 and again.headers.get("idempotent-replayed") == "true", again.text
    assert again.json() == first.json(), "expected the replay to answer the stored batch exactly"
    assert (await client_api.balance(a), await client_api.balance(b)) == (300, 150), "expected each item once"
    other = await post_batch(client_api, items[:2], atomic=True, key=key)
    assert other.status_code == 422 and other.json()["code"] == "idempotency_key_reused", other.text


async def test_a_thousand_item_atomic_batch_posts_in_one_request(client_api: RouterApi, topology: Topology) -> None:
    # 25 accounts, as a batch of payouts or a settlement run would touch: every posting in one transaction
    # adds a row version of its accounts that the next posting of the same account walks past, so a batch on
    # fewer, hotter accounts costs more (README, bench batch).
    _, accounts = await accounts_in_one_shard(client_api, topology, 25)
    n = len(accounts)
    items = [funds("deposit", a, 100) for a in accounts]
    items += [transfer(accounts[i % n], accounts[(i + 1) % n], 1) for i in range(1_000 - n)]
    assert len(items) == 1_000
    response = await post_batch(client_api, items, atomic=True, key=new_key())
    assert response.status_code == 201, response.text[:500]
    assert len(response.json()["items"]) == 1_000
    ids = {item["transfer"]["id"] for item in response.json()["items"]}
    assert len(ids) == 1_000, "expected 1000 distinct transfers"
    # Each account: 100 in, then debited and credited 39 times each (975 transfers around the ring of 25).
    assert [await client_api.balance(a) for a in accounts] == [100] * n
    assert len(await client_api.all_entries(accounts[0])) == 1 + 39 + 39, "expected one entry per item naming it"


async def test_a_batch_with_a_duplicate_item_key_is_refused_before_anything_posts(
    client_api: RouterApi, topology: Topology
) -> None:
    _, (a, b) = await accounts_in_one_shard(client_api, topology, 2)
    items = [funds("deposit", a, 10, idempotency_key="dup"), funds("deposit", b, 10, idempotency_key="dup")]
    for atomic in (True, False):
        response = await post_batch(client_api, items, atomic=atomic, key=new_key())
        assert response.status_code == 422, response.text
        assert response.json()["code"] == "batch_duplicate_item_key", response.text
    key = new_key()
    response = await post_batch(client_api, [funds("deposit", a, 10, idempotency_key=key)], atomic=False, key=key)
    assert response.status_code == 422 and response.json()["code"] == "batch_duplicate_item_key", response.text
    unique = [funds("deposit", a, 1, reference="inv-9", unique_reference=True)] * 2
    response = await post_batch(client_api, unique, atomic=False, key=new_key())
    assert response.status_code == 422 and response.json()["code"] == "batch_duplicate_reference", response.text
    assert (await client_api.balance(a), await client_api.balance(b)) == (0, 0)


async def test_an_atomic_batch_across_shards_is_refused_and_a_non_atomic_one_runs_a_saga(
    client_api: RouterApi, topology: Topology
) -> None:
    here = (await client_api.open_account(region=ROUTER_REGION)).json()["id"]
    there = (await client_api.open_account(region="us-east-1")).json()["id"]
    await client_api.funded(here, 100)
    spans = await post_batch(client_api, [transfer(here, there, 10)], atomic=True, key=new_key())
    assert spans.status_code == 422 and spans.json()["code"] == "batch_spans_shards", spans.text
    saga = await post_batch(client_api, [transfer(here, there, 10)], atomic=False, key=new_key())
    assert saga.status_code == 200, saga.text
    item = saga.json()["items"][0]
    assert item["status"] in (201, 202) and item["transfer"]["state"] in ("pending", "posted"), item
    assert await client_api.balance(here) == 90


async def test_a_non_atomic_batch_across_three_regions_answers_the_live_ones_while_one_is_down(
    client_api: RouterApi, topology: Topology, region_services: dict[str, ServiceProcess]
) -> None:
    accounts = {}
    for region in topology.regions:
        opened = await client_api.open_account(region=region.name)
        assert opened.status_code == 201, opened.text
        accounts[region.name] = opened.json()["id"]
    order = [r.name for r in topology.regions] * 3
    items = [funds("deposit", accounts[region], 10 + i) for i, region in enumerate(order)]
    # A batch's key is bound to its body at the key's home (a hash of client and key): a key at home in a live
    # region, and one at home in the region that goes down.
    key = key_at_home(client_api, topology, lambda region: region != DOWN)
    homeless = key_at_home(client_api, topology, lambda region: region == DOWN)
    victim = region_services[DOWN]
    victim.kill()
    try:
        # The key's home is down: nothing can bind it, so nothing is sent; the whole batch is 503 (retry it).
        refused = await post_batch(client_api, items, atomic=False, key=homeless)
        assert refused.status_code == 503 and refused.json()["code"] == "region_unavailable", refused.text
        for region, account in accounts.items():
            if region != DOWN:
                assert await client_api.balance(account) == 0, f"expected nothing posted in {region}"
        response = await post_batch(client_api, items, atomic=False, key=key)
        assert response.status_code == 200, response.text
        results = response.json()["items"]
        assert len(results) == len(items)
        for region, result in zip(order, results, strict=True):
            if region == DOWN:
                assert (result["status"], result["code"]) == (503, "region_unavailable"), result
            else:
                assert result["status"] == 201 and result["transfer"]["amount"] > 0, result
        for region, account in accounts.items():
            if region != DOWN:
                expected = sum(10 + i for i, r in enumerate(order) if r == region)
                assert await client_api.balance(account) == expected, f"expected {region}'s deposits once"
    finally:
        victim.start()
        victim.wait_ready()
    # The client retries the same batch with the same key: the live regions' items replay, the others post.
    retried = await post_batch(client_api, items, atomic=False, key=key)
    assert retried.status_code == 200, retried.text
    for region, first, again in zip(order, results, retried.json()["items"], strict=True):
        assert again["status"] == 201, again
        if region != DOWN:
            assert again.get("replayed") is True and again["transfer"]["id"] == first["transfer"]["id"], again
    for region, account in accounts.items():
        expected = sum(10 + i for i, r in enumerate(order) if r == region)
        assert await client_api.balance(account) == expected, f"expected every deposit of {region} exactly once"


async def test_a_batch_key_reused_with_another_body_is_refused_wholly_and_posts_nothing(
    client_api: RouterApi, topology: Topology
) -> None:
    # A non-atomic batch spans regions and stores its items' answers where each item posts; its key is still
    # bound to its whole body (items, their order, the atomic flag), at the key's own home, before any item.
    accounts = {}
    for region in topology.regions:
        opened = await client_api.open_account(region=region.name)
        assert opened.status_code == 201, opened.text
        accounts[region.name] = opened.json()["id"]
    a, b, c = accounts.values()
    key = new_key()
    first = await post_batch(client_api, [funds("deposit", a, 10)], atomic=False, key=key)
    assert first.status_code == 200 and first.json()["items"][0]["status"] == 201, first.text
    reuses = [
        ([funds("deposit", a, 10), funds("deposit", b, 77)], False),  # one more item, in another region
        ([funds("deposit", b, 77)], False),  # nothing in common with the first body: no region in common
        ([funds("deposit", a, 10)], True),  # the same item, atomic
        ([funds("deposit", a, 11)], False),
    ]
    for items, atomic in reuses:
        reused = await post_batch(client_api, items, atomic=atomic, key=key)
        assert reused.status_code == 422, f"expected 422 idempotency_key_reused, got {reused.status_code} {reused.text}"
        assert reused.json()["code"] == "idempotency_key_reused", reused.text
    assert (await client_api.balance(a), await client_api.balance(b)) == (10, 0), "expected nothing posted by a reuse"
    again = await post_batch(client_api, [funds("deposit", a, 10)], atomic=False, key=key)
    assert again.status_code == 200 and again.headers.get("idempotent-replayed") == "true", again.text
    assert again.json()["items"][0]["transfer"]["id"] == first.json()["items"][0]["transfer"]["id"]

    # Across three regions: the same items in another order are another batch; the same batch replays.
    spread = [funds("deposit", a, 1), funds("deposit", b, 2), funds("deposit", c, 3)]
    key = new_key()
    posted = await post_batch(client_api, spread, atomic=False, key=key)
    assert posted.status_code == 200 and [i["status"] for i in posted.json()["items"]] == [201] * 3, posted.text
    reordered = await post_batch(client_api, spread[::-1], atomic=False, key=key)
    assert reordered.status_code == 422 and reordered.json()["code"] == "idempotency_key_reused", reordered.text
    replayed = await post_batch(client_api, spread, atomic=False, key=key)
    assert replayed.status_code == 200 and replayed.json()["items"] == [
        {**item, "replayed": True} for item in posted.json()["items"]], replayed.text
    assert [await client_api.balance(x) for x in (a, b, c)] == [11, 2, 3], "expected each deposit once"

    # An atomic batch's key is bound the same way: the same items sent non-atomic are refused.
    _, (d,) = await accounts_in_one_shard(client_api, topology, 1)
    key = new_key()
    atomic = await post_batch(client_api, [funds("deposit", d, 5)], atomic=True, key=key)
    assert atomic.status_code == 201, atomic.text
    loose = await post_batch(client_api, [funds("deposit", d, 5)], atomic=False, key=key)
    assert loose.status_code == 422 and loose.json()["code"] == "idempotency_key_reused", loose.text
    assert await client_api.balance(d) == 5


def key_at_home(api: RouterApi, topology: Topology, wanted: Callable[[str], bool]) -> str:
    """A fresh Idempotency-Key whose batch home (app.topology.placement.batch_home_slot) is in a region `wanted`."""
    for _ in range(1_000):
        key = new_key()
        if wanted(topology.shard_for_slot(batch_home_slot(api.client_id, key)).region):
            return key
    raise AssertionError("expected a key at home in the wanted region within 1000 tries")


async def test_a_unique_reference_is_refused_when_taken_on_the_same_account(
    client_api: RouterApi, topology: Topology
) -> None:
    shard, (a, b) = await accounts_in_one_shard(client_api, topology, 2)
    await client_api.funded(a, 100)
    body = {"debit_account": a, "credit_account": b, "amount": 5, "currency": "EUR", "reference": "payout-7",
            "unique_reference": True}
    key = new_key()
    first = await client_api.post("/v1/transfers", body, key=key)
    assert first.status_code == 201, first.text
    replay = await client_api.post("/v1/transfers", body, key=key)
    assert replay.status_code == 201 and replay.headers.get("idempotent-replayed") == "true", replay.text
    taken = await client_api.post("/v1/transfers", body)
    assert taken.status_code == 409 and taken.json()["code"] == "reference_in_use", taken.text
    assert taken.json()["transfer_id"] == first.json()["id"], taken.text
    # Another account's payments may use the same reference, and without the flag any reference may repeat.
    await client_api.funded(b, 5)
    other = await client_api.post("/v1/transfers", {**body, "debit_account": b, "credit_account": a})
    assert other.status_code == 201, other.text
    plain = await client_api.post("/v1/transfers", {**body, "unique_reference": False})
    assert plain.status_code == 201, plain.text
    in_batch = await post_batch(client_api, [transfer(a, b, 1, reference="payout-7", unique_reference=True)],
                                atomic=True, key=new_key())
    assert in_batch.status_code == 422 and in_batch.json()["items"][0]["code"] == "reference_in_use", in_batch.text
    assert await client_api.balance(a) == 100 - 5 + 5 - 5, "expected the refused postings to move nothing"
    assert shard_of(topology, a) == shard


async def test_batch_items_follow_the_single_requests_rules_holds_and_closed_accounts(
    client_api: RouterApi, topology: Topology
) -> None:
    _, (a, b, closed) = await accounts_in_one_shard(client_api, topology, 3)
    await client_api.funded(a, 100)
    shut = await client_api.post(f"/v1/accounts/{closed}/close", {})
    assert shut.status_code == 200, shut.text
    items = [transfer(a, b, 30, hold={"expires_in_s": 600}), transfer(a, b, 80), funds("deposit", closed, 5)]
    response = await post_batch(client_api, items, atomic=False, key=new_key())
    assert response.status_code == 200, response.text
    held, short, refused = response.json()["items"]
    assert held["status"] == 201 and held["transfer"]["state"] == "held", held
    # The hold reserves 30 of the 100: 80 more is not available (the same per-posting SQL as a single request).
    assert (short["status"], short["code"]) == (422, "insufficient_funds"), short
    assert (refused["status"], refused["code"]) == (422, "account_closed"), refused
    atomic = await post_batch(client_api, [transfer(a, b, 10), funds("deposit", closed, 5)], atomic=True,
                              key=new_key())
    assert atomic.status_code == 422 and [i["code"] for i in atomic.json()["items"]] == [
        "batch_item_not_posted", "account_closed"], atomic.text
    assert (await client_api.balance(a), await client_api.balance(b)) == (100, 0)
