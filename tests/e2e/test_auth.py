"""Authentication and authorization, end to end: each refusal has the right status and changes no balance.

Client tokens are checked at the router; regions accept only the router's internal tokens.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import time
from typing import Any

import httpx
import jwt
import pytest
from cryptography.hazmat.primitives.asymmetric import ed25519

from app.local.processes import ServiceProcess
from app.security import scopes
from app.security.tokens import INTERNAL_AUDIENCE, INTERNAL_ISSUER, mint_client_token
from app.topology.model import Topology
from tests.e2e.conftest import ROUTER_REGION, RouterApi
from tests.helpers import accounts_in_one_shard, new_client_id, new_key, shard_of
from tests.keys import CLIENT_KID, SessionKeys


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _unsigned(header: dict[str, Any], claims: dict[str, Any]) -> str:
    return _b64(json.dumps(header).encode()) + "." + _b64(json.dumps(claims).encode())


def _claims(client: str, **extra: Any) -> dict[str, Any]:
    now = int(time.time())
    return {"sub": client, "scope": " ".join(sorted(scopes.PUBLIC_SCOPES)), "iat": now, "exp": now + 600, **extra}


def forged_tokens(keys: SessionKeys, client: str) -> dict[str, str]:
    """Tokens naming `client` that must all be refused with 401."""
    stranger = ed25519.Ed25519PrivateKey.generate()
    hs_input = _unsigned({"alg": "HS256", "typ": "JWT", "kid": CLIENT_KID}, _claims(client))
    hs_signature = hmac.new(keys.client_public_pem.encode(), hs_input.encode(), hashlib.sha256).digest()
    valid = keys.client_token(client)
    head, _, signature = valid.split(".")
    tampered_body = _b64(json.dumps(_claims("someone-else")).encode())
    return {
        "malformed": "not-a-jwt",
        "bad_signature": jwt.encode(_claims(client), stranger, algorithm="EdDSA", headers={"kid": CLIENT_KID}),
        "alg_none": _unsigned({"alg": "none", "typ": "JWT", "kid": CLIENT_KID}, _claims(client)) + ".",
        "hs256_with_public_key": hs_input + "." + _b64(hs_signature),
        "tampered_claims": f"{head}.{tampered_body}.{signature}",
        "expired": jwt.encode(
            _claims(client, iat=int(time.time()) - 700, exp=int(time.time()) - 100),
            keys.client_private, algorithm="EdDSA", headers={"kid": CLIENT_KID},
        ),
        "unknown_kid": jwt.encode(_claims(client), keys.client_private, algorithm="EdDSA", headers={"kid": "nope"}),
        "no_exp": jwt.encode(
            {"sub": client, "scope": "accounts:read"}, keys.client_private, algorithm="EdDSA",
            headers={"kid": CLIENT_KID},
        ),
        "internal_token_as_client_token": keys.internal_token(client),
    }


@pytest.fixture
async def funded_pair(client_api: RouterApi, topology: Topology) -> tuple[str, str]:
    """Two accounts of the client in one shard (so a transfer between them reaches the ownership check)."""
    _, (debit, credit) = await accounts_in_one_shard(client_api, topology, 2)
    await client_api.funded(debit, 1_000)
    return debit, credit


async def balances(api: RouterApi, *accounts: str) -> list[int]:
    return [await api.balance(a) for a in accounts]


def _requests(debit: str, credit: str) -> list[tuple[str, str, dict[str, Any] | None]]:
    return [
        ("GET", f"/v1/accounts/{debit}", None),
        ("POST", "/v1/deposits", {"account": debit, "amount": 5, "currency": "EUR"}),
        ("POST", "/v1/withdrawals", {"account": debit, "amount": 5, "currency": "EUR"}),
        ("POST", "/v1/transfers", {"debit_account": debit, "credit_account": credit, "amount": 5, "currency": "EUR"}),
        ("POST", "/v1/accounts", {"currency": "EUR"}),
    ]


async def _call(
    http: httpx.AsyncClient, url: str, method: str, path: str, body: Any, token: str | None
) -> httpx.Response:
    headers = {"Idempotency-Key": new_key()}
    if token is not None:
        headers["Authorization"] = "Bearer " + token
    return await http.request(method, url + path, json=body, headers=headers)


async def test_requests_without_a_valid_client_token_get_401_and_change_nothing(
    client_api: RouterApi, funded_pair: tuple[str, str], keys: SessionKeys, router: ServiceProcess,
    http: httpx.AsyncClient,
) -> None:
    debit, credit = funded_pair
    tokens: dict[str, str | None] = {"missing": None, **forged_tokens(keys, client_api.client_id)}
    for name, token in tokens.items():
        for method, path, body in _requests(debit, credit):
            response = await _call(http, router.url, method, path, body, token)
            assert response.status_code == 401, f"{name}: expected 401 for {method} {path}, got {response.text}"
            assert response.json()["code"] == "unauthorized"
            assert response.headers.get("www-authenticate") == "Bearer"
            assert token is None or token not in response.text, "a token must never be echoed"
    assert await balances(client_api, debit, credit) == [1_000, 0]


async def test_a_token_without_the_routes_scope_gets_403_and_changes_nothing(
    client_api: RouterApi, funded_pair: tuple[str, str], keys: SessionKeys, router: ServiceProcess,
    http: httpx.AsyncClient,
) -> None:
    debit, credit = funded_pair
    needs = {"GET": scopes.ACCOUNTS_READ, "/v1/deposits": scopes.FUNDS_WRITE, "/v1/withdrawals": scopes.FUNDS_WRITE,
             "/v1/transfers": scopes.TRANSFERS_WRITE, "/v1/accounts": scopes.ACCOUNTS_WRITE}
    for method, path, body in _requests(debit, credit):
        needed = needs["GET"] if method == "GET" else needs[path]
        token = keys.client_token(client_api.client_id, scopes.PUBLIC_SCOPES - {needed} | {"internal"})
        response = await _call(http, router.url, method, path, body, token)
        assert response.status_code == 403, f"expected 403 for {method} {path} without {needed}, got {response.text}"
        assert response.json()["code"] == "forbidden"
    assert await balances(client_api, debit, credit) == [1_000, 0]


async def test_another_tenants_accounts_read_as_404_and_cannot_be_moved(
    client_api: RouterApi, funded_pair: tuple[str, str], keys: SessionKeys, router_http: httpx.AsyncClient,
    topology: Topology,
) -> None:
    debit, credit = funded_pair
    intruder_id = new_client_id("intruder")
    intruder = RouterApi(router_http, intruder_id, keys.client_token(intruder_id))
    own = None
    home = topology.shard(shard_of(topology, debit)).region
    for _ in range(40):  # the intruder's own account in the victim's shard, so only ownership can refuse
        candidate = (await intruder.open_account("EUR", region=home)).json()["id"]
        if shard_of(topology, candidate) == shard_of(topology, debit):
            own = candidate
            break
    assert own is not None, "expected an intruder account in the victim's shard within 40 opens"
    await intruder.funded(own, 100)
    assert (await intruder.account(debit)).status_code == 404
    assert (await intruder.entries(debit)).status_code == 404
    for response in (
        await intruder.transfer(debit, own, 5),  # take from the victim
        await intruder.transfer(own, credit, 5),  # push into the victim's account
        await intruder.withdraw(debit, 5),
        await intruder.deposit(debit, 5),
    ):
        assert response.status_code == 404, f"expected 404 for another tenant's account, got {response.text}"
        assert response.json()["code"] == "account_not_found"
    assert await balances(client_api, debit, credit) == [1_000, 0]
    assert await intruder.balance(own) == 100


async def test_direct_calls_to_a_region_need_a_valid_internal_token(
    client_api: RouterApi, funded_pair: tuple[str, str], keys: SessionKeys,
    region_services: dict[str, ServiceProcess], http: httpx.AsyncClient,
) -> None:
    debit, credit = funded_pair
    region = region_services[ROUTER_REGION].url
    stranger = ed25519.Ed25519PrivateKey.generate()
    now = int(time.time())
    internal = {"iss": INTERNAL_ISSUER, "aud": INTERNAL_AUDIENCE, "sub": client_api.client_id,
                "scope": " ".join(sorted(scopes.PUBLIC_SCOPES)), "iat": now, "exp": now + 60}
    tokens: dict[str, str | None] = {
        "missing": None,
        "forged": jwt.encode(internal, stranger, algorithm="EdDSA"),
        "expired": jwt.encode(
            {**internal, "iat": now - 120, "exp": now - 60}, keys.internal_private, algorithm="EdDSA"
        ),
        "wrong_audience": jwt.encode({**internal, "aud": "elsewhere"}, keys.internal_private, algorithm="EdDSA"),
        "alg_none": _unsigned({"alg": "none", "typ": "JWT"}, internal) + ".",
        "client_token": mint_client_token(keys.client_private, client=client_api.client_id,
                                          scopes=scopes.PUBLIC_SCOPES, lifetime_s=600),
    }
    for name, token in tokens.items():
        for method, path, body in _requests(debit, credit):
            response = await _call(http, region, method, path, body, token)
            assert response.status_code == 401, f"{name}: expected 401 for {method} {path}, got {response.text}"
        shardmap = await _call(http, region, "GET", "/internal/shardmap", None, token)
        assert shardmap.status_code == 401, f"{name}: expected 401 for the shard map, got {shardmap.status_code}"
    # A client's internal token (as the router mints for clients) does not open internal routes.
    client_hop = await _call(http, region, "GET", "/internal/shardmap", None, keys.internal_token(client_api.client_id))
    assert client_hop.status_code == 403
    assert await balances(client_api, debit, credit) == [1_000, 0]
