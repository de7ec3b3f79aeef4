"""RPC workers' health and free memory, asked over llama.cpp's own RPC protocol.

ggml-rpc-server answers HELLO (protocol version), DEVICE_COUNT and GET_DEVICE_MEMORY
(free and total bytes per device) to any client, and serves ONE client at a time: while a
llama-server is connected, a second client's connection is accepted by the kernel but
never answered. So a probe reads three states: ``up`` (answered: free memory known),
``busy`` (connects, no answer: some client holds it) and ``down`` (no connection).
A worker held by one of our runners is not probed (it could not answer, and the kernel's
backlog of one pending connection would make the next probe time out as if it were down):
its runner's health is its health. One busy for someone else cannot take a new runner
(the load would wait forever).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import struct
import time
from collections.abc import Awaitable, Callable, Collection, Iterable
from dataclasses import dataclass
from typing import Literal

import anyio
import structlog

from ollamad.settings import parse_endpoint

log = structlog.get_logger("ollamad.workers")

CMD_GET_DEVICE_MEMORY = 11
CMD_HELLO = 14
CMD_DEVICE_COUNT = 15
CONN_CAPS = 24  # bytes of transport capabilities in HELLO; zeros = plain TCP
PROBE_TIMEOUT = 1.0
LINGER = 120.0  # seconds an unanswered probe may wait in a busy worker's queue

WorkerState = Literal["up", "busy", "held", "down", "unknown"]


@dataclass(frozen=True)
class WorkerStatus:
    endpoint: str
    state: WorkerState = "unknown"
    free: int = 0  # bytes, all its devices together (at the last answer)
    total: int = 0
    devices: int = 0
    version: str = ""
    error: str = ""
    checked_at: float = 0.0


class ProtocolError(Exception):
    pass


@dataclass
class Pending:
    """A probe the worker has not answered yet: it waits in the worker's queue of clients."""

    reader: asyncio.StreamReader
    writer: asyncio.StreamWriter
    since: float


def _send(writer: asyncio.StreamWriter, cmd: int, payload: bytes) -> None:
    """| cmd (1 byte) | payload size (8) | payload |"""
    writer.write(bytes([cmd]) + struct.pack("<Q", len(payload)) + payload)


async def _reply(reader: asyncio.StreamReader, size: int) -> bytes:
    """| reply size (8) | reply |"""
    (n,) = struct.unpack("<Q", await reader.readexactly(8))
    if n != size:
        raise ProtocolError(f"reply of {n} bytes, expected {size} (another protocol version?)")
    return await reader.readexactly(n)


async def _close(writer: asyncio.StreamWriter) -> None:
    writer.close()
    with contextlib.suppress(OSError, TimeoutError):
        await asyncio.wait_for(writer.wait_closed(), 1)


async def probe_worker(endpoint: str, timeout: float = PROBE_TIMEOUT,  # noqa: ASYNC109
                       pending: dict[str, Pending] | None = None) -> WorkerStatus:
    """Ask one worker for its version and free memory; never raises.

    A worker busy with another client answers nothing; with ``pending``, the unanswered
    probe keeps its place in the worker's queue and the next probe reads its answer. Closing
    it instead would leave a HELLO that the worker answers later into a closed socket, and a
    bare ggml-rpc-server dies of that SIGPIPE (``ollamad worker`` ignores SIGPIPE).
    """
    now = time.monotonic()
    conn = pending.pop(endpoint, None) if pending is not None else None
    if conn is None:
        host, port = parse_endpoint(endpoint)
        try:
            reader, writer = await asyncio.wait_for(asyncio.open_connection(host, port), timeout)
        except (OSError, TimeoutError) as e:
            return WorkerStatus(endpoint, "down", error=str(e) or type(e).__name__, checked_at=now)
        conn = Pending(reader, writer, now)
        _send(writer, CMD_HELLO, bytes(CONN_CAPS))
    reader, writer = conn.reader, conn.writer
    try:
        async with asyncio.timeout(timeout):
            await writer.drain()
            hello = await _reply(reader, 4 + CONN_CAPS)
    except TimeoutError:
        if pending is not None and now - conn.since < LINGER:
            pending[endpoint] = conn
        else:
            await _close(writer)
        return WorkerStatus(endpoint, "busy", error="connected, no answer: serving another client", checked_at=now)
    except (OSError, asyncio.IncompleteReadError, ProtocolError) as e:
        await _close(writer)
        return WorkerStatus(endpoint, "down", error=str(e) or type(e).__name__, checked_at=now)
    try:
        async with asyncio.timeout(timeout):
            _send(writer, CMD_DEVICE_COUNT, b"")
            (count,) = struct.unpack("<I", await _reply(reader, 4))
            free = total = 0
            for dev in range(count):
                _send(writer, CMD_GET_DEVICE_MEMORY, struct.pack("<I", dev))
                f, t = struct.unpack("<QQ", await _reply(reader, 16))
                free, total = free + f, total + t
        version = ".".join(str(b) for b in hello[:3])
        return WorkerStatus(endpoint, "up", free, total, count, version, checked_at=now)
    except (TimeoutError, OSError, asyncio.IncompleteReadError, ProtocolError) as e:
        return WorkerStatus(endpoint, "down", error=str(e) or type(e).__name__, checked_at=now)
    finally:
        await _close(writer)


class WorkerPool:
    """The configured workers and what the last probe of each said."""

    def __init__(self, endpoints: Iterable[str], *, interval: float = 2.0, reserve: int = 0,
                 probe: Callable[[str], Awaitable[WorkerStatus]] | None = None) -> None:
        self.endpoints = tuple(endpoints)
        self.interval = interval
        self.reserve = reserve
        self.pending: dict[str, Pending] = {}
        self._probe = probe or functools.partial(probe_worker, pending=self.pending)
        self.status: dict[str, WorkerStatus] = {e: WorkerStatus(e) for e in self.endpoints}
        self.known_free: dict[str, int] = {}  # free memory at the last answer, kept while busy
        self._poke = anyio.Event()
        self._checked = anyio.Event()

    async def run(self, on_change: Callable[[], None], held: Callable[[], Collection[str]] = tuple) -> None:
        """Probe every worker not ``held`` by a runner each ``interval`` (or at once when poked);
        report changes."""
        while True:
            self._poke = anyio.Event()
            changed = await self.check(held())
            if changed:
                on_change()
            with anyio.move_on_after(self.interval):
                await self._poke.wait()

    async def check(self, held: Collection[str] = ()) -> bool:
        """Probe the workers not ``held`` now; True if any changed state."""
        checked = self._checked
        for ep in held:  # never keep a held worker's next client waiting behind a probe
            if (conn := self.pending.pop(ep, None)) is not None:
                conn.writer.close()
        results: dict[str, WorkerStatus] = {
            ep: WorkerStatus(ep, "held", self.known_free.get(ep, 0), checked_at=time.monotonic())
            for ep in self.endpoints if ep in held}

        async def one(ep: str) -> None:
            results[ep] = await self._probe(ep)

        async with anyio.create_task_group() as tg:
            for ep in self.endpoints:
                if ep not in held:
                    tg.start_soon(one, ep)
        changed = False
        for ep, st in results.items():
            old = self.status.get(ep)
            if old is None or old.state != st.state:
                changed = True
                level = log.warning if st.state == "down" else log.info
                level("rpc worker state", worker=ep, state=st.state, free=st.free, error=st.error)
            if st.state == "up":
                if self.known_free.get(ep) != st.free:
                    changed = True
                self.known_free[ep] = st.free
            self.status[ep] = st
        checked.set()
        if checked is self._checked:
            self._checked = anyio.Event()
        return changed

    def poke(self) -> None:
        self._poke.set()

    def suspect(self, endpoints: Collection[str]) -> None:
        """A runner using these workers died: plan nothing on them until checked again."""
        for ep in endpoints:
            if ep in self.status:
                self.status[ep] = WorkerStatus(ep, "unknown", error="re-checking after a runner died")
        self.poke()

    async def settled(self, limit: float = 2 * PROBE_TIMEOUT + 0.5) -> None:
        """Wait (bounded) until no worker is in the ``unknown`` state."""
        with anyio.move_on_after(limit):
            while any(s.state == "unknown" for s in self.status.values()):
                await self._checked.wait()

    def usable(self, held: Collection[str] = ()) -> dict[str, int]:
        """Workers a plan may use, with their free bytes less the reserve: those that are up,
        and those held by our own runners (their memory as last seen free: they may be
        freed for a new runner by unloading the one that holds them)."""
        out: dict[str, int] = {}
        for ep, st in self.status.items():
            if st.state == "up" or (ep in held and st.state in ("busy", "held") and ep in self.known_free):
                out[ep] = max(self.known_free.get(ep, st.free) - self.reserve, 0)
        return out
