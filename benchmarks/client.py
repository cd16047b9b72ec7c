"""How benchmarks authenticate: to a regional service straight (an internal token, as the router sends) or
through the router (a client token). The keys are made once per benchmark process."""

from __future__ import annotations

import functools
import json

from cryptography.hazmat.primitives.asymmetric import ed25519

from app.security.keys import private_pem, public_pem
from app.security.scopes import PUBLIC_SCOPES
from app.security.tokens import InternalTokenMinter, mint_client_token

CLIENT_KID = "bench"


@functools.cache
def _keys() -> tuple[ed25519.Ed25519PrivateKey, ed25519.Ed25519PrivateKey, InternalTokenMinter]:
    internal = ed25519.Ed25519PrivateKey.generate()
    return ed25519.Ed25519PrivateKey.generate(), internal, InternalTokenMinter(internal)


def region_env() -> dict[str, str]:
    """What a regional service started by a benchmark needs to accept `auth_headers` and to sign its saga
    calls to the other regions."""
    internal = _keys()[1]
    return {
        "TXROUTE_INTERNAL_PUBLIC_KEY": public_pem(internal.public_key()),
        "TXROUTE_INTERNAL_PRIVATE_KEY": private_pem(internal),
    }


def router_env() -> dict[str, str]:
    """What a router started by a benchmark needs: the internal private key and the bench issuer's key."""
    client, internal, _ = _keys()
    return {
        "TXROUTE_INTERNAL_PRIVATE_KEY": private_pem(internal),
        "TXROUTE_CLIENT_PUBLIC_KEYS": json.dumps({CLIENT_KID: public_pem(client.public_key())}),
    }


def auth_headers(client_id: str) -> dict[str, str]:
    """Straight to a region: the internal token the router would send for this client."""
    return {"authorization": "Bearer " + _keys()[2].token(client_id, PUBLIC_SCOPES)}


def client_headers(client_id: str) -> dict[str, str]:
    """Through the router: a client token with every public scope."""
    token = mint_client_token(_keys()[0], client=client_id, scopes=PUBLIC_SCOPES, lifetime_s=3600, kid=CLIENT_KID)
    return {"authorization": "Bearer " + token}
