"""Bearer tokens of the three trust domains (DESIGN D8), each its own key pair, issuer and audience.

All are JWTs verified with PyJWT, the algorithm pinned by the verifying key's type (`keys.algorithm_for`), so
`alg: none` and HS256 signed with the public key are refused. Every refusal is a `TokenRefused` whose reason
is safe to show (it never echoes the token).

    client token  client -> router. iss = a configured issuer, sub = client id, scope, iat, exp; signed by
                  that issuer's key (selected by `kid`; required when more than one key is configured). The
                  issuer may only assert client ids of its own namespace, the lifetime is bounded and iat is
                  not in the future (`ClientIssuers`).
    hop token     router -> region. iss = txroute-router, aud = txroute-region, sub = client id (or the router
                  itself), scope, iat, exp (seconds), bound to one request: htm = method, htu = request target
                  (`request_target`), bdh = SHA-256 of the body, idk = the Idempotency-Key header. Signed by
                  the hop key, which only routers hold; one token per request, never reused. It travels
                  WITH the client's own token (`CLIENT_TOKEN_HEADER`): a region checks both, takes the client
                  id and scopes from the client token, and refuses a hop token whose sub is another client,
                  so the hop key alone can never act as a client (`client_behind_hop`).
    saga token    region -> region. iss = txroute-saga, aud = txroute-saga/<destination region>, sub = the
                  calling region, bound to its request like a hop token. Signed by the saga key, which only
                  regions hold: a router's key can sign nothing a saga route accepts.
"""

from __future__ import annotations

import base64
import hashlib
import json
import re
import time
from collections import OrderedDict
from collections.abc import Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any
from urllib.parse import parse_qsl, unquote, urlencode

import jwt
import msgspec

from app import limits
from app.security.keys import PrivateKey, PublicKey, algorithm_for, load_public_keys
from app.security.scopes import PUBLIC_SCOPES

if TYPE_CHECKING:
    from app.config import ClientIssuerSettings

HOP_ISSUER = "txroute-router"
HOP_AUDIENCE = "txroute-region"
SAGA_ISSUER = "txroute-saga"
CLIENT_ID = re.compile(rf"^[A-Za-z0-9._-]{{1,{limits.CLIENT_ID_CHARS_MAX}}}$")
# A client-id namespace is a prefix of client ids: the same characters, possibly empty (every id).
CLIENT_PREFIX = re.compile(rf"^[A-Za-z0-9._-]{{0,{limits.CLIENT_ID_CHARS_MAX}}}$")
# A non-empty namespace ends at one of these, so that a prefix never owns lookalike ids ("acme" vs "acme2").
PREFIX_SEPARATORS = ".-_"
_BOUND_CLAIMS = ("htm", "htu", "bdh")
# The header a router forwards the client's own bearer token in, next to its hop token in `authorization`.
CLIENT_TOKEN_HEADER = "x-client-authorization"  # noqa: S105 (a header name)


def saga_audience(region: str) -> str:
    """The audience of saga tokens addressed to `region`: a token for one region is refused by the others."""
    return f"{SAGA_ISSUER}/{region}"


class TokenRefused(Exception):
    """The token is missing, malformed, forged, expired or not for this request. `reason` is safe to show."""

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


# Request binding (hop and saga tokens) -------------------------------------------------------------------


def request_target(path: str, query: str | bytes = "") -> str:
    """The `htu` of a request: its percent-decoded path, then its query as the parsed pairs re-encoded. Both
    ends compute it from what they see, so an HTTP client re-quoting the URL on the way changes nothing, and
    two targets that a server would read differently never share one."""
    if isinstance(query, bytes):
        query = query.decode("latin-1")
    decoded = unquote(path)
    if not query:
        return decoded
    return decoded + "?" + urlencode(parse_qsl(query, keep_blank_values=True))


def body_digest(body: bytes) -> str:
    """The `bdh` of a request: base64url (no padding) of the SHA-256 of the exact body bytes."""
    return base64.urlsafe_b64encode(hashlib.sha256(body).digest()).rstrip(b"=").decode()


@dataclass(frozen=True, slots=True)
class BoundRequest:
    """What a hop or saga token is bound to: the request as the verifying service received it."""

    method: str
    target: str  # request_target(path, query)
    body: bytes
    idempotency_key: str | None = None

    def claims(self) -> dict[str, str]:
        claims = {"htm": self.method, "htu": self.target, "bdh": body_digest(self.body)}
        if self.idempotency_key is not None:
            claims["idk"] = self.idempotency_key
        return claims

    def check(self, claims: Mapping[str, object]) -> None:
        if claims.get("htm") != self.method:
            raise TokenRefused("the token was issued for another method")
        if claims.get("htu") != self.target:
            raise TokenRefused("the token was issued for another path")
        if claims.get("bdh") != body_digest(self.body):
            raise TokenRefused("the token was issued for another body")
        if claims.get("idk") != self.idempotency_key:
            raise TokenRefused("the token was issued for another Idempotency-Key")


# Decoding --------------------------------------------------------------------------------------------


def _decode(token: str, key: PublicKey, **options: Any) -> dict[str, object]:
    try:
        return jwt.decode(token, key, algorithms=[algorithm_for(key)], **options)
    except jwt.ExpiredSignatureError:
        raise TokenRefused("the token has expired") from None
    except jwt.ImmatureSignatureError:
        raise TokenRefused("the token is issued in the future") from None
    except jwt.InvalidAlgorithmError:
        raise TokenRefused("the token's algorithm is not accepted") from None
    except jwt.InvalidSignatureError:
        raise TokenRefused("the token's signature is not valid") from None
    except jwt.MissingRequiredClaimError as exc:
        raise TokenRefused(f"the token has no {exc.claim!r} claim") from None
    except jwt.InvalidIssuerError:
        raise TokenRefused("the token's issuer is not accepted here") from None
    except jwt.InvalidAudienceError:
        raise TokenRefused("the token's audience is not this service") from None
    except jwt.InvalidTokenError as exc:
        raise TokenRefused(f"the token is not valid ({type(exc).__name__})") from None


def _decode_any(token: str, keys: Sequence[PublicKey], **options: Any) -> dict[str, object]:
    """Claims of a token signed by one of `keys`: the few keys of ONE setting or kid, several only while one
    is rotated (keys.KEYS_PER_SETTING_MAX)."""
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


def _lifetime(claims: Mapping[str, object], *, lifetime_max_s: float, now: float, skew_s: float) -> float:
    """`exp` of claims whose iat and exp PyJWT found present, checked against the bounds. PyJWT reads them
    with int(), so a string such as "1700000000" passed it: only JSON numbers are accepted here."""
    iat, exp = claims["iat"], claims["exp"]
    if not all(isinstance(t, int | float) and not isinstance(t, bool) for t in (iat, exp)):
        raise TokenRefused("the token's iat and exp must be numeric dates")
    assert isinstance(iat, int | float) and isinstance(exp, int | float)  # for mypy
    if exp + skew_s <= now:  # PyJWT checked it against the wall clock; `now` is the caller's
        raise TokenRefused("the token has expired")
    if exp - iat > lifetime_max_s:
        raise TokenRefused(f"the token lives longer than {int(lifetime_max_s)} s")
    if iat > now + skew_s:
        raise TokenRefused("the token is issued in the future")
    return float(exp)


# Client tokens (router, and regions behind it) ----------------------------------------------------------


class _VerifiedCache:
    """Tokens already verified, by their exact text, least recently used first out: a client sends the same
    token with every request until it expires, so its signature is checked once. A hit still checks expiry;
    an entry never outlives its token. Keys are fixed for a process's life (a rotation restarts it, app/ops/
    keys.py), and the cache belongs to the `ClientIssuers` built from them: a key taken out is never vouched
    for by a cached verdict."""

    def __init__(self, entries_max: int = limits.TOKEN_CACHE_ENTRIES_MAX) -> None:
        assert entries_max >= 1, entries_max
        self._entries: OrderedDict[str, Principal] = OrderedDict()
        self._entries_max = entries_max

    def get(self, token: str, now: float) -> Principal | None:
        principal = self._entries.get(token)
        if principal is None:
            return None
        if principal.expires_at <= now:
            del self._entries[token]
            raise TokenRefused("the token has expired")
        self._entries.move_to_end(token)
        return principal

    def put(self, token: str, principal: Principal) -> None:
        self._entries[token] = principal
        self._entries.move_to_end(token)
        if len(self._entries) > self._entries_max:
            self._entries.popitem(last=False)  # the least recently used


@dataclass(frozen=True)
class ClientIssuer:
    """One identity provider the router trusts: its `iss`, its keys by `kid` (a kid holds one key, or two
    while it is rotated), and the namespace of client ids it may assert (a prefix ending with '.', '-' or '_';
    "" is every id that no other issuer's longer prefix claims)."""

    name: str
    keys: Mapping[str, PublicKey | Sequence[PublicKey]]
    client_prefix: str


class ClientIssuers:
    """Verifies client tokens. The namespace rule: a client id belongs to the issuer with the LONGEST prefix
    it starts with (two issuers may not share a prefix; an id no prefix matches belongs to nobody), and only
    that issuer may assert it. The `kid` selects one issuer's key; a token without `kid` is accepted only
    while exactly one key is configured (never a loop over every key)."""

    def __init__(
        self,
        issuers: Iterable[ClientIssuer],
        *,
        lifetime_max_s: int = limits.CLIENT_TOKEN_LIFETIME_MAX_S,
        cache_entries_max: int = limits.TOKEN_CACHE_ENTRIES_MAX,
    ) -> None:
        issuers = list(issuers)
        assert 0 < lifetime_max_s <= limits.CLIENT_TOKEN_LIFETIME_CAP_S, lifetime_max_s
        self._by_kid: dict[str, tuple[ClientIssuer, list[PublicKey]]] = {}
        self._by_prefix: dict[str, ClientIssuer] = {}
        for issuer in issuers:
            if not issuer.name or issuer.name in (HOP_ISSUER, SAGA_ISSUER):
                raise ValueError(f"client issuer {issuer.name!r}: not a usable issuer name")
            if not CLIENT_PREFIX.match(issuer.client_prefix):
                raise ValueError(f"client issuer {issuer.name!r}: client_prefix must be [A-Za-z0-9._-]*")
            if issuer.client_prefix and issuer.client_prefix[-1] not in PREFIX_SEPARATORS:
                # "acme" would own "acme2" and "acmex": ids that another issuer's tenants may already hold.
                raise ValueError(f"client issuer {issuer.name!r}: a client_prefix must end with one of "
                                 f"{' '.join(PREFIX_SEPARATORS)} (e.g. {issuer.client_prefix + '-'!r})")
            if issuer.client_prefix in self._by_prefix:
                raise ValueError(f"client issuers {self._by_prefix[issuer.client_prefix].name!r} and "
                                 f"{issuer.name!r} share the client_prefix {issuer.client_prefix!r}")
            self._by_prefix[issuer.client_prefix] = issuer
            if not issuer.keys:
                raise ValueError(f"client issuer {issuer.name!r} has no keys")
            for kid, keys in issuer.keys.items():
                if kid in self._by_kid:
                    raise ValueError(f"kid {kid!r} is configured for two client issuers")
                self._by_kid[kid] = (issuer, _key_list(keys))
        if len({i.name for i in issuers}) != len(issuers):
            raise ValueError("two client issuers have the same name")
        if not 1 <= len(self._by_kid) <= limits.CLIENT_KEYS_MAX:
            raise ValueError(f"between 1 and {limits.CLIENT_KEYS_MAX} client keys (kids)")
        self._only = next(iter(self._by_kid.values())) if sum(len(k) for _, k in self._by_kid.values()) == 1 else None
        # Longest prefix first: the first that matches owns the id.
        self._prefixes = sorted(self._by_prefix, key=len, reverse=True)
        self._lifetime_max_s = lifetime_max_s
        self._cache = _VerifiedCache(cache_entries_max)

    def owner(self, client: str) -> ClientIssuer | None:
        """The issuer whose namespace holds `client`, if any."""
        for prefix in self._prefixes:
            if client.startswith(prefix):
                return self._by_prefix[prefix]
        return None

    def verify(self, token: str, *, now: float | None = None) -> Principal:
        now = time.time() if now is None else now
        cached = self._cache.get(token, now)
        if cached is not None:
            return cached
        principal = self._verify(token, now)
        self._cache.put(token, principal)
        return principal

    def _verify(self, token: str, now: float) -> Principal:
        try:
            kid = jwt.get_unverified_header(token).get("kid")
        except jwt.InvalidTokenError:
            raise TokenRefused("the token is not a JWT") from None
        if kid is None:
            if self._only is None:
                raise TokenRefused("the token has no kid (several keys are configured)")
            issuer, keys = self._only
        else:
            found = self._by_kid.get(kid) if isinstance(kid, str) else None
            if found is None:
                raise TokenRefused("the token's kid names no configured key")
            issuer, keys = found
        skew_s = limits.CLIENT_TOKEN_LEEWAY_S
        claims = _decode_any(
            token, keys, issuer=issuer.name, leeway=skew_s,
            options={"require": ["iss", "sub", "iat", "exp"]},
        )
        exp = _lifetime(claims, lifetime_max_s=self._lifetime_max_s, now=now, skew_s=skew_s)
        sub, scope = claims.get("sub"), claims.get("scope", "")
        if not isinstance(sub, str) or not CLIENT_ID.match(sub):
            raise TokenRefused("the token's sub is not a valid client id")
        if self.owner(sub) is not issuer:
            raise TokenRefused(f"issuer {issuer.name!r} may not assert this client id")
        if not isinstance(scope, str):
            raise TokenRefused("the token's scope must be a space-separated string")
        return Principal(client=sub, scopes=frozenset(scope.split()), expires_at=exp + skew_s)


def client_issuers(settings: Mapping[str, ClientIssuerSettings], *, lifetime_max_s: int) -> ClientIssuers:
    """The client-token verifier from TXROUTE_CLIENT_ISSUERS, the same in routers and regions (fails at start
    on a bad key, a shared kid or a shared client prefix)."""
    issuers = [
        ClientIssuer(
            name=name,
            keys={kid: load_public_keys(pem, what=f"client issuer {name!r} key {kid!r}")
                  for kid, pem in s.keys.items()},
            client_prefix=s.client_prefix,
        )
        for name, s in settings.items()
    ]
    return ClientIssuers(issuers, lifetime_max_s=lifetime_max_s)


def mint_client_token(
    key: PrivateKey, *, issuer: str, client: str, scopes: Iterable[str], lifetime_s: int, kid: str | None = None
) -> str:
    """A client token, as an identity provider would issue it (dev issuer, `txroute token`, tests)."""
    assert CLIENT_ID.match(client), client
    assert 1 <= lifetime_s <= limits.CLIENT_TOKEN_LIFETIME_CAP_S, lifetime_s
    now = int(time.time())
    claims = {"iss": issuer, "sub": client, "scope": " ".join(sorted(scopes)), "iat": now, "exp": now + lifetime_s}
    return jwt.encode(claims, key, algorithm=algorithm_for(key), headers={"kid": kid} if kid else None)


def _b64(data: bytes) -> bytes:
    return base64.urlsafe_b64encode(data).rstrip(b"=")


class _Signer:
    """Compact JWS (a JWT) of claims under one private key, for the tokens minted per request (hop and saga).
    The header segment is encoded once, the claims by msgspec, and the signature made by PyJWT's own algorithm
    object (which also turns ECDSA's DER signature into JWS's r||s): the JWS `jwt.encode` makes (byte for
    byte while the claims are ASCII; msgspec leaves other characters unescaped), verified by `jwt.decode`.
    `jwt.encode` redid the header, the key's preparation and a
    json.dumps per token, about 60 us more than the signature itself per request on the router (measured)."""

    def __init__(self, key: PrivateKey) -> None:
        name = algorithm_for(key)
        self._algorithm = jwt.get_algorithm_by_name(name)
        self._key = self._algorithm.prepare_key(key)
        header = json.dumps({"alg": name, "typ": "JWT"}, separators=(",", ":"), sort_keys=True).encode()
        self._header = _b64(header) + b"."

    def sign(self, claims: Mapping[str, object]) -> str:
        signing_input = self._header + _b64(msgspec.json.encode(claims))
        return (signing_input + b"." + _b64(self._algorithm.sign(signing_input, self._key))).decode()


# Hop tokens (router -> region) -----------------------------------------------------------------------


class HopTokenMinter:
    """Mints the router's hop tokens: one per request, bound to it, living seconds."""

    def __init__(self, key: PrivateKey, *, lifetime_s: int = limits.HOP_TOKEN_LIFETIME_S) -> None:
        assert 1 <= lifetime_s <= limits.HOP_TOKEN_LIFETIME_S, lifetime_s
        self._signer = _Signer(key)
        self._lifetime_s = lifetime_s

    def token(self, client: str, scopes: Collection[str], request: BoundRequest, *, now: float | None = None) -> str:
        issued = int(time.time() if now is None else now)
        claims: dict[str, object] = {
            "iss": HOP_ISSUER, "aud": HOP_AUDIENCE, "sub": client, "scope": " ".join(sorted(scopes)),
            "iat": issued, "exp": issued + self._lifetime_s, **request.claims(),
        }
        return self._signer.sign(claims)

    def for_client(self, principal: Principal, request: BoundRequest) -> str:
        """The hop token for a client's request: its id, and only its public scopes."""
        return self.token(principal.client, principal.scopes & PUBLIC_SCOPES, request)


def client_behind_hop(hop: Principal, client: Principal) -> Principal:
    """Who a region serves: the client of the client token the router forwarded, with the scopes both tokens
    grant. The hop token must name that very client; the router's key alone thus asserts nobody."""
    if hop.client != client.client:
        raise TokenRefused("the hop token and the client token name different clients")
    return Principal(client=client.client, scopes=client.scopes & hop.scopes,
                     expires_at=min(hop.expires_at, client.expires_at))


class HopTokenVerifier:
    """The regional service's check of hop tokens (one key, or several while one is rotated): signature,
    issuer, audience, a lifetime of seconds, and the binding to the request being served. No cache: every
    request brings its own token."""

    def __init__(self, key: PublicKey | Sequence[PublicKey]) -> None:
        self._keys = _key_list(key)

    def verify(self, token: str, request: BoundRequest, *, now: float | None = None) -> Principal:
        now = time.time() if now is None else now
        claims = _decode_any(
            token, self._keys, audience=HOP_AUDIENCE, issuer=HOP_ISSUER, leeway=limits.HOP_TOKEN_LEEWAY_S,
            options={"require": ["exp", "iat", "sub", "aud", "iss", *_BOUND_CLAIMS]},
        )
        exp = _lifetime(claims, lifetime_max_s=limits.HOP_TOKEN_LIFETIME_S, now=now, skew_s=limits.HOP_TOKEN_LEEWAY_S)
        request.check(claims)
        sub, scope = claims.get("sub"), claims.get("scope", "")
        if not isinstance(sub, str) or not CLIENT_ID.match(sub):
            raise TokenRefused("the token's sub is not a valid client id")
        if not isinstance(scope, str):
            raise TokenRefused("the token's scope must be a space-separated string")
        return Principal(client=sub, scopes=frozenset(scope.split()), expires_at=exp)


# Saga tokens (region -> region) ----------------------------------------------------------------------


class SagaTokenMinter:
    """Mints one region's saga tokens: sub = this region, aud = the destination's, bound to the request."""

    def __init__(self, key: PrivateKey, region: str, *, lifetime_s: int = limits.SAGA_TOKEN_LIFETIME_S) -> None:
        assert 1 <= lifetime_s <= limits.SAGA_TOKEN_LIFETIME_S, lifetime_s
        self._signer = _Signer(key)
        self._region = region
        self._lifetime_s = lifetime_s

    def token(self, destination: str, request: BoundRequest, *, now: float | None = None) -> str:
        issued = int(time.time() if now is None else now)
        claims: dict[str, object] = {
            "iss": SAGA_ISSUER, "aud": saga_audience(destination), "sub": self._region,
            "iat": issued, "exp": issued + self._lifetime_s, **request.claims(),
        }
        return self._signer.sign(claims)


class SagaTokenVerifier:
    """A region's check of saga tokens: the saga key, addressed to this region, from a known region other
    than this one, bound to the request. Returns the calling region."""

    def __init__(self, key: PublicKey | Sequence[PublicKey], *, region: str, peers: Collection[str]) -> None:
        self._keys = _key_list(key)
        self._audience = saga_audience(region)
        self._peers = frozenset(peers) - {region}

    def verify(self, token: str, request: BoundRequest, *, now: float | None = None) -> str:
        now = time.time() if now is None else now
        claims = _decode_any(
            token, self._keys, audience=self._audience, issuer=SAGA_ISSUER, leeway=limits.SAGA_TOKEN_LEEWAY_S,
            options={"require": ["exp", "iat", "sub", "aud", "iss", *_BOUND_CLAIMS]},
        )
        _lifetime(claims, lifetime_max_s=limits.SAGA_TOKEN_LIFETIME_S, now=now, skew_s=limits.SAGA_TOKEN_LEEWAY_S)
        request.check(claims)
        sub = claims.get("sub")
        if not isinstance(sub, str) or sub not in self._peers:
            raise TokenRefused("the token's sub names no peer region")
        return sub
