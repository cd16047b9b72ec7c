"""Transfers across shards and regions (DESIGN D6), against real region processes and real PostgreSQL."""

from __future__ import annotations

import asyncio
from typing import Any

import asyncpg
import httpx

from app.topology.ids import new_account_id
from tests.helpers import ApiClient, new_client_id, poll_until, shard_of
from tests.tls import verify

EUR = "EUR"


async def _pair(services: Any, debit_region: str, credit_region: str, client: str) -> tuple[ApiClient, ApiClient]:
    return (
        ApiClient(httpx.AsyncClient(base_url=services[debit_region].url, timeout=30, verify=verify()), client),
        ApiClient(httpx.AsyncClient(base_url=services[credit_region].url, timeout=30, verify=verify()), client),
    )


async def _close(*apis: ApiClient) -> None:
    for api in apis:
        await api.http.aclose()


async def test_transfer_across_regions_posts_on_the_fast_path_with_its_history(region_services):
    src, dst = await _pair(region_services, "eu-west-1", "us-east-1", new_client_id("saga"))
    try:
        a, b = await src.new_account(), await dst.new_account()
        await src.funded(a, 1_000)
        response = await src.transfer(a, b, 300, reference="invoice 7")
        assert response.status_code == 201, f"expected 201 on the fast path: {response.status_code} {response.text}"
        transfer = response.json()
        assert transfer["state"] == "posted" and transfer["credit_account"] == b
        assert await src.balance(a) == 700, "expected the source debited once"
        assert await dst.balance(b) == 300, "expected the destination credited once"
        shown = (await src.get(f"/v1/transfers/{transfer['id']}")).json()
        assert [h["state"] for h in shown["history"]] == ["pending", "posted"], shown
    finally:
        await _close(src, dst)


async def test_transfer_between_two_shards_of_one_region_runs_the_same_saga(region_services, topology):
    api = ApiClient(httpx.AsyncClient(base_url=region_services["eu-north-1"].url, timeout=30, verify=verify()),
                    new_client_id("saga"))
    try:
        by_shard: dict[str, str] = {}
        while len(by_shard) < 2:
            account = await api.new_account()
            by_shard.setdefault(shard_of(topology, account), account)
        a, b = by_shard["eun1-a"], by_shard["eun1-b"]
        await api.funded(a, 50)
        response = await api.transfer(a, b, 50)
        assert response.status_code == 201 and response.json()["state"] == "posted", response.text
        assert (await api.balance(a), await api.balance(b)) == (0, 50)
    finally:
        await _close(api)


async def test_a_replayed_cross_region_transfer_answers_its_final_state_without_a_second_effect(region_services):
    src, dst = await _pair(region_services, "eu-north-1", "eu-west-1", new_client_id("saga"))
    try:
        a, b = await src.new_account(), await dst.new_account()
        await src.funded(a, 100)
        first = await src.transfer(a, b, 60, key="k-replay")
        again = await src.transfer(a, b, 60, key="k-replay")
        assert again.status_code == first.status_code == 201, (first.text, again.text)
        assert again.headers.get("idempotent-replayed") == "true"
        assert again.json() == first.json(), "expected the replay to carry the identical body"
        assert (await src.balance(a), await dst.balance(b)) == (40, 60), "expected exactly one effect"
    finally:
        await _close(src, dst)


async def _closed_account(dsn: str, account: str) -> None:
    conn = await asyncpg.connect(dsn)
    try:
        await conn.execute("update accounts set status = 'closed' where id = $1", account)
    finally:
        await conn.close()


async def test_each_refusal_returns_the_money_and_says_why(region_services, pg_clusters, topology):
    client = new_client_id("refuse")
    src, dst = await _pair(region_services, "eu-west-1", "us-east-1", client)
    stranger = ApiClient(dst.http, new_client_id("stranger"))
    try:
        a = await src.new_account()
        await src.funded(a, 1_000)
        usd = await dst.new_account("USD")
        closed = await dst.new_account()
        shard = topology.shard(shard_of(topology, closed))
        await _closed_account(pg_clusters["us-east-1"].dsn(shard.database), closed)
        others = await stranger.new_account()
        cases = {
            "account_not_found": new_account_id(3000),  # a well-formed id that was never opened
            "currency_mismatch": usd,
            "account_closed": closed,
        }
        for reason, credit in cases.items():
            response = await src.transfer(a, credit, 100)
            assert response.status_code == 201, f"{reason}: expected 201, got {response.status_code}: {response.text}"
            body = response.json()
            assert (body["state"], body["reason"]) == ("returned", reason), f"expected returned/{reason}, got {body}"
        tenant = (await src.transfer(a, others, 100)).json()
        assert (tenant["state"], tenant["reason"]) == ("returned", "account_not_found"), (
            f"expected another client's account to read as not found, got {tenant}"
        )
        assert await src.balance(a) == 1_000, "expected every refused transfer's money back at the source"
        assert await stranger.balance(others) == 0, "expected nothing credited to another client's account"
        assert await dst.balance(usd) == 0
    finally:
        await _close(src, dst)


async def test_with_simulated_wan_latency_a_cross_region_transfer_still_posts(make_world):
    world = make_world({r: {"TXROUTE_WAN_LATENCY_MS": "40"} for r in ("eu-west-1", "us-east-1", "eu-north-1")})
    async with world.http("eu-west-1") as h1, world.http("us-east-1") as h2:
        client = new_client_id("wan")
        src, dst = ApiClient(h1, client), ApiClient(h2, client)
        a, b = await src.new_account(), await dst.new_account()
        await src.funded(a, 10)
        response = await src.transfer(a, b, 10)
        assert response.status_code == 201 and response.json()["state"] == "posted", response.text
        assert await dst.balance(b) == 10
    report = await world.audit()
    assert report.clean, report.text()


async def test_concurrent_opposite_cross_region_transfers_conserve_money(region_services, pg_clusters, topology):
    from app.local.stack import cluster_shard_dsns
    from app.ops.audit import audit

    client = new_client_id("both-ways")
    west, east = await _pair(region_services, "eu-west-1", "us-east-1", client)
    try:
        a, b = await west.new_account(), await east.new_account()
        await west.funded(a, 10_000)
        await east.funded(b, 10_000)
        results = await asyncio.gather(
            *(west.transfer(a, b, 7) for _ in range(40)), *(east.transfer(b, a, 5) for _ in range(40))
        )
        assert all(r.status_code in (201, 202) for r in results), [r.text for r in results if r.status_code >= 300]

        async def settled() -> bool:
            states = [(await (west if r.json()["debit_account"] == a else east).get(
                f"/v1/transfers/{r.json()['id']}")).json()["state"] for r in results]
            return all(s == "posted" for s in states)

        await poll_until(settled, timeout_s=30, what="every transfer posted")
        assert await west.balance(a) == 10_000 - 40 * 7 + 40 * 5
        assert await east.balance(b) == 10_000 + 40 * 7 - 40 * 5
    finally:
        await _close(west, east)
    report = await audit(cluster_shard_dsns(topology, pg_clusters))
    assert report.clean, report.text()

