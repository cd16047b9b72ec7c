"""One trace per client request across processes: router -> region -> database, W3C trace context on every
hop, and a saga's delivery to the peer region as its own trace linked to the request (DESIGN D9)."""

from __future__ import annotations

import secrets

from tests.e2e.conftest import RouterApi
from tests.observability.conftest import Span, TracedWorld, dump, open_in


def _by_id(spans: list[Span]) -> dict[str, Span]:
    return {s.span_id: s for s in spans}


def _in_trace(spans: list[Span], trace_id: str) -> list[Span]:
    return [s for s in spans if s.trace_id == trace_id]


def _root(span: Span, index: dict[str, Span]) -> Span:
    while span.parent_span_id and span.parent_span_id in index:
        span = index[span.parent_span_id]
    return span


async def test_a_deposit_is_one_trace_from_the_callers_parent_through_router_and_region_to_the_database(
    traced: TracedWorld, traced_api: RouterApi
) -> None:
    account = await open_in(traced_api, "eu-west-1")
    trace_id, caller_span = secrets.token_hex(16), secrets.token_hex(8)
    response = await traced_api.http.post(
        "/v1/deposits", json={"account": account, "amount": 500, "currency": "EUR"},
        headers=traced_api.headers(key="key-" + secrets.token_hex(8),
                                   extra={"traceparent": f"00-{trace_id}-{caller_span}-01"}),
    )
    assert response.status_code == 201, response.text

    def complete(spans: list[Span]) -> bool:
        mine = _in_trace(spans, trace_id)
        return {("txroute-region", 2), ("txroute-router", 2), ("txroute-router", 3)} <= {
            (s.service, s.kind) for s in mine} and any(s.name == "db post" for s in mine)

    seen = traced.collector.wait_for(complete, what="the deposit's router, region and database spans")
    spans = _in_trace(seen, trace_id)
    index = _by_id(spans)
    (router_server,) = [s for s in spans if s.service == "txroute-router" and s.kind == 2]  # OTLP SERVER = 2
    assert router_server.parent_span_id == caller_span, "expected the router to continue the caller's trace"
    assert router_server.attributes["http.route"] == "POST /v1/deposits"
    assert router_server.attributes["http.response.status_code"] == 201
    (router_client,) = [s for s in spans if s.service == "txroute-router" and s.kind == 3]  # CLIENT = 3
    assert router_client.parent_span_id == router_server.span_id
    assert router_client.attributes["txroute.peer_region"] == "eu-west-1"
    (region_server,) = [s for s in spans if s.service == "txroute-region" and s.kind == 2]
    assert region_server.parent_span_id == router_client.span_id, (
        f"expected the region's server span to be the child of the router's client span:\n{dump(spans)}")
    assert region_server.attributes["txroute.region"] == "eu-west-1"
    assert region_server.attributes["http.route"] == "POST /v1/deposits"
    assert region_server.attributes["txroute.shard"].startswith("euw1-")
    (db,) = [s for s in spans if s.name == "db post"]
    assert db.parent_span_id == region_server.span_id, "expected the group commit's round trip in the request's trace"
    assert db.attributes["db.system"] == "postgresql" and db.attributes["txroute.shard"].startswith("euw1-")
    assert _root(db, index) is router_server


async def test_a_refusal_carries_its_error_code_on_the_span(traced: TracedWorld, traced_api: RouterApi) -> None:
    account = await open_in(traced_api, "us-east-1")
    trace_id = secrets.token_hex(16)
    response = await traced_api.http.post(
        "/v1/withdrawals", json={"account": account, "amount": 5, "currency": "EUR"},
        headers=traced_api.headers(key="key-" + secrets.token_hex(8),
                                   extra={"traceparent": f"00-{trace_id}-{secrets.token_hex(8)}-01"}),
    )
    assert response.status_code == 422 and response.json()["code"] == "insufficient_funds"
    spans = traced.collector.wait_for(
        lambda ss: any(s.service == "txroute-region" and s.kind == 2 for s in _in_trace(ss, trace_id)),
        what="the region's span of the refused withdrawal")
    (region_server,) = [s for s in _in_trace(spans, trace_id) if s.service == "txroute-region" and s.kind == 2]
    assert region_server.attributes["txroute.error_code"] == "insufficient_funds"
    assert region_server.attributes["http.response.status_code"] == 422
    assert region_server.attributes["txroute.region"] == "us-east-1"


async def test_a_cross_region_transfer_delivers_its_saga_message_in_a_trace_linked_to_the_request(
    traced: TracedWorld, traced_api: RouterApi
) -> None:
    source = await open_in(traced_api, "eu-west-1")
    destination = await open_in(traced_api, "us-east-1")
    await traced_api.funded(source, 1_000)
    trace_id = secrets.token_hex(16)
    response = await traced_api.http.post(
        "/v1/transfers",
        json={"debit_account": source, "credit_account": destination, "amount": 300, "currency": "EUR"},
        headers=traced_api.headers(key="key-" + secrets.token_hex(8),
                                   extra={"traceparent": f"00-{trace_id}-{secrets.token_hex(8)}-01"}),
    )
    assert response.status_code == 201, f"expected the fast path to post it: {response.text}"

    def delivered(spans: list[Span]) -> bool:
        delivers = [s for s in spans if s.name == "saga deliver" and any(t == trace_id for t, _ in s.links)]
        saga_trace = _in_trace(spans, delivers[0].trace_id) if delivers else []
        return any(s.service == "txroute-region" and s.attributes.get("txroute.region") == "us-east-1"
                   and s.kind == 2 for s in saga_trace) and any(s.name == "db saga_apply" for s in saga_trace)

    spans = traced.collector.wait_for(delivered, what="the saga delivery's spans in both regions")
    (deliver,) = [s for s in spans if s.name == "saga deliver" and any(t == trace_id for t, _ in s.links)]
    request_spans = _by_id(_in_trace(spans, trace_id))
    (link,) = deliver.links
    assert link[1] in request_spans, "expected the link to name a span of the client's request"
    assert request_spans[link[1]].service == "txroute-region", "expected the link to the debit region's span"
    assert deliver.trace_id != trace_id and not deliver.parent_span_id, "expected delivery to be a trace of its own"
    saga_trace = _in_trace(spans, deliver.trace_id)
    index = _by_id(saga_trace)
    (peer_server,) = [s for s in saga_trace if s.service == "txroute-region" and s.kind == 2]
    assert peer_server.attributes["txroute.region"] == "us-east-1"
    assert index[peer_server.parent_span_id].kind == 3 and _root(peer_server, index) is deliver, (
        f"expected the peer region's span under the delivery's client span:\n{dump(saga_trace)}")
    assert any(s.name == "db saga_apply" and s.parent_span_id == peer_server.span_id for s in saga_trace)
    assert any(s.name == "db saga_settle" and _root(s, index) is deliver for s in saga_trace)
