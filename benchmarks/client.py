"""How benchmarks authenticate: to a regional service straight (a hop token bound to each request plus the
client's own token, as the router sends) or through the router (a client token). The keys are made once per
benchmark process."""

from __future__ import annotations

import functools

from cryptography.hazmat.primitives.asymmetric import ed25519

from app.config import ClientIssuerSettings
from app.security.keys import private_pem, public_pem
from app.security.scopes import PUBLIC_SCOPES
from app.security.tokens import CLIENT_TOKEN_HEADER, BoundRequest, HopTokenMinter, mint_client_token, request_target

CLIENT_KID = "bench"
CLIENT_ISSUER = "txroute-bench"


@functools.cache
def _keys() -> tuple[ed25519.Ed25519PrivateKey, ed25519.Ed25519PrivateKey, ed25519.Ed25519PrivateKey]:
    """(bench client issuer, hop, saga) private keys."""
    client, hop, saga = (ed25519.Ed25519PrivateKey.generate() for _ in range(3))
    return client, hop, saga


def _client_issuers() -> str:
    """The bench issuer's public key, trusted by routers and regions alike."""
    issuer = ClientIssuerSettings(keys={CLIENT_KID: public_pem(_keys()[0].public_key())}, client_prefix="")
    return ClientIssuerSettings.dumps({CLIENT_ISSUER: issuer})


def _client_token(client_id: str) -> str:
    return mint_client_token(_keys()[0], issuer=CLIENT_ISSUER, client=client_id, scopes=PUBLIC_SCOPES,
                             lifetime_s=3600, kid=CLIENT_KID)


def region_env() -> dict[str, str]:
    """What a regional service started by a benchmark needs to accept `Direct` calls and to sign (and accept)
    saga calls between the regions."""
    _, hop, saga = _keys()
    return {
        "TXROUTE_HOP_PUBLIC_KEY": public_pem(hop.public_key()),
        "TXROUTE_SAGA_PUBLIC_KEY": public_pem(saga.public_key()),
        "TXROUTE_SAGA_PRIVATE_KEY": private_pem(saga),
        "TXROUTE_CLIENT_ISSUERS": _client_issuers(),
    }


def router_env() -> dict[str, str]:
    """What a router started by a benchmark needs: the hop private key and the bench issuer's key."""
    return {
        "TXROUTE_HOP_PRIVATE_KEY": private_pem(_keys()[1]),
        "TXROUTE_CLIENT_ISSUERS": _client_issuers(),
    }


class Auth:
    """The Authorization header of one request: `Direct` (straight to a region) or `Routed` (via the router)."""

    def headers(self, method: str, path: str, body: bytes, idempotency_key: str | None) -> dict[str, str]:
        raise NotImplementedError


class Direct(Auth):
    """Straight to a region: a hop token bound to each request, minted by this (load-generating) process as
    the router would mint it, and the client's own token (one for every request) next to it."""

    def __init__(self, client_id: str) -> None:
        self.client_id = client_id
        self._minter = HopTokenMinter(_keys()[1])
        self.client_header = "Bearer " + _client_token(client_id)

    def headers(self, method: str, path: str, body: bytes, idempotency_key: str | None) -> dict[str, str]:
        path, _, query = path.partition("?")
        request = BoundRequest(method, request_target(path, query), body, idempotency_key)
        return {"authorization": "Bearer " + self._minter.token(self.client_id, PUBLIC_SCOPES, request),
                CLIENT_TOKEN_HEADER: self.client_header}

    @staticmethod
    def hop_key() -> ed25519.Ed25519PrivateKey:
        """The hop private key, for a compiled load generator that mints the same tokens (benchmarks/wrk.py)."""
        return _keys()[1]


class Routed(Auth):
    """Through the router: one client token with every public scope, for every request."""

    def __init__(self, client_id: str) -> None:
        self._headers = {"authorization": "Bearer " + _client_token(client_id)}

    def headers(self, method: str, path: str, body: bytes, idempotency_key: str | None) -> dict[str, str]:
        return self._headers
