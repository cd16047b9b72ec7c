"""Routers as real processes in front of the session's three region processes (tests/conftest.py).

`router` is the session's router (in eu-west-1). `start_router` starts another, e.g. one with a stale
`regions/` to prove the 421 correction; it is stopped at the end of the test.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path

import httpx
import pytest

from app.local.ports import free_port
from app.local.processes import ROUTER_FACTORY, ServiceProcess, asgi_command
from tests.helpers import HTTP_TIMEOUT_S, ApiClient, new_client_id
from tests.keys import SessionKeys
from tests.tls import session_tls, verify

ROUTER_REGION = "eu-west-1"
StartRouter = Callable[..., ServiceProcess]


def router_process(
    name: str,
    region: str,
    region_urls: dict[str, str],
    keys: SessionKeys,
    log_dir: Path,
    *,
    regions_dir: Path | None = None,
    env_extra: dict[str, str] | None = None,
) -> ServiceProcess:
    port = free_port()
    env = {
        "TXROUTE_REGION": region,
        "TXROUTE_REGION_URLS": json.dumps(region_urls),
        **keys.router_env(),
        "TXROUTE_INTERNAL_CA_FILE": str(session_tls().ca_file),  # the regions serve HTTPS (tests/tls.py)
    }
    if regions_dir is not None:
        env["TXROUTE_REGIONS_DIR"] = str(regions_dir)
    env.update(env_extra or {})
    return ServiceProcess(name=name, argv=asgi_command(ROUTER_FACTORY, port), env=env, port=port,
                          log_file=log_dir / f"{name}.log")


@pytest.fixture(scope="session")
def region_urls(region_services: dict[str, ServiceProcess]) -> dict[str, str]:
    return {name: service.url for name, service in region_services.items()}


@pytest.fixture(scope="session")
def router(region_urls: dict[str, str], keys: SessionKeys, work_dir: Path) -> Iterator[ServiceProcess]:
    process = router_process("router", ROUTER_REGION, region_urls, keys, work_dir / "logs")
    process.start()
    try:
        process.wait_ready()
        yield process
    finally:
        process.stop()


@pytest.fixture
def start_router(region_urls: dict[str, str], keys: SessionKeys, work_dir: Path) -> Iterator[StartRouter]:
    started: list[ServiceProcess] = []

    def start(
        name: str, *, region: str = ROUTER_REGION, regions_dir: Path | None = None, env: dict[str, str] | None = None
    ) -> ServiceProcess:
        process = router_process(name, region, region_urls, keys, work_dir / "logs", regions_dir=regions_dir,
                                 env_extra=env)
        started.append(process)
        process.start()
        process.wait_ready()
        return process

    yield start
    for process in started:
        process.stop()


@pytest.fixture
async def http() -> AsyncIterator[httpx.AsyncClient]:
    """A client for full URLs: the router's (plain HTTP on loopback) or a region's (HTTPS, verified with the
    session's CA)."""
    async with httpx.AsyncClient(timeout=HTTP_TIMEOUT_S, verify=verify()) as client:
        yield client


class RouterApi(ApiClient):
    """The public API as a client sees it through the router: its own bearer token, nothing else."""

    def __init__(self, http: httpx.AsyncClient, client_id: str, token: str) -> None:
        super().__init__(http, client_id)
        self.token = token

    @property
    def auth(self) -> httpx.Auth | None:
        return None  # the client token travels in `headers`

    def headers(self, *, key: str | None = None, extra: dict[str, str] | None = None) -> dict[str, str]:
        headers = {"Authorization": "Bearer " + self.token}
        if key is not None:
            headers["Idempotency-Key"] = key
        headers.update(extra or {})
        return headers


@pytest.fixture
async def router_http(router: ServiceProcess) -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(base_url=router.url, timeout=HTTP_TIMEOUT_S) as client:
        yield client


@pytest.fixture
def client_api(router_http: httpx.AsyncClient, keys: SessionKeys) -> RouterApi:
    client = new_client_id()
    return RouterApi(router_http, client, keys.client_token(client))
