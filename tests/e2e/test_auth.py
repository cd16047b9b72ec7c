"""Authentication and authorization, end to end: each refusal has the right status and changes no balance.

Client tokens are checked at the router (issuer, namespace, lifetime, kid); regions accept for public routes
only a router's hop token bound to the very request (method, target, body digest, Idempotency-Key) AND the
client's own token, which they verify too and which the hop token must name (issue 9: the hop key alone, a
compromised router's, can act as no client).
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import time
from collections.abc import Callable
from typing import Any

import httpx
import jwt
import pytest
from cryptography.hazmat.primitives.asymmetric import ed25519

from app.local.processes import ServiceProcess
from app.security import scopes
from app.security.tokens import CLIENT_TOKEN_HEADER, HOP_AUDIENCE, HOP_ISSUER, BoundRequest, mint_client_token
from app.topology.ids import parse_account_id
from app.topology.model import Shard, Topology
from tests.e2e.conftest import ROUTER_REGION, RouterApi
from tests.helpers import accounts_in_one_shard, new_client_id, new_key, shard_of
from tests.keys import CLIENT_KID, PARTNER_PREFIX, TEST_ISSUER, SessionKeys, bound


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _unsigned(header: dict[str, Any], claims: dict[str, Any]) -> str:
    return _b64(json.dumps(header).encode()) + "." + _b64(json.dumps(claims).encode())


def _claims(client: str, **extra: Any) -> dict[str, Any]:
    now = int(time.time())
    return {"iss": TEST_ISSUER, "sub": client, "scope": " ".join(sorted(scopes.PUBLIC_SCOPES)), "iat": now,
            "exp": now + 600, **extra}


def _signed(keys: SessionKeys, claims: dict[str, Any], *, kid: str | None = CLIENT_KID) -> str:
    """Signed with the test issuer's real key: only the claims (or the missing kid) are wrong."""
    return jwt.encode(claims, keys.client_private, algorithm="EdDSA", headers={"kid": kid} if kid else None)


def policy_violations(keys: SessionKeys, client: str) -> dict[str, str]:
    """Tokens with a valid signature of a configured issuer that break the client-token rules (DESIGN D8)."""
    now = int(time.time())
    without = {name: {k: v for k, v in _claims(client).items() if k != name} for name in ("iat", "iss", "exp")}
    return {
        "no_iat": _signed(keys, without["iat"]),
        "no_iss": _signed(keys, without["iss"]),
        "lifetime_30_days": _signed(keys, _claims(client, iat=now - 60, exp=now - 60 + 30 * 24 * 3600)),
        "lifetime_just_over_24_h": _signed(keys, _claims(client, iat=now - 60, exp=now - 59 + 24 * 3600)),
        "future_iat": _signed(keys, _claims(client, iat=now + 600, exp=now + 1200)),
        "wrong_issuer_for_the_namespace": keys.partner_token(client),  # the partner may assert partner-* only
        "issuer_name_of_another_issuer": _signed(keys, _claims(client, iss="https://partner.test.txroute")),
        "kid_less_with_several_keys": _signed(keys, _claims(client), kid=None),
    }


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
        "hop_token_as_client_token": keys.hop_token(client, BoundRequest("GET", "/v1/accounts/x", b"")),
        **policy_violations(keys, client),
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


def test_the_partner_issuer_is_accepted_within_its_own_namespace(keys: SessionKeys, router: ServiceProcess) -> None:
    """The namespace rule cuts both ways: the partner issuer's own clients pass (so the refusals above are the
    namespace's, not a broken key), and the test issuer may not assert a partner client."""
    partner_client = new_client_id(PARTNER_PREFIX.rstrip("-"))
    assert partner_client.startswith(PARTNER_PREFIX)
    ok = httpx.post(router.url + "/v1/accounts", json={"currency": "EUR"},
                    headers={"authorization": "Bearer " + keys.partner_token(partner_client),
                             "idempotency-key": new_key()})
    assert ok.status_code == 201, ok.text
    account = ok.json()["id"]
    for token in (keys.client_token(partner_client), _signed(keys, _claims(partner_client), kid=None)):
        refused = httpx.get(router.url + f"/v1/accounts/{account}", headers={"authorization": "Bearer " + token})
        assert refused.status_code == 401, refused.text


TokenFor = Callable[[BoundRequest], str]


def shard_for(topology: Topology, account: str) -> Shard:
    return topology.shard_for_slot(parse_account_id(account).slot)


def _hop(keys: SessionKeys, client: str, **override: Any) -> TokenFor:
    """A hop-token factory: the claims a router would sign for the request, with `override` applied; the
    key is the session's hop key unless `key=` says otherwise."""
    key = override.pop("key", keys.hop_private)

    def token(request: BoundRequest) -> str:
        now = int(time.time())
        claims = {"iss": HOP_ISSUER, "aud": HOP_AUDIENCE, "sub": client,
                  "scope": " ".join(sorted(scopes.PUBLIC_SCOPES)), "iat": now, "exp": now + 10, **request.claims()}
        claims.update(override)
        return jwt.encode({k: v for k, v in claims.items() if v is not None}, key, algorithm="EdDSA")
    return token


async def _send(
    http: httpx.AsyncClient, url: str, method: str, path: str, body: Any, token_for: TokenFor | None,
    *, key: str | None = None, rewrite: Callable[[httpx.Request], httpx.Request] | None = None,
    client_token: str | None = None,
) -> httpx.Response:
    """A request whose token is made for it by `token_for` (then, if given, `rewrite` changes the request
    the token was made for: a replay), with `client_token` as the client's own token (None: none sent)."""
    headers = {"Idempotency-Key": key or new_key()}
    if client_token is not None:
        headers[CLIENT_TOKEN_HEADER] = "Bearer " + client_token
    request = http.build_request(method, url + path, json=body, headers=headers)
    if token_for is not None:
        request.headers["Authorization"] = "Bearer " + token_for(bound(request))
    if rewrite is not None:
        request = rewrite(request)
    return await http.send(request)


async def test_direct_calls_to_a_region_need_a_valid_hop_token(
    client_api: RouterApi, funded_pair: tuple[str, str], keys: SessionKeys,
    region_services: dict[str, ServiceProcess], http: httpx.AsyncClient,
) -> None:
    debit, credit = funded_pair
    region = region_services[ROUTER_REGION].url
    client = client_api.client_id
    now = int(time.time())
    tokens: dict[str, TokenFor | None] = {
        "missing": None,
        "forged": _hop(keys, client, key=ed25519.Ed25519PrivateKey.generate()),
        "signed_with_the_saga_key": _hop(keys, client, key=keys.saga_private),
        "expired": _hop(keys, client, iat=now - 120, exp=now - 60),
        "lives_a_minute": _hop(keys, client, iat=now, exp=now + 60),
        "issued_in_the_future": _hop(keys, client, iat=now + 30, exp=now + 40),
        "wrong_audience": _hop(keys, client, aud="elsewhere"),
        "wrong_issuer": _hop(keys, client, iss="txroute-saga"),
        "not_bound": _hop(keys, client, htm=None, htu=None, bdh=None),
        "alg_none": lambda request: _unsigned({"alg": "none", "typ": "JWT"}, {
            "iss": HOP_ISSUER, "aud": HOP_AUDIENCE, "sub": client, "iat": now, "exp": now + 10,
            "scope": " ".join(sorted(scopes.PUBLIC_SCOPES)), **request.claims()}) + ".",
        "client_token": lambda _: mint_client_token(keys.client_private, issuer=TEST_ISSUER, client=client,
                                                    scopes=scopes.PUBLIC_SCOPES, lifetime_s=600),
        "saga_token": lambda request: keys.saga_token("us-east-1", ROUTER_REGION, request),
    }
    own = keys.client_token(client)  # the client's valid token: every refusal below is the hop token's
    for name, token_for in tokens.items():
        for method, path, body in _requests(debit, credit):
            response = await _send(http, region, method, path, body, token_for, client_token=own)
            assert response.status_code == 401, f"{name}: expected 401 for {method} {path}, got {response.text}"
        shardmap = await _send(http, region, "GET", "/internal/shardmap", None, token_for)
        assert shardmap.status_code == 401, f"{name}: expected 401 for the shard map, got {shardmap.status_code}"
    # A client's hop token (as the router mints for clients) does not open internal routes.
    client_hop = await _send(http, region, "GET", "/internal/shardmap", None, _hop(keys, client))
    assert client_hop.status_code == 403
    router_hop = await _send(http, region, "GET", "/internal/shardmap", None, _hop(keys, "txroute-router",
                                                                                       scope="internal"))
    assert router_hop.status_code == 200, "the routers' own hop token reads the shard map"
    assert await balances(client_api, debit, credit) == [1_000, 0]


async def test_a_hop_token_replayed_for_another_method_path_body_or_key_is_refused(
    client_api: RouterApi, funded_pair: tuple[str, str], keys: SessionKeys,
    region_services: dict[str, ServiceProcess], http: httpx.AsyncClient, topology: Topology,
) -> None:
    """A hop token seen in transit buys exactly its own request: nothing else is read or written with it."""
    debit, credit = funded_pair
    region = region_services[shard_for(topology, debit).region].url  # the accounts' home: only it could apply
    hop = _hop(keys, client_api.client_id)
    deposit = {"account": debit, "amount": 5, "currency": "EUR"}
    key = new_key()
    own = keys.client_token(client_api.client_id)

    def moved(**change: Any) -> Callable[[httpx.Request], httpx.Request]:
        def rewrite(request: httpx.Request) -> httpx.Request:
            return http.build_request(
                change.get("method", request.method), change.get("url", str(request.url)),
                content=change.get("content", request.content),
                headers={**{k: v for k, v in request.headers.items() if k != "content-length"},
                         **change.get("headers", {})},
            )
        return rewrite

    replays = {
        "another_path": moved(url=region + "/v1/withdrawals"),
        "another_body": moved(content=json.dumps({**deposit, "amount": 500}).encode()),
        "another_idempotency_key": moved(headers={"idempotency-key": new_key()}),
        "another_account_read": moved(method="GET", url=region + f"/v1/accounts/{credit}", content=b""),
        "another_query": moved(method="GET", url=region + f"/v1/accounts/{debit}/entries?limit=1", content=b""),
    }
    for name, rewrite in replays.items():
        response = await _send(http, region, "POST", "/v1/deposits", deposit, hop, key=key, rewrite=rewrite,
                               client_token=own)
        assert response.status_code == 401, f"{name}: expected 401, got {response.status_code}: {response.text}"
        assert response.json()["code"] == "unauthorized" and "issued for another" in response.json()["detail"]
    # Another method on the same path and body: a token issued for GET /v1/deposits sent as a POST.
    as_get = _hop(keys, client_api.client_id, htm="GET")
    response = await _send(http, region, "POST", "/v1/deposits", deposit, as_get, client_token=own)
    assert response.status_code == 401 and "another method" in response.json()["detail"], response.text
    # An expired hop token, bound to its request, is refused too.
    now = int(time.time())
    expired = _hop(keys, client_api.client_id, iat=now - 30, exp=now - 20)
    response = await _send(http, region, "POST", "/v1/deposits", deposit, expired, client_token=own)
    assert response.status_code == 401 and "expired" in response.json()["detail"], response.text
    assert await balances(client_api, debit, credit) == [1_000, 0], "expected no replay to move money"
    # The token on its own request works, and the same request again is an idempotent replay: one effect.
    for _ in range(2):
        applied = await _send(http, region, "POST", "/v1/deposits", deposit, hop, key=key, client_token=own)
        assert applied.status_code == 201, applied.text
    assert await balances(client_api, debit, credit) == [1_005, 0]


async def test_the_hop_key_alone_cannot_act_as_a_client_so_a_compromised_router_mints_no_money(
    client_api: RouterApi, funded_pair: tuple[str, str], keys: SessionKeys,
    region_services: dict[str, ServiceProcess], http: httpx.AsyncClient, topology: Topology,
) -> None:
    """Issue 9: a deposit straight to the account's home region with a perfectly valid hop token (the router's
    key, bound to the request) is refused unless the client's own token comes along and names that client."""
    debit, credit = funded_pair
    region = region_services[shard_for(topology, debit).region].url
    victim = client_api.client_id
    other = new_client_id("other")
    deposit = {"account": debit, "amount": 500, "currency": "EUR"}
    forger = ed25519.Ed25519PrivateKey.generate()
    cases: dict[str, tuple[TokenFor, str | None]] = {
        "no_client_token": (_hop(keys, victim), None),
        "another_clients_token": (_hop(keys, victim), keys.client_token(other)),
        "hop_names_another_client": (_hop(keys, other), keys.client_token(victim)),
        "forged_with_a_stranger_key": (_hop(keys, victim), _signed_with(forger, _claims(victim))),
        "forged_with_the_hop_key": (_hop(keys, victim), _signed_with(keys.hop_private, _claims(victim))),
        "expired_client_token": (_hop(keys, victim), _signed(keys, _claims(victim, iat=int(time.time()) - 700,
                                                                           exp=int(time.time()) - 100))),
        "hop_token_as_client_token": (_hop(keys, victim), _hop(keys, victim)(BoundRequest("POST", "/", b""))),
    }
    for name, (hop, client_token) in cases.items():
        response = await _send(http, region, "POST", "/v1/deposits", deposit, hop, client_token=client_token)
        assert response.status_code == 401, f"{name}: expected 401, got {response.status_code}: {response.text}"
        assert response.json()["code"] == "unauthorized", response.text
    # Another client's token with a hop token naming it is that client: the victim's account is not theirs.
    response = await _send(http, region, "POST", "/v1/deposits", deposit, _hop(keys, other),
                           client_token=keys.client_token(other))
    assert response.status_code == 404 and response.json()["code"] == "account_not_found", response.text
    # The scopes are the client token's: a hop token granting funds:write does not widen a read-only client.
    read_only = keys.client_token(victim, {scopes.ACCOUNTS_READ})
    response = await _send(http, region, "POST", "/v1/deposits", deposit, _hop(keys, victim), client_token=read_only)
    assert response.status_code == 403, response.text
    assert await balances(client_api, debit, credit) == [1_000, 0], "expected no refused deposit to move money"
    # The client's own token with the router's hop token (what a router forwards) is served.
    applied = await _send(http, region, "POST", "/v1/deposits", deposit, _hop(keys, victim),
                          client_token=keys.client_token(victim))
    assert applied.status_code == 201, applied.text
    assert await balances(client_api, debit, credit) == [1_500, 0]


def _signed_with(key: ed25519.Ed25519PrivateKey, claims: dict[str, Any]) -> str:
    """A client token with the test issuer's kid and claims, signed by some other key."""
    return jwt.encode(claims, key, algorithm="EdDSA", headers={"kid": CLIENT_KID})
