"""Who is calling: the one place the regional service learns its caller (DESIGN D8), for both trust domains.

    public routes (/v1/...)      a hop token from a router: the client id and its scopes, bound to this very
                                 request (method, target, body digest, Idempotency-Key) and living seconds
    /internal/shardmap           a hop token with the `internal` scope (the routers' own calls); regions
                                 never read it (they have the topology), so a saga token is refused there
    saga routes (/internal/saga) a saga token from another region, naming it (`sub`); a hop token, whatever
                                 it claims, is refused, so a router's key can never move money

The body is read once, here, digested and kept: the handlers decode exactly the bytes the token was checked
against (`verified_body`). A call without a valid token is refused with 401 before anything is read from a
database or written.
"""

from __future__ import annotations

from typing import Any

from litestar import Request

from app.errors import Problem
from app.security.scopes import INTERNAL, required_scope
from app.security.tokens import (
    BoundRequest,
    HopTokenVerifier,
    Principal,
    SagaTokenVerifier,
    TokenRefused,
    bearer,
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


async def principal(request: Request[Any, Any, Any]) -> Principal:
    """The verified hop token of this request."""
    verifier: HopTokenVerifier | None = request.app.state.get("hop_tokens")
    if verifier is None:
        raise Problem("unauthorized", "this region has no hop token key configured")
    try:
        token = bearer(request.headers.get("authorization"))
        return verifier.verify(token, await _bound(request))
    except TokenRefused as exc:
        raise Problem("unauthorized", f"hop token refused: {exc.reason}") from None


async def caller(request: Request[Any, Any, Any]) -> str:
    """The client id of a public API call, after checking the token grants the route's scope."""
    found = await principal(request)
    scope = required_scope(request.method, request.url.path)
    assert scope is not None, f"{request.method} {request.url.path} is not a public route"
    if scope not in found.scopes:
        raise Problem("forbidden", f"the token does not grant {scope}")
    return found.client


async def require_internal(request: Request[Any, Any, Any]) -> None:
    """The shard map answers only the routers' own hop tokens (scope `internal`)."""
    if INTERNAL not in (await principal(request)).scopes:
        raise Problem("forbidden", "this route is internal")


async def saga_peer(request: Request[Any, Any, Any]) -> str:
    """The region calling a saga route, from its saga token."""
    verifier: SagaTokenVerifier | None = request.app.state.get("saga_tokens")
    if verifier is None:
        raise Problem("unauthorized", "this region has no saga token key configured")
    try:
        token = bearer(request.headers.get("authorization"))
        return verifier.verify(token, await _bound(request))
    except TokenRefused as exc:
        raise Problem("unauthorized", f"saga token refused: {exc.reason}") from None
