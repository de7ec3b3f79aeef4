"""A streamed reply relayed as its pieces arrive: translated and written to the client from the
runner connection's ``data_received`` (runner/wire.py), with no task woken per token.

The handler's task waits once for the end: the reply's last byte, the translation's end (a
native stream's final event), the client gone, or a client too slow to read (its socket's
buffer over ``HIGH``: the runner's reply is not read until it is under ``LOW``; what piled up
meanwhile goes out in one write, as coalesced pieces).
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable

import aiohttp
from aiohttp import web

from ollamad.api.reqlog import RequestRecord
from ollamad.runner.events import SseSplitter, UpstreamError, cut
from ollamad.runner.wire import Reply

HIGH = 256 * 1024  # bytes waiting in the client's socket buffer before the runner's reply is paused
LOW = 64 * 1024
DRAIN_POLL = 0.01  # seconds between looks at a paused client's buffer

# events of llama-server's (whole SSE blocks) -> the bytes to write now, and True once the
# stream's end is among them (nothing more is read then)
Translate = Callable[[bytes], tuple[bytes, bool]]


class StreamRelay:
    """One streamed reply, to ``resp`` (prepared; its headers go out with the first write):
    ``run()`` returns when it ended."""

    def __init__(self, request: web.Request, resp: web.StreamResponse, reply: Reply, translate: Translate,
                 rec: RequestRecord) -> None:
        self.transport = request.transport
        self.resp = resp
        # as aiohttp chose in prepare(): not for an HTTP/1.0 client, whose body ends with the connection
        self.chunked = resp.headers.get("Transfer-Encoding", "").lower() == "chunked"
        self.reply = reply
        self.translate = translate
        self.rec = rec
        self.sse = SseSplitter()
        self.ended = False  # the translation said the stream ended
        self.gone = False  # the client went away
        self.failed: UpstreamError | None = None  # the translation raised (an error event)
        self._paused = False
        self._waiter: asyncio.Future[None] | None = None

    async def run(self) -> None:
        """Relay until the end; UpstreamError if the runner cut the reply, ClientConnectionResetError
        if the client went away. Cancelled (the drain timeout, the client gone): the caller aborts."""
        self.reply.done.add_done_callback(self._wake)
        first = self._translated(self.reply.take())  # what came with the runner's headers
        if not (self.ended or self.failed):  # else all goes out with the caller's last write
            if first:
                self.rec.first_token()
            await self.resp.write(first)  # the headers, with what came along (aiohttp frames it)
            self.reply.stream(self._piece)
        loop = asyncio.get_running_loop()
        while not (self.ended or self.gone or self.failed or self.reply.done.done()):
            if self._paused:
                await self._drain()
                continue
            self._waiter = loop.create_future()
            await self._waiter
        if self.gone:
            raise aiohttp.ClientConnectionResetError("the client went away")
        if self.ended or self.failed:
            return
        error = self.reply.done.exception()
        if error is not None:
            raise cut(error)
        rest = self.sse.rest()  # a last event without its blank line
        if rest is not None:
            self._write(self._translated(rest, whole=True))

    def _piece(self, data: bytes) -> None:
        if self.ended or self.gone or self.failed:
            return
        out = self._translated(data)
        if out:
            self._write(out)
        if self.ended or self.failed:
            self._wake()

    def _translated(self, data: bytes, whole: bool = False) -> bytes:
        """What to write for ``data`` (its whole events; the rest waits for the next piece)."""
        block = data if whole else self.sse.feed(data) if data else None
        if block is None:
            return b""
        try:
            out, self.ended = self.translate(block)
        except UpstreamError as e:
            self.failed = e
            return b""
        return out

    def _write(self, data: bytes) -> None:
        if not data:
            return
        t = self.transport
        if t is None or t.is_closing():
            self.gone = True
            self._wake()
            return
        self.rec.first_token()
        t.write(b"%x\r\n%b\r\n" % (len(data), data) if self.chunked else data)
        if t.get_write_buffer_size() > HIGH:
            self._paused = True
            self.reply.pause()
            self._wake()

    async def _drain(self) -> None:
        t = self.transport
        # polled: only a slow client gets here, and aiohttp's own drain waiter is private
        while t is not None and not t.is_closing() and t.get_write_buffer_size() > LOW:  # noqa: ASYNC110
            await asyncio.sleep(DRAIN_POLL)
        self._paused = False
        self.reply.resume()

    def _wake(self, _: object = None) -> None:
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_result(None)
