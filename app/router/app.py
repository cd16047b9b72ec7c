"""The router's composition root: `create_app(settings)` does no I/O; the lifespan opens one pooled client
per region and closes them.

The public API (`/v1/...`) is served by a bare ASGI handler, `Router`, because the router's cost is per
request and Litestar's routing, request objects and responses cost about a quarter of a proxy's throughput
here (measured: a bare ASGI proxy over aiohttp forwarded ~4,500 req/s, the same through Litestar ~3,300).
Everything else (`/healthz`, `/readyz`, `/openapi.json`, the API reference at `/docs`, unknown paths and the
lifespan) goes to a small Litestar app, with the same problem+json handlers as the regions.

A request's path through `Router`: match the route (404/405) -> verify the client token (401) -> take
a token from the client's bucket (429, app/router/ratelimit.py) -> check the route's scope (403) -> decode
the body as strictly as the region will (400) -> slot -> region from the shard map -> forward with a hop
token bound to this request (method, target, body digest, Idempotency-Key; DESIGN D8) -> on 421 refresh the
map and forward once more; a region that cannot be reached answers 503 `region_unavailable` with Retry-After;
a region answering 503 `slot_moving` (its slot is frozen for a move) has the request held and sent again
until the move's switch lands or a bound passes (app/router/hold.py).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Awaitable, Callable, MutableMapping
from typing import Any

import msgspec
from litestar import Litestar, Request, Response, get
from litestar.openapi.datastructures import ResponseSpec

from app import limits, telemetry
from app.api.http import EXCEPTION_HANDLERS, healthz, json_response
from app.api.openapi import OPENAPI_CONFIG, build_document, openapi_document
from app.api.schemas import RouterReadiness
from app.api.upstreams import Answer, NoAnswer, NotConnected, UpstreamError, Upstreams
from app.config import RouterSettings
from app.errors import PROBLEM_CONTENT_TYPE, Problem, problem_body
from app.router.batches import claim_batch, post_split_batch
from app.router.docs import docs_asset, docs_page
from app.router.events import merged_page
from app.router.hold import SlotMovingHold, is_slot_moving
from app.router.lookups import find_by_reference
from app.router.ratelimit import ClientRateLimiter
from app.router.routes import Kind, Route, decode_webhook_write, decode_write, match, read_slot, webhook_slot
from app.router.shardmap import ShardMap, ShardMapCache
from app.security.keys import load_private_key
from app.security.scopes import INTERNAL
from app.security.tls import client_context
from app.security.tokens import (
    CLIENT_TOKEN_HEADER,
    BoundRequest,
    ClientIssuers,
    HopTokenMinter,
    TokenRefused,
    bearer,
    client_issuers,
    request_target,
)
from app.topology.loader import load_topology
from app.topology.placement import default_region

log = logging.getLogger("txroute.router")

Scope = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[MutableMapping[str, Any]]]
Send = Callable[[MutableMapping[str, Any]], Awaitable[None]]

ROUTER_ID = "txroute-router"
SHARDMAP_PATH = "/internal/shardmap"
_JSON = b"application/json"


class Router:
    """The bare-ASGI public API of the router; see the module docstring for a request's path."""

    def __init__(
        self,
        *,
        region: str,
        clients: ClientIssuers,
        minter: HopTokenMinter,
        upstreams: Upstreams,
        shardmap: ShardMapCache,
        limiter: ClientRateLimiter,
        fallback: Litestar,
        regions: tuple[str, ...],
        hold: SlotMovingHold,
    ) -> None:
        self.region = region
        # The regions of regions/ that own slots: the default region of a new account is one of them, the same
        # on every router (app.topology.placement). An account opened in a region that the live shard map
        # gives no slot is refused here (a region file being added; or a region evacuated).
        self.regions = regions
        self._owning: tuple[int, frozenset[str]] = (0, frozenset())  # (map version, regions owning a slot)
        self.clients = clients
        self.minter = minter
        self.upstreams = upstreams
        self.shardmap = shardmap
        self.limiter = limiter
        self.fallback = fallback
        self.hold = hold
        self._retry_after = str(limits.REGION_UNAVAILABLE_RETRY_AFTER_S)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["path"].startswith("/v1/"):
            await self._public(scope, receive, send)
        else:
            await self.fallback(scope, receive, send)  # type: ignore[arg-type]

    async def _public(self, scope: Scope, receive: Receive, send: Send) -> None:
        headers = {name.decode("latin-1"): value.decode("latin-1") for name, value in scope["headers"]}
        rid = scope.get("state", {}).get("request_id")  # telemetry.Instrumented's
        if rid is None:
            rid = telemetry.request_id(headers.get("x-request-id"))
        try:
            answer = await self._handle(scope, receive, headers, rid)
        except Problem as problem:
            telemetry.annotate(error_code=problem.code)
            await _send(send, problem.status, _problem_headers(problem), problem.body(rid), rid)
            return
        except Exception as exc:  # a bug: the request id and nothing else leaves the process
            telemetry.annotate(error_code="internal_error")
            log.error("unhandled_error", extra={"request_id": rid, "error_type": type(exc).__name__})
            body = problem_body("internal_error", f"internal error; quote request id {rid}", rid)
            await _send(send, 500, [(b"content-type", PROBLEM_CONTENT_TYPE.encode())], body, rid)
            return
        if answer is not None:
            await _send(send, answer.status, answer.headers, answer.body, rid)

    async def _handle(self, scope: Scope, receive: Receive, headers: dict[str, str], rid: str) -> Answer | None:
        method: str = scope["method"]
        path: str = scope["path"]
        route = match(method, path)
        scope["path_template"] = _template(route, path)  # the metrics' and spans' route label
        principal = self._authenticate(headers.get("authorization"))
        self.limiter.check(principal.client)  # before the body is read or anything is forwarded
        if route.scope not in principal.scopes:
            raise Problem("forbidden", f"the token does not grant {route.scope}")
        body: bytes | None = None
        query = scope.get("query_string", b"")
        if len(query) > limits.QUERY_STRING_BYTES_MAX:
            raise Problem("invalid_request", f"the query string may hold at most {limits.QUERY_STRING_BYTES_MAX} bytes")
        if route.kind is Kind.FIND_BY_REFERENCE:
            return await find_by_reference(self, principal, path, query, self._client_headers(headers, rid))
        slot: int | None = None
        named_region = None
        if route.kind is Kind.READ_ACCOUNT or route.kind is Kind.READ_TRANSFER:
            slot = read_slot(route)
        elif route.kind is Kind.EVENTS:
            pass  # every region (merged_page below)
        elif route.kind is Kind.WEBHOOKS or route.kind is Kind.WEBHOOK:
            slot = webhook_slot(route, principal.client)
            if method == "POST":
                body = await _read_body(receive, headers, limits.REQUEST_BODY_BYTES_MAX)
                if body is None:
                    return None
                decode_webhook_write(route, body, headers.get("content-type", ""), headers.get("idempotency-key"))
        else:
            bytes_max = limits.BATCH_BODY_BYTES_MAX if route.kind is Kind.BATCH else limits.REQUEST_BODY_BYTES_MAX
            body = await _read_body(receive, headers, bytes_max)
            if body is None:
                return None  # the client went away
            write = decode_write(
                route, body, headers.get("content-type", ""), headers.get("idempotency-key"), principal.scopes
            )
            slot, named_region = write.slot, write.region
            if write.batch is not None:
                assert write.slots is not None
                if write.batch.atomic:
                    regions = {self.shardmap.region_for_slot(s) for item in write.slots for s in item}
                    if len(regions) > 1:
                        raise Problem("batch_spans_shards", "an atomic batch keeps every account on one shard; "
                                      f"these accounts live in {len(regions)} regions",
                                      extra={"regions": sorted(regions)})
                # The batch's key bound to its whole body before any item is sent (DESIGN D15).
                refused = await claim_batch(self, principal, headers["idempotency-key"], write.batch,
                                            self._client_headers(headers, rid))
                if refused is not None:
                    return refused
                if not write.batch.atomic:
                    return await post_split_batch(
                        self, principal, headers["idempotency-key"], write.batch, write.slots,
                        self._client_headers(headers, rid),
                    )
            elif slot is None and named_region is None:
                # The same region for (client, key) on every router, so a retry through another region's
                # router replays instead of opening a second account (app.topology.placement).
                named_region = default_region(principal.client, headers["idempotency-key"], self.regions)
        path_qs = path + "?" + query.decode("latin-1") if query else path
        key = headers.get("idempotency-key", "") if body is not None else None
        bound = BoundRequest(method, request_target(path, query), body or b"", key)

        def mint() -> str:
            return self.minter.for_client(principal, bound)

        upstream_headers = self._upstream_headers(headers, rid, mint(), key)
        upstream_headers[CLIENT_TOKEN_HEADER] = "Bearer " + bearer(headers.get("authorization"))
        if route.kind is Kind.EVENTS:
            return await merged_page(
                query.decode("latin-1"), tuple(self.upstreams.urls),
                lambda region: self.send_to_region(
                    region, method, path_qs, {**upstream_headers, "authorization": "Bearer " + mint()}, None),
            )
        return await self._forward(route, slot, named_region, method, path_qs, upstream_headers, body, mint)

    def _client_headers(self, headers: dict[str, str], rid: str) -> dict[str, str]:
        """What every call to a region carries besides its hop token: the request id, the trace state, the
        body's media type and the client's own token (the region verifies it too and serves its client, never
        just the hop token's say-so: a router's key alone can act as no client)."""
        out = {"x-request-id": rid, CLIENT_TOKEN_HEADER: "Bearer " + bearer(headers.get("authorization"))}
        if "tracestate" in headers:
            out["tracestate"] = headers["tracestate"][:512]
        if "content-type" in headers:
            out["content-type"] = headers["content-type"]
        return out

    def _authenticate(self, authorization: str | None) -> Any:
        try:
            return self.clients.verify(bearer(authorization))
        except TokenRefused as exc:
            raise Problem("unauthorized", exc.reason, headers={"www-authenticate": "Bearer"}) from None

    def _upstream_headers(
        self, headers: dict[str, str], rid: str, token: str, idempotency_key: str | None
    ) -> dict[str, str]:
        # traceparent is set by the upstream client (telemetry.inject): this hop becomes the region's parent.
        out = {"authorization": "Bearer " + token, "x-request-id": rid}
        if "tracestate" in headers:
            out["tracestate"] = headers["tracestate"][:512]
        if idempotency_key is not None:
            out["content-type"] = headers.get("content-type", "")
            out["idempotency-key"] = idempotency_key
        return out

    async def _forward(
        self,
        route: Route,
        slot: int | None,
        named_region: str | None,
        method: str,
        path_qs: str,
        headers: dict[str, str],
        body: bytes | None,
        mint: Callable[[], str],
    ) -> Answer:
        if slot is None:  # an account is opened in the region its body names, else in its default region
            assert named_region is not None
            region = named_region
            if not self.upstreams.knows(region):
                raise Problem("invalid_request", f"no region named {region!r}")
            if region not in self._owning_regions():
                raise Problem("invalid_request", f"region {region} owns no slots yet and opens no accounts")
            self.refuse_if_draining(region)

            async def attempt() -> Answer:
                return await self._drain_aware(await self.send_to_region(region, method, path_qs, headers, body))
        else:
            owned_slot = slot

            async def attempt() -> Answer:
                return await self._to_owner(owned_slot, method, path_qs, headers, body)

        answer = await attempt()
        # A 421 that survived `_to_owner`'s refresh means this router's map is behind a move that just switched
        # (refreshes are rate-limited; the new owner may not claim the slot for a moment): the request is held
        # like a slot_moving one, so the client sees latency, never the routers' internal 421.
        if not is_slot_moving(answer) and not (slot is not None and answer.status == 421):
            return answer

        async def again() -> Answer:
            headers["authorization"] = "Bearer " + mint()  # a token of its own for every attempt
            return await attempt()

        return await self.hold.hold(again)

    async def send_to_slot(
        self, slot: int, method: str, path_qs: str, headers: dict[str, str], body: bytes | None
    ) -> Answer:
        """`_to_owner` for a request of the router's own making (a batch's claim, app/router/batches.py)."""
        return await self._to_owner(slot, method, path_qs, headers, body)

    async def _to_owner(
        self, slot: int, method: str, path_qs: str, headers: dict[str, str], body: bytes | None
    ) -> Answer:
        """Send to the slot's region from the map; on 421 refresh the map and send to the new owner once."""
        seen = self.shardmap.current.version
        region = self.shardmap.region_for_slot(slot)
        if body is not None:
            self.refuse_if_draining(region)
        answer = await self._drain_aware(await self.send_to_region(region, method, path_qs, headers, body))
        if answer.status != 421:
            return answer
        telemetry.METRICS.misdirected.labels("router", self.region).inc()
        # The map is stale (slots moved): a refusal with 421 wrote nothing, so sending again is safe.
        await self.shardmap.refresh(seen_version=seen)
        return await self.send_to_region(self.shardmap.region_for_slot(slot), method, path_qs, headers, body)

    def _owning_regions(self) -> frozenset[str]:
        current = self.shardmap.current
        if self._owning[0] != current.version:
            self._owning = (current.version, frozenset(current.regions))
        return self._owning[1]

    def refuse_if_draining(self, region: str) -> None:
        """A write for a drained region (`txroute ops drain`) is answered here; reads still go through."""
        if region in self.shardmap.current.draining:
            retry_after = str(limits.REGION_DRAINING_RETRY_AFTER_S)
            raise Problem(
                "region_draining",
                f"region {region} takes no new writes for now; retry after {retry_after} s with the same "
                "Idempotency-Key",
                extra={"region": region},
                headers={"retry-after": retry_after},
            )

    async def _drain_aware(self, answer: Answer) -> Answer:
        """A region that says it is drained before this router knew: learn it now for the next writes."""
        if answer.status == 503 and b'"region_draining"' in answer.body:
            await self.shardmap.refresh(seen_version=self.shardmap.current.version)
        return answer

    async def send_to_region(
        self, region: str, method: str, path_qs: str, headers: dict[str, str], body: bytes | None
    ) -> Answer:
        attempt = 0
        while True:
            try:
                return await self.upstreams.send(region, method, path_qs, headers=headers, body=body)
            except NotConnected as exc:
                # Never sent: safe to try again for a read, and for a POST because it carries an
                # Idempotency-Key (decode_write required one).
                failure: UpstreamError = exc
            except NoAnswer as exc:
                failure = exc
                if method == "POST":
                    break  # its effect is unknown: the client retries with the same Idempotency-Key
            attempt += 1
            if attempt > limits.UPSTREAM_RETRIES_MAX:
                break
        log.warning("region_unavailable", extra={"upstream": region, "error_type": failure.error_type})
        raise Problem(
            "region_unavailable",
            f"region {region} did not answer; retry after {self._retry_after} s with the same Idempotency-Key",
            extra={"region": region},
            headers={"retry-after": self._retry_after},
        )


def _problem_headers(problem: Problem) -> list[tuple[bytes, bytes]]:
    return [(b"content-type", PROBLEM_CONTENT_TYPE.encode())] + [
        (k.encode(), v.encode()) for k, v in problem.headers.items()
    ]


async def _send(send: Send, status: int, headers: list[tuple[bytes, bytes]], body: bytes, rid: str) -> None:
    out = [*headers, (b"x-request-id", rid.encode()), (b"content-length", str(len(body)).encode())]
    await send({"type": "http.response.start", "status": status, "headers": out})
    await send({"type": "http.response.body", "body": body})


async def _read_body(receive: Receive, headers: dict[str, str], bytes_max: int) -> bytes | None:
    """The whole body, refused early when it is larger than the route's requests may be."""
    declared = headers.get("content-length", "0")
    if not declared.isdigit() or int(declared) > bytes_max:
        raise Problem("payload_too_large", f"the body may hold at most {bytes_max} bytes")
    chunks: list[bytes] = []
    size = 0
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            return None
        chunk: bytes = message.get("body", b"")
        size += len(chunk)
        if size > bytes_max:
            raise Problem("payload_too_large", f"the body may hold at most {bytes_max} bytes")
        chunks.append(chunk)
        if not message.get("more_body", False):
            return b"".join(chunks)


def _template(route: Route, path: str) -> str:
    if route.kind is Kind.READ_TRANSFER:
        return "/v1/transfers/{transfer_id}"
    if route.kind is Kind.READ_ACCOUNT:
        for tail in ("/entries", "/transfers"):
            if path.endswith(tail):
                return "/v1/accounts/{account_id}" + tail
        return "/v1/accounts/{account_id}"
    if route.kind is Kind.CAPTURE:
        return "/v1/transfers/{transfer_id}/capture"
    if route.kind is Kind.VOID:
        return "/v1/transfers/{transfer_id}/void"
    if route.kind is Kind.CLOSE_ACCOUNT:
        return "/v1/accounts/{account_id}/close"
    if route.kind is Kind.WEBHOOK:
        tail = path.rsplit("/", 1)[1]
        suffix = "/" + tail if tail in ("rotate-secret", "deliveries") else ""
        return "/v1/webhook-endpoints/{endpoint_id}" + suffix
    return path  # a POST route's path is its template


# The fallback Litestar app: health, readiness, the OpenAPI document ---------------------------------


# The bodies are the same msgspec structs the OpenAPI document describes, so an answer cannot drift from it.
@get(
    "/readyz",
    summary="The router's upstream clients are open; each region's reachability",
    responses={
        200: ResponseSpec(RouterReadiness, description="ready (also while a region is down: see `regions`)"),
        503: ResponseSpec(RouterReadiness, description="not ready yet"),
    },
)
async def readyz(request: Request[Any, Any, Any]) -> Response[bytes]:
    upstreams: Upstreams = request.app.state.upstreams
    if not upstreams.is_open:
        return json_response(request, 503, RouterReadiness(status="not_ready"))
    regions = {}
    for region in upstreams.urls:
        try:
            answer = await upstreams.send(region, "GET", "/healthz", headers={}, body=None,
                                          timeout_s=limits.READYZ_PROBE_TIMEOUT_S)
            regions[region] = answer.status == 200
        except UpstreamError:
            regions[region] = False
    # Ready even when a region is down: this router still answers for the others, and 503 fast for it.
    current = request.app.state.shardmap.current
    return json_response(request, 200, RouterReadiness(status="ready", regions=regions,
                                                       shardmap_version=current.version,
                                                       draining=sorted(current.draining)))


@get("/metrics", include_in_schema=False)
async def metrics(request: Request[Any, Any, Any]) -> Response[bytes]:
    """Prometheus exposition (telemetry.METRICS)."""
    body, content_type = telemetry.exposition()
    return Response(body, media_type=content_type)


def _document(bodies: dict[str, type[Any]]) -> bytes:
    """The regions' OpenAPI surface (the same controllers' declarations), plus bearer authentication."""
    from app.region.api import PUBLIC_ROUTES
    from app.region.events_api import EVENT_ROUTES

    # The events feed and webhook endpoints are public routes too; their internal route stays out.
    public_events = [r for r in EVENT_ROUTES if all(path.startswith("/v1/") for path in r.paths)]
    schema_app = Litestar(route_handlers=[*PUBLIC_ROUTES, *public_events, healthz, readyz],
                          openapi_config=OPENAPI_CONFIG)
    document = build_document(schema_app, bodies)
    document.setdefault("components", {})["securitySchemes"] = {
        "bearer": {"type": "http", "scheme": "bearer", "bearerFormat": "JWT (EdDSA or ES256)"}
    }
    for path, operations in document["paths"].items():
        if path.startswith("/v1/"):
            for operation in operations.values():
                operation["security"] = [{"bearer": []}]
                operation.setdefault("responses", {}).setdefault(
                    "403", {"description": "the token does not grant the route's scope"}
                )
    return msgspec.json.encode(document)


def create_app(settings: RouterSettings) -> telemetry.Instrumented:
    topology = load_topology(settings.regions_dir)
    topology.region(settings.region)  # fails fast on an unknown region
    missing = {r.name for r in topology.regions} - set(settings.region_urls)
    assert not missing, f"TXROUTE_REGION_URLS has no URL for {sorted(missing)}"
    clients = client_issuers(settings.client_issuers, lifetime_max_s=settings.client_token_lifetime_max_s)
    minter = HopTokenMinter(load_private_key(settings.hop_private_key, what="TXROUTE_HOP_PRIVATE_KEY"))
    upstreams = Upstreams(
        settings.region_urls,
        tls=client_context(settings.internal_ca_file),
        connections_max=settings.upstream_connections_max,
        connect_timeout_s=settings.upstream_connect_timeout_s,
        read_timeout_s=settings.upstream_read_timeout_s,
        local_region=settings.region,
        wan_latency_ms=settings.wan_latency_ms,
    )

    async def fetch_claims(region: str) -> dict[str, Any]:
        token = minter.token(ROUTER_ID, {INTERNAL}, BoundRequest("GET", SHARDMAP_PATH, b""))
        answer = await upstreams.send(
            region, "GET", SHARDMAP_PATH, headers={"authorization": "Bearer " + token}, body=None,
            timeout_s=limits.SHARDMAP_FETCH_TIMEOUT_S,
        )
        if answer.status != 200:
            raise RuntimeError(f"/internal/shardmap of {region} answered {answer.status}")
        document: dict[str, Any] = msgspec.json.decode(answer.body)
        return document

    shardmap = ShardMapCache(ShardMap.from_topology(topology), tuple(upstreams.urls), fetch_claims)
    from app.region.api import REQUEST_BODIES

    @contextlib.asynccontextmanager
    async def lifespan(application: Litestar) -> AsyncIterator[None]:
        await upstreams.open()
        log.info("router_started", extra={"region": settings.region, "upstreams": len(upstreams.urls)})
        refresher = None
        if settings.shardmap_refresh_period_s > 0:
            await shardmap.refresh(seen_version=shardmap.current.version)  # a drained region is known at once
            refresher = asyncio.create_task(
                shardmap.refresh_forever(settings.shardmap_refresh_period_s), name="shardmap-refresh"
            )
        emf = asyncio.create_task(telemetry.publish_router_cloudwatch_metrics(settings.region), name="emf")
        try:
            yield
        finally:
            for task in (refresher, emf):
                if task is not None:
                    task.cancel()
                    await asyncio.gather(task, return_exceptions=True)
            await upstreams.close()

    fallback = Litestar(
        route_handlers=[healthz, readyz, openapi_document, docs_page, docs_asset, metrics],
        lifespan=[lifespan],
        exception_handlers=dict(EXCEPTION_HANDLERS),
        openapi_config=None,
        state=_state(
            upstreams=upstreams,
            shardmap=shardmap,
            request_bodies=REQUEST_BODIES,
            openapi_document=_document(REQUEST_BODIES),
        ),
        logging_config=None,
        on_startup=[lambda: telemetry.configure(service="router", region=settings.region)],
        on_shutdown=[telemetry.shutdown],
        debug=False,
    )
    limiter = ClientRateLimiter(
        rate_per_s=settings.client_rate_per_s, burst=settings.client_burst, region=settings.region
    )
    router = Router(
        region=settings.region, clients=clients, minter=minter, upstreams=upstreams, shardmap=shardmap,
        limiter=limiter, fallback=fallback, regions=topology.placing_regions,
        hold=SlotMovingHold(shardmap=shardmap, hold_s=settings.slot_moving_hold_s, region=settings.region),
    )
    return telemetry.Instrumented(router, service="router", region=settings.region)


def _state(**values: Any) -> Any:
    from litestar.datastructures import State

    return State(values)


def app_from_env() -> telemetry.Instrumented:
    """Entry point for the ASGI server: `granian --interface asgi --factory app.router.app:app_from_env`."""
    return create_app(RouterSettings.from_env())
