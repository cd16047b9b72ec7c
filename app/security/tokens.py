"""Bearer tokens: client tokens (checked by the router) and internal hop tokens (router -> region).

Both are JWTs verified with PyJWT, with the algorithm pinned by the verifying key's type (`keys.algorithm_for`),
so `alg: none` and HS256 signed with the public key are refused. Every refusal is a `TokenRefused` whose
reason is safe to show (it never echoes the token).

    client token   sub = client id, scope = space-separated scopes, exp; signed by a client issuer whose
                   public key the router is configured with (selected by `kid`, else each key is tried)
    internal token iss = txroute-router, aud = txroute-region, sub, scope, iat, exp (short-lived); signed
                   by the internal key that only routers hold
"""

from __future__ import annotations

import re
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

import jwt

from app import limits
from app.security.keys import PrivateKey, PublicKey, algorithm_for
from app.security.scopes import PUBLIC_SCOPES

INTERNAL_ISSUER = "txroute-router"
INTERNAL_AUDIENCE = "txroute-region"
CLIENT_ID = re.compile(rf"^[A-Za-z0-9._-]{{1,{limits.CLIENT_ID_CHARS_MAX}}}$")


class TokenRefused(Exception):
    """The token is missing, malformed, forged or expired. `reason` is safe to show the caller."""

    def __init__(self, reason: str) -> None:
        self.reason = reason
        super().__init__(reason)


@dataclass(frozen=True, slots=True)
class Principal:
    client: str
    scopes: frozenset[str]
    expires_at: float


def bearer(header: str | None) -> str:
    """The token of an `Authorization: Bearer <token>` header."""
    if header is None:
        raise TokenRefused("send an Authorization: Bearer token")
    scheme, _, token = header.partition(" ")
    token = token.strip()
    if scheme.lower() != "bearer" or not token or len(token) > limits.CLIENT_TOKEN_CHARS_MAX:
        raise TokenRefused("the Authorization header must be 'Bearer <token>'")
    return token


class _VerifiedCache:
    """Tokens already verified, by their exact text. A hit still checks expiry; the cache never outlives it."""

    def __init__(self, entries_max: int = limits.TOKEN_CACHE_ENTRIES_MAX) -> None:
        self._entries: dict[str, Principal] = {}
        self._entries_max = entries_max

    def get(self, token: str, now: float) -> Principal | None:
        principal = self._entries.get(token)
        if principal is not None and principal.expires_at <= now:
            del self._entries[token]
            raise TokenRefused("the token has expired")
        return principal

    def put(self, token: str, principal: Principal) -> None:
        if len(self._entries) >= self._entries_max:
            self._entries.clear()
        self._entries[token] = principal


def _principal(claims: Mapping[str, object], *, leeway_s: float) -> Principal:
    sub, scope, exp = claims.get("sub"), claims.get("scope", ""), claims.get("exp")
    if not isinstance(sub, str) or not CLIENT_ID.match(sub):
        raise TokenRefused("the token's sub is not a valid client id")
    if not isinstance(scope, str):
        raise TokenRefused("the token's scope must be a space-separated string")
    assert isinstance(exp, int | float)  # PyJWT checked it is present and numeric
    return Principal(client=sub, scopes=frozenset(scope.split()), expires_at=float(exp) + leeway_s)


def _decode(token: str, key: PublicKey, **options: object) -> dict[str, object]:
    try:
        return jwt.decode(token, key, algorithms=[algorithm_for(key)], **options)  # type: ignore[arg-type]
    except jwt.ExpiredSignatureError:
        raise TokenRefused("the token has expired") from None
    except jwt.InvalidAlgorithmError:
        raise TokenRefused("the token's algorithm is not accepted") from None
    except jwt.InvalidSignatureError:
        raise TokenRefused("the token's signature is not valid") from None
    except jwt.MissingRequiredClaimError as exc:
        raise TokenRefused(f"the token has no {exc.claim!r} claim") from None
    except jwt.InvalidTokenError as exc:
        raise TokenRefused(f"the token is not valid ({type(exc).__name__})") from None


def _decode_any(token: str, keys: Sequence[PublicKey], **options: object) -> dict[str, object]:
    """Claims of a token signed by any of `keys` (several while a key is rotated)."""
    assert keys, "at least one key"
    refusal = TokenRefused("the token's signature is not valid")
    for key in keys:
        try:
            return _decode(token, key, **options)
        except TokenRefused as exc:
            if exc.reason != refusal.reason:
                raise  # expired, wrong audience...: a verdict on the token, not on which key signed it
            refusal = exc
    raise refusal


def _key_list(keys: PublicKey | Sequence[PublicKey]) -> list[PublicKey]:
    return list(keys) if isinstance(keys, Sequence) else [keys]


class ClientTokenVerifier:
    """Verifies client tokens against the configured issuer keys (`kid` -> public key, or keys while one is
    rotated)."""

    def __init__(self, keys: Mapping[str, PublicKey | Sequence[PublicKey]]) -> None:
        assert 1 <= len(keys) <= limits.CLIENT_KEYS_MAX, "between 1 and CLIENT_KEYS_MAX client keys"
        self._keys = {kid: _key_list(k) for kid, k in keys.items()}
        self._cache = _VerifiedCache()

    def verify(self, token: str, *, now: float | None = None) -> Principal:
        now = time.time() if now is None else now
        cached = self._cache.get(token, now)
        if cached is not None:
            return cached
        principal = _principal(self._claims(token), leeway_s=limits.CLIENT_TOKEN_LEEWAY_S)
        self._cache.put(token, principal)
        return principal

    def _claims(self, token: str) -> dict[str, object]:
        try:
            kid = jwt.get_unverified_header(token).get("kid")
        except jwt.InvalidTokenError:
            raise TokenRefused("the token is not a JWT") from None
        options = {"options": {"require": ["exp", "sub"]}, "leeway": limits.CLIENT_TOKEN_LEEWAY_S}
        if kid is not None:
            key = self._keys.get(kid) if isinstance(kid, str) else None
            if key is None:
                raise TokenRefused("the token's kid names no configured key")
            return _decode_any(token, key, **options)
        refusal = TokenRefused("the token's signature is not valid")
        for keys in self._keys.values():
            try:
                return _decode_any(token, keys, **options)
            except TokenRefused as exc:
                refusal = exc
        raise refusal


def mint_client_token(
    key: PrivateKey, *, client: str, scopes: Iterable[str], lifetime_s: int, kid: str | None = None
) -> str:
    """A client token, as an identity provider would issue it (dev issuer, `txroute token`, tests)."""
    assert CLIENT_ID.match(client), client
    assert 1 <= lifetime_s <= 30 * 24 * 3600, lifetime_s
    now = int(time.time())
    claims = {"sub": client, "scope": " ".join(sorted(scopes)), "iat": now, "exp": now + lifetime_s}
    return jwt.encode(claims, key, algorithm=algorithm_for(key), headers={"kid": kid} if kid else None)


class InternalTokenMinter:
    """Mints the router's hop tokens; one token per (client, scopes) is reused for part of its short life."""

    def __init__(self, key: PrivateKey, *, lifetime_s: int = limits.INTERNAL_TOKEN_LIFETIME_S) -> None:
        assert limits.INTERNAL_TOKEN_REFRESH_BEFORE_S < lifetime_s <= 300, lifetime_s
        self._key = key
        self._algorithm = algorithm_for(key)
        self._lifetime_s = lifetime_s
        self._cache: dict[tuple[str, frozenset[str]], tuple[str, float]] = {}

    def token(self, client: str, scopes: frozenset[str], *, now: float | None = None) -> str:
        now = time.time() if now is None else now
        cache_key = (client, scopes)
        cached = self._cache.get(cache_key)
        if cached is not None and cached[1] - now > limits.INTERNAL_TOKEN_REFRESH_BEFORE_S:
            return cached[0]
        issued = int(now)
        claims = {
            "iss": INTERNAL_ISSUER,
            "aud": INTERNAL_AUDIENCE,
            "sub": client,
            "scope": " ".join(sorted(scopes)),
            "iat": issued,
            "exp": issued + self._lifetime_s,
        }
        token = jwt.encode(claims, self._key, algorithm=self._algorithm)
        if len(self._cache) >= limits.TOKEN_CACHE_ENTRIES_MAX:
            self._cache.clear()
        self._cache[cache_key] = (token, float(issued + self._lifetime_s))
        return token

    def for_client(self, principal: Principal) -> str:
        """The hop token for a client's request: its id, and only its public scopes."""
        return self.token(principal.client, principal.scopes & PUBLIC_SCOPES)


class InternalTokenVerifier:
    """The regional service's check of hop tokens (against one key, or several while one is rotated)."""

    def __init__(self, key: PublicKey | Sequence[PublicKey]) -> None:
        self._keys = _key_list(key)
        self._cache = _VerifiedCache()

    def verify(self, token: str, *, now: float | None = None) -> Principal:
        now = time.time() if now is None else now
        cached = self._cache.get(token, now)
        if cached is not None:
            return cached
        claims = _decode_any(
            token,
            self._keys,
            audience=INTERNAL_AUDIENCE,
            issuer=INTERNAL_ISSUER,
            leeway=limits.INTERNAL_TOKEN_LEEWAY_S,
            options={"require": ["exp", "iat", "sub", "aud", "iss"]},
        )
        iat, exp = claims["iat"], claims["exp"]
        assert isinstance(iat, int | float) and isinstance(exp, int | float)
        if exp - iat > 300:
            raise TokenRefused("the internal token lives too long")
        principal = _principal(claims, leeway_s=limits.INTERNAL_TOKEN_LEEWAY_S)
        self._cache.put(token, principal)
        return principal
