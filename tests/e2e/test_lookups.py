"""Lookups through the global endpoint (issue 12): transfers by the client's reference across every region,
and an account's transfers page by page (keyset cursor) without a skip or a repeat."""

from __future__ import annotations

from typing import Any

from app.local.processes import ServiceProcess
from app.topology.model import Topology
from tests.e2e.conftest import ROUTER_REGION, RouterApi
from tests.helpers import accounts_in_one_shard, new_key

DOWN = "us-east-1"


async def transfer_pages(api: RouterApi, account: str, **params: Any) -> list[dict[str, Any]]:
    """Every page of the account's transfers, walking the cursor; the items in the order listed."""
    items: list[dict[str, Any]] = []
    cursor = None
    for _ in range(1_000):
        query = {**params, **({"cursor": cursor} if cursor else {})}
        page = await api.get(f"/v1/accounts/{account}/transfers", params=query)
        assert page.status_code == 200, f"expected 200 listing transfers, got {page.status_code} {page.text}"
        items.extend(page.json()["items"])
        cursor = page.json()["next_cursor"]
        if cursor is None:
            return items
    raise AssertionError("transfer pagination did not end within 1000 pages")


async def test_a_reference_is_found_in_every_region_once_and_only_by_its_client(
    client_api: RouterApi, topology: Topology, keys: Any
) -> None:
    reference = "inv-" + new_key()[-12:]
    accounts = {}
    ids = set()
    for region in topology.regions:
        accounts[region.name] = (await client_api.open_account(region=region.name)).json()["id"]
        deposit = await client_api.deposit(accounts[region.name], 100, reference=reference)
        assert deposit.status_code == 201, deposit.text
        ids.add(deposit.json()["id"])
    # A saga: its debit shard and its credit shard both hold the transfer; it is listed once.
    other = next(r.name for r in topology.regions if r.name != ROUTER_REGION)
    saga = await client_api.transfer(accounts[ROUTER_REGION], accounts[other], 5, reference=reference)
    assert saga.status_code in (201, 202), saga.text
    ids.add(saga.json()["id"])
    await client_api.deposit(accounts[other], 1, reference=reference + "-not")
    found = await client_api.get("/v1/transfers", params={"reference": reference})
    assert found.status_code == 200, found.text
    listed = [t["id"] for t in found.json()["items"]]
    assert sorted(listed) == sorted(ids), f"expected each transfer with the reference once, got {listed}"
    assert "unavailable_regions" not in found.json(), found.json()
    stamps = [(t["created_at"], t["id"]) for t in found.json()["items"]]
    assert stamps == sorted(stamps, reverse=True), "expected newest first"
    limited = await client_api.get("/v1/transfers", params={"reference": reference, "limit": 2})
    assert [t["id"] for t in limited.json()["items"]] == listed[:2], limited.text
    stranger = RouterApi(client_api.http, "stranger", keys.client_token("other-" + new_key()[-8:]))
    hidden = await stranger.get("/v1/transfers", params={"reference": reference})
    assert hidden.status_code == 200 and hidden.json()["items"] == [], "expected another client to see none"
    bad = await client_api.get("/v1/transfers", params={"reference": "x" * 141})
    assert bad.status_code == 400 and bad.json()["code"] == "invalid_request", bad.text


async def test_an_accounts_transfers_page_without_skip_or_repeat_also_while_new_ones_arrive(
    client_api: RouterApi, topology: Topology
) -> None:
    _, (account, peer) = await accounts_in_one_shard(client_api, topology, 2)
    items: list[dict[str, Any]] = [
        {"type": "deposit", "account": account, "amount": 50, "currency": "EUR"} for _ in range(20)
    ] + [
        {"type": "transfer", "debit_account": account, "credit_account": peer, "amount": 1, "currency": "EUR"}
        for _ in range(9)
    ] + [{"type": "withdrawal", "account": account, "amount": 2, "currency": "EUR"} for _ in range(4)]
    seeded = await client_api.post("/v1/batches", {"atomic": False, "items": items}, key=new_key())
    assert seeded.status_code == 200 and all(i["status"] == 201 for i in seeded.json()["items"]), seeded.text
    back = await client_api.transfer(peer, account, 3)
    assert back.status_code == 201, back.text
    expected = {i["transfer"]["id"] for i in seeded.json()["items"]} | {back.json()["id"]}
    assert len(expected) == 34

    walked: list[dict[str, Any]] = []
    cursor = None
    for _ in range(100):
        page = await client_api.get(f"/v1/accounts/{account}/transfers",
                                    params={"limit": 7, **({"cursor": cursor} if cursor else {})})
        assert page.status_code == 200, page.text
        assert len(page.json()["items"]) <= 7
        walked.extend(page.json()["items"])
        # New transfers arrive between pages: they are newer than every listed one, so never on a later page.
        assert (await client_api.deposit(account, 1)).status_code == 201
        cursor = page.json()["next_cursor"]
        if cursor is None:
            break
    ids = [t["id"] for t in walked]
    assert len(ids) == len(set(ids)), "expected no transfer listed twice"
    assert set(ids) == expected, f"expected exactly the {len(expected)} transfers made before the walk"
    stamps = [(t["created_at"], t["id"]) for t in walked]
    assert stamps == sorted(stamps, reverse=True), "expected newest first"

    everything = await transfer_pages(client_api, account, limit=100)
    assert len(everything) == len(expected) + len(ids) // 7 + 1, "expected the deposits made during the walk too"
    posted = await transfer_pages(client_api, account, limit=3, state="posted")
    assert len(posted) == len(everything), "expected every transfer of a same-shard account posted"
    assert await transfer_pages(client_api, account, state="pending") == []
    middle = everything[len(everything) // 2]["created_at"]
    newer = await transfer_pages(client_api, account, limit=5, **{"from": middle})
    older = await transfer_pages(client_api, account, limit=5, to=middle)
    assert len(newer) + len(older) == len(everything), "expected [from, to) windows to split the list exactly"
    assert all(t["created_at"] >= middle for t in newer) and all(t["created_at"] < middle for t in older)


async def test_an_accounts_transfers_refuse_malformed_queries_and_other_clients(
    client_api: RouterApi, keys: Any
) -> None:
    account = await client_api.new_account()
    path = f"/v1/accounts/{account}/transfers"
    for params, code in (
        ({"limit": 0}, "invalid_request"),
        ({"limit": 101}, "invalid_request"),
        ({"cursor": "bm90LWEtY3Vyc29y"}, "invalid_cursor"),
        ({"from": "yesterday"}, "invalid_request"),
        ({"to": "2026-11-28T06:00:00"}, "invalid_request"),  # no offset: ambiguous
        ({"state": "lost"}, "invalid_request"),
    ):
        response = await client_api.get(path, params=params)
        assert response.status_code == 400 and response.json()["code"] == code, f"{params}: {response.text}"
    stranger = RouterApi(client_api.http, "stranger", keys.client_token("other-" + new_key()[-8:]))
    hidden = await stranger.get(path)
    assert hidden.status_code == 404 and hidden.json()["code"] == "account_not_found", hidden.text
    empty = await client_api.get(path, params={"from": "2026-01-01T00:00:00Z", "to": "2026-01-02T00:00:00+01:00"})
    assert empty.status_code == 200 and empty.json() == {"items": [], "next_cursor": None}, empty.text


async def test_a_reference_lookup_names_a_region_that_is_down_instead_of_passing_for_complete(
    client_api: RouterApi, topology: Topology, region_services: dict[str, ServiceProcess]
) -> None:
    reference = "down-" + new_key()[-12:]
    found_in = {}
    for region in topology.regions:
        account = (await client_api.open_account(region=region.name)).json()["id"]
        found_in[region.name] = (await client_api.deposit(account, 7, reference=reference)).json()["id"]
    victim = region_services[DOWN]
    victim.kill()
    try:
        partial = await client_api.get("/v1/transfers", params={"reference": reference})
    finally:
        victim.start()
        victim.wait_ready()
    assert partial.status_code == 200, partial.text
    assert partial.json()["unavailable_regions"] == [DOWN], partial.json()
    expected = {tid for region, tid in found_in.items() if region != DOWN}
    assert {t["id"] for t in partial.json()["items"]} == expected, partial.json()
    whole = await client_api.get("/v1/transfers", params={"reference": reference})
    assert {t["id"] for t in whole.json()["items"]} == set(found_in.values()), whole.json()
