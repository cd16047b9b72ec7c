"""telemetry in-process: tracing off costs no span at all; on (in-memory exporter), a request's server span
carries route, status, region, shard and code, and nothing from its headers or body."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from typing import Any

import pytest
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from app import telemetry

SECRET = "Bearer eyJhbGciOiJFZERTQSJ9.eyJzdWIiOiJ4In0.c2VjcmV0LXNpZ25hdHVyZQ"


async def _app(scope: dict[str, Any], receive: Any, send: Any) -> None:
    """A stand-in service: routes like Litestar (path_template), touches a shard, refuses with a code."""
    scope["path_template"] = "/v1/accounts/{account_id:str}"
    telemetry.annotate(shard="euw1-a", error_code="account_not_found")
    with telemetry.db_span("get_account", "euw1-a"):
        pass
    await send({"type": "http.response.start", "status": 404, "headers": []})
    await send({"type": "http.response.body", "body": b"{}"})


async def _call(app: telemetry.Instrumented, traceparent: str | None = None) -> list[dict[str, Any]]:
    headers = [(b"authorization", SECRET.encode()), (b"x-request-id", b"req-unit-test-1")]
    if traceparent:
        headers.append((b"traceparent", traceparent.encode()))
    scope = {"type": "http", "method": "GET", "path": "/v1/accounts/acc_0001", "headers": headers}
    sent: list[dict[str, Any]] = []

    async def receive() -> dict[str, Any]:
        return {"type": "http.request", "body": b""}

    async def send(message: Any) -> None:
        sent.append(message)

    await app(scope, receive, send)
    return sent


@pytest.fixture
def memory() -> Iterator[InMemorySpanExporter]:
    assert not telemetry.TRACING.enabled, "expected tracing off by default"
    exporter = InMemorySpanExporter()
    telemetry.configure_tracing(service="region", region="eu-west-1", exporters=[exporter])
    try:
        yield exporter
    finally:
        telemetry.TRACING.shutdown()


def test_tracing_off_makes_no_span_and_still_propagates_a_trace_id() -> None:
    assert not telemetry.TRACING.enabled
    assert telemetry.db_span("post", "euw1-a") is telemetry.db_span("owns", "euw1-b"), "expected one shared no-op"
    assert telemetry.current_span_context() is None
    headers: dict[str, str] = {}
    telemetry.inject(headers)
    assert headers["traceparent"].startswith("00-") and len(headers["traceparent"]) == 55
    sent = asyncio.run(_call(telemetry.Instrumented(_app, service="region", region="eu-west-1")))
    assert sent[0]["status"] == 404


def test_a_traced_request_has_route_status_region_shard_and_code_and_nothing_from_headers(
    memory: InMemorySpanExporter,
) -> None:
    parent_trace, parent_span = "a" * 32, "b" * 16
    asyncio.run(_call(telemetry.Instrumented(_app, service="region", region="eu-west-1"),
                      f"00-{parent_trace}-{parent_span}-01"))
    spans = {s.name: s for s in memory.get_finished_spans()}
    server, db = spans["GET /v1/accounts/{account_id}"], spans["db get_account"]
    assert f"{server.context.trace_id:032x}" == parent_trace and f"{server.parent.span_id:016x}" == parent_span
    assert db.parent.span_id == server.context.span_id
    assert dict(server.attributes) == {
        "txroute.region": "eu-west-1", "txroute.request_id": "req-unit-test-1", "txroute.shard": "euw1-a",
        "txroute.error_code": "account_not_found", "http.route": "GET /v1/accounts/{account_id}",
        "http.response.status_code": 404,
    }
    assert dict(db.attributes) == {"db.system": "postgresql", "db.operation": "get_account", "txroute.shard": "euw1-a"}
    for span in memory.get_finished_spans():
        text = span.to_json()
        assert "eyJ" not in text and "Bearer" not in text and "acc_0001" not in text, span.name


def test_an_exception_is_recorded_by_type_only(memory: InMemorySpanExporter) -> None:
    with pytest.raises(ValueError), telemetry.db_span("post", "euw1-a"):
        raise ValueError("insert into ... values ('" + SECRET + "')")
    (span,) = memory.get_finished_spans()
    assert span.attributes["error.type"] == "ValueError" and not span.events
    assert "eyJ" not in span.to_json()


def test_a_routers_cloudwatch_line_carries_only_its_rate_limited_refusals_over_the_interval() -> None:
    import json

    emf = telemetry.CloudWatchEmf("eu-west-1")
    counter = telemetry.METRICS.rate_limited.labels("client_rate", "eu-west-1")
    counter.inc(3)
    line = json.loads(emf.router_line())
    (directive,) = line["_aws"]["CloudWatchMetrics"]
    assert [m["Name"] for m in directive["Metrics"]] == ["RateLimited"], "expected nothing a region also counts"
    assert line["RateLimited"] == 3 and line["Region"] == "eu-west-1"
    assert json.loads(emf.router_line())["RateLimited"] == 0, "expected the next interval to start from zero"
