"""`txroute audit` is trustworthy under live traffic (issue 10): while clients move money between every
region through two routers (in two regions), the audit runs again and again, incremental and full, and
never reports a violation, though sagas are committed, applied and settled between its shard reads."""

from __future__ import annotations

import asyncio
import random
import time

import httpx

from app.local.stack import cluster_shard_dsns
from app.ops.audit import AuditReport, audit
from app.topology.model import Topology
from tests.e2e.conftest import ROUTER_REGION, RouterApi, StartRouter
from tests.helpers import poll_until

LOAD_S = 30.0
WRITERS = 6
ACCOUNTS_PER_REGION = 2
FULL_EVERY = 3  # every third audit recomputes everything; the others start from each shard's checkpoint


async def test_the_audit_stays_clean_while_cross_region_load_runs_through_two_routers(
    client_api: RouterApi, start_router: StartRouter, topology: Topology, pg_clusters
) -> None:
    other_region = next(r.name for r in topology.regions if r.name != ROUTER_REGION)
    other = start_router("router-audit-load", region=other_region)
    async with httpx.AsyncClient(base_url=other.url, timeout=30) as http:
        apis = [client_api, RouterApi(http, client_api.client_id, client_api.token)]
        accounts = []
        for region in topology.regions:
            for _ in range(ACCOUNTS_PER_REGION):
                opened = await client_api.open_account("EUR", region=region.name)
                assert opened.status_code == 201, opened.text
                accounts.append(opened.json()["id"])
                await client_api.funded(accounts[-1], 10_000_000)
        stop = asyncio.Event()
        acknowledged: list[str] = []
        unexpected: list[str] = []

        async def writer(seed: int) -> None:
            rng = random.Random(seed)
            while not stop.is_set():
                debit, credit = rng.sample(accounts, 2)
                response = await rng.choice(apis).transfer(debit, credit, rng.randint(1, 500))
                if response.status_code in (201, 202):
                    acknowledged.append(response.json()["id"])
                else:
                    unexpected.append(f"{response.status_code} {response.text}")

        dsns = cluster_shard_dsns(topology, pg_clusters)
        reports: list[AuditReport] = []
        writers = [asyncio.create_task(writer(i)) for i in range(WRITERS)]
        try:
            deadline = time.monotonic() + LOAD_S
            while time.monotonic() < deadline:
                report = await audit(dsns, full=len(reports) % FULL_EVERY == FULL_EVERY - 1)
                assert report.clean, f"expected no violation under load (audit {len(reports) + 1}):\n{report.text()}"
                reports.append(report)
        finally:
            stop.set()
            await asyncio.gather(*writers)

        assert not unexpected, f"expected every transfer acknowledged, got {unexpected[:5]}"
        assert len(acknowledged) > 200, f"expected a real load, only {len(acknowledged)} transfers"
        assert len(reports) >= 2 * FULL_EVERY, f"expected the audit to run repeatedly, ran {len(reports)} times"
        assert {m for r in reports for m in r.modes.values()} == {"full", "incremental"}, (
            "expected both full and incremental runs during the load"
        )
        judged = sum(r.counts.get("sagas_judged", 0) for r in reports)
        deferred = sum(r.counts.get("sagas_after_watermark", 0) for r in reports)
        assert judged > 0 and deferred > 0, (
            f"expected sagas judged behind the watermark and others deferred past it, got {judged} and {deferred}"
        )

        async def settled() -> bool:
            report = await audit(dsns)
            assert report.clean, report.text()
            return report.counts.get("sagas_pending", 0) == 0 and report.counts.get("sagas_after_watermark", 0) == 0

        # Once the last sagas are older than the watermark, every one of them has been judged.
        await poll_until(settled, timeout_s=60, what="every saga of the load judged, none pending")
