"""A region's service killed (SIGKILL): its accounts answer 503 `region_unavailable` promptly, the other
regions keep serving, and after a restart it serves again with no lost or doubled effect."""

from __future__ import annotations

import time

from app import limits
from app.local.processes import ServiceProcess
from app.topology.model import Topology
from tests.e2e.conftest import RouterApi
from tests.helpers import new_key

DOWN = "eu-north-1"
# Loose on purpose: "promptly" means within the connect timeout and one retry, not a measured figure.
PROMPT_S = 2 * limits.UPSTREAM_CONNECT_TIMEOUT_S + 1.0


async def test_a_killed_region_answers_503_promptly_and_recovers_without_lost_or_doubled_effects(
    client_api: RouterApi, topology: Topology, region_services: dict[str, ServiceProcess]
) -> None:
    accounts = {}
    for region in topology.regions:
        opened = await client_api.open_account(region=region.name)
        assert opened.status_code == 201, opened.text
        accounts[region.name] = opened.json()["id"]
        await client_api.funded(accounts[region.name], 1_000)
    victim = region_services[DOWN]
    victim.kill()
    try:
        started = time.monotonic()
        read = await client_api.account(accounts[DOWN])
        key = new_key()
        write = await client_api.deposit(accounts[DOWN], 70, key=key)
        elapsed = time.monotonic() - started
        for response in (read, write):
            assert response.status_code == 503, f"expected 503 from a dead region, got {response.text}"
            assert response.json()["code"] == "region_unavailable"
            assert response.headers.get("retry-after"), "expected Retry-After on region_unavailable"
        assert elapsed < PROMPT_S, f"expected both refusals within {PROMPT_S}s, took {elapsed:.2f}s"
        for region, account in accounts.items():
            if region != DOWN:
                assert (await client_api.deposit(account, 5)).status_code == 201, f"expected {region} to serve"
                assert await client_api.balance(account) == 1_005
    finally:
        victim.start()
        victim.wait_ready()
    # The client retries with its key: the write that was refused lands now, once.
    retried = await client_api.deposit(accounts[DOWN], 70, key=key)
    assert retried.status_code == 201 and retried.headers.get("idempotent-replayed") is None, retried.text
    replay = await client_api.deposit(accounts[DOWN], 70, key=key)
    assert replay.headers.get("idempotent-replayed") == "true", replay.text
    assert await client_api.balance(accounts[DOWN]) == 1_070, "expected the pre-kill deposit and the retry, once each"
    assert len(await client_api.all_entries(accounts[DOWN])) == 2
