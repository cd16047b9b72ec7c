"""Who is calling: the one place the regional service learns its caller (DESIGN D8), for both trust domains.

    public routes (/v1/...)      a hop token from a router, bound to this very request (method, target, body
                                 digest, Idempotency-Key) and living seconds, AND the client's own token that
                                 the router forwarded (x-client-authorization), verified with the same client
                                 issuers as the router's: the client id and scopes come from the client token,
                                 and a hop token naming another client is refused. A router's key alone (a
                                 compromised router) thus cannot act as a client it holds no token of
    /internal/shardmap           a hop token with the `internal` scope (the routers' own calls); regions
                                 never read it (they have the topology), so a saga token is refused there
    saga routes (/internal/saga) a saga token from another region, naming it (`sub`); a hop token, whatever
                                 it claims, is refused, so a router's key can never move money

The body is read once, here, digested and kept: the handlers decode exactly the bytes the token was checked
against (`verified_body`). A call without a valid token is refused with 401 before anything is read from a
database or written.
"""

from __future__ import annotations

from typing import Any, Protocol, TypeVar

from litestar import Request

from app.errors import Problem
from app.security.scopes import INTERNAL, required_scope
from app.security.tokens import (
    CLIENT_TOKEN_HEADER,
    BoundRequest,
    ClientIssuers,
    HopTokenVerifier,
    Principal,
    SagaTokenVerifier,
    TokenRefused,
    bearer,
    client_behind_hop,
    request_target,
)

_BODY = "verified_body"


async def _bound(request: Request[Any, Any, Any]) -> BoundRequest:
    body = await request.body()
    request.scope.setdefault("state", {})[_BODY] = body
    return BoundRequest(
        method=request.method,
        target=request_target(request.scope["path"], request.scope.get("query_string", b"")),
        body=body,
        idempotency_key=request.headers.get("idempotency-key"),
    )


def verified_body(request: Request[Any, Any, Any]) -> bytes:
    """The body bytes the caller's token was checked against (after `caller`, `require_internal` or
    `saga_peer`)."""
    body = request.scope["state"][_BODY]
    assert isinstance(body, bytes)
    return body


_T = TypeVar("_T")
_T_co = TypeVar("_T_co", covariant=True)


class _RequestTokenVerifier(Protocol[_T_co]):
    """A verifier of tokens bound to their request (`HopTokenVerifier`, `SagaTokenVerifier`)."""

    def verify(self, token: str, request: BoundRequest, *, now: float | None = None) -> _T_co: ...


async def _verified(
    request: Request[Any, Any, Any], verifier: _RequestTokenVerifier[_T] | None, what: str
) -> _T:
    """What `verifier` finds in this request's bearer token, which must be bound to this very request; any
    refusal (or no verifier configured) is a 401 naming `what` token and the reason."""
    if verifier is None:
        raise Problem("unauthorized", f"this region has no {what} token key configured")
    try:
        token = bearer(request.headers.get("authorization"))
        return verifier.verify(token, await _bound(request))
    except TokenRefused as exc:
        raise Problem("unauthorized", f"{what} token refused: {exc.reason}") from None


async def principal(request: Request[Any, Any, Any]) -> Principal:
    """The verified hop token of this request."""
    verifier: HopTokenVerifier | None = request.app.state.get("hop_tokens")
    return await _verified(request, verifier, "hop")


def _client(request: Request[Any, Any, Any], hop: Principal) -> Principal:
    """The client of a public API call: its own token, which the hop token must name (`client_behind_hop`)."""
    clients: ClientIssuers | None = request.app.state.get("client_tokens")
    if clients is None:
        raise Problem("unauthorized", "this region has no client issuers configured")
    try:
        header = request.headers.get(CLIENT_TOKEN_HEADER)
        if header is None:
            raise TokenRefused(f"send the client's own token in {CLIENT_TOKEN_HEADER}: Bearer <token>")
        token = bearer(header)
        return client_behind_hop(hop, clients.verify(token))
    except TokenRefused as exc:
        raise Problem("unauthorized", f"client token refused: {exc.reason}") from None


async def caller(request: Request[Any, Any, Any]) -> str:
    """The client id of a public API call (hop token and client token), after checking the tokens grant the
    route's scope."""
    return (await caller_principal(request)).client


async def caller_principal(request: Request[Any, Any, Any]) -> Principal:
    """The client of a public API call with its scopes (a batch checks more than its route's scope)."""
    found = _client(request, await principal(request))
    scope = required_scope(request.method, request.url.path)
    assert scope is not None, f"{request.method} {request.url.path} is not a public route"
    if scope not in found.scopes:
        raise Problem("forbidden", f"the token does not grant {scope}")
    return found


async def batch_claimer(request: Request[Any, Any, Any]) -> str:
    """The client of `/internal/batch-claim`: a router's call for a client's batch, so the client's own token
    behind the hop token, as on the public route `POST /v1/batches` (its scope)."""
    found = _client(request, await principal(request))
    scope = required_scope("POST", "/v1/batches")
    if scope is None or scope not in found.scopes:
        raise Problem("forbidden", f"the token does not grant {scope}")
    return found.client


async def require_internal(request: Request[Any, Any, Any]) -> None:
    """The shard map answers only the routers' own hop tokens (scope `internal`)."""
    if INTERNAL not in (await principal(request)).scopes:
        raise Problem("forbidden", "this route is internal")


async def saga_peer(request: Request[Any, Any, Any]) -> str:
    """The region calling a saga route, from its saga token."""
    verifier: SagaTokenVerifier | None = request.app.state.get("saga_tokens")
    return await _verified(request, verifier, "saga")
