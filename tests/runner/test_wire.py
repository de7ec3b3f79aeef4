"""The streams' client to runners (runner/wire.py), against a server whose every byte the test decides."""

from __future__ import annotations

import asyncio
import contextlib
import socket
from collections.abc import AsyncIterator, Callable

import pytest

from ollamad.runner.wire import CutBeforeReply, RunnerClient

OK_HEAD = b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nTransfer-Encoding: chunked\r\n\r\n"


def chunk(data: bytes) -> bytes:
    return b"%x\r\n%b\r\n" % (len(data), data)


class Server:
    """Answers each request with ``answer(n)`` (the n-th request, from 0); counts connections."""

    def __init__(self, answer: Callable[[int, asyncio.Transport], None]) -> None:
        self.answer = answer
        self.connections = 0
        self.requests: list[bytes] = []
        self.lost = asyncio.Event()

    def protocol(self) -> asyncio.Protocol:
        server = self

        class P(asyncio.Protocol):
            def connection_made(self, transport: asyncio.BaseTransport) -> None:
                assert isinstance(transport, asyncio.Transport)
                self.t = transport
                self.buf = b""
                server.connections += 1

            def data_received(self, data: bytes) -> None:
                self.buf += data
                head, sep, rest = self.buf.partition(b"\r\n\r\n")
                if not sep:
                    return
                length = int(next(ln.split(b":")[1] for ln in head.split(b"\r\n")
                                  if ln.lower().startswith(b"content-length")))
                if len(rest) < length:
                    return
                self.buf = rest[length:]
                server.requests.append(head + b"\r\n\r\n" + rest[:length])
                server.answer(len(server.requests) - 1, self.t)

            def connection_lost(self, exc: Exception | None) -> None:
                server.lost.set()

        return P()


@contextlib.asynccontextmanager
async def serving(answer: Callable[[int, asyncio.Transport], None]) -> AsyncIterator[tuple[Server, int]]:
    server = Server(answer)
    srv = await asyncio.get_running_loop().create_server(server.protocol, "127.0.0.1", 0)
    port = srv.sockets[0].getsockname()[1]
    try:
        yield server, port
    finally:
        srv.close()


async def test_a_streamed_reply_goes_to_the_sink_piece_by_piece_and_the_connection_is_kept() -> None:
    def answer(n: int, t: asyncio.Transport) -> None:
        t.write(OK_HEAD + chunk(b"data: 1\n\n"))  # a piece with the headers: before the sink is given
        loop = asyncio.get_running_loop()
        loop.call_later(0.02, t.write, chunk(b"data: 2\n\n"))
        loop.call_later(0.04, t.write, chunk(b"data: [DONE]\n\n") + b"0\r\n\r\n")

    client = RunnerClient()
    async with serving(answer) as (server, port):
        for _ in range(3):
            reply = await client.request("127.0.0.1", port, "/completion", b'{"prompt":"x"}',
                                         {"Authorization": "Bearer k"})
            assert reply.status == 200 and reply.content_type == "text/event-stream"
            got: list[tuple[float, bytes]] = []

            def sink(piece: bytes, got: list[tuple[float, bytes]] = got) -> None:
                got.append((asyncio.get_running_loop().time(), piece))

            reply.stream(sink)
            await reply.done
            assert b"".join(p for _, p in got) == b"data: 1\n\ndata: 2\n\ndata: [DONE]\n\n"
            assert len(got) == 3 and got[2][0] - got[0][0] > 0.03  # as they came, not at the end
        assert server.connections == 1
        assert server.requests[0].startswith(b"POST /completion HTTP/1.1\r\n")
        assert b"Authorization: Bearer k\r\n" in server.requests[0]
        assert server.requests[0].endswith(b'\r\n\r\n{"prompt":"x"}')
    client.close()


async def test_the_chunks_one_read_brings_go_to_the_sink_in_one_call() -> None:
    """A burst of events (a client slow to read, tokens piled up) becomes one write to the client."""

    def answer(n: int, t: asyncio.Transport) -> None:
        t.write(OK_HEAD)
        asyncio.get_running_loop().call_later(0.05, lambda: t.write(
            b"".join(chunk(b"data: %d\n\n" % i) for i in range(5)) + b"0\r\n\r\n"))

    client = RunnerClient()
    async with serving(answer) as (_, port):
        reply = await client.request("127.0.0.1", port, "/completion", b"{}")
        got: list[bytes] = []
        reply.stream(got.append)
        await reply.done
        assert got == [b"".join(b"data: %d\n\n" % i for i in range(5))]
    client.close()


async def test_a_request_cut_by_a_kept_connection_closing_is_sent_again_on_a_new_one() -> None:
    """As llama-server without runners/patches/0002 did: the connection closed after a stream, unsaid."""

    def answer(n: int, t: asyncio.Transport) -> None:
        t.write(OK_HEAD + chunk(b"data: %d\n\n" % n) + b"0\r\n\r\n")
        asyncio.get_running_loop().call_later(0.01, t.close)

    client = RunnerClient()
    async with serving(answer) as (server, port):
        first = await client.request("127.0.0.1", port, "/completion", b"{}")
        await first.done
        await asyncio.sleep(0.05)  # closed meanwhile, still in the pool
        second = await client.request("127.0.0.1", port, "/completion", b"{}")
        await second.done
        assert second.body() == b"data: 1\n\n"
        assert server.connections == 2 and len(server.requests) == 2
        await asyncio.sleep(0.05)
        assert client._idle == {}  # the closed ones left the pool
    client.close()


async def test_an_error_reply_is_read_whole() -> None:
    def answer(n: int, t: asyncio.Transport) -> None:
        body = b'{"error":{"code":400,"message":"the request exceeds the available context size"}}'
        t.write(b"HTTP/1.1 400 Bad Request\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n" % len(body))
        asyncio.get_running_loop().call_later(0.01, t.write, body)

    client = RunnerClient()
    async with serving(answer) as (_, port):
        reply = await client.request("127.0.0.1", port, "/completion", b"{}")
        assert reply.status == 400
        await reply.done
        assert b"exceeds the available context size" in reply.body()
    client.close()


async def test_a_reply_cut_midway_fails_its_end_and_one_cut_before_any_byte_says_so() -> None:
    def midway(n: int, t: asyncio.Transport) -> None:
        t.write(OK_HEAD + chunk(b"data: 1\n\n"))
        asyncio.get_running_loop().call_later(0.01, t.close)

    client = RunnerClient()
    async with serving(midway) as (_, port):
        reply = await client.request("127.0.0.1", port, "/completion", b"{}")
        with pytest.raises(ConnectionResetError):
            await reply.done
    async with serving(lambda n, t: t.close()) as (_, port):
        with pytest.raises(CutBeforeReply):  # a new connection: not sent again
            await client.request("127.0.0.1", port, "/completion", b"{}")
    client.close()


async def test_abort_closes_the_connection_so_the_runner_stops() -> None:
    client = RunnerClient()
    async with serving(lambda n, t: t.write(OK_HEAD + chunk(b"data: 1\n\n"))) as (server, port):
        reply = await client.request("127.0.0.1", port, "/completion", b"{}")
        reply.abort()
        await asyncio.wait_for(server.lost.wait(), 1.0)
        with pytest.raises(ConnectionAbortedError):
            await reply.done
    client.close()


async def test_a_refused_connection_raises_at_once() -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # bound, not listening
        with pytest.raises(ConnectionRefusedError):
            await RunnerClient().request("127.0.0.1", port, "/completion", b"{}")
