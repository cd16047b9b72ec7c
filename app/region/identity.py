"""Who is calling: the one place the regional service learns the caller's client id (DESIGN D8).

Public API calls reach a region only through the router, which sends each one on with a short-lived internal
token signed by the internal key: the client id and the client's scopes. Here that token is verified (its
signature, issuer, audience and expiry) and the route's scope is checked again. A call without one, or with
an expired or forged one, is refused with 401 before anything is read or written.
"""

from __future__ import annotations

from typing import Any

from litestar import Request

from app.errors import Problem
from app.security.scopes import INTERNAL, required_scope
from app.security.tokens import InternalTokenVerifier, Principal, TokenRefused, bearer


def principal(request: Request[Any, Any, Any]) -> Principal:
    """The verified internal token of this request (verified once per request)."""
    state = request.scope.setdefault("state", {})
    found = state.get("principal")
    if found is None:
        verifier: InternalTokenVerifier | None = request.app.state.get("internal_tokens")
        if verifier is None:
            raise Problem("unauthorized", "this region has no internal token key configured")
        try:
            found = verifier.verify(bearer(request.headers.get("authorization")))
        except TokenRefused as exc:
            raise Problem("unauthorized", f"internal token refused: {exc.reason}") from None
        state["principal"] = found
    assert isinstance(found, Principal)
    return found


def caller(request: Request[Any, Any, Any]) -> str:
    """The client id of a public API call, after checking the token grants the route's scope."""
    found = principal(request)
    scope = required_scope(request.method, request.url.path)
    assert scope is not None, f"{request.method} {request.url.path} is not a public route"
    if scope not in found.scopes:
        raise Problem("forbidden", f"the token does not grant {scope}")
    return found.client


def require_internal(request: Request[Any, Any, Any]) -> None:
    """Internal routes (the shard map) answer only the router's own tokens."""
    if INTERNAL not in principal(request).scopes:
        raise Problem("forbidden", "this route is internal")
