"""Rate limits and quotas (DESIGN D8), with real processes on loopback and real PostgreSQL:

- a router with a small per-client token bucket refuses a bursting client with 429 `rate_limited` and a
  Retry-After, while another client's requests through the same router all succeed;
- a region with a small per-client share of each shard's posting queue refuses a flooding client's overflow
  with 429 while every posting of the other clients on that shard succeeds, and money stays conserved.
"""

from __future__ import annotations

import asyncio
import re
from collections import Counter

import httpx

from app.local.processes import ServiceProcess
from app.topology.model import Topology
from tests.e2e.conftest import RouterApi, StartRouter
from tests.helpers import (
    HTTP_TIMEOUT_S,
    ApiClient,
    account_in_shard,
    assert_shard_conserved,
    new_client_id,
    new_key,
    poll_until,
    shard_of,
)
from tests.keys import SessionKeys

ROUTER_RATE_PER_S = 1
ROUTER_BURST = 5
FLOOD_REQUESTS = 20
QUIET_DEPOSITS = ROUTER_BURST - 2  # with its account's opening and one read: exactly its burst

REGION = "eu-west-1"
TENANT_SHARE = 3  # postings one client may have queued or in commit on one shard
FLOOD_POSTINGS = 150
POLITE_TENANTS = 3
POLITE_ROUNDS = 4  # each round: TENANT_SHARE postings at once, never more than the share


def _counter(metrics_text: str, reason: str) -> float:
    pattern = rf'^txroute_rate_limited_total\{{[^}}]*reason="{reason}"[^}}]*\}} ([0-9.e+]+)$'
    return sum(float(m.group(1)) for m in re.finditer(pattern, metrics_text, re.MULTILINE))


def _assert_rate_limited(response: httpx.Response, limit: str) -> None:
    problem = response.json()
    assert problem["code"] == "rate_limited" and problem["limit"] == limit, problem
    assert response.headers["content-type"] == "application/problem+json"
    retry_after = response.headers.get("retry-after", "")
    assert retry_after.isdigit() and int(retry_after) >= 1, f"expected whole seconds >= 1, got {retry_after!r}"


async def test_a_bursting_client_gets_429_with_retry_after_while_another_clients_requests_all_succeed(
    start_router: StartRouter, keys: SessionKeys
) -> None:
    router = start_router(
        "router-ratelimit",
        env={"TXROUTE_CLIENT_RATE_PER_S": str(ROUTER_RATE_PER_S), "TXROUTE_CLIENT_BURST": str(ROUTER_BURST)},
    )
    async with httpx.AsyncClient(base_url=router.url, timeout=HTTP_TIMEOUT_S) as http:
        noisy_id, quiet_id = new_client_id("noisy"), new_client_id("quiet")
        noisy = RouterApi(http, noisy_id, keys.client_token(noisy_id))
        quiet = RouterApi(http, quiet_id, keys.client_token(quiet_id))
        noisy_account = await noisy.new_account()
        quiet_account = await quiet.new_account()
        # The quiet client stays within its burst (open, deposits, one read); the noisy one sends 4x its burst.
        flood_keys = [new_key() for _ in range(FLOOD_REQUESTS)]
        flood, polite = await asyncio.gather(
            asyncio.gather(*(noisy.deposit(noisy_account, 1, key=k) for k in flood_keys)),
            asyncio.gather(*(quiet.deposit(quiet_account, 10) for _ in range(QUIET_DEPOSITS))),
        )
        assert [r.status_code for r in polite] == [201] * QUIET_DEPOSITS, [r.text for r in polite]
        statuses = Counter(r.status_code for r in flood)
        assert set(statuses) <= {201, 429}, f"expected only 201 and 429 for the noisy client, got {statuses}"
        assert statuses[429] >= FLOOD_REQUESTS - 2 * ROUTER_BURST, f"expected most of the flood refused: {statuses}"
        for response in flood:
            if response.status_code == 429:
                _assert_rate_limited(response, "client_rate")
        # A refused request wrote nothing; retried with its key once told to, it goes through.
        refused = next(k for k, r in zip(flood_keys, flood, strict=True) if r.status_code == 429)
        retried: list[httpx.Response] = []

        async def retry_passes() -> bool:
            retried.append(await noisy.deposit(noisy_account, 1, key=refused))
            return retried[-1].status_code == 201

        await poll_until(retry_passes, timeout_s=10 * (1 / ROUTER_RATE_PER_S) + 5, what="the refused deposit to pass")
        assert all(r.status_code in (201, 429) for r in retried), [r.text for r in retried]

        reads: list[httpx.Response] = []

        async def balance_read() -> bool:
            reads.append(await noisy.account(noisy_account))
            return reads[-1].status_code == 200

        await poll_until(balance_read, timeout_s=10, what="the noisy client's read to pass its limit")
        assert reads[-1].json()["balance"] == statuses[201] + 1, "expected exactly the acknowledged deposits"
        assert await quiet.balance(quiet_account) == 10 * QUIET_DEPOSITS
        refusals = statuses[429] + sum(r.status_code == 429 for r in retried + reads)
        metrics = (await http.get("/metrics")).text
        assert _counter(metrics, "client_rate") == refusals


async def test_a_tenant_flooding_a_shards_queue_does_not_fail_the_other_tenants_postings_on_that_shard(
    make_world, topology: Topology
) -> None:
    world = make_world({REGION: {"TXROUTE_TENANT_QUEUE_POSTINGS_MAX": str(TENANT_SHARE)}})
    region: ServiceProcess = world.services[REGION]
    limits = httpx.Limits(max_connections=FLOOD_POSTINGS + 20, max_keepalive_connections=FLOOD_POSTINGS + 20)
    async with httpx.AsyncClient(
        base_url=region.url, timeout=HTTP_TIMEOUT_S, limits=limits, verify=region.verify
    ) as http:
        flooder = ApiClient(http, new_client_id("flood"))
        flood_account = await flooder.new_account()
        shard = shard_of(topology, flood_account)
        polite = [ApiClient(http, new_client_id("polite")) for _ in range(POLITE_TENANTS)]
        polite_accounts = [await account_in_shard(api, topology, shard) for api in polite]

        async def flood() -> list[httpx.Response]:
            return list(await asyncio.gather(*(flooder.deposit(flood_account, 1) for _ in range(FLOOD_POSTINGS))))

        async def behave(api: ApiClient, account: str) -> list[httpx.Response]:
            answers: list[httpx.Response] = []
            for _ in range(POLITE_ROUNDS):
                answers += await asyncio.gather(*(api.deposit(account, 7) for _ in range(TENANT_SHARE)))
            return answers

        politely = (behave(api, account) for api, account in zip(polite, polite_accounts, strict=True))
        flooded, *behaved = await asyncio.gather(flood(), *politely)
        for answers in behaved:
            assert [r.status_code for r in answers] == [201] * len(answers), [r.text for r in answers if r.is_error]
        statuses = Counter(r.status_code for r in flooded)
        assert set(statuses) <= {201, 429}, f"expected only 201 and 429 (never a 5xx) for the flooder: {statuses}"
        assert statuses[429] > 0, f"expected the flooder to be refused beyond its share: {statuses}"
        for response in flooded:
            if response.status_code == 429:
                _assert_rate_limited(response, "shard_queue")
        # Refusals wrote nothing: each balance is exactly what was acknowledged.
        assert await flooder.balance(flood_account) == statuses[201]
        for api, account in zip(polite, polite_accounts, strict=True):
            assert await api.balance(account) == 7 * TENANT_SHARE * POLITE_ROUNDS
        metrics = (await http.get("/metrics")).text
        assert _counter(metrics, "shard_queue") == statuses[429]
    await assert_shard_conserved(world.shard_dsns()[shard])
