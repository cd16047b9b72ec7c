"""Pure checks of token verification, route matching and the router's shard map (no processes)."""

from __future__ import annotations

import time

import jwt
import pytest
from cryptography.hazmat.primitives.asymmetric import ec, ed25519

from app.errors import Problem
from app.router.routes import Kind, match, read_slot
from app.router.shardmap import ShardMap
from app.security.scopes import PUBLIC_SCOPES
from app.security.tokens import (
    ClientTokenVerifier,
    InternalTokenMinter,
    InternalTokenVerifier,
    TokenRefused,
    mint_client_token,
)
from app.topology.loader import load_topology


def test_client_tokens_verify_with_either_ed25519_or_p256_keys_and_nothing_else() -> None:
    ed, p256 = ed25519.Ed25519PrivateKey.generate(), ec.generate_private_key(ec.SECP256R1())
    verifier = ClientTokenVerifier({"ed": ed.public_key(), "ec": p256.public_key()})
    for kid, key in (("ed", ed), ("ec", p256)):
        token = mint_client_token(key, client="c1", scopes={"accounts:read"}, lifetime_s=60, kid=kid)
        principal = verifier.verify(token)
        assert principal.client == "c1" and principal.scopes == {"accounts:read"}
    # The algorithm is the key's, not the token's: an ES256 token presented under the Ed25519 kid is refused.
    wrong = mint_client_token(p256, client="c1", scopes=(), lifetime_s=60, kid="ed")
    with pytest.raises(TokenRefused):
        verifier.verify(wrong)


def test_a_cached_token_is_refused_once_it_expires() -> None:
    key = ed25519.Ed25519PrivateKey.generate()
    verifier = ClientTokenVerifier({"k": key.public_key()})
    token = mint_client_token(key, client="c1", scopes=(), lifetime_s=10, kid="k")
    verifier.verify(token)
    with pytest.raises(TokenRefused, match="expired"):
        verifier.verify(token, now=time.time() + 60)


def test_internal_tokens_are_reused_briefly_and_refused_with_another_key() -> None:
    key = ed25519.Ed25519PrivateKey.generate()
    minter = InternalTokenMinter(key)
    now = time.time()
    first = minter.token("c1", frozenset(PUBLIC_SCOPES), now=now)
    assert minter.token("c1", frozenset(PUBLIC_SCOPES), now=now + 1) == first
    assert minter.token("c1", frozenset(PUBLIC_SCOPES), now=now + 40) != first, "expected a fresh token near expiry"
    assert InternalTokenVerifier(key.public_key()).verify(first).client == "c1"
    with pytest.raises(TokenRefused):
        InternalTokenVerifier(ed25519.Ed25519PrivateKey.generate().public_key()).verify(first)
    unsigned = jwt.encode({"sub": "c1", "exp": int(now) + 60}, key=None, algorithm="none")
    with pytest.raises(TokenRefused):
        InternalTokenVerifier(key.public_key()).verify(unsigned)


def test_routes_match_the_public_api_and_refuse_the_rest() -> None:
    assert match("POST", "/v1/transfers").kind is Kind.TRANSFER
    assert match("GET", "/v1/accounts/acc_x/entries").kind is Kind.READ_ACCOUNT
    for method, path, status in (("GET", "/v1/nope", 404), ("DELETE", "/v1/accounts/acc_x", 405),
                                 ("GET", "/v1/transfers", 405)):
        with pytest.raises(Problem) as caught:
            match(method, path)
        assert caught.value.status == status, f"expected {status} for {method} {path}"
    with pytest.raises(Problem) as caught:
        read_slot(match("GET", "/v1/accounts/not-an-id"))
    assert caught.value.code == "account_not_found"


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
