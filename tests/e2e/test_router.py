"""End to end through the router: three regions as separate processes, each with its own PostgreSQL."""

from __future__ import annotations

import shutil
from pathlib import Path

import httpx

from app.local.processes import ServiceProcess
from app.topology.ids import parse_account_id
from app.topology.model import Topology
from app.topology.placement import default_region
from tests.e2e.conftest import ROUTER_REGION, RouterApi, StartRouter
from tests.helpers import new_key
from tests.keys import HopAuth, SessionKeys


def home_region(topology: Topology, account_id: str) -> str:
    return topology.shard_for_slot(parse_account_id(account_id).slot).region


async def test_each_regions_accounts_are_opened_and_served_in_that_region(
    client_api: RouterApi, topology: Topology, region_services: dict[str, ServiceProcess], keys: SessionKeys,
    http: httpx.AsyncClient,
) -> None:
    for region in topology.regions:
        opened = await client_api.open_account("EUR", region=region.name)
        assert opened.status_code == 201, f"expected 201 opening in {region.name}, got {opened.text}"
        account = opened.json()["id"]
        assert opened.json()["region"] == region.name
        assert home_region(topology, account) == region.name, f"expected {account} to live in {region.name}"
        await client_api.funded(account, 500)
        assert await client_api.balance(account) == 500
        # The region itself holds it: read straight from its service with a hop token, as a router sends.
        direct = await http.get(
            f"{region_services[region.name].url}/v1/accounts/{account}", auth=HopAuth(client_api.client_id)
        )
        assert direct.status_code == 200 and direct.json()["balance"] == 500, direct.text
    key = new_key()
    default = await client_api.open_account("EUR", key=key)
    expected = default_region(client_api.client_id, key, [r.name for r in topology.regions])
    assert default.status_code == 201 and default.json()["region"] == expected, (
        f"expected an account opened without a region in {expected}, its (client, key)'s default: {default.text}"
    )


async def test_an_account_open_retried_through_another_regions_router_replays_the_same_account(
    client_api: RouterApi, topology: Topology, start_router: StartRouter,
) -> None:
    other_region = next(r.name for r in topology.regions if r.name != ROUTER_REGION)
    other = start_router("router-other-region", region=other_region)
    async with httpx.AsyncClient(base_url=other.url, timeout=30) as http:
        other_api = RouterApi(http, client_api.client_id, client_api.token)
        for _ in range(6):  # several keys, so some default to neither router's region
            key = new_key()
            first = await client_api.open_account("EUR", key=key)
            again = await other_api.open_account("EUR", key=key)
            assert first.status_code == 201, f"expected 201 opening through {ROUTER_REGION}'s router: {first.text}"
            assert again.status_code == 201 and again.headers.get("idempotent-replayed") == "true", (
                f"expected the retry through {other_region}'s router to replay, got {again.status_code} "
                f"{again.headers.get('idempotent-replayed')}: {again.text}"
            )
            assert again.json()["id"] == first.json()["id"], "expected the same account, not a second one"
            assert await other_api.balance(first.json()["id"]) == 0


async def test_transfer_through_the_router_moves_money_once(client_api: RouterApi, topology: Topology) -> None:
    debit = (await client_api.open_account("EUR", region=ROUTER_REGION)).json()["id"]
    credit = None
    for _ in range(40):  # placement hashes the key: open until one shares the debit account's shard
        candidate = (await client_api.open_account("EUR", region=ROUTER_REGION)).json()["id"]
        if topology.shard_for_slot(parse_account_id(candidate).slot) == topology.shard_for_slot(
            parse_account_id(debit).slot
        ):
            credit = candidate
            break
    assert credit is not None, "expected a second account in the same shard within 40 opens"
    await client_api.funded(debit, 1_000)
    key = new_key()
    first = await client_api.transfer(debit, credit, 300, key=key)
    again = await client_api.transfer(debit, credit, 300, key=key)
    assert first.status_code == 201, first.text
    assert again.status_code == 201 and again.headers.get("idempotent-replayed") == "true", again.text
    assert again.json()["id"] == first.json()["id"]
    assert (await client_api.balance(debit), await client_api.balance(credit)) == (700, 300)
    fetched = await client_api.get(f"/v1/transfers/{first.json()['id']}")
    assert fetched.status_code == 200 and fetched.json()["amount"] == 300, fetched.text


def stale_regions_dir(tmp_path: Path, topology: Topology, a: str, b: str) -> Path:
    """A copy of regions/ in which shards `a` and `b` (in different regions) have swapped slot ranges."""
    target = tmp_path / "regions-stale"
    shutil.copytree(Path(topology.regions[0].source).parent, target)
    shard_a, shard_b = topology.shard(a), topology.shard(b)
    for shard, other in ((shard_a, shard_b), (shard_b, shard_a)):
        path = target / f"{shard.region}.toml"
        old = "slots = [" + ", ".join(f'"{r}"' for r in shard.slots) + "]"
        new = "slots = [" + ", ".join(f'"{r}"' for r in other.slots) + "]"
        text = path.read_text()
        assert old in text, f"expected {old} in {path}"
        path.write_text(text.replace(old, new))
    return target


async def test_a_stale_router_is_corrected_by_421_and_writes_exactly_once(
    client_api: RouterApi, topology: Topology, tmp_path: Path, start_router: StartRouter, keys: SessionKeys,
) -> None:
    account = None
    for _ in range(40):
        candidate = (await client_api.open_account("EUR", region="eu-west-1")).json()["id"]
        if topology.shard_for_slot(parse_account_id(candidate).slot).name == "euw1-a":
            account = candidate
            break
    assert account is not None, "expected an account in shard euw1-a within 40 opens"
    # No periodic refresh: only the 421 may correct this router's map.
    stale = start_router("router-stale", regions_dir=stale_regions_dir(tmp_path, topology, "euw1-a", "use1-a"),
                         env={"TXROUTE_SHARDMAP_REFRESH_PERIOD_S": "0"})
    async with httpx.AsyncClient(base_url=stale.url, timeout=30) as http:
        stale_api = RouterApi(http, client_api.client_id, client_api.token)
        before = (await http.get("/readyz")).json()["shardmap_version"]
        key = new_key()
        first = await stale_api.deposit(account, 250, key=key)  # sent to us-east-1 first: 421, refresh, retry
        assert first.status_code == 201, f"expected the stale router to land the deposit, got {first.text}"
        after = (await http.get("/readyz")).json()["shardmap_version"]
        assert after == before + 1, f"expected one shard map refresh, versions {before} -> {after}"
        replay = await stale_api.deposit(account, 250, key=key)
        assert replay.status_code == 201 and replay.headers.get("idempotent-replayed") == "true", replay.text
        assert await stale_api.balance(account) == 250, "expected the deposit exactly once"
        entries = await stale_api.all_entries(account)
        assert len(entries) == 1, f"expected one entry, got {entries}"


async def test_the_router_serves_the_regions_openapi_surface_plus_health(
    router: ServiceProcess, region_services: dict[str, ServiceProcess], http: httpx.AsyncClient
) -> None:
    ours = (await http.get(router.url + "/openapi.json")).json()
    theirs = (await http.get(region_services[ROUTER_REGION].url + "/openapi.json")).json()
    public = {p for p in theirs["paths"] if p.startswith("/v1/")}
    assert public and public <= set(ours["paths"]), f"expected every public path of the region, got {ours['paths']}"
    assert {"/healthz", "/readyz"} <= set(ours["paths"])
    assert (await http.get(router.url + "/healthz")).status_code == 200
    assert (await http.get(router.url + "/readyz")).json()["status"] == "ready"


async def test_transfers_between_every_pair_of_regions_post_through_the_global_endpoint(
    client_api: RouterApi, topology: Topology
) -> None:
    accounts = {}
    for region in topology.regions:
        opened = await client_api.open_account("EUR", region=region.name)
        assert opened.status_code == 201, opened.text
        accounts[region.name] = opened.json()["id"]
        await client_api.funded(accounts[region.name], 1_000)
    moves = [(a, b) for a in accounts for b in accounts if a != b]
    for debit_region, credit_region in moves:
        response = await client_api.transfer(accounts[debit_region], accounts[credit_region], 10)
        assert response.status_code == 201, f"{debit_region}->{credit_region}: expected 201, got {response.text}"
        assert response.json()["state"] == "posted", response.json()
        shown = await client_api.get(f"/v1/transfers/{response.json()['id']}")
        assert shown.status_code == 200 and shown.json()["state"] == "posted", shown.text
    for region, account in accounts.items():
        # Each region sent 10 to, and received 10 from, each of the others.
        assert await client_api.balance(account) == 1_000, f"expected {region}'s balance unchanged net"


async def test_holds_closing_and_as_of_go_through_the_router_by_the_id_in_their_path(
    client_api: RouterApi, topology: Topology
) -> None:
    """Capture, void and close carry their id in the path, not the body: the router routes them by its slot
    (the accounts here are in other regions than the router's, so each write is forwarded)."""
    far = next(r.name for r in topology.regions if r.name != ROUTER_REGION)
    debit = (await client_api.open_account("EUR", region=far)).json()["id"]
    credit = (await client_api.open_account("EUR", region=far)).json()["id"]
    await client_api.funded(debit, 100)
    first = (await client_api.hold(debit, credit, 40)).json()
    second = (await client_api.hold(debit, credit, 60)).json()
    assert (first["state"], second["state"]) == ("held", "held"), (first, second)
    key = new_key()
    captured = await client_api.capture(first["id"], 25, key=key)
    assert captured.status_code in (201, 202) and captured.json()["amount"] == 25, captured.text
    replay = await client_api.capture(first["id"], 25, key=key)
    assert replay.headers.get("idempotent-replayed") == "true", replay.text
    voided = await client_api.void(second["id"])
    assert voided.status_code == 200 and voided.json()["state"] == "voided", voided.text
    closed = await client_api.close(debit)
    assert closed.status_code == 409 and closed.json()["code"] == "account_not_empty", closed.text
    then = (await client_api.get(f"/v1/transfers/{second['id']}")).json()["history"][0]["at"]
    as_of = await client_api.account(debit, as_of=then)
    assert (as_of.json()["balance"], as_of.json()["held"]) == (100, 100), as_of.text
    empty = await client_api.capture(second["id"])
    assert empty.status_code == 409 and empty.json()["code"] == "transfer_not_held", empty.text
