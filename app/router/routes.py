"""Which public route a request is, the scope it needs, and where its account lives: the router's pure part.

Routing reads only the request: the account id in the path or body embeds its slot (DESIGN D1). Malformed ids
are refused here, before any routing, with the codes the regions use.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import Any

from app import limits
from app.api import batches
from app.api.decoding import decode_body, decode_optional_body, idempotency_key
from app.api.schemas import BatchRequest, CaptureRequest, FundsRequest, OpenAccountRequest, TransferRequest
from app.errors import Problem
from app.events.webhooks import EndpointRequest, endpoint_slot, home_slot
from app.security import scopes
from app.topology.ids import InvalidId, parse_account_id, parse_transfer_id


class Kind(enum.Enum):
    OPEN_ACCOUNT = "open_account"
    FUNDS = "funds"
    TRANSFER = "transfer"
    BATCH = "batch"
    READ_ACCOUNT = "read_account"
    READ_TRANSFER = "read_transfer"
    # Writes on one resource, routed by the slot of the id in their path (DESIGN D1).
    CAPTURE = "capture"
    VOID = "void"
    CLOSE_ACCOUNT = "close_account"
    FIND_BY_REFERENCE = "find_by_reference"  # every region is asked (app/router/lookups.py)
    EVENTS = "events"  # GET /v1/events: every region's part, merged (app/router/events.py)
    WEBHOOKS = "webhooks"  # /v1/webhook-endpoints: the client's home slot (app/events/webhooks.py)
    WEBHOOK = "webhook"  # /v1/webhook-endpoints/{id}[/rotate-secret|/deliveries]: the id's slot


@dataclass(frozen=True, slots=True)
class Route:
    kind: Kind
    scope: str
    path_id: str | None = None  # the id in the path, for reads and writes on one resource


_POSTS = {
    "/v1/accounts": Route(Kind.OPEN_ACCOUNT, scopes.ACCOUNTS_WRITE),
    "/v1/deposits": Route(Kind.FUNDS, scopes.FUNDS_WRITE),
    "/v1/withdrawals": Route(Kind.FUNDS, scopes.FUNDS_WRITE),
    "/v1/transfers": Route(Kind.TRANSFER, scopes.TRANSFERS_WRITE),
    "/v1/batches": Route(Kind.BATCH, scopes.TRANSFERS_WRITE),
}
_BODIES: dict[Kind, type[Any]] = {
    Kind.OPEN_ACCOUNT: OpenAccountRequest,
    Kind.FUNDS: FundsRequest,
    Kind.TRANSFER: TransferRequest,
}


def _webhook_route(method: str, parts: list[str]) -> Route:
    """/v1/webhook-endpoints[/{id}[/rotate-secret|/deliveries]] (parts after the split of the path)."""
    allowed: tuple[str, ...]
    path_id: str | None
    if len(parts) == 3:
        allowed, kind, path_id = ("GET", "HEAD", "POST"), Kind.WEBHOOKS, None
    elif len(parts) == 4 and parts[3]:
        allowed, kind, path_id = ("GET", "HEAD", "DELETE"), Kind.WEBHOOK, parts[3]
    elif len(parts) == 5 and parts[3] and parts[4] == "rotate-secret":
        allowed, kind, path_id = ("POST",), Kind.WEBHOOK, parts[3]
    elif len(parts) == 5 and parts[3] and parts[4] == "deliveries":
        allowed, kind, path_id = ("GET", "HEAD"), Kind.WEBHOOK, parts[3]
    else:
        raise Problem("not_found", "no such route")
    if method not in allowed:
        raise Problem("method_not_allowed", headers={"allow": ", ".join(a for a in allowed if a != "HEAD")})
    return Route(kind, scopes.WEBHOOKS_MANAGE, path_id)


def webhook_slot(route: Route, client: str) -> int:
    """The slot of the shard holding the endpoint(s) of a webhook route."""
    if route.path_id is None:
        return home_slot(client)
    slot = endpoint_slot(route.path_id)
    if slot is None:
        raise Problem("webhook_endpoint_not_found", f"{route.path_id[:40]!r} is not a valid webhook endpoint id")
    return slot


def decode_webhook_write(route: Route, body: bytes, content_type: str, key_header: str | None) -> None:
    """Checks a webhook POST as strictly as the region will: a key always, a body for a registration."""
    idempotency_key(key_header)
    if route.kind is Kind.WEBHOOKS:
        decode_body(body, content_type, EndpointRequest)


def match(method: str, path: str) -> Route:
    """The route of `method path`, or the problem a region would answer for it (404, 405)."""
    if path == "/v1/events":
        if method not in ("GET", "HEAD"):
            raise Problem("method_not_allowed", headers={"allow": "GET"})
        return Route(Kind.EVENTS, scopes.EVENTS_READ)
    if path == "/v1/webhook-endpoints" or path.startswith("/v1/webhook-endpoints/"):
        return _webhook_route(method, path.split("/"))
    post = _POSTS.get(path)
    if post is not None and path == "/v1/transfers" and method in ("GET", "HEAD"):
        return Route(Kind.FIND_BY_REFERENCE, scopes.ACCOUNTS_READ)
    if post is not None:
        if method != "POST":
            allow = "GET, POST" if path == "/v1/transfers" else "POST"
            raise Problem("method_not_allowed", headers={"allow": allow})
        return post
    parts = path.split("/")  # ['', 'v1', 'accounts', id] or [..., id, 'entries']
    resource_post = _resource_post(parts)
    if resource_post is not None:
        if method != "POST":
            raise Problem("method_not_allowed", headers={"allow": "POST"})
        assert scopes.required_scope("POST", path) == resource_post.scope
        return resource_post
    route: Route | None = None
    if len(parts) == 4 and parts[2] == "accounts" and parts[3]:
        route = Route(Kind.READ_ACCOUNT, scopes.ACCOUNTS_READ, parts[3])
    elif len(parts) == 5 and parts[2] == "accounts" and parts[3] and parts[4] in ("entries", "transfers"):
        route = Route(Kind.READ_ACCOUNT, scopes.ACCOUNTS_READ, parts[3])
    elif len(parts) == 4 and parts[2] == "transfers" and parts[3]:
        route = Route(Kind.READ_TRANSFER, scopes.ACCOUNTS_READ, parts[3])
    if route is None:
        raise Problem("not_found", "no such route")
    if method not in ("GET", "HEAD"):
        raise Problem("method_not_allowed", headers={"allow": "GET"})
    assert scopes.required_scope("GET", path) == route.scope
    return route


def _resource_post(parts: list[str]) -> Route | None:
    if len(parts) != 5 or not parts[3]:
        return None
    if parts[2] == "transfers" and parts[4] == "capture":
        return Route(Kind.CAPTURE, scopes.TRANSFERS_WRITE, parts[3])
    if parts[2] == "transfers" and parts[4] == "void":
        return Route(Kind.VOID, scopes.TRANSFERS_WRITE, parts[3])
    if parts[2] == "accounts" and parts[4] == "close":
        return Route(Kind.CLOSE_ACCOUNT, scopes.ACCOUNTS_WRITE, parts[3])
    return None


_ON_ACCOUNT = frozenset({Kind.READ_ACCOUNT, Kind.CLOSE_ACCOUNT})


def read_slot(route: Route) -> int:
    """The slot of the id in the path (a read's, or a write's on one resource); a malformed id reads as not
    found, as at the region."""
    assert route.path_id is not None
    try:
        if route.kind in _ON_ACCOUNT:
            return parse_account_id(route.path_id).slot
        return parse_transfer_id(route.path_id).slot
    except InvalidId:
        code = "account_not_found" if route.kind in _ON_ACCOUNT else "transfer_not_found"
        raise Problem(code, f"{route.path_id[:40]!r} is not a valid id") from None


@dataclass(frozen=True, slots=True)
class Write:
    slot: int | None  # where the write lands, or None for an account opened by region (or a split batch)
    region: str | None  # the region named in an open-account body
    batch: BatchRequest | None = None  # a non-atomic batch, split by region (app/router/batches.py)
    slots: list[list[int]] | None = None  # a batch's items' account slots (home account first)


def decode_write(
    route: Route, body: bytes, content_type: str, key_header: str | None, granted: frozenset[str] = frozenset()
) -> Write:
    """Checks a POST as strictly as the region will (key, media type, schema) and finds its home."""
    key = idempotency_key(key_header)
    if route.kind is Kind.BATCH:
        return _decode_batch(key, body, content_type, granted)
    if route.path_id is not None:  # a write on one resource lives where the id in its path says
        slot = read_slot(route)
        if route.kind is Kind.CAPTURE:
            decode_optional_body(body, content_type, CaptureRequest)
        return Write(slot=slot, region=None)
    data: Any = decode_body(body, content_type, _BODIES[route.kind])
    if isinstance(data, OpenAccountRequest):
        return Write(slot=None, region=data.region)
    if isinstance(data, FundsRequest):
        return Write(slot=parse_account_id(data.account).slot, region=None)
    assert isinstance(data, TransferRequest)
    return Write(slot=parse_account_id(data.debit_account).slot, region=None)


def _decode_batch(key: str, body: bytes, content_type: str, granted: frozenset[str]) -> Write:
    """A batch checked as the region will check it. An atomic one is forwarded whole to the home of its first
    item (the router checks that its accounts share a region; the region, that they share a shard)."""
    batch = decode_body(body, content_type, BatchRequest, bytes_max=limits.BATCH_BODY_BYTES_MAX)
    if batch.indexes is not None:
        raise Problem("invalid_request", "indexes is set by routers only")
    batches.check(key, batch, granted)
    try:
        slots = [[parse_account_id(a).slot for a in batches.accounts(item)] for item in batch.items]
    except InvalidId as exc:
        raise Problem("invalid_account_id", str(exc)[:100]) from None
    if batch.atomic:
        return Write(slot=slots[0][0], region=None, batch=batch, slots=slots)
    return Write(slot=None, region=None, batch=batch, slots=slots)
