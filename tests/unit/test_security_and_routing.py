"""Pure checks of token verification, route matching and the router's shard map (no processes)."""

from __future__ import annotations

import time

import jwt
import pytest
from cryptography.hazmat.primitives.asymmetric import ec, ed25519

from app import limits
from app.errors import Problem
from app.router.routes import Kind, match, read_slot
from app.router.shardmap import ShardMap
from app.security import scopes
from app.security.scopes import PUBLIC_SCOPES
from app.security.tokens import (
    BoundRequest,
    ClientIssuer,
    ClientIssuers,
    HopTokenMinter,
    HopTokenVerifier,
    SagaTokenMinter,
    SagaTokenVerifier,
    TokenRefused,
    mint_client_token,
    request_target,
)
from app.topology.ids import new_account_id, new_transfer_id
from app.topology.loader import load_topology


def test_client_tokens_verify_with_either_ed25519_or_p256_keys_and_nothing_else() -> None:
    ed, p256 = ed25519.Ed25519PrivateKey.generate(), ec.generate_private_key(ec.SECP256R1())
    verifier = ClientIssuers([ClientIssuer("iss", {"ed": ed.public_key(), "ec": p256.public_key()}, "")])
    for kid, key in (("ed", ed), ("ec", p256)):
        token = mint_client_token(key, issuer="iss", client="c1", scopes={"accounts:read"}, lifetime_s=60, kid=kid)
        principal = verifier.verify(token)
        assert principal.client == "c1" and principal.scopes == {"accounts:read"}
    # The algorithm is the key's, not the token's: an ES256 token presented under the Ed25519 kid is refused.
    wrong = mint_client_token(p256, issuer="iss", client="c1", scopes=(), lifetime_s=60, kid="ed")
    with pytest.raises(TokenRefused):
        verifier.verify(wrong)


def test_a_cached_token_is_refused_once_it_expires() -> None:
    key = ed25519.Ed25519PrivateKey.generate()
    verifier = ClientIssuers([ClientIssuer("iss", {"k": key.public_key()}, "")])
    token = mint_client_token(key, issuer="iss", client="c1", scopes=(), lifetime_s=10, kid="k")
    verifier.verify(token)
    with pytest.raises(TokenRefused, match="expired"):
        verifier.verify(token, now=time.time() + 60)


def test_the_verified_token_cache_evicts_the_least_recently_used_and_reverifies_it() -> None:
    key = ed25519.Ed25519PrivateKey.generate()
    verifier = ClientIssuers([ClientIssuer("iss", {"k": key.public_key()}, "")], cache_entries_max=2)
    first, second, third = (mint_client_token(key, issuer="iss", client=f"c{i}", scopes=(), lifetime_s=60, kid="k")
                            for i in range(3))
    verifier.verify(first)
    verifier.verify(second)
    verifier.verify(first)  # used again: now `second` is the least recently used
    verifier.verify(third)
    cached = verifier._cache._entries
    assert list(cached) == [first, third], f"expected {second[:12]}... evicted, kept {len(cached)} entries"
    assert verifier.verify(second).client == "c1", "an evicted token is verified again, not refused"
    # A cached verdict is only ever one the keys gave: another issuer's verifier knows nothing of it.
    other = ClientIssuers([ClientIssuer("iss", {"k": ed25519.Ed25519PrivateKey.generate().public_key()}, "")])
    with pytest.raises(TokenRefused, match="signature"):
        other.verify(first)


def test_hop_and_saga_tokens_are_the_jws_pyjwt_makes() -> None:
    key = ed25519.Ed25519PrivateKey.generate()
    request = BoundRequest("POST", "/v1/deposits", b'{"amount": 5}', "key-1")
    now = int(time.time())
    claims = {"iss": "txroute-router", "aud": "txroute-region", "sub": "c1", "scope": " ".join(sorted(PUBLIC_SCOPES)),
              "iat": now, "exp": now + limits.HOP_TOKEN_LIFETIME_S, **request.claims()}
    assert HopTokenMinter(key).token("c1", PUBLIC_SCOPES, request, now=now) == jwt.encode(claims, key, "EdDSA")
    p256 = ec.generate_private_key(ec.SECP256R1())  # ECDSA: a raw r||s signature, as JWS wants
    assert HopTokenVerifier(p256.public_key()).verify(HopTokenMinter(p256).token("c1", PUBLIC_SCOPES, request),
                                                      request).client == "c1"
    saga = SagaTokenMinter(p256, "us-east-1").token("eu-west-1", request)
    assert SagaTokenVerifier(p256.public_key(), region="eu-west-1", peers={"us-east-1"}).verify(saga, request) \
        == "us-east-1"


def test_hop_tokens_are_bound_to_their_request_and_refused_with_another_key() -> None:
    key = ed25519.Ed25519PrivateKey.generate()
    minter, verifier = HopTokenMinter(key), HopTokenVerifier(key.public_key())
    request = BoundRequest("POST", "/v1/deposits", b'{"amount": 5}', "key-1")
    token = minter.token("c1", PUBLIC_SCOPES, request)
    assert minter.token("c1", PUBLIC_SCOPES, request, now=time.time() + 1) != token, "one token per request"
    assert verifier.verify(token, request).client == "c1"
    for other in (BoundRequest("PUT", "/v1/deposits", b'{"amount": 5}', "key-1"),
                  BoundRequest("POST", "/v1/withdrawals", b'{"amount": 5}', "key-1"),
                  BoundRequest("POST", "/v1/deposits", b'{"amount": 500}', "key-1"),
                  BoundRequest("POST", "/v1/deposits", b'{"amount": 5}', "key-2")):
        with pytest.raises(TokenRefused, match="issued for another"):
            verifier.verify(token, other)
    with pytest.raises(TokenRefused, match="expired"):
        verifier.verify(token, request, now=time.time() + 60)
    with pytest.raises(TokenRefused):
        HopTokenVerifier(ed25519.Ed25519PrivateKey.generate().public_key()).verify(token, request)
    unsigned = jwt.encode({"sub": "c1", "exp": int(time.time()) + 60}, key=None, algorithm="none")
    with pytest.raises(TokenRefused):
        verifier.verify(unsigned, request)
    # A saga token signed with the same key is still no hop token (issuer and audience differ), and back.
    saga = SagaTokenMinter(key, "us-east-1").token("eu-west-1", request)
    with pytest.raises(TokenRefused):
        verifier.verify(saga, request)
    saga_verifier = SagaTokenVerifier(key.public_key(), region="eu-west-1", peers=["eu-west-1", "us-east-1"])
    assert saga_verifier.verify(saga, request) == "us-east-1"
    with pytest.raises(TokenRefused):
        saga_verifier.verify(token, request)
    with pytest.raises(TokenRefused, match="audience"):  # addressed to another region
        SagaTokenVerifier(key.public_key(), region="us-east-1", peers=["eu-west-1"]).verify(saga, request)


def test_request_targets_survive_requoting_and_keep_distinct_queries_distinct() -> None:
    assert request_target("/v1/accounts/a", b"") == "/v1/accounts/a"
    assert request_target("/v1/accounts/a%5Fb", "limit=5&cursor=a%2Fb") == request_target(
        "/v1/accounts/a_b", b"limit=5&cursor=a/b")
    assert request_target("/x", "cursor=a%26limit%3D5") != request_target("/x", "cursor=a&limit=5")


def test_client_issuers_keep_to_their_namespace_and_refuse_ambiguous_configuration() -> None:
    dev, partner = ed25519.Ed25519PrivateKey.generate(), ed25519.Ed25519PrivateKey.generate()
    issuers = ClientIssuers([ClientIssuer("dev", {"d": dev.public_key()}, ""),
                             ClientIssuer("partner", {"p": partner.public_key()}, "partner-")])
    assert issuers.owner("partner-7") is not None and issuers.owner("partner-7").name == "partner"  # type: ignore[union-attr]
    assert issuers.owner("someone").name == "dev"  # type: ignore[union-attr]
    ok = mint_client_token(partner, issuer="partner", client="partner-7", scopes=(), lifetime_s=60, kid="p")
    assert issuers.verify(ok).client == "partner-7"
    for token, reason in (
        (mint_client_token(dev, issuer="dev", client="partner-7", scopes=(), lifetime_s=60, kid="d"), "may not"),
        (mint_client_token(partner, issuer="partner", client="someone", scopes=(), lifetime_s=60, kid="p"),
         "may not"),
        (mint_client_token(partner, issuer="dev", client="partner-7", scopes=(), lifetime_s=60, kid="p"), "issuer"),
        (mint_client_token(dev, issuer="dev", client="someone", scopes=(), lifetime_s=60), "no kid"),
    ):
        with pytest.raises(TokenRefused, match=reason):
            issuers.verify(token)
    with pytest.raises(ValueError, match="share the client_prefix"):
        ClientIssuers([ClientIssuer("a", {"a": dev.public_key()}, "x-"),
                       ClientIssuer("b", {"b": partner.public_key()}, "x-")])
    with pytest.raises(ValueError, match="two client issuers"):
        ClientIssuers([ClientIssuer("a", {"k": dev.public_key()}, "x-"),
                       ClientIssuer("b", {"k": partner.public_key()}, "y-")])


def test_routes_match_the_public_api_and_refuse_the_rest() -> None:
    assert match("POST", "/v1/transfers").kind is Kind.TRANSFER
    assert match("GET", "/v1/accounts/acc_x/entries").kind is Kind.READ_ACCOUNT
    assert match("GET", "/v1/transfers").kind is Kind.FIND_BY_REFERENCE  # ?reference=, asked of every region
    assert match("POST", "/v1/batches").kind is Kind.BATCH
    assert match("GET", "/v1/accounts/acc_x/transfers").kind is Kind.READ_ACCOUNT
    for method, path, status in (("GET", "/v1/nope", 404), ("DELETE", "/v1/accounts/acc_x", 405),
                                 ("DELETE", "/v1/transfers", 405), ("GET", "/v1/batches", 405)):
        with pytest.raises(Problem) as caught:
            match(method, path)
        assert caught.value.status == status, f"expected {status} for {method} {path}"
    with pytest.raises(Problem) as caught:
        read_slot(match("GET", "/v1/accounts/not-an-id"))
    assert caught.value.code == "account_not_found"


def test_writes_on_one_resource_route_by_the_slot_of_the_id_in_their_path() -> None:
    account = new_account_id(1500)
    transfer = new_transfer_id(2100)
    for path, kind, scope, slot in (
        (f"/v1/transfers/{transfer}/capture", Kind.CAPTURE, scopes.TRANSFERS_WRITE, 2100),
        (f"/v1/transfers/{transfer}/void", Kind.VOID, scopes.TRANSFERS_WRITE, 2100),
        (f"/v1/accounts/{account}/close", Kind.CLOSE_ACCOUNT, scopes.ACCOUNTS_WRITE, 1500),
    ):
        route = match("POST", path)
        assert (route.kind, route.scope, read_slot(route)) == (kind, scope, slot), path
        assert scopes.required_scope("POST", path) == scope, path
        with pytest.raises(Problem) as caught:
            match("GET", path)
        assert caught.value.status == 405, f"expected 405 for GET {path}"
    with pytest.raises(Problem) as caught:
        read_slot(match("POST", "/v1/transfers/trf_bad/capture"))
    assert caught.value.code == "transfer_not_found"
    with pytest.raises(Problem) as caught:
        match("POST", f"/v1/transfers/{transfer}/refund")
    assert caught.value.status == 404


def test_shard_map_claims_move_only_the_slots_a_region_claims() -> None:
    initial = ShardMap.from_topology(load_topology())
    assert initial.region_for_slot(1366) == "eu-west-1"
    moved = initial.with_claims(
        {"us-east-1": {"shards": [{"slots": [{"slot_lo": 1366, "slot_hi": 1400, "state": "owned"},
                                             {"slot_lo": 1401, "slot_hi": 1500, "state": "moving"}]}]}}
    )
    assert moved.version == initial.version + 1
    assert moved.region_for_slot(1366) == moved.region_for_slot(1400) == "us-east-1"
    assert moved.region_for_slot(1401) == "eu-west-1", "expected a slot not claimed as owned to stay"
    assert moved.region_for_slot(0) == initial.region_for_slot(0)


def test_tokens_with_non_numeric_times_are_refused_not_crashed_on() -> None:
    """PyJWT accepts `"iat": "1700000000"` (it calls int() on it); the lifetime checks must refuse such a
    token with a reason, not fail on it (an AssertionError is a 500 at the router and at the region)."""
    key = ed25519.Ed25519PrivateKey.generate()
    issuers = ClientIssuers([ClientIssuer("iss", {"k": key.public_key()}, "")])
    hop = HopTokenVerifier(key.public_key())
    saga = SagaTokenVerifier(key.public_key(), region="eu-west-1", peers=["us-east-1"])
    request = BoundRequest("POST", "/v1/deposits", b"{}", "key-1")
    now = int(time.time())
    for times in ({"iat": str(now), "exp": now + 60}, {"iat": now, "exp": str(now + 60)}):
        client = jwt.encode({"iss": "iss", "sub": "c1", **times}, key, algorithm="EdDSA", headers={"kid": "k"})
        with pytest.raises(TokenRefused, match="numeric"):
            issuers.verify(client)
        bound = {"sub": "c1", **request.claims(), **times}
        with pytest.raises(TokenRefused, match="numeric"):
            hop.verify(jwt.encode({"iss": "txroute-router", "aud": "txroute-region", **bound}, key,
                                  algorithm="EdDSA"), request)
        with pytest.raises(TokenRefused, match="numeric"):
            saga.verify(jwt.encode({"iss": "txroute-saga", "aud": "txroute-saga/eu-west-1", **bound,
                                    "sub": "us-east-1"}, key, algorithm="EdDSA"), request)


def test_a_key_setting_that_is_neither_pem_nor_a_file_is_never_echoed() -> None:
    """A private key pasted with a stray quote (or escaped newlines) is not PEM text, so it is read as a file
    name; the error (logged at start) must name the setting, never hold the key."""
    from app.security.keys import KeyConfigError, load_private_key, private_pem

    pem = private_pem(ed25519.Ed25519PrivateKey.generate())
    body = pem.splitlines()[1]
    for value in ('"' + pem + '"', pem.replace("\n", "\\n").replace("-----BEGIN", " x-----BEGIN"), body):
        with pytest.raises(KeyConfigError) as caught:
            load_private_key(value, what="TXROUTE_SAGA_PRIVATE_KEY")
        assert "TXROUTE_SAGA_PRIVATE_KEY" in str(caught.value)
        assert body not in str(caught.value) and body[:16] not in str(caught.value)


def test_a_client_prefix_ends_at_a_separator_so_it_cannot_take_lookalike_ids() -> None:
    """A prefix "acme" would own "acme2" and "acmex" (ids another issuer's tenants, e.g. the catch-all's,
    may already hold): a non-empty prefix must end with '.', '-' or '_'."""
    dev, acme = ed25519.Ed25519PrivateKey.generate(), ed25519.Ed25519PrivateKey.generate()
    for prefix in ("acme", "acme2", "a"):
        with pytest.raises(ValueError, match="must end with"):
            ClientIssuers([ClientIssuer("dev", {"d": dev.public_key()}, ""),
                           ClientIssuer("acme", {"a": acme.public_key()}, prefix)])
    issuers = ClientIssuers([ClientIssuer("dev", {"d": dev.public_key()}, ""),
                             ClientIssuer("acme", {"a": acme.public_key()}, "acme-")])
    for lookalike in ("acme", "acme2", "acmex", "acme_1"):
        assert issuers.owner(lookalike).name == "dev", lookalike  # type: ignore[union-attr]
        token = mint_client_token(acme, issuer="acme", client=lookalike, scopes=(), lifetime_s=60, kid="a")
        with pytest.raises(TokenRefused, match="may not"):
            issuers.verify(token)
    assert issuers.owner("acme-7").name == "acme"  # type: ignore[union-attr]
