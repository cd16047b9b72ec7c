"""The regional service's events and webhook controllers (issue 13): decode, call the shard, answer.

`GET /v1/events` here answers this region's part of the feed, one page per shard with each event's position:
the router merges the regions' answers into the client's page and cursor (app/router/events.py).
`/internal/events` is the same read for a named client, for another region's webhook worker (saga token).
Endpoints live on the shard of their client's home slot (app/events/webhooks.py).
"""

from __future__ import annotations

import datetime
from typing import Any

from litestar import Request, Response, delete, get, post

from app import limits
from app.api.decoding import decode_body, idempotency_key
from app.api.http import json_response
from app.errors import Problem, slot_moving
from app.events import feed, signing
from app.events.delivery import pages_json, read_pages
from app.events.urls import UrlPolicy, UrlRefused, check_url
from app.events.webhooks import (
    EndpointRequest,
    attempt_view,
    create_fingerprint,
    endpoint_slot,
    home_slot,
    new_endpoint_id,
    unknown_types,
)
from app.ledger.postings import fingerprint
from app.region.api import _ERRORS, ledger, outcome_response
from app.region.identity import caller, saga_peer, verified_body
from app.store.shard import Outcome, ShardStore


async def _region_events(request: Request[Any, Any, Any], client: str, *, for_worker: bool = False) -> Response[bytes]:
    """This region's page of each shard. For a client, a shard that cannot be read fails the page (503); for
    another region's webhook worker it is left out, so its other shards' events are still delivered."""
    q = request.query_params
    positions = feed.decode_cursor(q.get("after"))
    limit = feed.page_size(q.get("limit"))
    types = feed.event_types(q.get("types"))
    region = ledger(request).region
    since = _since(q.get("since")) if for_worker else None
    pages = await read_pages(ledger(request).stores, client, positions, types, limit,
                             skip_unavailable_in=region if for_worker else None, since=since)
    return json_response(request, 200, pages_json(pages))


def _since(text: str | None) -> datetime.datetime | None:
    """A webhook endpoint's creation time (a peer worker's `since`): shards it has not read start there."""
    if text is None:
        return None
    try:
        at = datetime.datetime.fromisoformat(text)
    except ValueError:
        raise Problem("invalid_request", "since must be an ISO 8601 time with its offset") from None
    if at.tzinfo is None:
        raise Problem("invalid_request", "since must be an ISO 8601 time with its offset")
    return at


@get("/v1/events", summary="The client's events after a cursor: the router merges every region's part (one page per "
                            "shard here) into items, next_cursor and has_more",
     responses=_ERRORS)
async def list_events(request: Request[Any, Any, Any]) -> Response[bytes]:
    return await _region_events(request, await caller(request))


@get("/internal/events", include_in_schema=False)
async def internal_events(request: Request[Any, Any, Any]) -> Response[bytes]:
    """Another region's webhook worker reads a client's events here (it holds that client's endpoint)."""
    await saga_peer(request)
    client = request.query_params.get("client")
    if not client or len(client) > 128:
        raise Problem("invalid_request", "name the client")
    return await _region_events(request, client, for_worker=True)


async def _owned_store(request: Request[Any, Any, Any], slot: int) -> ShardStore:
    """The shard owning `slot`, asked of its database: right after a slot move this region's view may still name
    the old shard for a moment, whose answer would be a stale 404; a misdirected problem (421, or 503 while the
    slot is frozen) sends the router to look again."""
    store = await ledger(request).store_for_slot(slot)
    if not await store.webhook_call("webhook_owns", "select txr_event_slot_owned($1)", slot):
        doc = await store.webhook_call("misdirected", "select txr_misdirected($1)", slot)
        body = dict(doc["body"])
        code, detail = body.pop("code"), body.pop("detail")
        if code == "misdirected" and "owner_shard" in body:  # the shard's record of where the slot went
            ledger(request).learn(slot, str(body["owner_region"]), str(body["owner_shard"]))
        raise (slot_moving(detail, extra=body, advise=False) if code == "slot_moving"
               else Problem(code, detail, extra=body))
    return store


async def _home_store(request: Request[Any, Any, Any], client: str) -> tuple[ShardStore, int]:
    slot = home_slot(client)
    return await _owned_store(request, slot), slot


async def _endpoint_store(request: Request[Any, Any, Any], endpoint_id: str) -> ShardStore:
    slot = endpoint_slot(endpoint_id)
    if slot is None:
        raise Problem("webhook_endpoint_not_found", f"{endpoint_id[:40]!r} is not a valid webhook endpoint id")
    return await _owned_store(request, slot)


def _not_found(endpoint_id: str) -> Problem:
    return Problem("webhook_endpoint_not_found", f"webhook endpoint {endpoint_id} was not found")


@post("/v1/webhook-endpoints", summary="Register a webhook endpoint (its secret is in this answer only)",
      responses=_ERRORS, status_code=201)
async def create_endpoint(request: Request[Any, Any, Any]) -> Response[bytes]:
    client = await caller(request)
    ledger(request).refuse_writes_if_draining()
    key = idempotency_key(request.headers.get("idempotency-key"))
    data = decode_body(verified_body(request), request.headers.get("content-type", ""), EndpointRequest)
    unknown = unknown_types(data.event_types)
    if unknown:
        raise Problem("unknown_event_type", f"unknown event types {unknown}; known: {list(feed.EVENT_TYPES)}")
    policy: UrlPolicy = request.app.state.webhook_policy
    try:
        await check_url(data.url, policy)
    except UrlRefused as exc:
        raise Problem("invalid_webhook_url", str(exc)) from None
    store, slot = await _home_store(request, client)
    doc = await store.webhook_call("webhook_create", "select txr_webhook_create($1::jsonb)", {
        "client": client, "key": key, "fingerprint": create_fingerprint(data), "slot": slot,
        "id": new_endpoint_id(slot), "url": data.url, "event_types": data.event_types,
        "description": data.description, "secret": signing.new_secret(),
        "endpoints_max": limits.WEBHOOK_ENDPOINTS_PER_CLIENT_MAX,
    })
    return outcome_response(request, Outcome.from_json(doc), location="/v1/webhook-endpoints/{id}")


_SELECT = """select txr_webhook_body(w) as body from webhook_endpoints w where w.client = $1"""


@get("/v1/webhook-endpoints", summary="List the client's webhook endpoints", responses=_ERRORS)
async def list_endpoints(request: Request[Any, Any, Any]) -> Response[bytes]:
    client = await caller(request)
    store, _ = await _home_store(request, client)
    rows = await store.webhook_rows("webhook_list", _SELECT + " order by w.created_at, w.id", client)
    return json_response(request, 200, {"items": [r["body"] for r in rows]})


@get("/v1/webhook-endpoints/{endpoint_id:str}", summary="Read a webhook endpoint", responses=_ERRORS)
async def get_endpoint(request: Request[Any, Any, Any], endpoint_id: str) -> Response[bytes]:
    client = await caller(request)
    rows = await (await _endpoint_store(request, endpoint_id)).webhook_rows(
        "webhook_get", _SELECT + " and w.id = $2", client, endpoint_id)
    if not rows:
        raise _not_found(endpoint_id)
    return json_response(request, 200, rows[0]["body"])


@delete("/v1/webhook-endpoints/{endpoint_id:str}", summary="Delete a webhook endpoint", responses=_ERRORS,
        status_code=204)
async def delete_endpoint(request: Request[Any, Any, Any], endpoint_id: str) -> Response[None]:
    client = await caller(request)
    ledger(request).refuse_writes_if_draining()
    found = await (await _endpoint_store(request, endpoint_id)).webhook_call(
        "webhook_delete", "select txr_webhook_delete($1, $2)", endpoint_id, client)
    if not found:
        raise _not_found(endpoint_id)
    return Response(None, status_code=204)


@post("/v1/webhook-endpoints/{endpoint_id:str}/rotate-secret",
      summary="A new secret; the previous one still signs for 24 h", responses=_ERRORS, status_code=200)
async def rotate_secret(request: Request[Any, Any, Any], endpoint_id: str) -> Response[bytes]:
    client = await caller(request)
    ledger(request).refuse_writes_if_draining()
    key = idempotency_key(request.headers.get("idempotency-key"))
    store = await _endpoint_store(request, endpoint_id)
    doc = await store.webhook_call("webhook_rotate", "select txr_webhook_rotate($1::jsonb)", {
        "client": client, "key": key, "fingerprint": fingerprint("webhook_rotate", {"id": endpoint_id}),
        "id": endpoint_id, "slot": endpoint_slot(endpoint_id), "secret": signing.new_secret(),
        "overlap_s": limits.WEBHOOK_SECRET_OVERLAP_S,
    })
    return outcome_response(request, Outcome.from_json(doc))


@get("/v1/webhook-endpoints/{endpoint_id:str}/deliveries",
     summary="The endpoint's latest delivery attempts, newest first", responses=_ERRORS)
async def list_deliveries(request: Request[Any, Any, Any], endpoint_id: str) -> Response[bytes]:
    client = await caller(request)
    store = await _endpoint_store(request, endpoint_id)
    owned = await store.webhook_rows("webhook_get", _SELECT + " and w.id = $2", client, endpoint_id)
    if not owned:
        raise _not_found(endpoint_id)
    limit = feed.page_size(request.query_params.get("limit"))
    rows = await store.webhook_rows(
        "webhook_attempts",
        """select event_id, attempt, txr_ts(at) as at, status, latency_ms, error from webhook_attempts
           where endpoint_id = $1 order by at desc limit $2""",
        endpoint_id, min(limit, limits.WEBHOOK_DELIVERIES_PAGE_MAX),
    )
    return json_response(request, 200, {"items": [attempt_view(r) for r in rows]})


EVENT_ROUTES = [list_events, internal_events, create_endpoint, list_endpoints, get_endpoint, delete_endpoint,
                rotate_secret, list_deliveries]
