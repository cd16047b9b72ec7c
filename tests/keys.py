"""The test session's signing keys, made once per process, one pair per trust domain (DESIGN D8): two client
issuers' (the test issuer, whose namespace is every client id, and a partner issuer owning `partner-*`), the
hop pair (routers sign, regions verify) and the saga pair (regions sign and verify). Region processes get
`region_env`, routers `router_env`; tests mint tokens with the private keys, each hop or saga token bound
to its request (`HopAuth` signs an httpx request the way the router does)."""

from __future__ import annotations

import asyncio
import functools
from collections.abc import AsyncGenerator, Generator, Iterable
from dataclasses import dataclass

import httpx
from cryptography.hazmat.primitives.asymmetric import ed25519

from app.config import ClientIssuerSettings
from app.security.keys import private_pem, public_pem
from app.security.scopes import PUBLIC_SCOPES
from app.security.tokens import (
    CLIENT_TOKEN_HEADER,
    BoundRequest,
    HopTokenMinter,
    SagaTokenMinter,
    mint_client_token,
    request_target,
)

CLIENT_KID = "test-issuer"
TEST_ISSUER = "https://issuer.test.txroute"
PARTNER_KID = "partner-key"
PARTNER_ISSUER = "https://partner.test.txroute"
PARTNER_PREFIX = "partner-"


@dataclass(frozen=True)
class SessionKeys:
    client_private: ed25519.Ed25519PrivateKey
    partner_private: ed25519.Ed25519PrivateKey
    hop_private: ed25519.Ed25519PrivateKey
    saga_private: ed25519.Ed25519PrivateKey

    @property
    def client_public_pem(self) -> str:
        return public_pem(self.client_private.public_key())

    @property
    def hop_public_pem(self) -> str:
        return public_pem(self.hop_private.public_key())

    @property
    def hop_private_pem(self) -> str:
        return private_pem(self.hop_private)

    @property
    def saga_public_pem(self) -> str:
        return public_pem(self.saga_private.public_key())

    @property
    def saga_private_pem(self) -> str:
        return private_pem(self.saga_private)

    def client_token(self, client: str, scopes: Iterable[str] = PUBLIC_SCOPES, *, lifetime_s: int = 600) -> str:
        return mint_client_token(
            self.client_private, issuer=TEST_ISSUER, client=client, scopes=scopes, lifetime_s=lifetime_s,
            kid=CLIENT_KID,
        )

    def partner_token(self, client: str, scopes: Iterable[str] = PUBLIC_SCOPES) -> str:
        return mint_client_token(
            self.partner_private, issuer=PARTNER_ISSUER, client=client, scopes=scopes, lifetime_s=600,
            kid=PARTNER_KID,
        )

    def hop_token(self, client: str, request: BoundRequest, scopes: Iterable[str] = PUBLIC_SCOPES) -> str:
        """The hop token a router would send for `client`'s `request`."""
        return HopTokenMinter(self.hop_private).token(client, frozenset(scopes), request)

    def saga_token(self, caller: str, destination: str, request: BoundRequest) -> str:
        """A saga token region `caller` would send to region `destination` for `request`."""
        return SagaTokenMinter(self.saga_private, caller).token(destination, request)

    def client_issuers(self) -> str:
        """TXROUTE_CLIENT_ISSUERS of routers and regions alike: both client issuers' public keys."""
        issuers = {
            TEST_ISSUER: ClientIssuerSettings(keys={CLIENT_KID: self.client_public_pem}, client_prefix=""),
            PARTNER_ISSUER: ClientIssuerSettings(
                keys={PARTNER_KID: public_pem(self.partner_private.public_key())}, client_prefix=PARTNER_PREFIX
            ),
        }
        return ClientIssuerSettings.dumps(issuers)

    def router_env(self) -> dict[str, str]:
        """A router's keys: both client issuers and the hop private key (never the saga key)."""
        return {"TXROUTE_CLIENT_ISSUERS": self.client_issuers(), "TXROUTE_HOP_PRIVATE_KEY": self.hop_private_pem}


# Signed requests one test HTTP client may have in flight at once: no more than its connection pool holds
# (tests/integration/conftest.py), so a token is signed when its request can be sent at once, as the router
# signs right before it forwards. Signed earlier, a request waiting for a pooled connection behind hundreds of
# others could outlive its token's seconds.
SIGNED_IN_FLIGHT_MAX = 64
_gates: dict[int, asyncio.Semaphore] = {}


class HopAuth(httpx.Auth):
    """Signs each httpx request with a hop token bound to it and sends the client's own token along, as the
    router does (direct calls to a region). The client token is minted once and reused, as a client's is."""

    def __init__(self, client: str, scopes: Iterable[str] = PUBLIC_SCOPES) -> None:
        self.client = client
        self.scopes = frozenset(scopes)
        self.client_token = session_keys().client_token(client, self.scopes)

    def _sign(self, request: httpx.Request) -> httpx.Request:
        request.headers["Authorization"] = "Bearer " + session_keys().hop_token(
            self.client, bound(request), self.scopes
        )
        request.headers[CLIENT_TOKEN_HEADER] = "Bearer " + self.client_token
        return request

    def sync_auth_flow(self, request: httpx.Request) -> Generator[httpx.Request, httpx.Response, None]:
        yield self._sign(request)

    async def async_auth_flow(self, request: httpx.Request) -> AsyncGenerator[httpx.Request, httpx.Response]:
        gate = _gates.setdefault(id(asyncio.get_running_loop()), asyncio.Semaphore(SIGNED_IN_FLIGHT_MAX))
        async with gate:
            yield self._sign(request)


def bound(request: httpx.Request) -> BoundRequest:
    """What a region will check a token for `request` against."""
    return BoundRequest(
        method=request.method,
        target=request_target(request.url.path, request.url.query),
        body=request.content,
        idempotency_key=request.headers.get("idempotency-key"),
    )


@functools.cache
def session_keys() -> SessionKeys:
    return SessionKeys(*(ed25519.Ed25519PrivateKey.generate() for _ in range(4)))


def region_env() -> dict[str, str]:
    """What a regional service process needs to accept the session's hop tokens and saga tokens, and to sign
    its own saga calls to other regions."""
    keys = session_keys()
    return {
        "TXROUTE_HOP_PUBLIC_KEY": keys.hop_public_pem,
        "TXROUTE_SAGA_PUBLIC_KEY": keys.saga_public_pem,
        "TXROUTE_SAGA_PRIVATE_KEY": keys.saga_private_pem,
        "TXROUTE_CLIENT_ISSUERS": keys.client_issuers(),
    }
