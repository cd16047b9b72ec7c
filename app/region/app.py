"""The regional service's composition root: `create_app(settings)` does no I/O; the lifespan opens one
asyncpg pool per shard of the region (connecting on demand, as the service role: provisioning ran before, as
the owner) and closes them. A database that is unreachable at start delays readiness, never the start."""

from __future__ import annotations

import asyncio
import contextlib
import datetime
import logging
import sys
from collections.abc import AsyncIterator
from typing import Any

import msgspec
from litestar import Litestar, Request, Response, get, post
from litestar.openapi.datastructures import ResponseSpec

from app import limits, telemetry
from app.api.decoding import decode_body
from app.api.http import EXCEPTION_HANDLERS, healthz, json_response, problem_response
from app.api.openapi import OPENAPI_CONFIG, openapi_document
from app.api.schemas import RegionReadiness, SagaBatch, SagaMessage
from app.api.upstreams import Upstreams
from app.config import RegionSettings
from app.errors import Problem, slot_moving
from app.events.delivery import WebhookWorker
from app.events.urls import UrlPolicy
from app.region.api import PUBLIC_ROUTES, REQUEST_BODIES, batch_claim, outcome_response
from app.region.events_api import EVENT_ROUTES
from app.region.health import Readiness
from app.region.identity import require_internal, saga_peer, verified_body
from app.region.open_replay import peer_asker, replay_lookup
from app.region.saga import TRANSIENT_DB_ERRORS, Saga
from app.region.service import RegionLedger
from app.region.sweeper import sweep_forever
from app.security.keys import load_private_key, load_public_keys
from app.security.tls import client_context
from app.security.tokens import HopTokenVerifier, SagaTokenMinter, SagaTokenVerifier, client_issuers
from app.store.shard import (
    AccountBusy,
    Outcome,
    QueueFull,
    ShardStore,
    ShardUnavailable,
    SlotMoved,
    TenantQueueFull,
    open_pool,
)
from app.topology.loader import load_topology
from app.topology.model import Topology

log = logging.getLogger("txroute.region")


def create_app(settings: RegionSettings) -> telemetry.Instrumented:
    topology = load_topology(settings.regions_dir)
    region = topology.region(settings.region)  # fails fast on an unknown region
    hop_tokens = (
        HopTokenVerifier(load_public_keys(settings.hop_public_key, what="TXROUTE_HOP_PUBLIC_KEY"))
        if settings.hop_public_key
        else None
    )
    clients = (
        client_issuers(settings.client_issuers, lifetime_max_s=settings.client_token_lifetime_max_s)
        if settings.client_issuers
        else None
    )
    saga_tokens = (
        SagaTokenVerifier(
            load_public_keys(settings.saga_public_key, what="TXROUTE_SAGA_PUBLIC_KEY"),
            region=region.name,
            peers=[r.name for r in topology.regions],
        )
        if settings.saga_public_key
        else None
    )
    saga_minter = (
        SagaTokenMinter(load_private_key(settings.saga_private_key, what="TXROUTE_SAGA_PRIVATE_KEY"), region.name)
        if settings.saga_private_key
        else None
    )
    peer_tls = client_context(settings.internal_ca_file)  # an unreadable CA bundle fails here, at start
    webhook_policy = UrlPolicy(allow_loopback=settings.webhook_allow_loopback)

    @contextlib.asynccontextmanager
    async def lifespan(application: Litestar) -> AsyncIterator[None]:
        stores: dict[str, ShardStore] = {}
        peers: Upstreams | None = None
        relay: asyncio.Task[None] | None = None
        drain_watch: asyncio.Task[None] | None = None
        emf: asyncio.Task[None] | None = None
        readiness: asyncio.Task[None] | None = None
        sweeper: asyncio.Task[None] | None = None
        webhooks: asyncio.Task[None] | None = None
        retention: asyncio.Task[None] | None = None
        try:
            for shard in region.shards:
                pool = await open_pool(settings.database, shard.database, size_max=settings.db_pool_size_max)
                workers = min(limits.POSTING_WORKERS, settings.db_pool_size_max)
                stores[shard.name] = ShardStore(
                    shard.name, pool, workers=workers, client_postings_max=settings.tenant_queue_postings_max,
                    endpoint=settings.database, database=shard.database,
                )
            peers = Upstreams(
                {r: url for r, url in settings.region_urls.items() if r != region.name},
                tls=peer_tls,
                read_timeout_s=limits.SAGA_DELIVERY_TIMEOUT_S,
                local_region=region.name,
                wan_latency_ms=settings.wan_latency_ms,
            )
            await peers.open()
            saga = Saga(region.name, stores, peers, saga_minter, settings.faults,
                        destinations=tuple(r.name for r in topology.regions))
            application.state.ledger = RegionLedger(region=region.name, topology=topology, stores=stores, saga=saga)
            if saga_minter is not None:
                application.state.ledger.ask_peer = peer_asker(peers, saga_minter)
            # A drained region starts drained: readiness waits until the flag has been read (app/region/health.py).
            application.state.readiness = Readiness(application.state.ledger)
            readiness = asyncio.create_task(application.state.readiness.check_forever(), name="readiness")
            relay = asyncio.create_task(saga.relay_forever(), name="saga-relay")
            drain_watch = asyncio.create_task(_watch_drain(application.state.ledger), name="drain-watch")
            emf = asyncio.create_task(_publish_cloudwatch_metrics(application.state.ledger), name="emf")
            sweeper = asyncio.create_task(sweep_forever(stores), name="hold-sweeper")
            worker = WebhookWorker(
                region=region.name, topology=topology, stores=stores, peers=peers, minter=saga_minter,
                policy=webhook_policy, schedule_s=settings.webhook_retry_schedule_s,
            )
            webhooks = asyncio.create_task(worker.run_forever(), name="webhooks")
            retention = asyncio.create_task(
                _events_retention(application.state.ledger, settings.events_retention_days), name="retention")
            log.info("region_started", extra={"region": region.name, "shards": len(stores)})
            yield
        finally:
            for task in (readiness, relay, drain_watch, emf, sweeper, webhooks, retention):
                if task is not None:
                    task.cancel()
                    await asyncio.gather(task, return_exceptions=True)
            if peers is not None:
                await peers.close()
            for store in stores.values():
                await store.close()

    app = Litestar(
        route_handlers=[
            *PUBLIC_ROUTES, *EVENT_ROUTES, batch_claim, healthz, readyz, shardmap, saga_apply, saga_apply_batch,
            replay_lookup,
            openapi_document,
            metrics,
        ],
        lifespan=[lifespan],
        exception_handlers={
            **EXCEPTION_HANDLERS,
            ShardUnavailable: _shard_unavailable,
            QueueFull: _overloaded,
            TenantQueueFull: _tenant_queue_full,
            AccountBusy: _account_busy,
            SlotMoved: _slot_moved,
        },
        openapi_config=OPENAPI_CONFIG,
        request_max_body_size=limits.REQUEST_BODY_BYTES_MAX,
        state=_state(
            topology=topology, region=region.name, request_bodies=REQUEST_BODIES, hop_tokens=hop_tokens,
            client_tokens=clients, saga_tokens=saga_tokens, webhook_policy=webhook_policy,
        ),
        logging_config=None,
        on_startup=[lambda: telemetry.configure(service="region", region=region.name)],
        on_shutdown=[telemetry.shutdown],
        debug=False,
    )
    return telemetry.Instrumented(app, service="region", region=region.name)


def _state(**values: Any) -> Any:
    from litestar.datastructures import State

    return State(values)


def _shard_unavailable(request: Request[Any, Any, Any], exc: Exception) -> Response[bytes]:
    log.warning("shard_unavailable", extra={"error": str(exc)})
    return problem_response(
        request,
        Problem("shard_unavailable", "the account's database did not answer; retry with the same Idempotency-Key",
                headers={"retry-after": "1"}),
    )


def _account_busy(request: Request[Any, Any, Any], exc: Exception) -> Response[bytes]:
    # Not stored under the Idempotency-Key (the posting never ran): the same request, retried, can succeed.
    retry_after = str(limits.ACCOUNT_BUSY_RETRY_AFTER_S)
    return problem_response(request, Problem(
        "account_busy",
        f"an account of this posting is locked by another operation; nothing was posted; retry after "
        f"{retry_after} s with the same Idempotency-Key",
        headers={"retry-after": retry_after},
    ))


def _slot_moved(request: Request[Any, Any, Any], exc: Exception) -> Response[bytes]:
    # A same-shard posting crediting an account whose slot a move switched away meanwhile, or one that waited
    # for an account the switch holds while it books the range out: nothing was written. The region's map is
    # read again before its next request, so the retry is sent as a saga to the new owner.
    request.app.state.ledger.ownership_changed()
    return problem_response(request, slot_moving(
        "an account of this posting is moving, or has just moved, to another shard; nothing was written"))


def _overloaded(request: Request[Any, Any, Any], exc: Exception) -> Response[bytes]:
    return problem_response(request, Problem("overloaded", "too many requests queued", headers={"retry-after": "1"}))


def _tenant_queue_full(request: Request[Any, Any, Any], exc: Exception) -> Response[bytes]:
    """One client's share of a shard's posting queue is full (DESIGN D8): 429 for it, room for the others."""
    assert isinstance(exc, TenantQueueFull)
    telemetry.METRICS.rate_limited.labels("shard_queue", request.app.state.region).inc()
    retry_after = str(limits.TENANT_QUEUE_RETRY_AFTER_S)
    return problem_response(request, Problem(
        "rate_limited",
        f"this client already has {exc.limit} postings waiting on shard {exc.shard}; retry after {retry_after} s "
        "with the same Idempotency-Key",
        extra={"limit": "shard_queue", "shard": exc.shard},
        headers={"retry-after": retry_after},
    ))


async def _events_retention(ledger: RegionLedger, retention_days: int) -> None:
    """Deletes events (and finished webhook deliveries) older than the retention, every
    EVENTS_CLEANUP_INTERVAL_S, at most EVENTS_CLEANUP_BATCH_MAX rows a statement and
    EVENTS_CLEANUP_BATCHES_PER_RUN_MAX statements a run per shard: a backlog is worked off over several runs."""
    before_s = retention_days * 86_400.0
    while True:
        for store in ledger.stores.values():
            try:
                for _ in range(limits.EVENTS_CLEANUP_BATCHES_PER_RUN_MAX):
                    deleted = await store.events_cleanup(before_s, limit=limits.EVENTS_CLEANUP_BATCH_MAX)
                    await store.webhook_call(
                        "webhook_cleanup",
                        "select txr_webhook_cleanup(clock_timestamp() - make_interval(secs => $1), $2)",
                        before_s, limits.EVENTS_CLEANUP_BATCH_MAX,
                    )
                    telemetry.METRICS.events_deleted.labels(ledger.region, store.name).inc(deleted)
                    if deleted < limits.EVENTS_CLEANUP_BATCH_MAX:
                        break
            except Exception as exc:  # the job outlives any one failure; the next run deletes what is left
                log.error("events_retention_error", extra={"shard": store.name, "error_type": type(exc).__name__})
        await asyncio.sleep(limits.EVENTS_CLEANUP_INTERVAL_S)


async def _watch_drain(ledger: RegionLedger) -> None:
    """Keeps the region's drain flag (`txroute ops drain`) within REGION_DRAIN_POLL_S of its databases, and its
    view of slot ownership (slot moves, issue 11) within SLOT_OWNERSHIP_POLL_S."""
    assert limits.SLOT_OWNERSHIP_POLL_S == limits.REGION_DRAIN_POLL_S, "one loop reads both"
    while True:
        try:
            before = ledger.draining
            if await ledger.refresh_drain() != before:
                log.warning("region_drain_changed", extra={"region": ledger.region, "draining": ledger.draining})
            await ledger.refresh_ownership()
        except Exception as exc:  # the watch must outlive any one failure; the flag stays as it was
            log.error("drain_watch_error", extra={"error_type": type(exc).__name__})
        await asyncio.sleep(limits.REGION_DRAIN_POLL_S)


# The bodies are the same msgspec structs the OpenAPI document describes, so an answer cannot drift from it.
@get(
    "/readyz",
    summary="Readiness: every shard of the region answered its last check (cached, app/region/health.py)",
    responses={
        200: ResponseSpec(RegionReadiness, description="ready: every shard reachable and migrated"),
        503: ResponseSpec(RegionReadiness, description="not ready: which shards are not"),
    },
)
async def readyz(request: Request[Any, Any, Any]) -> Response[bytes]:
    readiness: Readiness | None = request.app.state.get("readiness")
    if readiness is None:
        return json_response(request, 503, RegionReadiness(status="not_ready"))
    status, body = readiness.answer()
    return json_response(request, status, body)


@get("/internal/shardmap", summary="This region's shards and the slots each claims (DESIGN D2)")
async def shardmap(request: Request[Any, Any, Any]) -> Response[bytes]:
    await require_internal(request)
    ledger: RegionLedger = request.app.state.ledger
    shards = [
        {"shard": name, "region": ledger.region, "slots": await store.slot_claims()}
        for name, store in ledger.stores.items()
    ]
    draining = await ledger.refresh_drain()
    return json_response(
        request, 200, {"region": ledger.region, "shards": shards, "draining": draining is not None,
                       "drain_reason": draining},
    )


@post("/internal/saga/apply", summary="Apply a saga message to its credit shard, once (DESIGN D6)", status_code=200)
async def saga_apply(request: Request[Any, Any, Any]) -> Response[bytes]:
    """Only from another region (a saga token), and only a message whose source shard that region owns: a
    region vouches for the debits of its own shards and nothing else (DESIGN D8)."""
    peer = await saga_peer(request)
    message = decode_body(verified_body(request), request.headers.get("content-type", ""), SagaMessage)
    ledger: RegionLedger = request.app.state.ledger
    _check_saga_message(message, peer, ledger, request.app.state.topology)
    store = await ledger.store_for_slot(message.credit_slot)
    result = await store.saga_apply_one(msgspec.structs.asdict(message))
    if result.get("status") in (421, 503):  # the slot moved (naming its owner) or is frozen by a move
        return outcome_response(request, Outcome(int(result["status"]), result["body"]))
    return json_response(request, 200, result)


@post(
    "/internal/saga/apply-batch",
    summary="Apply many saga messages, each once, with an outcome of its own (DESIGN D6, issue 14)",
    status_code=200,
    request_max_body_size=limits.SAGA_RELAY_BATCH_BODY_BYTES_MAX,
)
async def saga_apply_batch(request: Request[Any, Any, Any]) -> Response[bytes]:
    """The relay's batched delivery: the same token check as /internal/saga/apply for the call, the same
    checks for each message (a message whose source shard the caller does not own is answered 403 on its own
    and never applied), then each credit shard applies its messages in one transaction. The answer is 200
    with one result per message, in order: {"outcome": "applied"|"refused", ...} or {"status", "body"} (a
    problem: 421 naming the slot's owner, 503 slot_moving, 400/403 refused, 500 failed alone)."""
    peer = await saga_peer(request)
    batch = decode_body(verified_body(request), request.headers.get("content-type", ""), SagaBatch,
                        bytes_max=limits.SAGA_RELAY_BATCH_BODY_BYTES_MAX)
    ledger: RegionLedger = request.app.state.ledger
    topology: Topology = request.app.state.topology
    results: list[dict[str, Any] | None] = [None] * len(batch.messages)
    by_store: dict[str, list[int]] = {}
    for i, message in enumerate(batch.messages):
        try:
            _check_saga_message(message, peer, ledger, topology)
            store = await ledger.store_for_slot(message.credit_slot)
        except Problem as exc:
            results[i] = _problem_result(exc)
            continue
        by_store.setdefault(store.name, []).append(i)
    for name, indexes in by_store.items():
        applied = await ledger.stores[name].saga_apply_isolated(
            [msgspec.structs.asdict(batch.messages[i]) for i in indexes])
        for i, result in zip(indexes, applied, strict=True):
            results[i] = _batch_result(ledger, result)
    return json_response(request, 200, {"results": results})


def _check_saga_message(message: SagaMessage, peer: str, ledger: RegionLedger, topology: Topology) -> None:
    """A region vouches for the debits of its own shards and nothing else (DESIGN D8)."""
    source = next((s for s in topology.shards if s.name == message.source_shard), None)
    if source is None:
        raise Problem("unknown_shard", f"source_shard {message.source_shard[:40]!r} is no shard of the topology")
    if message.destination_shard not in ledger.stores:
        raise Problem("unknown_shard",
                      f"destination_shard {message.destination_shard[:40]!r} is no shard of region {ledger.region}")
    if source.region != peer:
        raise Problem("forbidden", f"region {peer} does not own source shard {source.name}")


def _problem_result(problem: Problem) -> dict[str, Any]:
    return {"status": problem.status, "body": {"code": problem.code, "detail": problem.detail, **problem.extra}}


def _batch_result(ledger: RegionLedger, result: dict[str, Any] | Exception) -> dict[str, Any]:
    """One message's result as the batch answers it (the shard's own, or a problem)."""
    if isinstance(result, Exception):  # failed alone (the batch was split to find it): a bug, or it heals
        if isinstance(result, (ShardUnavailable, SlotMoved, *TRANSIENT_DB_ERRORS)):
            return _problem_result(Problem("shard_unavailable", "the credit shard could not apply it now"))
        return _problem_result(Problem("internal_error", "applying this message failed"))
    if result.get("status") == 421 and isinstance(result.get("body"), dict):
        body = dict(result["body"])
        if "owner_shard" not in body:
            region, shard = ledger.owner_of(int(body["slot"]))
            body.update(owner_region=region, owner_shard=shard)
        else:  # the shard's own record of where the slot moved: this region routes there now
            ledger.learn(int(body["slot"]), str(body["owner_region"]), str(body["owner_shard"]))
        return {"status": 421, "body": body}
    return result


@get("/metrics", include_in_schema=False)
async def metrics(request: Request[Any, Any, Any]) -> Response[bytes]:
    """Prometheus exposition: the process's counters, and per shard its saga backlog, pool and last audit."""
    ledger: RegionLedger | None = request.app.state.get("ledger")
    if ledger is not None:
        telemetry.METRICS.webhook_backlog_age.clear()  # endpoints deleted since the last scrape leave no series
        await asyncio.gather(*(_observe_shard(ledger.region, store) for store in ledger.stores.values()))
    body, content_type = telemetry.exposition()
    return Response(body, media_type=content_type)


async def _observe_shard(region: str, store: ShardStore) -> None:
    m = telemetry.METRICS
    pool = store.pool
    m.pool_in_use.labels(region, store.name).set(pool.get_size() - pool.get_idle_size())
    m.pool_max.labels(region, store.name).set(pool.get_max_size())
    try:
        async with asyncio.timeout(limits.METRICS_DB_TIMEOUT_S):
            seen = await store.observe()
            backlog, disabled = await store.webhook_observe()
    except (TimeoutError, ShardUnavailable):
        m.scrape_errors.labels(region, store.name).inc()
        return
    for endpoint in backlog:
        m.webhook_backlog_age.labels(region, endpoint["id"]).set(endpoint["age_s"])
    m.webhook_endpoints_disabled.labels(region, store.name).set(disabled)
    m.saga_backlog.labels(region, store.name).set(seen["pending"])
    m.saga_oldest_s.labels(region, store.name).set(seen["oldest_s"])
    m.saga_dead_letters.labels(region, store.name).set(seen["dead_letters"])
    m.system_account_usage.labels(region, store.name).set(
        seen["system_abs_max"] / limits.SYSTEM_ACCOUNT_BALANCE_ABS_MAX)
    if seen["audit_clean"] is not None:
        m.audit_clean.labels(region, store.name).set(1 if seen["audit_clean"] else 0)
        m.audit_time.labels(region, store.name).set(seen["audit_at"])
    await _observe_moves(region, store)


# Slot moves (DESIGN D13) are read from the shards' `slot_moves` rows at each scrape. A freeze is observed
# in the histogram once per process: the moves whose freeze ended after the process started, remembered by id.
_MOVE_PHASES = ("copying", "catching_up", "frozen", "switching")  # unfinished, as migration 0008 names them
_STARTED_AT = datetime.datetime.now(datetime.UTC)
_freezes_seen: set[str] = set()


async def _observe_moves(region: str, store: ShardStore) -> float | None:
    """Set the shard's move gauges and observe new freezes; returns the unfinished move's phase age (0 when
    none), or None when the shard could not be read in time."""
    m = telemetry.METRICS
    try:
        async with asyncio.timeout(limits.METRICS_DB_TIMEOUT_S):
            seen = await store.observe_moves(ended_since=_STARTED_AT)
    except (TimeoutError, ShardUnavailable):
        m.scrape_errors.labels(region, store.name).inc()
        return None
    active = seen["active"] or {}
    for phase in _MOVE_PHASES:
        here = active.get("phase") == phase
        m.moves_in_progress.labels(region, store.name, phase).set(1 if here else 0)
        m.move_phase_age.labels(region, store.name, phase).set(active["phase_age_s"] if here else 0)
        m.move_lag.labels(region, store.name, phase).set(active["lag"] if here else 0)
    if len(_freezes_seen) >= limits.MOVE_FREEZES_REMEMBERED_MAX:
        _freezes_seen.clear()  # bounded memory; a freeze seen again is one more sample, never a lost one
    for move_id, freeze_s in seen["freezes"]:
        if move_id not in _freezes_seen:
            _freezes_seen.add(move_id)
            m.move_freeze.labels(region).observe(max(freeze_s, 0.0))
    return float(active["phase_age_s"]) if active else 0.0


async def _publish_cloudwatch_metrics(ledger: RegionLedger) -> None:
    """Every EMF_INTERVAL_S, the metrics the region's CloudWatch alarms watch, as one log line."""
    emf = telemetry.CloudWatchEmf(ledger.region)
    while True:
        await asyncio.sleep(limits.EMF_INTERVAL_S)
        seen = []
        move_ages: list[float] = []
        for store in ledger.stores.values():
            try:
                async with asyncio.timeout(limits.METRICS_DB_TIMEOUT_S):
                    seen.append(await store.observe())
                age = await _observe_moves(ledger.region, store)
                if age is not None:
                    move_ages.append(age)
            except (TimeoutError, ShardUnavailable):
                pass  # that shard's figures are missing from this interval; the alarms treat missing data
            except Exception as exc:  # the publisher must outlive any one failure
                log.error("cloudwatch_metrics_error", extra={"shard": store.name, "error_type": type(exc).__name__})
        audits = [s["audit_clean"] for s in seen if s["audit_clean"] is not None]
        oldest_s = max((s["oldest_s"] for s in seen), default=None)
        print(emf.line(outbox_oldest_s=oldest_s, audit_clean=all(audits) if audits else None,
                       move_phase_age_s=max(move_ages, default=None)),
              file=sys.stderr, flush=True)


def app_from_env() -> telemetry.Instrumented:
    """Entry point for the ASGI server: `granian --interface asgi --factory app.region.app:app_from_env`."""
    return create_app(RegionSettings.from_env())
