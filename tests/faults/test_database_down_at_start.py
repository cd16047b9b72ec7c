"""A region whose database is unreachable when it starts (a Multi-AZ failover in progress) starts anyway:
liveness answers, readiness says not ready, and once the database is back it becomes ready and posts, with
no restart (issue 9.6, 15.9)."""

from __future__ import annotations

from pathlib import Path

import httpx

from app.local.postgres import Cluster
from tests.conftest import TEST_PG_SETTINGS, copy_cluster, region_process
from tests.helpers import ApiClient, new_client_id, poll_until

REGION = "eu-west-1"
READY_WITHIN_S = 30.0


async def test_a_region_started_with_its_database_down_is_alive_not_ready_then_ready_and_posting(
    work_dir: Path, pg_template: Cluster
) -> None:
    folder = work_dir / "db-down-at-start"
    cluster = copy_cluster(pg_template, folder / "pg")
    service = region_process(REGION, cluster, folder / "logs")  # provisions, as a deploy's migrate step does
    cluster.stop(mode="immediate")
    service.start()
    try:
        async with httpx.AsyncClient(base_url=service.url, timeout=5.0, verify=service.verify) as http:
            async def answers() -> bool:
                try:
                    return (await http.get("/healthz")).status_code == 200
                except httpx.TransportError:
                    return False

            await poll_until(answers, timeout_s=READY_WITHIN_S, what="/healthz 200 with the database down")
            assert service.process is not None and service.process.poll() is None, "expected no crash at start"
            ready = await http.get("/readyz")
            assert ready.status_code == 503, f"expected 503 not ready with the database down, got {ready.text}"
            assert ready.json()["status"] == "not_ready"
            write = await ApiClient(http, new_client_id()).open_account("EUR")
            assert write.status_code == 503, f"expected writes refused while down, got {write.status_code}"

            cluster.start(settings=TEST_PG_SETTINGS)

            async def is_ready() -> bool:
                return (await http.get("/readyz")).status_code == 200

            await poll_until(is_ready, timeout_s=READY_WITHIN_S, what="/readyz 200 once the database is back")
            api = ApiClient(http, new_client_id())
            a, b = await api.new_account(), await api.new_account()
            await api.funded(a, 300)
            assert (await api.transfer(a, b, 120)).status_code == 201
            assert (await api.balance(a), await api.balance(b)) == (180, 120)
    finally:
        service.stop()
        cluster.stop(mode="immediate")
