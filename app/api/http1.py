"""A lean HTTP/1.1 client for calls between the project's own services (router -> region, region -> region):
keep-alive connections pooled per origin, TLS through the context given, a request written in one write, an
answer parsed with a few bytes operations. It replaced aiohttp's client in `app.api.upstreams`: aiohttp took
~340 us of CPU per forwarded call on this 2-core machine against ~50 us for this one (the same calls, one
process, measured), and it was the largest part of the router's profile that was its own work.

It speaks what our services (granian) answer: HTTP/1.1, a body framed by Content-Length or chunked, or read
to the connection's close; one request at a time per connection (no pipelining). Nothing else goes through it
(webhook deliveries to clients' URLs keep aiohttp: app/events/delivery.py).

Failures, by class:

    ConnectFailed   no connection: refused, timed out, TLS handshake or certificate check failed, or no pooled
                    connection came free in time. Nothing of the request was written.
    AnswerFailed    the request may have been written, but no complete, well-formed answer came back (the
                    connection was lost, the answer was malformed or too large, or it timed out).
"""

from __future__ import annotations

import asyncio
import re
import ssl
from collections.abc import Mapping
from dataclasses import dataclass
from typing import cast
from urllib.parse import urlsplit

from app import limits


class HttpError(Exception):
    pass


class ConnectFailed(HttpError):
    """No connection could be had; nothing was sent."""


class AnswerFailed(HttpError):
    """The request may have been sent; no complete answer came back."""


@dataclass(frozen=True, slots=True)
class Response:
    status: int
    headers: dict[str, str]  # names in lower case; repeated fields joined with ", "
    body: bytes


# Characters a request target may carry as they are (RFC 3986 unreserved, sub-delims, ":@/?" and "%" starting
# an escape); anything else is percent-encoded as UTF-8, as aiohttp's URL handling (yarl) did.
_TARGET_UNSAFE = re.compile(r"%(?![0-9A-Fa-f]{2})|[^A-Za-z0-9\-._~!$&'()*+,;=:@/?%]")
_NO_BODY_STATUSES = frozenset({204, 304})


def _encode(match: re.Match[str]) -> str:
    return "".join(f"%{byte:02X}" for byte in match.group().encode())


def request_target(path_qs: str) -> str:
    """`path_qs` with what may not appear in a request line percent-encoded (usually nothing)."""
    return path_qs if _TARGET_UNSAFE.search(path_qs) is None else _TARGET_UNSAFE.sub(_encode, path_qs)


class _Connection(asyncio.Protocol):
    """One kept-alive connection: at most one request in flight; the answer is parsed as its bytes arrive."""

    def __init__(self, response_bytes_max: int) -> None:
        self._transport: asyncio.Transport | None = None
        self._buffer = bytearray()
        self._answer: asyncio.Future[Response] | None = None
        self._head_only = False
        self._status = 0
        self._headers: dict[str, str] | None = None
        self._length: int | None = None  # of the body; None while unknown (chunked, or until the close)
        self._chunked = False
        self._chunks: list[bytes] = []
        self._chunks_bytes = 0
        self._response_bytes_max = response_bytes_max
        self.closed = False
        self.reusable = True
        self.idle_since = 0.0

    # asyncio.Protocol ------------------------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = cast(asyncio.Transport, transport)  # uvloop's transports are no asyncio.Transport

    def data_received(self, data: bytes) -> None:
        if self._answer is None or self._answer.done():
            self._fail(AnswerFailed("bytes arrived with no request waiting"))  # the connection is unusable
            return
        self._buffer += data
        try:
            self._parse()
        except AnswerFailed as exc:
            self._fail(exc)

    def eof_received(self) -> bool:
        self.reusable = False  # the server closed its side: never handed out again, though connection_lost is to come
        return False  # close the transport; connection_lost follows

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self.reusable = False
        answer = self._answer
        if answer is None or answer.done():
            return
        if exc is None and self._headers is not None and self._length is None and not self._chunked:
            self._finish(bytes(self._buffer))  # a body delimited by the connection's (orderly) close
            return
        answer.set_exception(AnswerFailed(f"the connection was lost ({type(exc).__name__ if exc else 'closed'})"))

    # Requests --------------------------------------------------------------------------------------------

    def send(self, request: bytes, *, head_only: bool) -> asyncio.Future[Response]:
        """Write the request. A connection lost before it (between connect and now, or while idle) raises
        ConnectFailed: nothing was sent (asyncio would drop the write and the call wait out its timeout; uvloop
        raises RuntimeError)."""
        assert self._transport is not None and self._answer is None, "one request at a time"
        if self.closed or self._transport.is_closing():
            self.reusable = False
            raise ConnectFailed("the connection closed before the request was sent")
        try:
            self._transport.write(request)
        except RuntimeError:
            self.reusable = False
            raise ConnectFailed("the connection closed before the request was sent") from None
        self._answer = asyncio.get_running_loop().create_future()
        self._head_only = head_only
        return self._answer

    @property
    def open(self) -> bool:
        """Usable for a request: neither side has closed it (closing, or closed already)."""
        return (self.reusable and not self.closed and self._transport is not None
                and not self._transport.is_closing())

    def done(self, now: float) -> None:
        """The caller has its answer, or gave up on it: then (a timeout, a cancellation, a failure) the rest of
        that answer may still come, so the connection is never used again."""
        answer = self._answer
        if answer is None or not answer.done() or answer.cancelled() or answer.exception() is not None:
            self.reusable = False
        self._answer = None
        self.idle_since = now

    def close(self) -> None:
        self.reusable = False
        if self._transport is not None and not self.closed:
            self._transport.close()

    def abort(self) -> None:
        self.reusable = False
        if self._transport is not None and not self.closed:
            self._transport.abort()

    # Parsing ---------------------------------------------------------------------------------------------

    def _parse(self) -> None:
        if self._headers is None and not self._parse_head():
            return
        if len(self._buffer) > self._response_bytes_max:
            raise AnswerFailed(f"an answer larger than {self._response_bytes_max} bytes")
        if self._chunked:
            self._parse_chunks()
        elif self._length is not None and len(self._buffer) >= self._length:
            if len(self._buffer) > self._length:
                raise AnswerFailed("more bytes than the answer's Content-Length")
            self._finish(bytes(self._buffer))

    def _parse_head(self) -> bool:
        while True:  # 1xx interim answers are skipped
            end = self._buffer.find(b"\r\n\r\n")
            if end < 0:
                if len(self._buffer) > limits.UPSTREAM_RESPONSE_HEAD_BYTES_MAX:
                    raise AnswerFailed("an answer's head too large")
                return False
            lines = bytes(self._buffer[:end]).decode("latin-1").split("\r\n")
            del self._buffer[: end + 4]
            version, _, rest = lines[0].partition(" ")
            status_text = rest[:3]
            if not version.startswith("HTTP/1.") or not status_text.isdigit() or len(status_text) != 3:
                raise AnswerFailed("not an HTTP/1.x status line")
            status = int(status_text)
            if 100 <= status < 200:
                continue
            headers: dict[str, str] = {}
            for line in lines[1:]:
                name, colon, value = line.partition(":")
                if not colon or not name or name != name.strip():
                    raise AnswerFailed("a malformed header line")
                name, value = name.lower(), value.strip()
                headers[name] = headers[name] + ", " + value if name in headers else value
            break
        self._status, self._headers = status, headers
        connection = headers.get("connection", "").lower()
        if version == "HTTP/1.0" or "close" in connection:
            self.reusable = False
        if self._head_only or status in _NO_BODY_STATUSES:
            self._length = 0
        elif "chunked" in headers.get("transfer-encoding", "").lower():
            self._chunked = True
        elif "content-length" in headers:
            length = headers["content-length"]
            if not length.isdigit():
                raise AnswerFailed("a malformed Content-Length")
            self._length = int(length)
            if self._length > self._response_bytes_max:
                raise AnswerFailed(f"an answer larger than {self._response_bytes_max} bytes")
        else:
            self.reusable = False  # the body ends with the connection
        return True

    def _parse_chunks(self) -> None:
        while True:
            line_end = self._buffer.find(b"\r\n")
            if line_end < 0:
                return
            size_text = bytes(self._buffer[:line_end]).split(b";", 1)[0].strip()
            try:
                size = int(size_text, 16)
            except ValueError:
                raise AnswerFailed("a malformed chunk size") from None
            if size == 0:  # the last chunk, then trailer fields (ignored) and an empty line
                if self._buffer[line_end + 2 : line_end + 4] == b"\r\n":
                    trailer_end = line_end + 4
                else:
                    found = self._buffer.find(b"\r\n\r\n", line_end + 2)
                    if found < 0:
                        return
                    trailer_end = found + 4
                if len(self._buffer) > trailer_end:
                    raise AnswerFailed("bytes after the last chunk")
                self._finish(b"".join(self._chunks))
                return
            start = line_end + 2
            if len(self._buffer) < start + size + 2:
                return
            if self._buffer[start + size : start + size + 2] != b"\r\n":
                raise AnswerFailed("a chunk not ended by CRLF")
            self._chunks.append(bytes(self._buffer[start : start + size]))
            self._chunks_bytes += size
            if self._chunks_bytes > self._response_bytes_max:
                raise AnswerFailed(f"an answer larger than {self._response_bytes_max} bytes")
            del self._buffer[: start + size + 2]

    def _finish(self, body: bytes) -> None:
        assert self._answer is not None and self._headers is not None
        answer = Response(self._status, self._headers, body)
        self._buffer.clear()
        self._headers, self._length, self._chunked, self._chunks, self._chunks_bytes = None, None, False, [], 0
        self._answer.set_result(answer)

    def _fail(self, exc: AnswerFailed) -> None:
        if self._answer is not None and not self._answer.done():
            self._answer.set_exception(exc)
        self.abort()


class Pool:
    """Kept-alive connections to one origin (`http://host:port` or `https://...`), at most `connections_max`
    in use at once; a caller waits for one at most `connect_timeout_s` (as long as a connection may take to
    open), and for an answer at most `read_timeout_s`, unless it passes its own bound for the whole call."""

    def __init__(
        self,
        url: str,
        *,
        tls: ssl.SSLContext | None,
        connections_max: int,
        connect_timeout_s: float,
        read_timeout_s: float,
        keepalive_s: float = limits.UPSTREAM_KEEPALIVE_S,
        response_bytes_max: int = limits.UPSTREAM_RESPONSE_BYTES_MAX,
    ) -> None:
        parts = urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.hostname or parts.path not in ("", "/"):
            raise ValueError(f"not an origin (scheme://host[:port]): {url!r}")
        assert 1 <= connections_max and 0 < connect_timeout_s and 0 < read_timeout_s and 0 < keepalive_s
        self._host = parts.hostname
        self._port = parts.port or (443 if parts.scheme == "https" else 80)
        self._tls = tls if parts.scheme == "https" else None
        if parts.scheme == "https" and tls is None:
            raise ValueError(f"{url}: https needs a TLS context")
        self._host_header = f"host: {parts.netloc}\r\n"
        self._slots = asyncio.Semaphore(connections_max)
        self._idle: list[_Connection] = []
        self._connect_timeout_s = connect_timeout_s
        self._read_timeout_s = read_timeout_s
        self._keepalive_s = keepalive_s
        self._response_bytes_max = response_bytes_max
        self._closed = False

    async def request(
        self, method: str, path_qs: str, *, headers: Mapping[str, str], body: bytes | None,
        timeout_s: float | None = None,
    ) -> Response:
        """One call. `headers` must not set host, content-length or transfer-encoding (set here). `timeout_s`
        bounds the whole call (the wait for a connection included); without it, the connection is waited for
        at most the connect timeout and the answer at most the read timeout."""
        request = self._encode(method, path_qs, headers, body)
        loop = asyncio.get_running_loop()
        started = loop.time()
        connection = await self._acquire(
            loop, self._connect_timeout_s if timeout_s is None else min(self._connect_timeout_s, timeout_s))
        try:
            answer = connection.send(request, head_only=method == "HEAD")
            bound_s = self._read_timeout_s if timeout_s is None else max(timeout_s - (loop.time() - started), 0.0)
            timer = loop.call_later(bound_s, _time_out, answer, timeout_s or bound_s)
            try:
                return await answer
            finally:
                timer.cancel()
        finally:
            connection.done(loop.time())
            self._release(connection)

    def close(self) -> None:
        """Closes the idle connections now and the others as their calls end."""
        self._closed = True
        while self._idle:
            self._idle.pop().close()

    def _encode(self, method: str, path_qs: str, headers: Mapping[str, str], body: bytes | None) -> bytes:
        fields = [f"{method} {request_target(path_qs)} HTTP/1.1\r\n", self._host_header]
        fields += [f"{name}: {value}\r\n" for name, value in headers.items()]
        if body is not None or method in ("POST", "PUT", "PATCH"):
            fields.append(f"content-length: {len(body or b'')}\r\n")
        fields.append("\r\n")
        head = "".join(fields)
        # A CR or LF inside a name or value would start a header (or a request) of its own: one line per field.
        if head.count("\n") != len(fields) or head.count("\r") != len(fields):
            raise ValueError("a header name or value holds CR or LF")
        encoded = head.encode("latin-1")
        return encoded + body if body else encoded

    async def _acquire(self, loop: asyncio.AbstractEventLoop, bound_s: float) -> _Connection:
        if self._closed:
            raise ConnectFailed("the pool is closed")
        deadline = loop.time() + bound_s
        try:
            if self._slots.locked():
                async with asyncio.timeout_at(deadline):
                    await self._slots.acquire()
            else:
                await self._slots.acquire()  # a free slot: taken at once
        except TimeoutError:
            raise ConnectFailed(f"no pooled connection came free in {bound_s} s") from None
        try:
            now = loop.time()
            while self._idle:
                connection = self._idle.pop()
                if connection.open and now - connection.idle_since < self._keepalive_s:
                    return connection
                connection.close()
            return await self._connect(loop, deadline, bound_s)
        except BaseException:
            self._slots.release()
            raise

    async def _connect(self, loop: asyncio.AbstractEventLoop, deadline: float, bound_s: float) -> _Connection:
        try:
            async with asyncio.timeout_at(deadline):
                _, connection = await loop.create_connection(
                    lambda: _Connection(self._response_bytes_max), self._host, self._port,
                    ssl=self._tls, server_hostname=self._host if self._tls else None,
                )
        except TimeoutError:
            raise ConnectFailed(f"no connection in {bound_s} s") from None
        except (OSError, ValueError) as exc:  # refused, unreachable, TLS refused (SSLError is an OSError)
            raise ConnectFailed(f"{type(exc).__name__}") from None
        return connection

    def _release(self, connection: _Connection) -> None:
        if connection.open and not self._closed:
            self._idle.append(connection)
        else:
            connection.close()
        self._slots.release()


def _time_out(answer: asyncio.Future[Response], bound_s: float) -> None:
    if not answer.done():
        answer.set_exception(AnswerFailed(f"no answer in {bound_s} s"))
