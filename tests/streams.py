"""Helpers for fault tests: a line-by-line streaming client and a runner's own /slots."""

from __future__ import annotations

import asyncio
import http.client
import json
import threading
import time
import urllib.request
from collections.abc import Callable
from typing import Any, Self, TypeVar

import psutil
from aiohttp import web

from tests.conftest import Daemon, runner_key

T = TypeVar("T")


class Stream:
    """One streamed request, read line by line; ``close()`` is the client going away."""

    def __init__(self, d: Daemon, path: str, body: dict[str, Any], timeout: float = 60,
                 headers: dict[str, str] | None = None) -> None:
        self.conn = http.client.HTTPConnection("127.0.0.1", d.port, timeout=timeout)
        self.conn.request("POST", path, json.dumps(body), {"Content-Type": "application/json", **(headers or {})})
        self.resp = self.conn.getresponse()
        self.status = self.resp.status

    def line(self) -> dict[str, Any] | None:
        raw = self.resp.readline()
        return json.loads(raw) if raw.strip() else None

    def rest(self) -> list[dict[str, Any]]:
        out = []
        while (ln := self.line()) is not None:
            out.append(ln)
        return out

    def close(self) -> None:
        self.resp.close()
        self.conn.close()


def runners(d: Daemon) -> list[psutil.Process]:
    return [p for p in d.children() if "llama-server" in p.name() or "fake_llama_server" in " ".join(p.cmdline())]


def flag(proc: psutil.Process, name: str) -> str:
    argv = proc.cmdline()
    return argv[argv.index(name) + 1]


def child_get(proc: psutil.Process, path: str, key: str | None = "") -> tuple[int, Any]:
    """GET from the runner itself, with its --api-key unless ``key`` is given (None: no key)."""
    port = flag(proc, "--port")
    use = runner_key(proc.cmdline()) if key == "" else key
    req = urllib.request.Request(f"http://127.0.0.1:{port}{path}")
    if use is not None:
        req.add_header("Authorization", f"Bearer {use}")
    try:
        with urllib.request.urlopen(req, timeout=5) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, e.read()


def busy_slots(proc: psutil.Process) -> int:
    status, slots = child_get(proc, "/slots")
    assert status == 200, slots
    return sum(1 for s in slots if s.get("is_processing"))


def wait_until(fn: Callable[[], T], what: str = "condition", timeout: float = 30, step: float = 0.1) -> T:
    """``fn()`` once it is truthy; AssertionError naming ``what`` after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        value = fn()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(step)


def wait_for(cond: Any, timeout: float = 30, step: float = 0.02) -> Any:
    return wait_until(cond, "condition", timeout, step)


def queued(d: Daemon) -> int:
    return int(d.get("/api/ps")[1]["queue"]["waiting"])


class ThreadedApp:
    """An aiohttp app (from ``make_app``) served on 127.0.0.1 in a thread of its own, for the
    daemon to reach as a remote peer (a model registry); ``port`` is known once entered."""

    def __init__(self) -> None:
        self.port = 0
        self._ready = threading.Event()
        self._thread = threading.Thread(target=lambda: asyncio.run(self._main()), daemon=True)

    def make_app(self) -> web.Application:
        raise NotImplementedError

    async def _main(self) -> None:
        runner = web.AppRunner(self.make_app())
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        self.port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
        self._stop = asyncio.Event()
        self._loop = asyncio.get_running_loop()
        self._ready.set()
        await self._stop.wait()
        await runner.cleanup()

    def __enter__(self) -> Self:
        self._thread.start()
        assert self._ready.wait(10)
        return self

    def __exit__(self, *exc: object) -> None:
        self._loop.call_soon_threadsafe(self._stop.set)
        self._thread.join(10)
