"""Fixtures for tests against the running regional services: one HTTP client per test, a fresh client id
per test (so tests never see each other's accounts), and direct database access to a shard."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable

import httpx
import pytest

from app.local.postgres import Cluster
from app.local.processes import ServiceProcess
from app.topology.model import Topology
from tests.helpers import HTTP_TIMEOUT_S, ApiClient, new_client_id

# The region most tests talk to; others serve as "another region" for 421s.
HOME_REGION = "eu-west-1"


@pytest.fixture
def home_region() -> str:
    return HOME_REGION


@pytest.fixture
async def http(region_services: dict[str, ServiceProcess]) -> AsyncIterator[httpx.AsyncClient]:
    limits = httpx.Limits(max_connections=64, max_keepalive_connections=64)
    async with httpx.AsyncClient(
        base_url=region_services[HOME_REGION].url, timeout=HTTP_TIMEOUT_S, limits=limits,
        verify=region_services[HOME_REGION].verify,
    ) as client:
        yield client


@pytest.fixture
def api(http: httpx.AsyncClient) -> ApiClient:
    return ApiClient(http, new_client_id())


@pytest.fixture
def other_api(http: httpx.AsyncClient) -> ApiClient:
    """Another client of the same region."""
    return ApiClient(http, new_client_id("other"))


@pytest.fixture
def shard_dsn(pg_clusters: dict[str, Cluster], topology: Topology) -> Callable[[str], str]:
    """The DSN of a shard database of the home region, by shard name."""

    def dsn(shard_name: str) -> str:
        shard = topology.shard(shard_name)
        return pg_clusters[shard.region].dsn(shard.database)

    return dsn
