"""The benchmarks' compiled load generator (benchmarks/wrk.py, wrk_load.lua) sends what the Python one sends:
valid transfers with a fresh Idempotency-Key each, and straight to a region a hop token that the region's own
verifier accepts for that very request. wrk runs for real against a loopback server that records what it gets.
"""

from __future__ import annotations

import asyncio
import json
import shutil
from collections.abc import AsyncIterator, Mapping

import pytest
from aiohttp import web

from app.security.scopes import PUBLIC_SCOPES
from app.security.tokens import CLIENT_TOKEN_HEADER, BoundRequest, HopTokenVerifier
from benchmarks import wrk
from benchmarks.client import Direct, Routed
from benchmarks.common import pairs_within

WRK = shutil.which("wrk")
pytestmark = pytest.mark.skipif(WRK is None, reason="wrk is not installed (apt-get install wrk)")
ACCOUNTS = ["acc_001" + "A" * 26, "acc_002" + "B" * 26, "acc_003" + "C" * 26]


@pytest.fixture
async def recorder() -> AsyncIterator[tuple[str, list[tuple[str, str, Mapping[str, str], bytes]]]]:
    """(url, the requests received: method, path, headers, body) of a server answering 201 to everything."""
    received: list[tuple[str, str, Mapping[str, str], bytes]] = []

    async def record(request: web.Request) -> web.Response:
        received.append((request.method, request.path, request.headers.copy(), await request.read()))
        return web.json_response({"state": "posted"}, status=201)

    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", record)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    try:
        yield f"http://127.0.0.1:{port}", received
    finally:
        await runner.cleanup()


async def test_direct_transfers_carry_a_hop_token_the_region_accepts_and_unique_keys(recorder) -> None:
    url, received = recorder
    assert WRK is not None
    auth = Direct("bench-wrk-test")
    ok, errors, seconds, latencies = await asyncio.to_thread(
        wrk.run, WRK, url, auth, clients=2, seconds=1, pick=pairs_within(ACCOUNTS), timeout_s=5)
    assert ok > 0 and errors == 0, (ok, errors)
    assert len(latencies) == ok and seconds > 0, "every answered request has its latency"
    assert len(received) >= ok, "wrk counted no more answers than the server gave"
    verifier = HopTokenVerifier(auth.hop_key().public_key())
    keys = set()
    for method, path, headers, body in received:
        key = headers["Idempotency-Key"]
        keys.add(key)
        transfer = json.loads(body)
        assert (method, path, headers["Content-Type"]) == ("POST", "/v1/transfers", "application/json")
        assert transfer["debit_account"] in ACCOUNTS and transfer["credit_account"] in ACCOUNTS
        assert transfer["debit_account"] != transfer["credit_account"]
        assert (transfer["amount"], transfer["currency"]) == (1, "EUR")
        scheme, _, token = headers["Authorization"].partition(" ")
        principal = verifier.verify(token, BoundRequest("POST", "/v1/transfers", body, key))
        assert scheme == "Bearer" and principal.client == "bench-wrk-test"
        assert principal.scopes == PUBLIC_SCOPES
        assert headers[CLIENT_TOKEN_HEADER] == auth.client_header
    assert len(keys) == len(received), "expected a fresh Idempotency-Key on every request"


async def test_routed_reads_carry_the_client_token(recorder) -> None:
    url, received = recorder
    assert WRK is not None
    auth = Routed("bench-wrk-test")
    ok, errors, _, _ = await asyncio.to_thread(wrk.run, WRK, url, auth, clients=1, seconds=1, reads=ACCOUNTS,
                                               timeout_s=5)
    assert ok > 0 and errors == 0, (ok, errors)
    expected = auth.headers("GET", "/", b"", None)["authorization"]
    for method, path, headers, _ in received:
        assert method == "GET" and path.removeprefix("/v1/accounts/") in ACCOUNTS
        assert headers["Authorization"] == expected and CLIENT_TOKEN_HEADER not in headers
