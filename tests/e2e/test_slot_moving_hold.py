"""The router holds a request whose slot is moving (DESIGN D13, app/router/hold.py): a client sees latency, not
an error, while a slot range is frozen for its switch; past the hold it sees 503 slot_moving with Retry-After.

The region of the test is a real region process behind a small HTTPS gate (same certificate) that answers
as a region does during a move's freeze (503 slot_moving, nothing written) while `frozen` and forwards
everything, unchanged, to the region otherwise. A real router process is pointed at the gate.
"""

from __future__ import annotations

import asyncio
import ssl
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import aiohttp
import httpx
import msgspec
import pytest
from aiohttp import web

from app.errors import PROBLEM_CONTENT_TYPE, problem_body
from app.local.ports import free_port
from app.local.processes import ServiceProcess
from tests.e2e.conftest import RouterApi, router_process
from tests.helpers import HTTP_TIMEOUT_S, new_client_id, new_key, poll_until
from tests.keys import SessionKeys
from tests.observability.test_metrics import scrape, value
from tests.tls import session_tls, verify

REGION = "eu-west-1"


@dataclass
class Gate:
    """HTTPS in front of one region: answers slot_moving while `frozen`, or 421 while `misdirected` (a switch
    this router's map has not caught up with), on public routes only."""

    upstream: str
    frozen: bool = False
    misdirected: bool = False
    refused: int = 0  # public requests answered slot_moving or 421
    url: str = ""
    _runner: web.AppRunner | None = field(default=None, repr=False)
    _client: aiohttp.ClientSession | None = field(default=None, repr=False)

    async def start(self) -> None:
        app = web.Application(client_max_size=64 * 1024)
        app.router.add_route("*", "/{tail:.*}", self._handle)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        tls = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        tls.load_cert_chain(session_tls().cert_file, session_tls().key_file)
        port = free_port()
        await web.TCPSite(self._runner, "127.0.0.1", port, ssl_context=tls).start()
        self.url = f"https://localhost:{port}"
        self._client = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=HTTP_TIMEOUT_S))

    async def stop(self) -> None:
        if self._client is not None:
            await self._client.close()
        if self._runner is not None:
            await self._runner.cleanup()

    async def _handle(self, request: web.Request) -> web.Response:
        if self.frozen and request.path.startswith("/v1/"):
            self.refused += 1
            body = problem_body("slot_moving", "slot range frozen for its switch", "req_gate")
            return web.Response(status=503, body=body, headers={"content-type": PROBLEM_CONTENT_TYPE,
                                                                "retry-after": "1"})
        if self.misdirected and request.path.startswith("/v1/"):
            self.refused += 1
            body = problem_body("misdirected", "slot moved to a shard this router's map does not name yet", "req_gate")
            return web.Response(status=421, body=body, headers={"content-type": PROBLEM_CONTENT_TYPE})
        assert self._client is not None
        headers = {k: v for k, v in request.headers.items() if k.lower() not in ("host", "content-length")}
        async with self._client.request(request.method, self.upstream + request.path_qs, headers=headers,
                                        data=await request.read(), ssl=verify()) as answer:
            passed = {k: v for k, v in answer.headers.items()
                      if k.lower() in ("content-type", "idempotent-replayed", "retry-after", "location")}
            return web.Response(status=answer.status, body=await answer.read(), headers=passed)


@pytest.fixture
async def gate(region_services: dict[str, ServiceProcess]) -> AsyncIterator[Gate]:
    gate = Gate(region_services[REGION].url)
    await gate.start()
    try:
        yield gate
    finally:
        await gate.stop()


@pytest.fixture
def gated_router(
    gate: Gate, region_services: dict[str, ServiceProcess], keys: SessionKeys, work_dir: Path,
    request: pytest.FixtureRequest,
) -> Iterator[ServiceProcess]:
    urls = {name: service.url for name, service in region_services.items()} | {REGION: gate.url}
    hold_s = getattr(request, "param", "2")
    process = router_process(f"router-gated-{hold_s}", REGION, urls, keys, work_dir / "logs",
                             env_extra={"TXROUTE_SLOT_MOVING_HOLD_S": hold_s})
    process.start()
    try:
        process.wait_ready()
        yield process
    finally:
        process.stop()


@pytest.fixture
async def gated_api(gated_router: ServiceProcess, keys: SessionKeys) -> AsyncIterator[RouterApi]:
    client = new_client_id()
    async with httpx.AsyncClient(base_url=gated_router.url, timeout=HTTP_TIMEOUT_S) as http:
        yield RouterApi(http, client, keys.client_token(client))


async def test_a_deposit_to_a_moving_slot_is_held_and_posted_once_when_the_freeze_lifts(
    gate: Gate, gated_router: ServiceProcess, gated_api: RouterApi,
) -> None:
    account = (await gated_api.open_account("EUR", region=REGION)).json()["id"]
    before = await scrape(gated_router.url)
    gate.frozen = True
    key = new_key()
    started = time.monotonic()
    pending = asyncio.create_task(gated_api.deposit(account, 700, key=key))
    # Held: the router asks again and again while the range is frozen, and the client has no answer yet.
    await poll_until(lambda: _at_least(gate, 3), timeout_s=5, what="the held deposit to be tried 3 times")
    assert not pending.done(), "expected the deposit to be held while its slot is frozen"
    gate.frozen = False
    answer = await asyncio.wait_for(pending, HTTP_TIMEOUT_S)
    held_s = time.monotonic() - started
    assert answer.status_code == 201, f"expected the held deposit to post once the freeze lifted: {answer.text}"
    assert answer.headers.get("idempotent-replayed") is None, "expected the first posting, not a replay"
    assert await gated_api.balance(account) == 700, "expected exactly one posting of 700"
    after = await scrape(gated_router.url)
    released = "txroute_router_held_requests_total"
    assert value(after, released, outcome="released") - value(before, released, outcome="released") == 1, (
        "expected one held request counted as released"
    )
    assert value(after, "txroute_router_hold_duration_seconds_count", outcome="released") >= 1
    assert value(after, "txroute_router_requests_on_hold") == 0, "expected no request still held"
    print(f"held deposit answered after {held_s * 1000:.0f} ms, {gate.refused} slot_moving answers")


async def test_a_421_the_routers_map_cannot_explain_yet_is_held_not_passed_to_the_client(
    gate: Gate, gated_router: ServiceProcess, gated_api: RouterApi,
) -> None:
    """Right after a switch a router's refresh may still name the old owner (refreshes are rate-limited, the new
    owner's claim may land a moment later): the 421 it gets again is held like slot_moving, then posted once."""
    account = (await gated_api.open_account("EUR", region=REGION)).json()["id"]
    gate.misdirected = True
    pending = asyncio.create_task(gated_api.deposit(account, 400, key=new_key()))
    await poll_until(lambda: _at_least(gate, 3), timeout_s=5, what="the deposit to be tried 3 times")
    assert not pending.done(), "expected the deposit held while every answer is 421"
    gate.misdirected = False
    answer = await asyncio.wait_for(pending, HTTP_TIMEOUT_S)
    assert answer.status_code == 201, f"expected the held deposit to post once the owner answers: {answer.text}"
    assert await gated_api.balance(account) == 400, "expected exactly one posting of 400"


@pytest.mark.parametrize("gated_router", ["0.3"], indirect=True)
async def test_a_request_held_past_the_bound_is_answered_503_slot_moving_and_its_retry_posts_once(
    gate: Gate, gated_router: ServiceProcess, gated_api: RouterApi,
) -> None:
    account = (await gated_api.open_account("EUR", region=REGION)).json()["id"]
    before = await scrape(gated_router.url)
    gate.frozen = True
    key = new_key()
    refused = await gated_api.deposit(account, 300, key=key)
    assert refused.status_code == 503, f"expected 503 after the hold, got {refused.status_code}: {refused.text}"
    problem = msgspec.json.decode(refused.content)
    assert problem["code"] == "slot_moving" and refused.headers["retry-after"] == "1", refused.text
    assert refused.headers["content-type"] == PROBLEM_CONTENT_TYPE
    assert gate.refused >= 2, f"expected the router to try again during its hold, saw {gate.refused} attempts"
    read = await gated_api.account(account)
    assert read.status_code == 503 and read.json()["code"] == "slot_moving", "expected reads held and refused too"
    after = await scrape(gated_router.url)
    counted = "txroute_router_held_requests_total"
    assert value(after, counted, outcome="timeout") - value(before, counted, outcome="timeout") == 2
    gate.frozen = False
    # Nothing was written: the client's retry with the same key is the first posting.
    retried = await gated_api.deposit(account, 300, key=key)
    assert retried.status_code == 201 and retried.headers.get("idempotent-replayed") is None, retried.text
    assert await gated_api.balance(account) == 300


async def _at_least(gate: Gate, refused: int) -> bool:
    return gate.refused >= refused


@pytest.mark.parametrize("gated_router", ["0.3"], indirect=True)
async def test_batch_items_whose_slot_no_shard_claims_yet_are_answered_slot_moving_past_the_hold(
    gate: Gate, gated_router: ServiceProcess, gated_api: RouterApi,
) -> None:
    """A move's target claims its range only once its switch-in commits (seconds at 10,000 accounts), and
    meanwhile answers 421 at once (migration 0025). A non-atomic batch's items still answered 421 when the hold
    ran out kept that answer: the client saw the routers' internal 421. They are 503 slot_moving, as a single
    request is, and their retry with the same key posts them once."""
    account = (await gated_api.open_account("EUR", region=REGION)).json()["id"]
    items = [{"type": "deposit", "account": account, "amount": amount, "currency": "EUR"} for amount in (5, 7)]
    key = new_key()
    gate.misdirected = True
    held = await gated_api.post("/v1/batches", {"atomic": False, "items": items}, key=key)
    gate.misdirected = False
    retried = await gated_api.post("/v1/batches", {"atomic": False, "items": items}, key=key)

    assert held.status_code == 200, held.text
    assert [(i["status"], i["code"]) for i in held.json()["items"]] == [(503, "slot_moving")] * 2, held.text
    assert retried.status_code == 200 and [i["status"] for i in retried.json()["items"]] == [201, 201], retried.text
    assert await gated_api.balance(account) == 12, "expected each item posted once"
