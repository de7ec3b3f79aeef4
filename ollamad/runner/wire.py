"""The relay's HTTP/1.1 client to its runners: each piece of a streamed reply is handed to the
relay where it is read, with no task woken for it.

aiohttp's client hands a response body over through a StreamReader: for each piece a future is
set, the reading task is woken and steps through its async iterators. With a real llama-server
each token comes on its own read, so that is paid per token: in an experiment relaying paced
SSE events (one per 2 ms, 4 clients; BENCHMARKS.md, "A task woken per token") it took 36-50 µs
of user CPU per event against 14-23 µs when the connection's protocol hands each piece on itself.
Here a connection is an asyncio protocol, httptools (llhttp, as uvicorn uses) parses the reply,
and a streamed body goes to a ``sink`` called from ``data_received``; a reply read whole is
gathered.

Connections are kept for ``KEEPALIVE`` seconds (below llama-server's 5 s), and a request that a
kept connection's closing cut before any reply came is sent again on a new one, as
runner/upstream.py does for aiohttp.
"""

from __future__ import annotations

import asyncio
import socket
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import cast

import httptools

from ollamad.runner.upstream import ATTEMPTS, KEEPALIVE

# The kernel's receive buffer for a runner's reply. While a slow client holds the relay back the
# daemon stops reading; with autotuning the kernel went on taking the reply in (12 MB of 12 was
# seen), so the runner was not held back and the daemon's socket held that memory after all.
RECEIVE_BUFFER = 1 << 20

Sink = Callable[[bytes], None]


class CutBeforeReply(ConnectionError):
    """The connection closed before any byte of the reply: the runner never answered."""


@dataclass(eq=False)
class Reply:
    """One request's reply. ``status`` once ``headers`` is done; the body goes to the sink given
    to ``stream()`` (pieces that came before it are handed over first), or is gathered."""

    headers: asyncio.Future[None]
    done: asyncio.Future[None]
    status: int = 0
    content_type: str = ""
    started: bool = False  # a byte of the reply came
    _sink: Sink | None = None
    _body: list[bytes] = field(default_factory=list)
    _conn: _Connection | None = None

    def stream(self, sink: Sink) -> None:
        """Hand the body to ``sink`` from now on (what came already, at once), a call per read."""
        body, self._body = self._body, []
        self._sink = sink
        if body:
            sink(b"".join(body))

    def body(self) -> bytes:
        return b"".join(self._body)

    def take(self) -> bytes:
        """The body read so far, no longer kept."""
        body, self._body = self._body, []
        return b"".join(body)

    def pause(self) -> None:
        """Stop reading the reply (the client is slow): the runner's writes wait in the socket."""
        if self._conn is not None and self._conn.transport is not None:
            self._conn.transport.pause_reading()

    def resume(self) -> None:
        if self._conn is not None and self._conn.transport is not None and not self._conn.transport.is_closing():
            self._conn.transport.resume_reading()

    def abort(self) -> None:
        """Drop the connection (llama-server stops the task when it sees it closed)."""
        if self._conn is not None:
            self._conn.close()
        self._end(ConnectionAbortedError("the reply was not read to its end"))

    def _flush(self, pieces: list[bytes]) -> None:
        """What one read brought (one or more chunks of the body): one call of the sink."""
        if self._sink is None:
            self._body += pieces
        else:
            self._sink(pieces[0] if len(pieces) == 1 else b"".join(pieces))

    def _end(self, error: BaseException | None = None) -> None:
        for fut in (self.headers, self.done):
            if not fut.done():
                if error is None:
                    fut.set_result(None)
                else:
                    fut.set_exception(error)
                    fut.exception()  # retrieved: an unread failure is not logged as such


class _Connection(asyncio.Protocol):
    def __init__(self, pool: RunnerClient, key: tuple[str, int]) -> None:
        self.pool, self.key = pool, key
        self.transport: asyncio.Transport | None = None
        self.parser = httptools.HttpResponseParser(self)
        self.reply: Reply | None = None
        self.pieces: list[bytes] = []
        self.closed = False
        self.idle_since = 0.0

    # asyncio.Protocol
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's is one, without subclassing it

    def data_received(self, data: bytes) -> None:
        reply = self.reply
        if reply is None:  # nothing asked: not HTTP we understand
            self.close()
            return
        reply.started = True
        self.pieces = []
        try:
            self.parser.feed_data(data)  # on_body gathers the body's chunks in self.pieces
        except httptools.HttpParserError as e:
            self.close()
            reply._end(ConnectionError(f"bad reply from llama-server: {e}"))
            return
        if self.pieces:  # all that this read brought goes on at once (a burst: one write to the client)
            reply._flush(self.pieces)

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self.pool._forget(self)
        reply, self.reply = self.reply, None
        if reply is not None:
            if not reply.started:
                reply._end(CutBeforeReply(str(exc or "the runner closed the connection")))
            else:
                reply._end(ConnectionResetError(str(exc or "the runner closed the connection mid-reply")))

    # httptools callbacks
    def on_header(self, name: bytes, value: bytes) -> None:
        if self.reply is not None and name.lower() == b"content-type":
            self.reply.content_type = value.decode("latin-1")

    def on_headers_complete(self) -> None:
        reply = self.reply
        if reply is not None:
            reply.status = self.parser.get_status_code()
            if not reply.headers.done():
                reply.headers.set_result(None)

    def on_body(self, body: bytes) -> None:
        self.pieces.append(body)

    def on_message_complete(self) -> None:
        reply, self.reply = self.reply, None
        keep = self.parser.should_keep_alive()
        if reply is not None:
            reply._conn = None
            reply._end()
        if keep and not self.closed:
            self.idle_since = time.monotonic()
            self.pool._idle.setdefault(self.key, []).append(self)
        else:
            self.close()

    def close(self) -> None:
        self.closed = True
        if self.transport is not None:
            self.transport.close()


class RunnerClient:
    """POSTs to runners over kept-alive connections; ``request()`` returns once the headers came."""

    def __init__(self) -> None:
        self._idle: dict[tuple[str, int], list[_Connection]] = {}

    async def request(self, host: str, port: int, path: str, body: bytes, headers: dict[str, str] | None = None,
                      accept: Callable[[asyncio.Future[None]], Awaitable[None]] | None = None) -> Reply:
        """``accept``: awaits the headers future in place of a plain await (a deadline policy)."""
        head = (f"POST {path} HTTP/1.1\r\nHost: {host}:{port}\r\nContent-Type: application/json\r\n"
                f"Content-Length: {len(body)}\r\n"
                + "".join(f"{k}: {v}\r\n" for k, v in (headers or {}).items()) + "\r\n").encode("latin-1")
        message = head + body
        for attempt in range(1, ATTEMPTS + 1):
            conn, kept = self._connection(host, port)
            if conn is None:
                conn = await self._connect(host, port)
            reply = self._send(conn, message)
            try:
                await (reply.headers if accept is None else accept(reply.headers))
                return reply
            except CutBeforeReply:
                if not kept or attempt == ATTEMPTS:
                    raise
            except BaseException:
                reply.abort()
                raise
        raise AssertionError("unreachable")

    def close(self) -> None:
        for conns in self._idle.values():
            for conn in conns:
                conn.close()
        self._idle.clear()

    def _forget(self, conn: _Connection) -> None:
        """A closed connection leaves the pool (a runner's port goes with its last one)."""
        idle = self._idle.get(conn.key)
        if idle is not None and conn in idle:
            idle.remove(conn)
        if idle is not None and not idle:
            del self._idle[conn.key]

    def _connection(self, host: str, port: int) -> tuple[_Connection | None, bool]:
        idle = self._idle.get((host, port))
        now = time.monotonic()
        while idle:
            conn = idle.pop()
            if not conn.closed and now - conn.idle_since < KEEPALIVE:
                return conn, True
            conn.close()
        return None, False

    async def _connect(self, host: str, port: int) -> _Connection:
        loop = asyncio.get_running_loop()
        transport, conn = await loop.create_connection(lambda: _Connection(self, (host, port)), host, port)
        sock = transport.get_extra_info("socket")
        if sock is not None:  # fixed: no autotuning up to tcp_rmem's maximum (32 MB here)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, RECEIVE_BUFFER)
        return conn

    @staticmethod
    def _send(conn: _Connection, message: bytes) -> Reply:
        loop = asyncio.get_running_loop()
        reply = Reply(loop.create_future(), loop.create_future(), _conn=conn)
        conn.reply = reply
        assert conn.transport is not None
        conn.transport.write(message)
        return reply
