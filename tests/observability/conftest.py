"""A traced world: one PostgreSQL cluster and one region process per region plus a router, all exporting
their spans over OTLP/HTTP to a collector inside the test process, and writing their logs to files.

The collector is a loopback HTTP server that decodes each `ExportTraceServiceRequest` (the protobuf the
standard exporter sends) into `Span`s, and keeps the raw bodies too, so a test can search them for text.
"""

from __future__ import annotations

import json
import shutil
import threading
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import httpx
import pytest
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
    ExportTraceServiceRequest,
    ExportTraceServiceResponse,
)

from app.local.postgres import Cluster
from app.local.processes import ServiceProcess
from app.topology.model import Topology
from tests.e2e.conftest import RouterApi, router_process
from tests.helpers import HTTP_TIMEOUT_S, new_client_id
from tests.keys import SessionKeys
from tests.world import World

ROUTER_REGION = "eu-west-1"
SPANS_WAIT_S = 15.0


@dataclass(frozen=True)
class Span:
    service: str
    name: str
    kind: int
    trace_id: str
    span_id: str
    parent_span_id: str
    attributes: dict[str, Any]
    links: tuple[tuple[str, str], ...]  # (trace id, span id) of each link


@dataclass
class Collector:
    """What the processes exported: decoded spans and the raw request bodies."""

    port: int = 0
    spans: list[Span] = field(default_factory=list)
    bodies: list[bytes] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1/traces"

    def receive(self, body: bytes) -> None:
        request = ExportTraceServiceRequest.FromString(body)
        decoded = []
        for resource_spans in request.resource_spans:
            resource = {a.key: _value(a.value) for a in resource_spans.resource.attributes}
            for scope_spans in resource_spans.scope_spans:
                for s in scope_spans.spans:
                    decoded.append(Span(
                        service=str(resource.get("service.name")), name=s.name, kind=s.kind,
                        trace_id=s.trace_id.hex(), span_id=s.span_id.hex(), parent_span_id=s.parent_span_id.hex(),
                        attributes={a.key: _value(a.value) for a in s.attributes},
                        links=tuple((link.trace_id.hex(), link.span_id.hex()) for link in s.links),
                    ))
        with self.lock:
            self.bodies.append(body)
            self.spans.extend(decoded)

    def snapshot(self) -> list[Span]:
        with self.lock:
            return list(self.spans)

    def wait_for(self, predicate: Any, *, what: str, timeout_s: float = SPANS_WAIT_S) -> list[Span]:
        """Poll (bounded) until `predicate(spans)` holds; returns the spans seen then."""
        deadline = time.monotonic() + timeout_s
        while True:
            spans = self.snapshot()
            if predicate(spans):
                return spans
            if time.monotonic() > deadline:
                raise AssertionError(f"expected {what} within {timeout_s}s; got {[(s.service, s.name) for s in spans]}")
            time.sleep(0.05)


def _value(value: Any) -> Any:
    kind = value.WhichOneof("value")
    return getattr(value, kind) if kind else None


@pytest.fixture(scope="session")
def collector() -> Iterator[Collector]:
    found = Collector()

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            body = self.rfile.read(int(self.headers.get("content-length", "0")))
            found.receive(body)
            answer = ExportTraceServiceResponse().SerializeToString()
            self.send_response(200)
            self.send_header("content-type", "application/x-protobuf")
            self.send_header("content-length", str(len(answer)))
            self.end_headers()
            self.wfile.write(answer)

        def log_message(self, *args: Any) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    found.port = server.server_address[1]
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield found
    finally:
        server.shutdown()
        server.server_close()


def otel_env(collector: Collector) -> dict[str, str]:
    return {
        "OTEL_TRACES_EXPORTER": "otlp",
        "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": collector.endpoint,
        "OTEL_EXPORTER_OTLP_TRACES_PROTOCOL": "http/protobuf",
        "OTEL_BSP_SCHEDULE_DELAY": "50",  # ms: spans reach the collector promptly
        "TXROUTE_LOG_LEVEL": "DEBUG",  # every log line there is, for the secrets scan
    }


@dataclass
class TracedWorld:
    world: World
    router: ServiceProcess
    collector: Collector
    keys: SessionKeys

    @property
    def services(self) -> dict[str, ServiceProcess]:
        return self.world.services

    @property
    def clusters(self) -> dict[str, Cluster]:
        return self.world.clusters

    def log_files(self) -> list[Path]:
        """Every log the world wrote: its services' and its PostgreSQL servers'."""
        files = sorted((self.world.folder / "logs").glob("*.log"))
        files += [c.log_file for c in self.clusters.values() if c.log_file.exists()]
        return files


@pytest.fixture(scope="session")
def traced(
    collector: Collector, topology: Topology, pg_template: Cluster, keys: SessionKeys, work_dir: Path
) -> Iterator[TracedWorld]:
    env = otel_env(collector)
    folder = work_dir / f"traced-{id(collector)}"
    world = World.build(folder, topology, pg_template, {r.name: dict(env) for r in topology.regions})
    urls = {name: service.url for name, service in world.services.items()}
    router = router_process("router-traced", ROUTER_REGION, urls, keys, folder / "logs")
    router.env.update(env)
    try:
        router.start()
        router.wait_ready()
        yield TracedWorld(world, router, collector, keys)
    finally:
        router.stop()
        for service in world.services.values():
            service.stop()  # SIGTERM: the exporters flush what they hold
        world.close()
        shutil.rmtree(folder, ignore_errors=True)


@pytest.fixture
async def traced_api(traced: TracedWorld) -> AsyncIterator[RouterApi]:
    async with httpx.AsyncClient(base_url=traced.router.url, timeout=HTTP_TIMEOUT_S) as http:
        client = new_client_id("obs")
        yield RouterApi(http, client, traced.keys.client_token(client))


async def open_in(api: RouterApi, region: str) -> str:
    response = await api.open_account(region=region)
    assert response.status_code == 201, f"expected an account opened in {region}: {response.text}"
    account_id: str = response.json()["id"]
    return account_id


def dump(spans: list[Span]) -> str:
    return json.dumps([s.__dict__ for s in spans], default=str, indent=1)[:4000]
