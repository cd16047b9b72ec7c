"""The scopes a client token can grant, and which one each public route needs (router and region agree)."""

from __future__ import annotations

ACCOUNTS_READ = "accounts:read"
ACCOUNTS_WRITE = "accounts:write"
TRANSFERS_WRITE = "transfers:write"
FUNDS_WRITE = "funds:write"  # deposits and withdrawals
EVENTS_READ = "events:read"  # GET /v1/events
WEBHOOKS_MANAGE = "webhooks:manage"  # /v1/webhook-endpoints: register, list, rotate, delete, deliveries
PUBLIC_SCOPES = frozenset({ACCOUNTS_READ, ACCOUNTS_WRITE, TRANSFERS_WRITE, FUNDS_WRITE, EVENTS_READ, WEBHOOKS_MANAGE})

# Only the routers' own hop tokens carry this (e.g. /internal/shardmap); a client token's scopes
# are filtered to PUBLIC_SCOPES before the router passes them on, so no client can obtain it.
INTERNAL = "internal"

_POSTS = {
    "/v1/accounts": ACCOUNTS_WRITE,
    "/v1/transfers": TRANSFERS_WRITE,
    "/v1/deposits": FUNDS_WRITE,
    "/v1/withdrawals": FUNDS_WRITE,
    # A batch with deposits or withdrawals needs funds:write as well (checked on its items).
    "/v1/batches": TRANSFERS_WRITE,
}


# POSTs on one resource, by the path's last segment: /v1/transfers/{id}/capture, /v1/accounts/{id}/close.
# A hold's capture or void needs transfers:write whatever it holds (a transfer or a withdrawal).
_RESOURCE_POSTS = {
    ("transfers", "capture"): TRANSFERS_WRITE,
    ("transfers", "void"): TRANSFERS_WRITE,
    ("accounts", "close"): ACCOUNTS_WRITE,
}


def required_scope(method: str, path: str) -> str | None:
    """The scope a public route needs, or None when `method path` is not a public route."""
    if path == "/v1/webhook-endpoints" or path.startswith("/v1/webhook-endpoints/"):
        return WEBHOOKS_MANAGE if method in ("GET", "HEAD", "POST", "DELETE") else None
    if method == "POST":
        parts = path.split("/")
        if len(parts) == 5 and parts[1] == "v1" and parts[3]:
            return _RESOURCE_POSTS.get((parts[2], parts[4]))
        return _POSTS.get(path)
    if method in ("GET", "HEAD") and path == "/v1/events":
        return EVENTS_READ
    if method in ("GET", "HEAD") and (
        path.startswith("/v1/accounts/") or path.startswith("/v1/transfers/") or path == "/v1/transfers"
    ):
        return ACCOUNTS_READ
    return None
