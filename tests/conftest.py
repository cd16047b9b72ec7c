"""Real parts for every test: one PostgreSQL cluster per region, started by the tests themselves.

Clusters are initialised once (a template), copied per region and started with fsync off (they are
throwaway). Region services run as real granian processes on loopback, exactly as `txroute up` runs them.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from app.local.ports import free_port
from app.local.postgres import Cluster, ensure_pg_user, find_pg_bin
from app.local.processes import ServiceProcess
from app.local.processes import region_process as local_region_process
from app.topology.loader import load_topology
from app.topology.model import Topology
from tests.keys import SessionKeys, region_env, session_keys
from tests.tls import session_tls

# fsync off: the machine does not crash during a test, only processes do. synchronous_commit stays on, so an
# acknowledged commit is in the WAL when PostgreSQL itself is killed (the fault tests stop it "immediate").
TEST_PG_SETTINGS = {"fsync": "off", "synchronous_commit": "on", "full_page_writes": "off"}


@pytest.fixture(scope="session")
def topology() -> Topology:
    return load_topology()


@pytest.fixture(scope="session")
def keys() -> SessionKeys:
    """The session's client-issuer, hop and saga key pairs (made once; tokens are minted from them)."""
    return session_keys()


@pytest.fixture(scope="session")
def work_dir() -> Iterator[Path]:
    path = Path(tempfile.mkdtemp(prefix="txroute-test-"))
    path.chmod(0o755)  # the PostgreSQL user must traverse it
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture(scope="session")
def pg_template(work_dir: Path) -> Cluster:
    """An initialised, stopped cluster that every test cluster is copied from (initdb once per session)."""
    template = Cluster(work_dir / "template", free_port(), ensure_pg_user(), find_pg_bin())
    template.init(fsync=False)
    return template


def copy_cluster(template: Cluster, folder: Path) -> Cluster:
    cluster = Cluster(folder, free_port(), template.run_as, template.bin_dir)
    cluster.folder.parent.mkdir(parents=True, exist_ok=True)
    subprocess.run(["cp", "-a", str(template.folder), str(cluster.folder)], check=True, timeout=60)
    cluster.start(settings=TEST_PG_SETTINGS)
    return cluster


@pytest.fixture(scope="session")
def pg_clusters(work_dir: Path, topology: Topology, pg_template: Cluster) -> Iterator[dict[str, Cluster]]:
    """One started cluster per region of `regions/`."""
    clusters: dict[str, Cluster] = {}
    try:
        for region in topology.regions:
            clusters[region.name] = copy_cluster(pg_template, work_dir / "pg" / region.name)
        yield clusters
    finally:
        for cluster in clusters.values():
            cluster.stop(mode="immediate")


def server_url(cluster: Cluster) -> str:
    return f"postgresql://postgres:{cluster.password()}@127.0.0.1:{cluster.port}"


def region_process(region: str, cluster: Cluster, log_dir: Path, **env: str) -> ServiceProcess:
    """A region's service as it runs deployed: the cluster is provisioned as its owner first, the service logs
    in as the least-privilege service role."""
    cluster.provision(load_topology().region(region).shards)
    return local_region_process(
        region, cluster.port, free_port(), log_dir / f"region-{region}.log", tls=session_tls(),
        TXROUTE_DATABASE_PASSWORD_FILE=str(cluster.service_password_file), **region_env(), **env,
    )


def link_regions(services: dict[str, ServiceProcess]) -> None:
    """Tell every region where the others are (saga messages go region to region)."""
    urls = json.dumps({region: service.url for region, service in services.items()})
    for service in services.values():
        service.env["TXROUTE_REGION_URLS"] = urls


@pytest.fixture(scope="session")
def region_services(
    pg_clusters: dict[str, Cluster], work_dir: Path, topology: Topology
) -> Iterator[dict[str, ServiceProcess]]:
    """Every region's service, running as its own process against its own cluster."""
    services = {r.name: region_process(r.name, pg_clusters[r.name], work_dir / "logs") for r in topology.regions}
    link_regions(services)
    try:
        for service in services.values():
            service.start()
        for service in services.values():
            service.wait_ready()
        yield services
    finally:
        for service in services.values():
            service.stop()
        if os.environ.get("TXROUTE_TEST_SHOW_LOGS"):
            for service in services.values():
                print(service.log_file.read_text())


@pytest.fixture
def make_world(work_dir: Path, topology: Topology, pg_template: Cluster) -> Iterator[Any]:
    """A factory of isolated worlds (clusters and region services of their own) for tests that kill things."""
    from tests.world import World

    worlds: list[World] = []

    def make(env: dict[str, dict[str, str]] | None = None) -> World:
        world = World.build(work_dir / f"world-{len(worlds)}-{os.getpid()}-{id(worlds)}", topology, pg_template,
                            env or {})
        worlds.append(world)
        return world

    try:
        yield make
    finally:
        for world in worlds:
            world.close()
