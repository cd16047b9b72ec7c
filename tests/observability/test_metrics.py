"""Prometheus exposition at /metrics on the router and every region, with bounded labels (DESIGN D9)."""

from __future__ import annotations

import httpx
from prometheus_client.parser import text_string_to_metric_families

from app.ops.audit import audit, record
from tests.e2e.conftest import RouterApi
from tests.helpers import ApiClient, new_key
from tests.observability.conftest import TracedWorld, open_in
from tests.tls import verify

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


async def scrape(url: str) -> Samples:
    async with httpx.AsyncClient(timeout=10, verify=verify()) as http:  # the regions' CA (the router is http)
        response = await http.get(url + "/metrics")
    assert response.status_code == 200 and response.headers["content-type"].startswith("text/plain")
    return {
        (s.name, frozenset(s.labels.items())): s.value
        for family in text_string_to_metric_families(response.text)
        for s in family.samples
    }


def value(samples: Samples, name: str, **labels: str) -> float:
    """The sum over the samples of `name` whose labels include `labels` (0 when none)."""
    wanted = set(labels.items())
    return sum(v for (n, ls), v in samples.items() if n == name and wanted <= ls)


async def test_router_and_regions_expose_requests_outcomes_replays_421s_saga_pool_and_audit(
    traced: TracedWorld, traced_api: RouterApi
) -> None:
    eu, us = traced.services["eu-west-1"].url, traced.services["us-east-1"].url
    source, destination = await open_in(traced_api, "eu-west-1"), await open_in(traced_api, "us-east-1")
    key = new_key()
    assert (await traced_api.deposit(source, 1_000, key=key)).status_code == 201
    replay = await traced_api.deposit(source, 1_000, key=key)
    assert replay.status_code == 201 and replay.headers["idempotent-replayed"] == "true"
    assert (await traced_api.withdraw(destination, 5)).status_code == 422
    assert (await traced_api.transfer(source, destination, 100)).status_code == 201
    forged = await traced_api.http.get(f"/v1/accounts/{source}", headers={"Authorization": "Bearer nope"})
    assert forged.status_code == 401
    # A region asked for another's account.
    async with httpx.AsyncClient(base_url=eu, timeout=10, verify=verify()) as http:
        assert (await ApiClient(http, traced_api.client_id).account(destination)).status_code == 421
    report = await audit(traced.world.shard_dsns())
    assert report.clean, report.text()
    assert await record(report, traced.world.shard_dsns()) == []

    router = await scrape(traced.router.url)
    duration = "txroute_http_request_duration_seconds_count"
    assert value(router, duration, route="POST /v1/deposits", status="201", region="eu-west-1") >= 2
    assert value(router, duration, route="POST /v1/withdrawals", status="422") >= 1
    assert value(router, "txroute_http_problems_total", route="GET /v1/accounts/{account_id}", code="unauthorized") >= 1
    assert value(router, "txroute_upstream_request_duration_seconds_count", peer="us-east-1", status="422") >= 1
    routes = {dict(ls).get("route") for (n, ls) in router if n == duration}
    assert all(r == "unmatched" or (r.split(" ")[0].isupper() and "acc_" not in r) for r in routes if r), routes

    euw, use = await scrape(eu), await scrape(us)
    assert value(euw, "txroute_transfers_total", kind="deposit", outcome="posted") >= 1
    assert value(euw, "txroute_transfers_total", kind="transfer", outcome="posted") >= 1
    assert value(use, "txroute_transfers_total", kind="withdrawal", outcome="insufficient_funds") >= 1
    assert value(euw, "txroute_idempotent_replays_total", route="POST /v1/deposits") >= 1
    assert value(euw, "txroute_misdirected_total", side="region") >= 1
    assert value(euw, "txroute_http_problems_total", code="misdirected") >= 1
    assert value(euw, "txroute_saga_deliveries_total", outcome="applied") >= 1
    assert value(use, duration, route="POST /internal/saga/apply", status="200") >= 1
    for samples, region in ((euw, "eu-west-1"), (use, "us-east-1")):
        shards = [s.name for s in traced.world.topology.region(region).shards]
        for shard in shards:
            assert ("txroute_saga_backlog", frozenset({("region", region), ("shard", shard)})) in samples
            assert value(samples, "txroute_saga_oldest_pending_age_seconds", shard=shard) >= 0
            assert value(samples, "txroute_db_pool_connections_max", shard=shard) >= 1
            assert ("txroute_db_pool_connections_in_use", frozenset({("region", region), ("shard", shard)})) in samples
            assert value(samples, "txroute_last_audit_clean", shard=shard) == 1, f"expected {shard}'s audit clean"
            assert value(samples, "txroute_last_audit_timestamp_seconds", shard=shard) > 0
