"""The scopes a client token can grant, and which one each public route needs (router and region agree)."""

from __future__ import annotations

ACCOUNTS_READ = "accounts:read"
ACCOUNTS_WRITE = "accounts:write"
TRANSFERS_WRITE = "transfers:write"
FUNDS_WRITE = "funds:write"  # deposits and withdrawals
PUBLIC_SCOPES = frozenset({ACCOUNTS_READ, ACCOUNTS_WRITE, TRANSFERS_WRITE, FUNDS_WRITE})

# Only the routers' own hop tokens carry this (e.g. /internal/shardmap); a client token's scopes
# are filtered to PUBLIC_SCOPES before the router passes them on, so no client can obtain it.
INTERNAL = "internal"

_POSTS = {
    "/v1/accounts": ACCOUNTS_WRITE,
    "/v1/transfers": TRANSFERS_WRITE,
    "/v1/deposits": FUNDS_WRITE,
    "/v1/withdrawals": FUNDS_WRITE,
}


def required_scope(method: str, path: str) -> str | None:
    """The scope a public route needs, or None when `method path` is not a public route."""
    if method == "POST":
        return _POSTS.get(path)
    if method in ("GET", "HEAD") and (path.startswith("/v1/accounts/") or path.startswith("/v1/transfers/")):
        return ACCOUNTS_READ
    return None
