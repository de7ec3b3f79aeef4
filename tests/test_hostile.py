"""Hostile clients (issue 17): DNS rebinding, socket floods and slow clients, errors after a
stream began, clients that never read. Daemons run over the fake llama-server."""

from __future__ import annotations

import contextlib
import errno
import http.client
import json
import resource
import socket
import time
from pathlib import Path
from typing import Any

import anyio
import pytest

from ollamad.api.guard import host_allowed, host_name
from ollamad.memory.accountant import Accountant
from ollamad.memory.probe import MemoryProbe
from tests.conftest import Daemon, fake_with
from tests.streams import child_get, runners, wait_for


def _raw(d: Daemon, method: str, path: str, headers: dict[str, str], body: Any = None) -> tuple[int, bytes]:
    conn = http.client.HTTPConnection("127.0.0.1", d.port, timeout=30)
    try:
        data = json.dumps(body).encode() if body is not None else None
        conn.request(method, path, body=data, headers=headers)
        resp = conn.getresponse()
        return resp.status, resp.read()
    finally:
        conn.close()


# --- 1. DNS rebinding -------------------------------------------------------------------
@pytest.mark.parametrize(("header", "ok"), [
    ("", True), ("localhost", True), ("localhost:11434", True), ("LOCALHOST.:1", True),
    ("127.0.0.1:11434", True), ("[::1]:11434", True), ("[::1]", True), ("0.0.0.0:1", True),
    ("app.localhost:8080", True), ("printer.local", True), ("host.docker.internal:11434", True),
    ("192.168.1.20:11434", True), ("10.0.0.1", True),
    ("evil.example", False), ("evil.example:11434", False), ("localhost.evil.example:11434", False),
    ("127.0.0.1.nip.io:11434", False), ("8.8.8.8:11434", False), ("evil.localhost.example", False),
])
def test_host_rules_follow_ollama(header: str, ok: bool) -> None:
    assert host_allowed(header) is ok


def test_allowed_hosts_opt_in() -> None:
    assert host_allowed("llm.example.com:443", ["llm.example.com"])
    assert host_allowed("a.b.example.com", ["*.example.com"])
    assert not host_allowed("example.com.evil.net", ["*.example.com"])
    assert host_allowed("anything.at.all", ["*"])
    assert host_name("[::1]:80") == "::1" and host_name("Foo.Local.:9") == "foo.local"


def test_rebinding_is_refused_on_loopback(daemon_factory: Any, fake_server: Path, models_dir: Path) -> None:
    d = daemon_factory(fake_server, models_dir)
    evil = {"Host": f"evil.example:{d.port}", "Origin": f"http://evil.example:{d.port}"}
    status, body = _raw(d, "GET", "/api/tags", evil)
    assert status == 403 and b"not allowed" in body
    assert _raw(d, "POST", "/api/copy", evil, {"source": "tiny", "destination": "stolen"})[0] == 403
    assert _raw(d, "DELETE", "/api/delete", evil, {"model": "tiny"})[0] == 403
    assert _raw(d, "POST", "/api/generate", evil, {"model": "tiny", "prompt": "hi"})[0] == 403
    assert _raw(d, "GET", "/api/tags", {"Host": "evil.example"})[0] == 403  # no Origin: still refused
    status, body = _raw(d, "GET", "/api/tags", {})
    assert status == 200 and any(m["name"].startswith("tiny") for m in json.loads(body)["models"])
    for host in (f"localhost:{d.port}", f"127.0.0.1:{d.port}", f"app.localhost:{d.port}"):
        assert _raw(d, "GET", "/api/tags", {"Host": host})[0] == 200, host


def test_allowed_hosts_setting(daemon_factory: Any, fake_server: Path, models_dir: Path) -> None:
    d = daemon_factory(fake_server, models_dir, OLLAMAD_ALLOWED_HOSTS="llm.example.com")
    assert _raw(d, "GET", "/api/tags", {"Host": f"llm.example.com:{d.port}"})[0] == 200
    assert _raw(d, "GET", "/api/tags", {"Host": f"evil.example:{d.port}"})[0] == 403


# --- 2. file-descriptor exhaustion and slow senders ---------------------------------------
def _half_headers(port: int, n: int) -> list[socket.socket]:
    """``n`` connections that each send half a request head and then nothing."""
    socks = []
    for _ in range(n):
        s = socket.socket()
        s.settimeout(5)
        try:
            s.connect(("127.0.0.1", port))
            s.sendall(b"POST /api/generate HTTP/1.1\r\nHost: localhost\r\nContent-Type: app")
        except OSError:
            s.close()
            continue
        socks.append(s)
    return socks


def _raise_own_fd_limit(need: int) -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < need:
        if hard != resource.RLIM_INFINITY and hard < need:
            pytest.skip(f"this test needs {need} open files; the hard limit is {hard}")
        resource.setrlimit(resource.RLIMIT_NOFILE, (need, hard))


HEADER_DEADLINE = 10.0


@pytest.mark.parametrize("cap", ["auto", "none"])
def test_socket_flood_under_a_low_fd_limit(tmp_path: Path, models_dir: Path, cap: str) -> None:
    """More half-sent headers than the daemon has file descriptors: it stays up, its runner
    lives, and once the header deadline closes them it answers again. With the cap (auto)
    the extra connections get 503 at once; without it (a cap above the limit) every
    background loop must survive the EMFILE errors."""
    _raise_own_fd_limit(2048)
    env = {"OLLAMAD_HEADER_TIMEOUT": f"{HEADER_DEADLINE}s", "OLLAMAD_MEMORY_POLL": "0.2s",
           "OLLAMAD_HEALTH_INTERVAL": "0.3s", "OLLAMAD_HEALTH_TIMEOUT": "2s", "OLLAMA_KEEP_ALIVE": "10m"}
    if cap == "none":
        env["OLLAMAD_MAX_CONNECTIONS"] = "100000"
    d = Daemon(fake_with(tmp_path), models_dir, env)
    d.nofile = 320  # auto cap: 64 connections
    d.start(tmp_path / "daemon.log")
    socks: list[socket.socket] = []
    try:
        assert d.post("/api/generate", {"model": "tiny", "prompt": "hi", "stream": False})[0] == 200
        (child,) = runners(d)
        t0 = time.monotonic()
        socks = _half_headers(d.port, 400)
        time.sleep(1.5)  # several memory polls and health checks while the descriptors are gone
        assert d.proc is not None and d.proc.poll() is None, d.log()[-3000:]
        assert child.is_running()
        if cap == "auto":  # refused at once, not left to pile up
            assert time.monotonic() - t0 < HEADER_DEADLINE - 1, "the flood took too long to test the cap"
            status, body = _raw(d, "GET", "/api/version", {})
            assert status == 503 and b"too many connections" in body
        time.sleep(max(0.0, t0 + HEADER_DEADLINE + 1.5 - time.monotonic()))  # the header deadline closes them
        if cap == "auto":  # each was answered 503 or closed by the daemon: none is left waiting
            for s in socks:  # (without the cap some wait in the listen queue and are accepted later)
                with contextlib.suppress(ConnectionResetError):
                    s.recv(100, socket.MSG_PEEK)
        for s in socks:
            s.close()
        socks = []
        assert d.proc.poll() is None, d.log()[-3000:]
        status, body = d.post("/api/generate", {"model": "tiny", "prompt": "hi", "stream": False})
        assert status == 200, body
        assert [c.pid for c in runners(d)] == [child.pid], "the runner was replaced"
        if cap == "none":
            assert "Too many open files" in d.log() or "EMFILE" in d.log()
    finally:
        for s in socks:
            s.close()
        d.stop()


def _slow_body(port: int, path: str, declared: int, sent: bytes) -> tuple[float, bytes]:
    """Send a request head promising ``declared`` bytes, then only ``sent``; what comes back, and when."""
    with socket.create_connection(("127.0.0.1", port), timeout=30) as s:
        t0 = time.monotonic()
        s.sendall(f"POST {path} HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\n"
                  f"Content-Length: {declared}\r\n\r\n".encode() + sent)
        answer = s.recv(4096)
        return time.monotonic() - t0, answer


def test_slow_bodies_get_408(daemon_factory: Any, fake_server: Path, models_dir: Path) -> None:
    d = daemon_factory(fake_server, models_dir, OLLAMAD_BODY_TIMEOUT="1s")
    took, answer = _slow_body(d.port, "/api/generate", 1000, b'{"model": "tiny", ')
    assert answer.startswith(b"HTTP/1.1 408") and b"OLLAMAD_BODY_TIMEOUT" in answer, answer
    assert 0.9 < took < 10
    digest = "sha256:" + "0" * 64  # an upload may pause up to the same deadline between chunks
    took, answer = _slow_body(d.port, f"/api/blobs/{digest}", 1 << 20, b"x" * 1000)
    assert answer.startswith(b"HTTP/1.1 408"), answer
    assert d.request("GET", "/")[0] == 200


def test_fd_limit_is_raised_to_the_hard_limit(daemon_factory: Any, fake_server: Path, models_dir: Path) -> None:
    d = daemon_factory(fake_server, models_dir)
    assert d.proc is not None
    soft, hard = resource.prlimit(d.proc.pid, resource.RLIMIT_NOFILE)
    assert soft == hard or (hard == resource.RLIM_INFINITY and soft >= 1 << 20)
    assert f'"open_files": {soft}' in d.log()


# --- 4. an error after a stream began ------------------------------------------------------
def test_huge_final_event_is_read(daemon_factory: Any, tmp_path: Path, models_dir: Path) -> None:
    """llama-server's final event echoes the prompt: 3 MB on one line is still a good answer."""
    d = daemon_factory(fake_with(tmp_path, FAKE_FINAL_PAD=str(3 << 20)), models_dir)
    status, chunks = d.post("/api/generate", {"model": "tiny", "prompt": "hi", "options": {"num_predict": 3}})
    assert status == 200 and isinstance(chunks, list), chunks
    assert chunks[-1]["done"] is True and "error" not in chunks[-1]
    status, body = d.post("/api/generate", {"model": "tiny", "prompt": "hi", "stream": False})
    assert status == 200 and body["done"] is True


# --- 5. a client that never reads ----------------------------------------------------------
def _stalled_client(port: int, path: str, body: dict[str, Any]) -> socket.socket:
    """A client that sends a streaming request and then reads nothing."""
    s = socket.socket()
    s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    s.connect(("127.0.0.1", port))
    data = json.dumps(body).encode()
    s.sendall(b"POST %s HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\n"
              b"Content-Length: %d\r\n\r\n%s" % (path.encode(), len(data), data))
    return s


@pytest.mark.parametrize(("path", "body"), [
    ("/api/generate", {"model": "tiny", "prompt": "long", "options": {"num_predict": 4000}}),
    ("/v1/chat/completions", {"model": "tiny", "stream": True, "max_tokens": 4000,
                              "messages": [{"role": "user", "content": "long"}]}),
])
def test_client_that_never_reads_loses_its_slot(daemon_factory: Any, tmp_path: Path, models_dir: Path,
                                                 path: str, body: dict[str, Any]) -> None:
    """One slot, a client that stops reading a long answer: after OLLAMAD_WRITE_TIMEOUT its
    connection is cut, the runner's request is cancelled and the next client is served."""
    d = daemon_factory(fake_with(tmp_path, FAKE_TOKEN_BYTES="16384", FAKE_TOKEN_DELAY="0.001"), models_dir,
                       OLLAMA_NUM_PARALLEL="1", OLLAMAD_WRITE_TIMEOUT="2s")
    assert d.post("/api/generate", {"model": "tiny", "prompt": "hi", "stream": False})[0] == 200
    (child,) = runners(d)
    stalled = _stalled_client(d.port, path, body)
    try:
        wait_for(lambda: child_get(child, "/fake/stats")[1]["in_flight"] == 1, timeout=10)
        t0 = time.monotonic()
        status, body = d.post("/api/generate", {"model": "tiny", "prompt": "next", "stream": False,
                                                "options": {"num_predict": 2}}, timeout=30)
        waited = time.monotonic() - t0
        assert status == 200, body
        assert 1.5 < waited < 15, waited  # it waited for the slot until the stalled client was cut
        assert "client stopped reading its answer" in d.log()
        wait_for(lambda: child_get(child, "/fake/stats")[1]["in_flight"] == 0, timeout=5)
        assert [c.pid for c in runners(d)] == [child.pid]  # the runner is fine and kept
    finally:
        stalled.close()


def test_header_deadline_spares_requests_in_progress(daemon_factory: Any, tmp_path: Path, models_dir: Path) -> None:
    """The header deadline applies while a request head is awaited, not while it is served."""
    d = daemon_factory(fake_with(tmp_path, FAKE_TOKEN_DELAY="0.1"), models_dir, OLLAMAD_HEADER_TIMEOUT="1s")
    status, body = d.post("/api/generate", {"model": "tiny", "prompt": "hi", "stream": False,
                                            "options": {"num_predict": 25}})
    assert status == 200 and body["done"] is True  # loading and 2.5 s of tokens, all past the deadline
    with socket.create_connection(("127.0.0.1", d.port), timeout=10) as s:  # an idle connection is closed
        t0 = time.monotonic()
        assert s.recv(10) == b""
        assert 0.5 < time.monotonic() - t0 < 5


async def test_memory_poller_survives_failed_measurements() -> None:
    """The poller that died on EMFILE reading /proc: errors are logged, polling goes on."""
    probe = MemoryProbe(None, cgroup=False)
    real = probe.snapshot
    calls = {"n": 0}

    def flaky(pids: Any = ()) -> Any:
        calls["n"] += 1
        if calls["n"] <= 3:
            raise OSError(errno.EMFILE, "Too many open files")
        return real(pids)

    probe.snapshot = flaky  # type: ignore[method-assign]
    acct = Accountant(probe, interval=0.01)
    measured = anyio.Event()
    with anyio.move_on_after(5):
        async with anyio.create_task_group() as tg:
            tg.start_soon(acct.run, dict, lambda snap: measured.set())
            await measured.wait()
            tg.cancel_scope.cancel()
    assert calls["n"] >= 4 and measured.is_set() and acct.snapshot is not None
