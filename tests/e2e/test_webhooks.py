"""Webhooks end to end (issue 13): a router and three regions of their own, receivers as real HTTP servers on
loopback. Deliveries are verified with the test's own Standard Webhooks implementation."""

from __future__ import annotations

import asyncio
import os
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import httpx
import pytest
from aiohttp import web

from app import limits
from app.events.feed import EVENT_TYPES
from app.events.webhooks import home_slot
from app.local.processes import ServiceProcess
from app.ops import webhooks as ops_webhooks
from app.ops.target import deployed_target
from app.topology.model import Topology
from tests.e2e.conftest import ROUTER_REGION, RouterApi, router_process
from tests.events_support import verify_signature, walk_feed
from tests.helpers import accounts_in_one_shard, new_client_id, new_key, poll_until
from tests.keys import SessionKeys

# Short enough for a test, long enough to outlast a region's restart between attempts.
SCHEDULE_S = "0.5,0.5,1,1,2,2,4,4,8,8,16,16"


@dataclass
class Received:
    path: str
    headers: dict[str, str]
    body: bytes
    answered: int


@dataclass
class Receiver:
    """Answers 200 on /ok/..., 410 on /gone until `back`, and 503 on /flaky until `recovered`."""

    url: str = ""
    recovered: bool = False
    back: bool = False
    received: list[Received] = field(default_factory=list)

    async def handle(self, request: web.Request) -> web.Response:
        path = request.path
        status = 200
        if path.startswith("/gone") and not self.back:
            status = 410
        elif path.startswith("/flaky") and not self.recovered:
            status = 503
        self.received.append(Received(path, {k.lower(): v for k, v in request.headers.items()},
                                      await request.read(), status))
        return web.Response(status=status)

    def on(self, path: str, *, status: int | None = None) -> list[Received]:
        return [r for r in self.received if r.path == path and (status is None or r.answered == status)]


@pytest.fixture
async def receiver() -> AsyncIterator[Receiver]:
    found = Receiver()
    app = web.Application()
    app.router.add_post("/{tail:.*}", found.handle)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    found.url = f"http://127.0.0.1:{port}"
    try:
        yield found
    finally:
        await runner.cleanup()


@pytest.fixture
def webhook_world(make_world: Callable[..., Any], topology: Topology, keys: SessionKeys) -> Iterator[Any]:
    env = {"TXROUTE_WEBHOOK_ALLOW_LOOPBACK": "1", "TXROUTE_WEBHOOK_RETRY_SCHEDULE_S": SCHEDULE_S}
    world = make_world({r.name: dict(env) for r in topology.regions})
    router = router_process("router-webhooks", ROUTER_REGION, {r: s.url for r, s in world.services.items()}, keys,
                            world.folder / "logs")
    router.start()
    try:
        router.wait_ready()
        world.router = router
        yield world
    finally:
        router.stop()
        if os.environ.get("TXROUTE_TEST_SHOW_LOGS"):
            for log in sorted((world.folder / "logs").glob("*.log")):
                print(log.name, log.read_text()[-20_000:])


async def _register(api: RouterApi, url: str, **extra: Any) -> dict[str, Any]:
    response = await api.post("/v1/webhook-endpoints", {"url": url, **extra})
    assert response.status_code == 201, f"expected 201 registering {url}, got {response.status_code}: {response.text}"
    body: dict[str, Any] = response.json()
    return body


async def _endpoint(api: RouterApi, endpoint_id: str) -> dict[str, Any]:
    response = await api.get(f"/v1/webhook-endpoints/{endpoint_id}")
    assert response.status_code == 200, response.text
    body: dict[str, Any] = response.json()
    return body


async def test_webhooks_deliver_signed_events_retry_across_a_restart_and_stop_at_410(
    webhook_world: Any, receiver: Receiver, topology: Topology, keys: SessionKeys,
) -> None:
    router: ServiceProcess = webhook_world.router
    async with httpx.AsyncClient(base_url=router.url, timeout=30) as http:
        client = new_client_id()
        api = RouterApi(http, client, keys.client_token(client))
        other_id = new_client_id("other")
        other = RouterApi(http, other_id, keys.client_token(other_id))

        ok = await _register(api, f"{receiver.url}/ok/a", description="books")
        assert ok["secret"].startswith("whsec_") and ok["id"].startswith("we_") and ok["state"] == "enabled"
        flaky = await _register(api, f"{receiver.url}/flaky")
        gone = await _register(api, f"{receiver.url}/gone", event_types=["account.opened"])
        theirs = await _register(other, f"{receiver.url}/ok/b")
        listed = (await api.get("/v1/webhook-endpoints")).json()["items"]
        assert {e["id"] for e in listed} == {ok["id"], flaky["id"], gone["id"]}, "expected A's endpoints only"
        assert all("secret" not in e for e in listed), "expected the secret in the registration answer only"

        # Every event type the API can cause.
        regions = [r.name for r in topology.regions]
        home, (source, peer, spare) = await accounts_in_one_shard(api, topology, 3)
        remote_region = next(r for r in regions if r != topology.shard(home).region)
        remote = (await api.open_account("EUR", region=remote_region)).json()["id"]
        remote_usd = (await api.open_account("USD", region=remote_region)).json()["id"]
        await api.funded(source, 1_000)
        assert (await api.transfer(source, peer, 100)).status_code == 201
        assert (await api.transfer(source, remote, 200)).status_code in (201, 202)
        assert (await api.transfer(source, remote_usd, 300)).status_code in (201, 202)
        holds = [(await api.hold(source, peer, 10, expires_in_s=s)).json()["id"] for s in (3600, 3600, 1)]
        assert (await api.capture(holds[0])).status_code == 201
        assert (await api.void(holds[1])).status_code == 200
        assert (await api.close(spare)).status_code == 200
        await other.new_account()

        async def feed_types() -> set[str]:
            return {e["type"] for e in (await walk_feed(api))[0]}

        async def all_types() -> bool:
            return await feed_types() >= set(EVENT_TYPES)

        await poll_until(all_types, timeout_s=30, what="every event type in the feed")
        events = (await walk_feed(api))[0]
        expected = {e["id"]: e for e in events}

        async def delivered_ok() -> bool:
            return {r.headers["webhook-id"] for r in receiver.on("/ok/a")} >= set(expected)

        await poll_until(delivered_ok, timeout_s=60, what="every event delivered to the healthy endpoint")
        for got in receiver.on("/ok/a"):
            assert verify_signature(ok["secret"], got.headers, got.body), "expected a valid v1 signature"
            event = httpx.Response(200, content=got.body).json()
            assert event["id"] == got.headers["webhook-id"] and event == expected[event["id"]], (
                "expected the body to be the event as the feed lists it, under webhook-id = its id")
        assert {r.headers["webhook-id"] for r in receiver.on("/ok/a")} == set(expected), (
            "expected exactly the events the feed lists")
        assert not {r.headers["webhook-id"] for r in receiver.on("/ok/b")} & set(expected), (
            "expected client B's endpoint to receive none of A's events")

        async def gone_disabled() -> bool:
            return (await _endpoint(api, gone["id"]))["state"] == "disabled"

        await poll_until(gone_disabled, timeout_s=30, what="the endpoint answering 410 to be disabled")
        assert "410" in (await _endpoint(api, gone["id"]))["disabled_reason"]
        # Attempts already in flight when the first 410 came finish; none is started after it.
        assert 1 <= len(receiver.on("/gone")) <= limits.WEBHOOK_IN_FLIGHT_PER_ENDPOINT_MAX, (
            "expected no attempt beyond those in flight when the endpoint answered 410")
        # `txroute ops webhooks` lists it with its reason and enables it again.
        target = deployed_target(endpoints=[], dsns=[f"{s}={d}" for s, d in webhook_world.shard_dsns().items()],
                                 dsn_file=None, regions_dir=None)
        disabled, unreadable = await ops_webhooks.endpoints(target, client=client, disabled_only=True)
        assert not unreadable and [r["id"] for r in disabled] == [gone["id"]]
        assert "410" in disabled[0]["disabled_reason"]
        # The receiver is back (had it stayed gone, the redelivery the enable starts would disable it again).
        receiver.back = True
        await ops_webhooks.retry(target, gone["id"], enable=True, yes=True)
        opened = {i for i, e in expected.items() if e["type"] == "account.opened"}

        async def gone_caught_up() -> bool:
            return receiver_ok_ids(receiver, "/gone") >= opened

        await poll_until(gone_caught_up, timeout_s=30, what="the re-enabled endpoint to receive its events")
        assert (await _endpoint(api, gone["id"]))["state"] == "enabled", "expected ops webhooks enable to enable it"
        assert {r.headers["webhook-id"] for r in receiver.on("/gone")} <= opened, (
            "expected only the event types the endpoint subscribed to")

        # The flaky receiver has failed some attempts: restart the region whose worker sends them, then recover.
        async def retried() -> bool:
            ids = [r.headers["webhook-id"] for r in receiver.on("/flaky")]
            return any(ids.count(i) >= 2 for i in ids)

        await poll_until(retried, timeout_s=30, what="a failed delivery to be attempted again")
        worker_region = topology.shard_for_slot(home_slot(client)).region
        await asyncio.to_thread(webhook_world.restart, worker_region)
        receiver.recovered = True

        async def delivered_flaky() -> bool:
            return {r.headers["webhook-id"] for r in receiver.on("/flaky", status=200)} >= set(expected)

        await poll_until(delivered_flaky, timeout_s=90, what="every event delivered once the receiver recovered")
        ids = [r.headers["webhook-id"] for r in receiver.on("/flaky")]
        assert any(ids.count(i) >= 2 for i in receiver_ok_ids(receiver, "/flaky")), (
            "expected a failed event to arrive again under the same webhook-id")
        attempts = (await api.get(f"/v1/webhook-endpoints/{flaky['id']}/deliveries")).json()["items"]
        assert {a["status"] for a in attempts} >= {503, 200} and all(a["latency_ms"] >= 0 for a in attempts)

        # Rotation: both secrets sign for a while.
        rotated = await api.post(f"/v1/webhook-endpoints/{ok['id']}/rotate-secret", {}, key=new_key())
        assert rotated.status_code == 200 and rotated.json()["secret"] != ok["secret"], rotated.text
        before = len(receiver.on("/ok/a"))
        await api.new_account()

        async def one_more() -> bool:
            return len(receiver.on("/ok/a")) > before

        await poll_until(one_more, timeout_s=30, what="a delivery after the rotation")
        latest = receiver.on("/ok/a")[-1]
        assert len(latest.headers["webhook-signature"].split(" ")) == 2
        assert verify_signature(rotated.json()["secret"], latest.headers, latest.body)
        assert verify_signature(ok["secret"], latest.headers, latest.body)
        # Deliveries are per client too: B sees its endpoint's attempts, A gets 404 for them as for the endpoint.
        async def theirs_attempted() -> bool:
            answer = await other.get(f"/v1/webhook-endpoints/{theirs['id']}/deliveries")
            assert answer.status_code == 200, answer.text
            return bool(answer.json()["items"])

        await poll_until(theirs_attempted, timeout_s=30, what="B's endpoint to show its delivery attempts")
        for path in (f"/v1/webhook-endpoints/{theirs['id']}/deliveries", f"/v1/webhook-endpoints/{theirs['id']}"):
            peeked = await api.get(path)
            assert peeked.status_code == 404, f"expected A to get 404 for B's {path}, got {peeked.status_code}"
            assert peeked.json()["code"] == "webhook_endpoint_not_found", peeked.text
        deleted = await http.delete(f"/v1/webhook-endpoints/{theirs['id']}", headers=api.headers())
        assert deleted.status_code == 404, "expected A unable to delete B's endpoint"


def receiver_ok_ids(receiver: Receiver, path: str) -> set[str]:
    return {r.headers["webhook-id"] for r in receiver.on(path, status=200)}


@pytest.mark.parametrize("url", [
    "https://127.0.0.1/hook", "https://10.1.2.3/hook", "https://169.254.169.254/latest/meta-data",
    "https://localhost/hook", "http://example.com/hook", "https://[::1]/hook", "https://192.168.0.10/",
])
async def test_a_webhook_url_that_is_not_https_to_a_public_address_is_refused_outside_the_local_stack(
    client_api: RouterApi, url: str,
) -> None:
    response = await client_api.post("/v1/webhook-endpoints", {"url": url})
    assert response.status_code == 400, f"expected 400 for {url}, got {response.status_code}: {response.text}"
    assert response.json()["code"] == "invalid_webhook_url"
