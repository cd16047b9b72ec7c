"""Logs, metrics and traces for both deployables (DESIGN D9), set up by `configure(...)` from each composition
root. What may leave the process is fixed here, and only names, ids and codes ever do (DESIGN D8):

    logs      JSON lines on stderr: time, level, event, service, region, and per request its request id, trace
              id and shard. An exception is logged by its type only: its message or frames could carry SQL, a
              token or a secret.
    metrics   Prometheus exposition (`exposition()`, served at /metrics): request durations by route template,
              status and region; problems by code; the ledger's and the saga's own counters and gauges. Labels
              come from fixed sets (route templates, status codes, problem codes, shard names), never from a
              raw path or a body.
    traces    OpenTelemetry, configured by the standard `OTEL_*` variables: `OTEL_TRACES_EXPORTER` `otlp`
              (OTLP over HTTP, `OTEL_EXPORTER_OTLP_ENDPOINT`...) or `console`; unset or `none` (the default)
              is off, and then no span object is made at all (`TRACING.enabled` is False, a no-op context
              manager stands in). Attributes are names, codes and statuses; never a header, a body, a SQL
              parameter or an exception's message. Trace context crosses every hop as W3C `traceparent`,
              traced or not, so logs of one request share a trace id across processes.

A request's context (request id, trace id, shard, error code) lives in a context variable set by
`Instrumented`, the ASGI wrapper both deployables run behind; it feeds the log lines, the server span's
attributes and the problem counter.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import random
import re
import sys
import time
from collections.abc import Awaitable, Callable, Iterator, Mapping, MutableMapping, Sequence
from contextvars import ContextVar
from dataclasses import dataclass, field
from typing import Any

import msgspec
import prometheus_client
from opentelemetry import trace
from opentelemetry.context import Context
from opentelemetry.trace import Link, SpanContext, SpanKind, Status, StatusCode

from app import limits

Scope = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[MutableMapping[str, Any]]]
Send = Callable[[MutableMapping[str, Any]], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]

# Request context ----------------------------------------------------------------------------------------


@dataclass(slots=True)
class RequestContext:
    request_id: str
    trace_id: str
    shard: str | None = None
    error_code: str | None = None


_request: ContextVar[RequestContext | None] = ContextVar("txroute_request", default=None)
_REQUEST_ID = re.compile(r"^[A-Za-z0-9._-]{8,64}$")
_TRACEPARENT = re.compile(r"^00-([0-9a-f]{32})-([0-9a-f]{16})-([0-9a-f]{2})$")
_NO_TRACE = "0" * 32


def random_hex(nbytes: int) -> str:
    """`nbytes` random bytes as hex, for request, trace and span ids. They identify, they guard nothing (no
    id is a secret or a capability), so they come from `random` (reseeded in a forked child) rather than the
    OS's generator: `secrets.token_hex` made a getrandom system call each, three per forwarded request."""
    return f"{random.getrandbits(nbytes * 8):0{nbytes * 2}x}"


def request_id(given: str | None) -> str:
    """The caller's X-Request-Id when well-formed, else a new one."""
    return given if given and _REQUEST_ID.match(given) else "req_" + random_hex(12)


def current() -> RequestContext | None:
    return _request.get()


def annotate(*, shard: str | None = None, error_code: str | None = None) -> None:
    """Record what the request touched (its shard) or how it failed (its problem code): on its log lines,
    on its server span, and for the problem counter."""
    ctx = _request.get()
    if ctx is not None:
        if shard is not None:
            ctx.shard = shard
        if error_code is not None:
            ctx.error_code = error_code
    if TRACING.enabled:
        span = trace.get_current_span()
        if shard is not None:
            span.set_attribute("txroute.shard", shard)
        if error_code is not None:
            span.set_attribute("txroute.error_code", error_code)


# Logs ---------------------------------------------------------------------------------------------------

_STANDARD = set(logging.LogRecord("", 0, "", 0, "", (), None).__dict__) | {"message", "asctime"}
_context: dict[str, str] = {}


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        doc: dict[str, Any] = {
            "time": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)) + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "event": record.msg if isinstance(record.msg, str) else str(record.msg),
            "logger": record.name,
            **_context,
        }
        ctx = _request.get()
        if ctx is not None:
            doc["request_id"] = ctx.request_id
            doc["trace_id"] = ctx.trace_id
            if ctx.shard is not None:
                doc["shard"] = ctx.shard
        for key, value in record.__dict__.items():
            if key not in _STANDARD and not key.startswith("_"):
                doc[key] = value if isinstance(value, (str, int, float, bool, type(None))) else str(value)
        if record.exc_info and record.exc_info[0] is not None:
            doc["error_type"] = record.exc_info[0].__name__
        return msgspec.json.encode(doc).decode()


def configure_logging(*, service: str, region: str | None = None) -> None:
    _context.update(service=service)
    if region:
        _context.update(region=region)
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(os.environ.get("TXROUTE_LOG_LEVEL", "INFO").upper())
    for noisy in ("granian", "granian.access", "httpx", "asyncio"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


# Metrics ------------------------------------------------------------------------------------------------

_LATENCY_BUCKETS_S = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
_HOLD_BUCKETS_S = (0.025, 0.05, 0.1, 0.25, 0.5, 0.75, 1.0, 1.5, 2.0, 3.0, 5.0, 10.0)
_METHODS = frozenset({"GET", "POST", "PUT", "PATCH", "DELETE", "HEAD", "OPTIONS"})


class _KnownLabels:
    """prometheus_client's `labels()` validates, converts every value with str() and takes a lock on each
    call, which the profile of a posting showed (3% of the service's Python time, `_counted` once per
    request). A child that exists already is found with one dict read instead, when the values are given
    positionally as strings (the child's key): the same object `labels()` returns, and nothing is cached
    beside prometheus_client's own table, so `remove()` and `clear()` keep working. Anything else takes
    the full path."""

    def labels(self, *values: Any, **by_name: Any) -> Any:
        children = getattr(self, "_metrics", None)  # only a labelled parent has one
        if children is not None and not by_name:
            child = children.get(values)  # keys are tuples of str: a non-str value never matches here
            if child is not None:
                return child
        return super().labels(*values, **by_name)  # type: ignore[misc]


class _Counter(_KnownLabels, prometheus_client.Counter):
    pass


class _Gauge(_KnownLabels, prometheus_client.Gauge):
    pass


class _Histogram(_KnownLabels, prometheus_client.Histogram):
    pass


class Metrics:
    """Every metric of both deployables; a process exposes those it uses. Label values are bounded sets."""

    def __init__(self, registry: prometheus_client.CollectorRegistry) -> None:
        self.registry = registry
        c, g, h = _Counter, _Gauge, _Histogram
        r = registry
        self.requests = h("txroute_http_request_duration_seconds",
                          "HTTP requests served, by route template, status and region (count = request rate)",
                          ["route", "status", "region"], buckets=_LATENCY_BUCKETS_S, registry=r)
        self.problems = c("txroute_http_problems_total", "Problem answers by route template and stable code",
                          ["route", "code", "region"], registry=r)
        self.upstream = h("txroute_upstream_request_duration_seconds",
                          "Calls to a region service (router forwarding, saga delivery), by peer and status",
                          ["peer", "status", "region"], buckets=_LATENCY_BUCKETS_S, registry=r)
        self.transfers = c("txroute_transfers_total",
                           "Postings answered by the ledger (replays excluded), by kind and outcome",
                           ["kind", "outcome", "region"], registry=r)
        self.replays = c("txroute_idempotent_replays_total", "Requests answered from a stored idempotent response",
                         ["route", "region"], registry=r)
        self.misdirected = c("txroute_misdirected_total",
                             "421 Misdirected Request: answered by a region (side=region) or received and retried "
                             "by a router after a shard map refresh (side=router)", ["side", "region"], registry=r)
        self.rate_limited = c("txroute_rate_limited_total",
                              "Requests refused 429 rate_limited, by limit: client_rate (a router's per-client "
                              "token bucket) or shard_queue (a client's share of a shard's posting queue)",
                              ["reason", "region"], registry=r)
        self.held_requests = c("txroute_router_held_requests_total",
                               "Requests a router held because their slot was moving (503 slot_moving), by "
                               "outcome: released (answered by the owner), timeout (answered 503 slot_moving "
                               "after the hold), overflow (too many held already), error (region unreachable)",
                               ["outcome", "region"], registry=r)
        self.held_now = g("txroute_router_requests_on_hold", "Requests a router holds right now for a moving slot",
                          ["region"], registry=r)
        self.hold_duration = h("txroute_router_hold_duration_seconds",
                               "How long a router held a request for a moving slot, by outcome",
                               ["outcome", "region"], buckets=_HOLD_BUCKETS_S, registry=r)
        # Slot moves (DESIGN D13), read from each shard's slot_moves rows when a region is scraped (bounded by
        # METRICS_DB_TIMEOUT_S, like the saga gauges); a move is counted by the shard it leaves.
        self.moves_in_progress = g("txroute_slot_moves_in_progress",
                                   "Slot moves leaving a shard that have not finished, by phase",
                                   ["region", "shard", "phase"], registry=r)
        self.move_phase_age = g("txroute_slot_move_phase_age_seconds",
                                "How long the oldest unfinished move leaving a shard has been in its phase",
                                ["region", "shard", "phase"], registry=r)
        self.move_lag = g("txroute_slot_move_lag_rows",
                          "Changes to the range of an unfinished move leaving a shard (its change log) not yet "
                          "applied to the target: the catch-up's lag, by phase",
                          ["region", "shard", "phase"], registry=r)
        self.move_freeze = h("txroute_slot_move_freeze_duration_seconds",
                             "How long a move kept its slot range frozen (writes answered 503 slot_moving), "
                             "observed once per move leaving a shard of this region when its freeze ended",
                             ["region"], buckets=_HOLD_BUCKETS_S, registry=r)
        self.saga_backlog = g("txroute_saga_backlog", "Saga messages in a shard's outbox not yet delivered",
                              ["region", "shard"], registry=r)
        self.saga_oldest_s = g("txroute_saga_oldest_pending_age_seconds",
                               "Age of the oldest undelivered saga message of a shard", ["region", "shard"],
                               registry=r)
        self.saga_retries = c("txroute_saga_relay_retries_total", "Saga deliveries the relay rescheduled",
                              ["region", "shard"], registry=r)
        self.saga_deliveries = c("txroute_saga_deliveries_total", "Saga messages delivered and settled, by answer",
                                 ["region", "outcome"], registry=r)
        self.saga_dead_letters = g("txroute_saga_dead_letters",
                                   "Saga messages of a shard's outbox dead-lettered after SAGA_POISON_FAILURES_MAX "
                                   "failures that cannot heal (their money stays in transit)", ["region", "shard"],
                                   registry=r)
        self.saga_dead_lettered = c("txroute_saga_dead_lettered_total",
                                    "Saga messages this process dead-lettered", ["region", "shard"], registry=r)
        self.system_account_usage = g("txroute_system_account_usage_ratio",
                                      "The fullest settlement or transit account of a shard: |balance| over its "
                                      "bound SYSTEM_ACCOUNT_BALANCE_ABS_MAX (at 1 its postings are refused)",
                                      ["region", "shard"], registry=r)
        self.pool_in_use = g("txroute_db_pool_connections_in_use", "Database connections checked out of the pool",
                             ["region", "shard"], registry=r)
        self.pool_max = g("txroute_db_pool_connections_max", "The pool's bound", ["region", "shard"], registry=r)
        self.audit_clean = g("txroute_last_audit_clean",
                             "1 when the last `txroute audit` recorded in the shard found no violation, else 0",
                             ["region", "shard"], registry=r)
        self.audit_time = g("txroute_last_audit_timestamp_seconds", "When the last recorded audit ran (Unix time)",
                            ["region", "shard"], registry=r)
        # Webhooks (issue 13). `reason` is a bounded set: status_4xx, status_5xx, gone, timeout, connection,
        # url_refused; `endpoint` labels are bounded by WEBHOOK_ENDPOINTS_PER_CLIENT_MAX per client.
        self.webhook_attempts = c("txroute_webhook_attempts_total", "Webhook delivery attempts, by result",
                                  ["region", "result"], registry=r)
        self.webhook_failures = c("txroute_webhook_failures_total", "Failed webhook delivery attempts, by reason",
                                  ["region", "reason"], registry=r)
        self.webhook_latency = h("txroute_webhook_attempt_duration_seconds",
                                 "One webhook delivery attempt, connect to answer", ["region"],
                                 buckets=_LATENCY_BUCKETS_S, registry=r)
        self.webhook_backlog_age = g("txroute_webhook_backlog_age_seconds",
                                     "Age of the oldest event not yet delivered to an endpoint (0: none waiting)",
                                     ["region", "endpoint"], registry=r)
        self.webhook_endpoints_disabled = g("txroute_webhook_endpoints_disabled",
                                            "Webhook endpoints of a shard disabled after failing deliveries or 410",
                                            ["region", "shard"], registry=r)
        self.webhook_endpoints_disabled_total = c(
            "txroute_webhook_endpoint_disabled_total",
            "Endpoints this process disabled, by why: gone (410) or failing (the retry schedule ran out)",
            ["region", "reason"], registry=r)
        # `shard` is a local shard, or a peer region whose feed could not be read; `stage` a bounded set:
        # endpoints, ingest, feed_read, claim, peer_read, peer_refused.
        self.webhook_shard_errors = c("txroute_webhook_shard_errors_total",
                                      "Webhook worker passes that skipped a shard or peer region it could not reach",
                                      ["region", "shard", "stage"], registry=r)
        self.events_deleted = c("txroute_events_deleted_total", "Events deleted past their retention",
                                ["region", "shard"], registry=r)
        self.scrape_errors = c("txroute_metrics_shard_read_errors_total",
                               "Scrapes that could not read a shard's outbox or audit record in time",
                               ["region", "shard"], registry=r)


METRICS = Metrics(prometheus_client.REGISTRY)


def exposition() -> tuple[bytes, str]:
    """The process's metrics in Prometheus text format, and its content type."""
    return prometheus_client.generate_latest(METRICS.registry), prometheus_client.CONTENT_TYPE_LATEST


def route_label(scope: Mapping[str, Any]) -> str:
    """`METHOD /template` for a matched route, else `unmatched` (never the raw path: unbounded labels)."""
    template = scope.get("path_template")
    if not template:
        return "unmatched"
    method = scope.get("method", "")
    if method not in _METHODS:
        method = "OTHER"
    key = (method, template)
    label = _route_labels.get(key)
    if label is None:  # bounded: methods are a fixed set, templates are the app's routes
        label = _route_labels[key] = f"{method} {_TYPED_PARAM.sub('}', template)}"
    return label


_TYPED_PARAM = re.compile(r":[a-z]+}")
_route_labels: dict[tuple[str, str], str] = {}


# CloudWatch: the few metrics the alarms in infra/ watch, as embedded metric format lines in the log ------

EMF_NAMESPACE = "txroute"  # infra/txroute_infra/layout.py names the same namespace and metrics
_IDEMPOTENCY_CODES = frozenset({"idempotency_key_reused", "idempotency_key_in_flight"})


def _sample_sum(metric: Any, sample: str, keep: Callable[[dict[str, str]], bool]) -> float:
    return float(sum(s.value for family in metric.collect() for s in family.samples
                     if s.name == sample and keep(s.labels)))


class CloudWatchEmf:
    """One JSON line per interval that CloudWatch Logs turns into metrics (dimension `Region`). A region's
    (`line`): the outbox's oldest message age, the last audit's result, the longest time an unfinished slot move
    has spent in its phase and, over the interval, writes, idempotency conflicts, postings refused 429 for a
    client's share of a shard's queue and webhook endpoints disabled (410 or failing deliveries). A router's
    (`router_line`): only the requests it refused 429 for a client's rate, so the two add up in `RateLimited`
    and nothing else is counted twice."""

    def __init__(self, region: str) -> None:
        self.region = region
        self._totals = self._read_totals()

    def router_line(self) -> str:
        totals = self._read_totals()
        limited = totals[2] - self._totals[2]
        self._totals = totals
        return self._document({"RateLimited": limited}, {"RateLimited": "Count"})

    @staticmethod
    def _read_totals() -> tuple[float, float, float, float]:
        conflicts = _sample_sum(METRICS.problems, "txroute_http_problems_total",
                                lambda labels: labels["code"] in _IDEMPOTENCY_CODES)
        writes = _sample_sum(METRICS.requests, "txroute_http_request_duration_seconds_count",
                             lambda labels: labels["route"].startswith("POST /v1/"))
        limited = _sample_sum(METRICS.rate_limited, "txroute_rate_limited_total", lambda labels: True)
        disabled = _sample_sum(METRICS.webhook_endpoints_disabled_total, "txroute_webhook_endpoint_disabled_total",
                               lambda labels: True)
        return conflicts, writes, limited, disabled

    def line(self, *, outbox_oldest_s: float | None, audit_clean: bool | None,
             move_phase_age_s: float | None = None) -> str:
        totals = self._read_totals()
        conflicts, writes, limited, disabled = (
            now - before for now, before in zip(totals, self._totals, strict=True))
        values: dict[str, float] = {"IdempotencyConflicts": conflicts, "Writes": writes, "RateLimited": limited,
                                    "WebhookEndpointsDisabled": disabled}
        self._totals = totals
        units = {"IdempotencyConflicts": "Count", "Writes": "Count", "RateLimited": "Count",
                 "WebhookEndpointsDisabled": "Count"}
        if outbox_oldest_s is not None:
            values["OutboxOldestAgeSeconds"] = round(outbox_oldest_s, 3)
            units["OutboxOldestAgeSeconds"] = "Seconds"
        if audit_clean is not None:
            values["LastAuditClean"] = 1 if audit_clean else 0
            units["LastAuditClean"] = "None"
        if move_phase_age_s is not None:
            values["SlotMoveOldestPhaseAgeSeconds"] = round(move_phase_age_s, 3)
            units["SlotMoveOldestPhaseAgeSeconds"] = "Seconds"
        return self._document(values, units)

    def _document(self, values: dict[str, float], units: dict[str, str]) -> str:
        now = time.time()
        doc = {
            "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(now)), "level": "info",
            "event": "cloudwatch_metrics", **_context, "Region": self.region, **values,
            "_aws": {"Timestamp": int(now * 1000), "CloudWatchMetrics": [{
                "Namespace": EMF_NAMESPACE, "Dimensions": [["Region"]],
                "Metrics": [{"Name": name, "Unit": unit} for name, unit in units.items()],
            }]},
        }
        return msgspec.json.encode(doc).decode()


async def publish_router_cloudwatch_metrics(region: str) -> None:
    """Every EMF_INTERVAL_S, the router's one line for the CloudWatch alarms (`CloudWatchEmf.router_line`)."""
    emf = CloudWatchEmf(region)
    while True:
        await asyncio.sleep(limits.EMF_INTERVAL_S)
        print(emf.router_line(), file=sys.stderr, flush=True)


# Traces -------------------------------------------------------------------------------------------------


@dataclass
class Tracing:
    """Off unless `OTEL_TRACES_EXPORTER` names an exporter; `tracer` is only used when `enabled`."""

    enabled: bool = False
    tracer: trace.Tracer = field(default_factory=lambda: trace.NoOpTracer())
    provider: Any = None

    def shutdown(self) -> None:
        if self.provider is not None:
            self.provider.shutdown()
        self.enabled, self.provider, self.tracer = False, None, trace.NoOpTracer()


TRACING = Tracing()
_NOOP = contextlib.nullcontext()


def configure_tracing(*, service: str, region: str | None, exporters: Sequence[Any] | None = None) -> None:
    """Turn tracing on when `OTEL_TRACES_EXPORTER` asks for it, or with `exporters` (tests: in-memory)."""
    names = [n.strip() for n in os.environ.get("OTEL_TRACES_EXPORTER", "none").split(",") if n.strip()]
    if exporters is None and all(n == "none" for n in names):
        return
    from opentelemetry.sdk.resources import Resource
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor, ConsoleSpanExporter, SimpleSpanProcessor

    attributes = {"service.name": f"txroute-{service}"}
    if region:
        attributes["cloud.region"] = region
    provider = TracerProvider(resource=Resource.create(attributes))  # OTEL_SERVICE_NAME etc. still apply
    if exporters is not None:
        for exporter in exporters:
            provider.add_span_processor(SimpleSpanProcessor(exporter))
    for name in names:
        if name == "otlp":
            from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter

            provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter()))
        elif name == "console":
            console = ConsoleSpanExporter(out=sys.stderr, formatter=lambda s: s.to_json(indent=None) + "\n")
            provider.add_span_processor(BatchSpanProcessor(console))
        elif name != "none":
            raise ValueError(f"OTEL_TRACES_EXPORTER: {name!r} is not one of otlp, console, none")
    TRACING.provider = provider
    TRACING.tracer = provider.get_tracer("txroute")
    TRACING.enabled = True


def _attr(value: str) -> str:
    return value[: limits.SPAN_ATTRIBUTE_CHARS_MAX]


def current_span_context() -> SpanContext | None:
    """The active span's context when tracing is on (to parent or link work done elsewhere), else None."""
    if not TRACING.enabled:
        return None
    context = trace.get_current_span().get_span_context()
    return context if context.is_valid else None


@contextlib.contextmanager
def _span(name: str, *, kind: SpanKind, context: Context | None, links: Sequence[Link] = (),
          attributes: Mapping[str, str | int] | None = None) -> Iterator[trace.Span]:
    # Exceptions are recorded by type only: their message could hold SQL, a token or an amount.
    with TRACING.tracer.start_as_current_span(
        name, context=context, kind=kind, links=links, attributes=attributes,
        record_exception=False, set_status_on_exception=False,
    ) as span:
        try:
            yield span
        except BaseException as exc:
            span.set_attribute("error.type", type(exc).__name__)
            span.set_status(Status(StatusCode.ERROR))
            raise


def db_span(operation: str, shard: str, *, parent: SpanContext | None = None,
            links: Sequence[SpanContext] = (), batch_size: int | None = None) -> contextlib.AbstractContextManager[Any]:
    """One span per database round trip: the operation's name and the shard, never SQL or its parameters.
    `parent` places a round trip made on behalf of a request by another task (group commit) in its trace."""
    if not TRACING.enabled:
        return _NOOP
    attributes: dict[str, str | int] = {"db.system": "postgresql", "db.operation": operation, "txroute.shard": shard}
    if batch_size is not None:
        attributes["db.batch.size"] = batch_size
    context = trace.set_span_in_context(trace.NonRecordingSpan(parent)) if parent is not None else None
    return _span(f"db {operation}", kind=SpanKind.CLIENT, context=context,
                 links=[Link(c) for c in links], attributes=attributes)


def client_span(peer: str, method: str) -> contextlib.AbstractContextManager[Any]:
    """The span of one call to a region service (forwarding or saga delivery)."""
    if not TRACING.enabled:
        return _NOOP
    return _span(f"{method} {peer}", kind=SpanKind.CLIENT, context=None,
                 attributes={"txroute.peer_region": peer, "http.request.method": method})


def linked_root_span(
    name: str, attributes: Mapping[str, str], *, origin: SpanContext | None = None,
    origins: Sequence[SpanContext | None] = (),
) -> contextlib.AbstractContextManager[Any]:
    """A new trace for work that outlives the request that caused it (a saga message's delivery), linked to
    that request's span so one can be found from the other: `origin` when given (the context stored with
    the work, for a retry long after the request), else the current span. Work done for many requests at
    once (a relay batch) passes their contexts as `origins` and is linked to each."""
    if not TRACING.enabled:
        return _NOOP
    if origins:
        links = [Link(o) for o in origins if o is not None and o.is_valid]
        return _span(name, kind=SpanKind.INTERNAL, context=Context(), links=links,
                     attributes={k: _attr(v) for k, v in attributes.items()})
    if origin is None:
        origin = trace.get_current_span().get_span_context()
    links = [Link(origin)] if origin.is_valid else []
    return _span(name, kind=SpanKind.INTERNAL, context=Context(), links=links,
                 attributes={k: _attr(v) for k, v in attributes.items()})


def traceparent(context: SpanContext) -> str:
    """A span context as a W3C `traceparent` value (to store with work that is done later)."""
    return f"00-{context.trace_id:032x}-{context.span_id:016x}-{int(context.trace_flags):02x}"


def span_context(traceparent_value: str | None) -> SpanContext | None:
    """A stored `traceparent` back as a (remote) span context; None when absent or malformed."""
    m = _TRACEPARENT.match(traceparent_value or "")
    if m is None or m.group(1) == _NO_TRACE or m.group(2) == "0" * 16:
        return None
    return SpanContext(int(m.group(1), 16), int(m.group(2), 16), is_remote=True,
                       trace_flags=trace.TraceFlags(int(m.group(3), 16)))


def inject(headers: dict[str, str]) -> None:
    """Put the current trace context on an outgoing call's headers (W3C `traceparent`). Untraced, the
    request's trace id still travels, under a new parent id; work outside a request starts a new trace."""
    if TRACING.enabled:
        context = trace.get_current_span().get_span_context()
        if context.is_valid:
            headers["traceparent"] = traceparent(context)
            return
    ctx = _request.get()
    trace_id = ctx.trace_id if ctx is not None else random_hex(16)
    headers["traceparent"] = f"00-{trace_id}-{random_hex(8)}-01"


def _incoming_context(traceparent: str | None) -> tuple[str | None, Context | None]:
    """The caller's trace id (if its `traceparent` is valid) and, when tracing, the context to continue."""
    m = _TRACEPARENT.match(traceparent or "")
    if m is None or m.group(1) == _NO_TRACE or m.group(2) == "0" * 16:
        return None, None
    if not TRACING.enabled:
        return m.group(1), None
    parent = span_context(traceparent)
    assert parent is not None
    return m.group(1), trace.set_span_in_context(trace.NonRecordingSpan(parent))


# The ASGI wrapper ---------------------------------------------------------------------------------------

_access_log = logging.getLogger("txroute.access")


class Instrumented:
    """Wraps a deployable's ASGI app: per HTTP request a request id and trace id (the caller's when
    well-formed), a server span when tracing, and its duration, status and problem code as metrics."""

    def __init__(self, app: Any, *, service: str, region: str) -> None:
        self.app: ASGIApp = app  # Any: Litestar declares its own, narrower ASGI scope types
        self.service = service
        self.region = region
        # Labelled histogram children by (route, status): label lookup costs more than the observation.
        # Bounded: routes are the app's templates, statuses the few the app answers with.
        self._durations: dict[tuple[str, int], Any] = {}

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        given_rid: str | None = None
        traceparent: str | None = None
        for name, value in scope["headers"]:
            if name == b"x-request-id":
                given_rid = value.decode("latin-1")
            elif name == b"traceparent":
                traceparent = value.decode("latin-1")
        rid = request_id(given_rid)
        scope.setdefault("state", {})["request_id"] = rid
        trace_id, parent = _incoming_context(traceparent)
        ctx = RequestContext(rid, trace_id or random_hex(16))
        token = _request.set(ctx)
        status = 500

        async def send_status(message: MutableMapping[str, Any]) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            if TRACING.enabled:
                await self._traced(scope, receive, send_status, ctx, parent, lambda: status)
            else:
                await self.app(scope, receive, send_status)
        finally:
            route = route_label(scope)
            elapsed_s = time.perf_counter() - started
            duration = self._durations.get((route, status))
            if duration is None:
                duration = self._durations[(route, status)] = METRICS.requests.labels(route, str(status), self.region)
            duration.observe(elapsed_s)
            if ctx.error_code is not None:
                METRICS.problems.labels(route, ctx.error_code, self.region).inc()
            if _access_log.isEnabledFor(logging.DEBUG):  # one line per request, at DEBUG only
                _access_log.debug("request", extra={"route": route, "status": status, "code": ctx.error_code,
                                                    "duration_ms": round(elapsed_s * 1000, 3)})
            _request.reset(token)

    async def _traced(self, scope: Scope, receive: Receive, send: Send, ctx: RequestContext,
                      parent: Context | None, status: Callable[[], int]) -> None:
        with _span(f"{scope['method'] if scope['method'] in _METHODS else 'OTHER'} {self.service}",
                   kind=SpanKind.SERVER, context=parent,
                   attributes={"txroute.region": self.region, "txroute.request_id": ctx.request_id}) as span:
            # The span's trace id is the one logged: the caller's, or the new trace's.
            ctx.trace_id = f"{span.get_span_context().trace_id:032x}"
            try:
                await self.app(scope, receive, send)
            finally:
                route = route_label(scope)
                if route != "unmatched":
                    span.update_name(route)
                span.set_attribute("http.route", route)
                span.set_attribute("http.response.status_code", status())
                if status() >= 500:
                    span.set_status(Status(StatusCode.ERROR))


def configure(*, service: str, region: str) -> None:
    """Logs and traces of one process; called once from its composition root's startup."""
    configure_logging(service=service, region=region)
    if not TRACING.enabled:
        configure_tracing(service=service, region=region)


def shutdown() -> None:
    """Flush the spans still buffered (on the process's way out)."""
    TRACING.shutdown()
