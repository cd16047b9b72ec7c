"""An isolated set of real parts for tests that break things: a PostgreSQL cluster and a regional service
process per region, all its own, so killing or stopping one disturbs no other test."""

from __future__ import annotations

import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import httpx

from app.local.postgres import Cluster
from app.local.processes import ServiceProcess
from app.local.stack import cluster_shard_dsns
from app.ops.audit import AuditReport, audit
from app.topology.model import Topology
from tests.conftest import TEST_PG_SETTINGS, copy_cluster, link_regions, region_process
from tests.helpers import ApiClient


@dataclass
class World:
    folder: Path
    topology: Topology
    clusters: dict[str, Cluster]
    services: dict[str, ServiceProcess]

    @classmethod
    def build(cls, folder: Path, topology: Topology, template: Cluster, env: dict[str, dict[str, str]]) -> World:
        clusters = {r.name: copy_cluster(template, folder / "pg" / r.name) for r in topology.regions}
        services = {
            r.name: region_process(r.name, clusters[r.name], folder / "logs", **env.get(r.name, {}))
            for r in topology.regions
        }
        link_regions(services)
        world = cls(folder, topology, clusters, services)
        try:
            for service in services.values():
                service.start()
            for service in services.values():
                service.wait_ready()
        except BaseException:
            # A world that never got ready is stopped here (its test never got it to close): no service or
            # cluster outlives the failed test, and its logs are kept like any world's (TXROUTE_TEST_KEEP_LOGS).
            world.close()
            raise
        return world

    def close(self) -> None:
        for service in self.services.values():
            service.kill()
        for cluster in self.clusters.values():
            cluster.stop(mode="immediate")
        keep = os.environ.get("TXROUTE_TEST_KEEP_LOGS")  # a folder: the world's service logs are copied there
        if keep:
            shutil.copytree(self.folder / "logs", Path(keep) / self.folder.name, dirs_exist_ok=True)
        shutil.rmtree(self.folder, ignore_errors=True)

    def api(self, region: str, client_id: str, http: httpx.AsyncClient) -> ApiClient:
        assert str(http.base_url).rstrip("/") == self.services[region].url
        return ApiClient(http, client_id)

    def http(self, region: str) -> httpx.AsyncClient:
        service = self.services[region]
        return httpx.AsyncClient(base_url=service.url, timeout=30.0, verify=service.verify)

    def restart(self, region: str, **env: str) -> None:
        """Start a killed region's service again on the same port, with `env` changed (others keep theirs)."""
        service = self.services[region]
        service.kill()
        for name, value in env.items():
            if value == "":
                service.env.pop(name, None)
            else:
                service.env[name] = value
        service.start()
        service.wait_ready()

    def stop_postgres(self, region: str) -> None:
        self.clusters[region].stop(mode="immediate")

    def start_postgres(self, region: str) -> None:
        self.clusters[region].start(settings=TEST_PG_SETTINGS)

    def shard_dsns(self) -> dict[str, str]:
        return cluster_shard_dsns(self.topology, self.clusters)

    async def audit(self) -> AuditReport:
        return await audit(self.shard_dsns())
