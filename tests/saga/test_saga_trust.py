"""The saga routes' trust boundary (DESIGN D8), as an attacker would try it (issue 9), against real region
processes and real PostgreSQL: a router's key signs nothing a saga route accepts, and a region vouches only
for the debits of its own shards.

Every attempt carries a well-formed saga message that, if applied, would credit a real account 500 EUR out
of nothing; each test checks every shard's ledger before and after.
"""

from __future__ import annotations

import itertools
import json
import time
from typing import Any

import httpx
import jwt

from app.config import RegionSettings
from app.local.postgres import Cluster
from app.local.processes import ServiceProcess
from app.local.stack import cluster_shard_dsns
from app.region.app import create_app
from app.security import scopes
from app.security.tokens import HOP_AUDIENCE, HOP_ISSUER, SAGA_ISSUER, BoundRequest, saga_audience
from app.topology.ids import new_transfer_id, parse_account_id
from app.topology.model import Topology
from tests.helpers import ApiClient, assert_shard_conserved, ledger_snapshot, new_client_id, shard_of
from tests.keys import SessionKeys, region_env
from tests.tls import verify

SAGA_ROUTES = ["/internal/saga/apply", "/internal/saga/apply-batch"]  # every region-to-region write (see below)
SAGA_READ_ROUTES = ["/internal/events"]  # every region-to-region read: another region's webhook worker
# Region-to-region reads by POST: a retried open asks where its key's slots moved (app/region/open_replay.py).
SAGA_READ_POST_ROUTES = ["/internal/replay-lookup"]
# Router-to-region routes, hop tokens only (app/router): the shard map, and a batch's key claim (DESIGN D15).
ROUTER_ROUTES = ["/internal/shardmap", "/internal/batch-claim"]
SOURCE, DESTINATION = "eu-west-1", "us-east-1"


async def _snapshot(pg_clusters: dict[str, Cluster], topology: Topology) -> dict[str, Any]:
    dsns = cluster_shard_dsns(topology, pg_clusters)
    return {shard: await ledger_snapshot(dsn) for shard, dsn in dsns.items()}


async def _conserved(pg_clusters: dict[str, Cluster], topology: Topology) -> None:
    for dsn in cluster_shard_dsns(topology, pg_clusters).values():
        await assert_shard_conserved(dsn)


async def _victim(region_services: dict[str, ServiceProcess], topology: Topology) -> tuple[dict[str, Any], str]:
    """A real debit account in SOURCE and credit account in DESTINATION of one client, and the message a
    SOURCE shard would send to credit 500 EUR (nothing was debited for it)."""
    client = new_client_id("victim")
    async with httpx.AsyncClient(base_url=region_services[SOURCE].url, timeout=30, verify=verify()) as h1, \
            httpx.AsyncClient(base_url=region_services[DESTINATION].url, timeout=30, verify=verify()) as h2:
        debit = await ApiClient(h1, client).new_account()
        credit = await ApiClient(h2, client).new_account()
    slot = parse_account_id(credit).slot
    message = {
        "transfer_id": new_transfer_id(parse_account_id(debit).slot), "client": client,
        "debit_account": debit, "credit_account": credit, "credit_slot": slot, "amount": 500,
        "currency": "EUR", "source_shard": shard_of(topology, debit), "destination_shard": shard_of(topology, credit),
    }
    return message, credit


def _router_key_tokens(keys: SessionKeys, request: BoundRequest, client: str) -> dict[str, str]:
    """Every kind of token the router's key (the hop key) can sign: any iss, aud, sub and scope, bound to
    the request or not."""
    now = int(time.time())
    tokens = {}
    issuers = [HOP_ISSUER, SAGA_ISSUER, "anything"]
    audiences = [HOP_AUDIENCE, saga_audience(DESTINATION), saga_audience(SOURCE), None]
    subjects = [SOURCE, DESTINATION, client, "txroute-router"]
    scope_sets = ["", scopes.INTERNAL, " ".join(sorted(scopes.PUBLIC_SCOPES)), "saga"]
    for iss, aud, sub, scope, bind in itertools.product(issuers, audiences, subjects, scope_sets, (True, False)):
        claims: dict[str, Any] = {"iss": iss, "sub": sub, "scope": scope, "iat": now, "exp": now + 10}
        if aud is not None:
            claims["aud"] = aud
        if bind:
            claims.update(request.claims())
        tokens[f"iss={iss} aud={aud} sub={sub} scope={scope!r} bound={bind}"] = jwt.encode(
            claims, keys.hop_private, algorithm="EdDSA"
        )
    return tokens


async def _post(http: httpx.AsyncClient, url: str, body: bytes, token: str) -> httpx.Response:
    return await http.post(url, content=body, headers={"authorization": "Bearer " + token,
                                                       "content-type": "application/json"})


async def test_no_token_the_routers_key_can_sign_is_accepted_on_any_saga_route_and_no_money_moves(
    region_services: dict[str, ServiceProcess], pg_clusters: dict[str, Cluster], topology: Topology,
    keys: SessionKeys,
) -> None:
    message, credit = await _victim(region_services, topology)
    body = json.dumps(message).encode()
    before = await _snapshot(pg_clusters, topology)
    async with httpx.AsyncClient(timeout=30, verify=verify()) as http:
        for route in SAGA_ROUTES:
            request = BoundRequest("POST", route, body)
            tokens = _router_key_tokens(keys, request, message["client"])
            assert len(tokens) >= 300
            for name, token in tokens.items():
                response = await _post(http, region_services[DESTINATION].url + route, body, token)
                assert response.status_code in (401, 403), f"{name}: expected 401/403 on {route}, got {response.text}"
    assert await _snapshot(pg_clusters, topology) == before, "expected no balance or entry to change"
    async with httpx.AsyncClient(base_url=region_services[DESTINATION].url, timeout=30, verify=verify()) as h:
        assert await ApiClient(h, message["client"]).balance(credit) == 0
    await _conserved(pg_clusters, topology)


async def test_a_saga_message_is_applied_only_from_the_region_owning_its_source_shard(
    region_services: dict[str, ServiceProcess], pg_clusters: dict[str, Cluster], topology: Topology,
    keys: SessionKeys,
) -> None:
    message, credit = await _victim(region_services, topology)
    url = region_services[DESTINATION].url + SAGA_ROUTES[0]
    other_source = next(s.name for s in topology.region("eu-north-1").shards)
    foreign_destination = next(s.name for s in topology.region("eu-north-1").shards)
    before = await _snapshot(pg_clusters, topology)
    cases: list[tuple[str, str, dict[str, Any], int, str]] = [
        # (what, calling region, message, status, code)
        ("caller does not own the source shard", "eu-north-1", message, 403, "forbidden"),
        ("caller claims another region's shard as source", SOURCE, {**message, "source_shard": other_source},
         403, "forbidden"),
        ("unknown source shard", SOURCE, {**message, "source_shard": "nowhere-a"}, 400, "unknown_shard"),
        ("unknown destination shard", SOURCE, {**message, "destination_shard": "nowhere-b"}, 400, "unknown_shard"),
        ("destination shard of another region", SOURCE, {**message, "destination_shard": foreign_destination},
         400, "unknown_shard"),
    ]
    async with httpx.AsyncClient(timeout=30, verify=verify()) as http:
        for what, caller, sent, status, code in cases:
            body = json.dumps(sent).encode()
            token = keys.saga_token(caller, DESTINATION, BoundRequest("POST", SAGA_ROUTES[0], body))
            response = await _post(http, url, body, token)
            assert response.status_code == status, f"{what}: expected {status}, got {response.text}"
            assert response.json()["code"] == code, response.text
        # A saga token addressed to another region, or replayed with another body, is refused as well.
        body = json.dumps(message).encode()
        elsewhere = keys.saga_token(SOURCE, "eu-north-1", BoundRequest("POST", SAGA_ROUTES[0], body))
        assert (await _post(http, url, body, elsewhere)).status_code == 401
        small = json.dumps({**message, "amount": 1}).encode()
        token = keys.saga_token(SOURCE, DESTINATION, BoundRequest("POST", SAGA_ROUTES[0], small))
        assert (await _post(http, url, body, token)).status_code == 401
        # Saga tokens open no other door: not the public API, not the routers' shard map.
        account = f"/v1/accounts/{credit}"
        claim = json.dumps({"key": "k-1", "fingerprint": "0" * 64}).encode()
        for method, path, sent in (("GET", account, b""), ("GET", ROUTER_ROUTES[0], b""),
                                   ("POST", ROUTER_ROUTES[1], claim)):
            token = keys.saga_token(SOURCE, DESTINATION, BoundRequest(method, path, sent))
            response = await http.request(method, region_services[DESTINATION].url + path, content=sent or None,
                                          headers={"authorization": "Bearer " + token,
                                                   "content-type": "application/json"})
            assert response.status_code == 401, f"{method} {path}: {response.text}"
    assert await _snapshot(pg_clusters, topology) == before, "expected nothing written by a refused message"
    await _conserved(pg_clusters, topology)


async def test_saga_routes_refuse_calls_without_a_token_or_with_a_client_token(
    region_services: dict[str, ServiceProcess], keys: SessionKeys,
) -> None:
    async with httpx.AsyncClient(timeout=30, verify=verify()) as http:
        url = region_services[DESTINATION].url + SAGA_ROUTES[0]
        missing = await http.post(url, content=b"{}", headers={"content-type": "application/json"})
        assert missing.status_code == 401 and missing.json()["code"] == "unauthorized"
        refused = await _post(http, url, b"{}", keys.client_token(new_client_id()))
        assert refused.status_code == 401 and refused.json()["code"] == "unauthorized"


def test_saga_routes_name_every_internal_route_the_regions_serve_to_each_other() -> None:
    """The attack tests above cover SAGA_ROUTES; a region-to-region route added later must join them. Every
    /internal/ route of the regional service is a saga route, but the routers' (hop tokens; a saga token is refused
    there, above)."""
    app = create_app(RegionSettings.from_env({
        **region_env(), "TXROUTE_REGION": SOURCE, "TXROUTE_DATABASE_URL": "postgresql://nobody@127.0.0.1:1",
    }))
    litestar = app.app
    internal = {route.path for route in litestar.routes if route.path.startswith("/internal/")}  # type: ignore[attr-defined]
    assert internal - set(ROUTER_ROUTES) == set(SAGA_ROUTES) | set(SAGA_READ_ROUTES) | set(SAGA_READ_POST_ROUTES), (
        sorted(internal))


async def test_no_token_the_routers_key_can_sign_reads_a_clients_events_across_regions(
    region_services: dict[str, ServiceProcess], keys: SessionKeys,
) -> None:
    """A region-to-region read names any client: the router's key must not open it, a saga token does."""
    client = new_client_id("victim")
    async with httpx.AsyncClient(timeout=30, verify=verify()) as http:
        for route in SAGA_READ_ROUTES:
            path = f"{route}?client={client}"
            url = region_services[DESTINATION].url + path
            for name, token in _router_key_tokens(keys, BoundRequest("GET", path, b""), client).items():
                response = await http.get(url, headers={"authorization": "Bearer " + token})
                assert response.status_code in (401, 403), f"{name}: expected 401/403 on {route}, got {response.text}"
            saga = keys.saga_token(SOURCE, DESTINATION, BoundRequest("GET", path, b""))
            response = await http.get(url, headers={"authorization": "Bearer " + saga})
            assert response.status_code == 200, response.text


async def test_no_token_the_routers_key_can_sign_reads_a_clients_stored_answers_across_regions(
    region_services: dict[str, ServiceProcess], keys: SessionKeys,
) -> None:
    """The replay lookup names any client and key: the router's key must not open it, a saga token does."""
    body = json.dumps({"client": new_client_id("victim"), "key": "k-1", "slots": [0, 2732]}).encode()
    async with httpx.AsyncClient(timeout=30, verify=verify()) as http:
        for route in SAGA_READ_POST_ROUTES:
            url = region_services[DESTINATION].url + route
            for name, token in _router_key_tokens(keys, BoundRequest("POST", route, body), "victim").items():
                response = await _post(http, url, body, token)
                assert response.status_code in (401, 403), f"{name}: expected 401/403 on {route}, got {response.text}"
            saga = keys.saga_token(SOURCE, DESTINATION, BoundRequest("POST", route, body))
            response = await _post(http, url, body, saga)
            assert response.status_code == 200, response.text
            assert [a["slot"] for a in response.json()["answers"]] == [0, 2732], (
                f"expected an answer for each slot asked, got {response.text}")
