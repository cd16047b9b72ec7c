"""The test session's signing keys, made once per process: a client issuer's key pair and the internal key
pair. Region processes get the internal public key (`region_env`); tests mint tokens with the private keys."""

from __future__ import annotations

import functools
from collections.abc import Iterable
from dataclasses import dataclass

from cryptography.hazmat.primitives.asymmetric import ed25519

from app.security.keys import private_pem, public_pem
from app.security.scopes import PUBLIC_SCOPES
from app.security.tokens import InternalTokenMinter, mint_client_token

CLIENT_KID = "test-issuer"


@dataclass(frozen=True)
class SessionKeys:
    client_private: ed25519.Ed25519PrivateKey
    internal_private: ed25519.Ed25519PrivateKey
    minter: InternalTokenMinter

    @property
    def client_public_pem(self) -> str:
        return public_pem(self.client_private.public_key())

    @property
    def internal_public_pem(self) -> str:
        return public_pem(self.internal_private.public_key())

    @property
    def internal_private_pem(self) -> str:
        return private_pem(self.internal_private)

    def client_token(self, client: str, scopes: Iterable[str] = PUBLIC_SCOPES, *, lifetime_s: int = 600) -> str:
        return mint_client_token(
            self.client_private, client=client, scopes=scopes, lifetime_s=lifetime_s, kid=CLIENT_KID
        )

    def internal_token(self, client: str, scopes: Iterable[str] = PUBLIC_SCOPES) -> str:
        return self.minter.token(client, frozenset(scopes))


@functools.cache
def session_keys() -> SessionKeys:
    internal = ed25519.Ed25519PrivateKey.generate()
    return SessionKeys(ed25519.Ed25519PrivateKey.generate(), internal, InternalTokenMinter(internal))


def region_env() -> dict[str, str]:
    """What a regional service process needs to accept the test session's internal tokens, and to sign its
    own saga calls to other regions."""
    keys = session_keys()
    return {
        "TXROUTE_INTERNAL_PUBLIC_KEY": keys.internal_public_pem,
        "TXROUTE_INTERNAL_PRIVATE_KEY": keys.internal_private_pem,
    }
