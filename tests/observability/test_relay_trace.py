"""A saga message delivered by the relay, retried long after the request that committed it, still links to
that request's trace (issue 10): the trace context is stored with the outbox message."""

from __future__ import annotations

import secrets
from typing import Any

from app.topology.model import Topology
from tests.helpers import ApiClient, new_client_id, poll_until
from tests.observability.conftest import Collector, Span, dump, otel_env


async def test_a_retried_relay_delivery_links_to_the_trace_of_the_request_that_committed_it(
    make_world: Any, collector: Collector, topology: Topology
) -> None:
    env = {r.name: otel_env(collector) for r in topology.regions}
    # No fast path, and half the deliveries dropped: the relay delivers, after the request ended, with retries.
    env["eu-west-1"].update({"TXROUTE_FAULT_SKIP_FAST_PATH": "1", "TXROUTE_FAULT_DROP_REQUEST": "0.5"})
    world = make_world(env)
    client = new_client_id("relay-trace")
    async with world.http("eu-west-1") as h1, world.http("us-east-1") as h2:
        src, dst = ApiClient(h1, client), ApiClient(h2, client)
        a, b = await src.new_account(), await dst.new_account()
        await src.funded(a, 100)
        trace_id = secrets.token_hex(16)
        response = await h1.post(
            "/v1/transfers", json={"debit_account": a, "credit_account": b, "amount": 40, "currency": "EUR"},
            headers=src.headers(key="key-" + secrets.token_hex(8),
                                extra={"traceparent": f"00-{trace_id}-{secrets.token_hex(8)}-01"}),
            auth=src.auth,
        )
        assert response.status_code == 202, f"expected 202 pending (fast path off): {response.text}"
        transfer_id = response.json()["id"]

        async def posted() -> bool:
            return (await src.get(f"/v1/transfers/{transfer_id}")).json()["state"] == "posted"

        await poll_until(posted, timeout_s=60, what="the transfer posted by the relay")

    def delivers(spans: list[Span]) -> list[Span]:
        return [s for s in spans if s.name == "saga deliver" and s.attributes.get("txroute.transfer_id") == transfer_id]

    def settled(spans: list[Span]) -> bool:
        return any(s.name == "db saga_settle" and s.trace_id in {d.trace_id for d in delivers(spans)} for s in spans)

    spans = collector.wait_for(settled, what="the relay's delivery spans of the transfer")
    attempts = delivers(spans)
    request = {s.span_id: s for s in spans if s.trace_id == trace_id}
    for deliver in attempts:
        assert deliver.trace_id != trace_id, "expected each delivery to be a trace of its own"
        assert [t for t, _ in deliver.links] == [trace_id], (
            f"expected every delivery, retries included, linked to the request's trace:\n{dump(attempts)}")
        assert deliver.links[0][1] in request, "expected the link to name a span of the committing request"
        assert request[deliver.links[0][1]].service == "txroute-region"
