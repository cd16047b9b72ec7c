"""The lean HTTP/1.1 client between our services (app/api/http1.py), against real loopback servers that answer
with scripted bytes: each framing of a body, keep-alive reuse, and each failure class a caller acts on."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable

import pytest

from app.api.http1 import AnswerFailed, ConnectFailed, Pool, request_target
from app.local.ports import free_port

TIMEOUT_S = 5.0

Script = Callable[[bytes], bytes | None]  # a request's bytes -> the answer to write (None: close at once)


class ScriptedServer:
    """Answers each complete request (head and Content-Length body) with `script(request)`, closing after an
    answer that says `Connection: close`; counts connections and keeps every request it read."""

    def __init__(self, script: Script) -> None:
        self.script = script
        self.connections = 0
        self.requests: list[bytes] = []
        self.server: asyncio.Server | None = None

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                length = 0
                for line in head.split(b"\r\n"):
                    name, _, value = line.partition(b":")
                    if name.lower() == b"content-length":
                        length = int(value)
                request = head + await reader.readexactly(length)
                self.requests.append(request)
                answer = self.script(request)
                if answer is None:
                    break
                writer.write(answer)
                await writer.drain()
                if b"\r\nConnection: close\r\n" in answer:
                    break
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()


Serve = Callable[[Script], Awaitable[tuple[ScriptedServer, Pool]]]


@pytest.fixture
async def serve() -> AsyncIterator[Serve]:
    servers: list[ScriptedServer] = []
    pools: list[Pool] = []

    async def start(script: Script) -> tuple[ScriptedServer, Pool]:
        scripted = ScriptedServer(script)
        scripted.server = await asyncio.start_server(scripted.handle, "127.0.0.1", 0)
        port = scripted.server.sockets[0].getsockname()[1]
        pool = Pool(f"http://127.0.0.1:{port}", tls=None, connections_max=2, connect_timeout_s=TIMEOUT_S,
                    read_timeout_s=TIMEOUT_S)
        servers.append(scripted)
        pools.append(pool)
        return scripted, pool

    yield start
    for pool in pools:
        pool.close()
    for scripted in servers:
        assert scripted.server is not None
        scripted.server.close()


def _fixed(answer: bytes) -> Script:
    return lambda request: answer


async def test_content_length_answers_reuse_one_kept_alive_connection(serve: Serve) -> None:
    server, pool = await serve(_fixed(b"HTTP/1.1 201 Created\r\nContent-Type: application/json\r\n"
                                      b"Idempotent-Replayed: true\r\nContent-Length: 7\r\n\r\n{\"a\":1}"))
    for _ in range(3):
        answer = await pool.request("POST", "/v1/transfers", headers={"x-request-id": "r1"}, body=b"{}")
        assert (answer.status, answer.body) == (201, b'{"a":1}')
        assert answer.headers["content-type"] == "application/json"
        assert answer.headers["idempotent-replayed"] == "true"
    assert server.connections == 1, f"expected one kept-alive connection, the server saw {server.connections}"
    first = server.requests[0]
    assert first.startswith(b"POST /v1/transfers HTTP/1.1\r\nhost: 127.0.0.1:")
    assert b"\r\nx-request-id: r1\r\n" in first and first.endswith(b"content-length: 2\r\n\r\n{}")


async def test_chunked_close_delimited_interim_and_bodyless_answers_are_read_whole(serve: Serve) -> None:
    answers = iter([
        b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
        b"3\r\nabc\r\n4;ext=1\r\ndefg\r\n0\r\nTrailer: x\r\n\r\n",
        b"HTTP/1.1 204 No Content\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\n",  # to a HEAD: no body follows
        b"HTTP/1.1 200 OK\r\nConnection: close\r\n\r\nto the close",
    ])
    server, pool = await serve(lambda request: next(answers))
    chunked = await pool.request("GET", "/a", headers={}, body=None)
    assert (chunked.status, chunked.body) == (200, b"abcdefg")
    assert (await pool.request("DELETE", "/b", headers={}, body=None)).status == 204
    head = await pool.request("HEAD", "/c", headers={}, body=None)
    assert (head.status, head.body) == (200, b"")
    assert server.connections == 1, "chunked, 204 and HEAD answers all leave the connection reusable"
    closing = await pool.request("GET", "/d", headers={}, body=None)
    assert closing.body == b"to the close"


async def test_a_request_target_is_encoded_where_it_must_be_only() -> None:
    assert request_target("/v1/transfers?reference=r-1&limit=5") == "/v1/transfers?reference=r-1&limit=5"
    assert request_target("/v1/a b/é?q=50%&r=%41") == "/v1/a%20b/%C3%A9?q=50%25&r=%41"


async def test_header_values_cannot_smuggle_a_header_line(serve: Serve) -> None:
    server, pool = await serve(_fixed(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n"))
    with pytest.raises(ValueError, match="CR or LF"):
        await pool.request("GET", "/", headers={"tracestate": "a\r\nx-evil: 1"}, body=None)
    assert server.connections == 0, "nothing was sent"


async def test_no_connection_is_connect_failed_and_a_lost_or_late_answer_is_answer_failed(serve: Serve) -> None:
    refused = Pool(f"http://127.0.0.1:{free_port()}", tls=None, connections_max=1, connect_timeout_s=TIMEOUT_S,
                   read_timeout_s=TIMEOUT_S)
    with pytest.raises(ConnectFailed):
        await refused.request("GET", "/", headers={}, body=None)
    _, dropping = await serve(lambda request: None)  # reads the request, closes without an answer
    with pytest.raises(AnswerFailed, match="lost"):
        await dropping.request("POST", "/", headers={}, body=b"x")
    _, truncated = await serve(_fixed(b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nabc"))
    with pytest.raises(AnswerFailed):
        await truncated.request("GET", "/", headers={}, body=None, timeout_s=0.2)
    _, garbage = await serve(_fixed(b"SSH-2.0-nope\r\n\r\n"))
    with pytest.raises(AnswerFailed, match="status line"):
        await garbage.request("GET", "/", headers={}, body=None)


async def test_a_connection_whose_answer_timed_out_is_never_reused(serve: Serve) -> None:
    answers = iter([b"HTTP/1.1 200 OK\r\nContent-Length: 4\r\n\r\nla",
                    b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\n\r\nnew"])
    server, pool = await serve(lambda request: next(answers))
    with pytest.raises(AnswerFailed, match="no answer in"):
        await pool.request("GET", "/slow", headers={}, body=None, timeout_s=0.2)
    # The rest of the first answer ("te") must never be read as the start of the next one.
    answer = await pool.request("GET", "/next", headers={}, body=None)
    assert answer.body == b"new"
    assert server.connections == 2, "the timed-out connection was dropped, a new one opened"


async def test_callers_beyond_the_pool_wait_for_a_free_connection(serve: Serve) -> None:
    server, pool = await serve(_fixed(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"))
    answers = await asyncio.gather(*(pool.request("GET", f"/{i}", headers={}, body=None) for i in range(10)))
    assert [a.body for a in answers] == [b"ok"] * 10
    assert server.connections <= 2, f"the pool holds 2 connections at most; the server saw {server.connections}"


async def test_a_connection_closing_while_pooled_is_never_written_to(serve: Serve) -> None:
    """A server closing a kept-alive connection (its FIN read: the transport closes, connection_lost is still to
    come) leaves that connection out of the pool: the next call opens a new one instead of failing as
    AnswerFailed (effect unknown, which a router answers 503). A write to a connection already closing raises
    ConnectFailed: nothing was sent (asyncio would drop it and wait out the timeout; uvloop raises)."""
    server, pool = await serve(_fixed(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"))
    assert (await pool.request("GET", "/1", headers={}, body=None)).body == b"ok"
    (idle,) = pool._idle
    idle.eof_received()
    assert idle._transport is not None
    idle._transport.close()
    with pytest.raises(ConnectFailed, match="before the request was sent"):
        idle.send(b"GET / HTTP/1.1\r\n\r\n", head_only=False)
    answer = await pool.request("POST", "/2", headers={}, body=b"{}")
    assert (answer.status, answer.body) == (200, b"ok")
    assert server.connections == 2, "the closing connection was left out, a new one opened"
    assert [r.split(b" ", 2)[1] for r in server.requests] == [b"/1", b"/2"], "nothing written to the closing one"
