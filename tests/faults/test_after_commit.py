"""After the debit side of a saga has committed, the client never sees a 500 (issue 9 item 8): whatever the
fast path meets (a peer answering garbage or refusing the token, a connection cut, a settlement that raises),
the answer is the stored 202 pending, and the relay finishes the saga once the fault is gone.

Real parts only: the faulty peer is an HTTP server on loopback that region eu-west-1 is pointed at, the
failing settlement is the shard's own PL/pgSQL function replaced for a while."""

from __future__ import annotations

import asyncio
import json
import ssl
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager

import asyncpg
from cryptography.hazmat.primitives.asymmetric import ed25519

from app.security.keys import private_pem
from tests.faults.test_saga_faults import _all_posted
from tests.helpers import ApiClient, new_client_id, shard_of
from tests.keys import region_env
from tests.tls import session_tls

SOURCE, DESTINATION = "eu-west-1", "us-east-1"
# What the faulty peer answers, one per transfer, in order.
BAD_ANSWERS = {
    "not JSON": b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: 9\r\n\r\nnot json!",
    "JSON, not an object": b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: 3\r\n\r\n[1]",
    "an object without an outcome": (b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\n"
                                     b"content-length: 2\r\n\r\n{}"),
    "the token refused": (b"HTTP/1.1 401 Unauthorized\r\ncontent-type: application/problem+json\r\n"
                          b"content-length: 2\r\n\r\n{}"),
    "the connection cut": b"HTTP/1.1 200 OK\r\ncontent-length: 100\r\n\r\n{\"outc",
}


@asynccontextmanager
async def faulty_peer(answers: Iterator[bytes], served: list[bytes]) -> AsyncIterator[str]:
    """An HTTP server on loopback answering each request with the next of `answers`, then closing; the
    request lines it read go to `served`."""

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            head = await reader.readuntil(b"\r\n\r\n")
            length = next((int(line.split(b":")[1]) for line in head.split(b"\r\n")
                           if line.lower().startswith(b"content-length:")), 0)
            await reader.readexactly(length)
            served.append(head.split(b"\r\n")[0])
            writer.write(next(answers, BAD_ANSWERS["not JSON"]))
            await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError, ssl.SSLError):
            pass
        finally:
            writer.close()

    # It serves HTTPS with the session's certificate: regions call each other over TLS only.
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(session_tls().cert_file, session_tls().key_file)
    server = await asyncio.start_server(serve, "127.0.0.1", 0, ssl=context)
    port = server.sockets[0].getsockname()[1]
    try:
        yield f"https://127.0.0.1:{port}"
    finally:
        server.close()
        await server.wait_closed()


async def _replace_settle(dsn: str, *, failing: bool, original: str | None = None) -> str:
    """Swap the shard's txr_saga_settle for one that raises (returns the original definition), or back."""
    conn = await asyncpg.connect(dsn)
    try:
        if failing:
            definition = str(await conn.fetchval("select pg_get_functiondef('txr_saga_settle'::regproc)"))
            await conn.execute(
                """create or replace function txr_saga_settle(p_transfer_id text, p_outcome text, p_reason text)
                   returns jsonb language plpgsql as $$
                   begin raise exception 'injected settlement failure'; end $$"""
            )
            return definition
        assert original is not None
        await conn.execute(original)
        return original
    finally:
        await conn.close()


async def test_every_fast_path_failure_after_the_commit_answers_202_pending_and_the_relay_finishes(make_world):
    world = make_world()
    client = new_client_id("after-commit")
    urls = {region: service.url for region, service in world.services.items()}
    transfers: list[str] = []
    async with world.http(SOURCE) as h1, world.http(DESTINATION) as h2:
        src, dst = ApiClient(h1, client), ApiClient(h2, client)
        a, b = await src.new_account(), await dst.new_account()
        total = 100 * (len(BAD_ANSWERS) + 2)
        await src.funded(a, total)

        async def pending_transfer(what: str) -> None:
            response = await src.transfer(a, b, 100)
            assert response.status_code == 202, f"{what}: expected 202 pending, got {response.status_code}: " \
                                                f"{response.text}"
            assert response.json()["state"] == "pending", response.text
            transfers.append(response.json()["id"])

        # A peer answering garbage, refusing the token or cutting the connection.
        served: list[bytes] = []
        async with faulty_peer(iter(BAD_ANSWERS.values()), served) as peer:
            world.restart(SOURCE, TXROUTE_REGION_URLS=json.dumps({**urls, DESTINATION: peer}),
                          TXROUTE_FAULT_RELAY_PAUSED="1")
            for what in BAD_ANSWERS:
                await pending_transfer(what)
        # The relay is paused: each bad answer reached the fast path (a 202 without it would prove nothing).
        assert served == [b"POST /internal/saga/apply HTTP/1.1"] * len(BAD_ANSWERS), served
        # The real peer refusing this region's saga token (signed with a key it does not know).
        stranger = private_pem(ed25519.Ed25519PrivateKey.generate())
        world.restart(SOURCE, TXROUTE_REGION_URLS=json.dumps(urls), TXROUTE_SAGA_PRIVATE_KEY=stranger)
        await pending_transfer("the real peer refusing a token signed by an unknown key")
        world.restart(SOURCE, TXROUTE_SAGA_PRIVATE_KEY=region_env()["TXROUTE_SAGA_PRIVATE_KEY"],
                      TXROUTE_FAULT_RELAY_PAUSED="")
        # The settlement failing in the source shard once the credit side has applied the message.
        dsn = world.clusters[SOURCE].dsn(world.topology.shard(shard_of(world.topology, a)).database)
        original = await _replace_settle(dsn, failing=True)
        try:
            await pending_transfer("the settlement raising")
        finally:
            await _replace_settle(dsn, failing=False, original=original)

        await _all_posted(src, transfers)
        assert await src.balance(a) == total - 100 * len(transfers)
        assert await dst.balance(b) == 100 * len(transfers), "expected each transfer credited exactly once"
    report = await world.audit()
    assert report.clean, report.text()
