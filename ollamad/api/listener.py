"""The listening socket and its guards against clients that hold connections open.

- Open files: ``raise_fd_limit`` lifts the soft RLIMIT_NOFILE to the hard limit at start.
- Connection cap: a connection beyond ``max_connections`` (OLLAMAD_MAX_CONNECTIONS; auto =
  3/4 of the open-file limit, at least 256 kept for runners, their connections and files) is
  answered 503 at once and closed, so a flood of sockets cannot exhaust the descriptors.
- Header deadline: aiohttp's keep-alive timer also runs from a connection's opening, and
  closes a connection that has no complete request head when it fires; ``AppRunner`` gets
  OLLAMAD_HEADER_TIMEOUT as ``keepalive_timeout``, so half-sent headers and idle connections
  close after it. (Bodies have their own deadline, in ``common.read_json``.)
- Write deadline: ``watch_stalled_writers`` aborts a connection whose unsent answer has not
  shrunk for OLLAMAD_WRITE_TIMEOUT (a client that stopped reading). With
  ``handler_cancellation`` its handler is cancelled: the runner request is cut, the slot freed.
"""

from __future__ import annotations

import asyncio
import resource
import time
from typing import cast

import anyio
import structlog
from aiohttp import web

log = structlog.get_logger("ollamad.api")
BUSY = (b"HTTP/1.1 503 Service Unavailable\r\nContent-Type: application/json\r\nConnection: close\r\n"
        b"Retry-After: 1\r\nContent-Length: 72\r\n\r\n"
        b'{"error":"server busy: too many connections (OLLAMAD_MAX_CONNECTIONS)"}\n')
REFUSE_LINGER = 0.5  # seconds a refused connection may take to read its 503 before it is closed
MAX_LINGERING = 32  # refused connections waiting so at once; more are closed at once
BACKLOG = 128  # the listen queue, as aiohttp's default
assert len(BUSY.split(b"\r\n\r\n", 1)[1]) == 72


def raise_fd_limit() -> int:
    """Lift the soft open-file limit to the hard one; return the soft limit now in force."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = hard if hard != resource.RLIM_INFINITY else max(soft, 1 << 20)
    if soft != resource.RLIM_INFINITY and soft < want:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (want, hard))
            log.debug("raised the open-file limit", soft=want, was=soft)
            soft = want
        except (ValueError, OSError) as e:
            log.warning("cannot raise the open-file limit", soft=soft, hard=hard, error=str(e))
    return soft if soft != resource.RLIM_INFINITY else 1 << 20


def auto_max_connections(fd_limit: int) -> int:
    """3/4 of the open files, and at least BACKLOG + MAX_LINGERING + 96 left over: the loop
    accepts up to BACKLOG sockets before it makes their protocols, so the cap is passed by
    that many for a moment; runners, their connections, logs and /proc reads need the rest."""
    return max(16, min(fd_limit * 3 // 4, fd_limit - BACKLOG - MAX_LINGERING - 96))


class _Refused(asyncio.Protocol):
    """Answers 503 and closes; what the client sent is read and dropped for a moment, so
    closing does not reset the connection before the client reads the answer."""

    lingering = 0

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's is one, without subclassing it
        self.transport.write(BUSY)
        if _Refused.lingering >= MAX_LINGERING:
            self.transport.abort()
            return
        _Refused.lingering += 1
        self.counted = True
        self.timer = asyncio.get_running_loop().call_later(REFUSE_LINGER, self.transport.abort)

    def data_received(self, data: bytes) -> None:
        pass

    def eof_received(self) -> bool:
        self.transport.close()
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        if getattr(self, "counted", False):
            _Refused.lingering -= 1
            self.timer.cancel()


class CappedSite(web.BaseSite):
    """A TCP site that refuses connections beyond ``max_connections`` with 503."""

    __slots__ = ("_host", "_last_warning", "_max", "_port", "_refused")

    def __init__(self, runner: web.BaseRunner, host: str, port: int, max_connections: int) -> None:
        super().__init__(runner)
        self._host, self._port, self._max = host, port, max_connections
        self._refused = 0
        self._last_warning = 0.0

    @property
    def name(self) -> str:
        return f"http://{self._host}:{self._port}"

    def _protocol(self) -> asyncio.BaseProtocol:
        server = self._runner.server
        assert server is not None
        if len(server.connections) < self._max:
            return server()
        self._refused += 1
        now = time.monotonic()
        if now - self._last_warning > 10:
            log.warning("too many connections; refusing new ones with 503", max_connections=self._max,
                        refused=self._refused)
            self._last_warning, self._refused = now, 0
        return _Refused()

    async def start(self) -> None:
        await super().start()
        loop = asyncio.get_running_loop()
        self._server = await loop.create_server(self._protocol, self._host, self._port, reuse_address=True,
                                                  backlog=BACKLOG)


async def watch_stalled_writers(server: web.Server, timeout: float) -> None:  # noqa: ASYNC109
    """Abort connections whose unsent answer has not shrunk for ``timeout`` seconds."""
    if timeout <= 0:
        return
    every = min(1.0, timeout / 4)
    seen: dict[object, tuple[int, float]] = {}  # connection -> (bytes waiting, since when no progress)
    while True:
        await anyio.sleep(every)
        try:
            seen = _abort_stalled(server, seen, timeout)
        except Exception:  # never the end of the daemon
            log.exception("checking for stalled clients failed")


def _abort_stalled(server: web.Server, seen: dict[object, tuple[int, float]],
                   timeout: float) -> dict[object, tuple[int, float]]:
    """One look at every connection; returns what to remember for the next."""
    now = time.monotonic()
    live: dict[object, tuple[int, float]] = {}
    for conn in server.connections:
        transport = conn.transport
        waiting = transport.get_write_buffer_size() if transport is not None else 0
        if not waiting or transport is None:
            continue
        before = seen.get(conn)
        since = now if before is None or waiting < before[0] else before[1]
        if now - since < timeout:
            live[conn] = (waiting, since)
            continue
        log.warning("client stopped reading its answer; closing the connection and cancelling its request",
                    peer=str(transport.get_extra_info("peername")), unsent_bytes=waiting,
                    stalled_for=round(now - since, 1))
        transport.abort()
    return live
