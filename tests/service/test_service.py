"""The daemon as systemd runs it: sd_notify, SIGTERM drain, SIGHUP reload."""

from __future__ import annotations

import http.client
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psutil
import pytest
import structlog

from ollamad.models.testmodels import write_llama
from ollamad.service.logs import configure
from ollamad.service.notify import Notifier
from tests.conftest import HERE, Daemon
from tests.streams import wait_for


class NotifySocket:
    """A datagram socket the test owns, standing in for systemd's notify socket."""

    def __init__(self) -> None:
        self.dir = tempfile.mkdtemp(prefix="sdn")  # short: AF_UNIX paths are limited to 108 bytes
        self.path = str(Path(self.dir) / "notify")
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(self.path)
        self.messages: list[str] = []

    def wait_for(self, pred: Any, timeout: float = 30) -> str:
        """Collect messages until one satisfies ``pred``; return it."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            self.sock.settimeout(max(deadline - time.monotonic(), 0.01))
            try:
                msg = self.sock.recv(4096).decode()
            except TimeoutError:
                break
            self.messages.append(msg)
            if pred(msg):
                return msg
        raise AssertionError(f"no matching message; got {self.messages}")

    def close(self) -> None:
        self.sock.close()
        shutil.rmtree(self.dir, ignore_errors=True)


@pytest.fixture
def notify_socket() -> Iterator[NotifySocket]:
    ns = NotifySocket()
    yield ns
    ns.close()


def first_index(messages: list[str], needle: str) -> int:
    return next(i for i, m in enumerate(messages) if needle in m.split("\n"))


@pytest.mark.real
def test_notify_ready_status_watchdog_stopping(notify_socket: NotifySocket, daemon_factory: Any,
                                               llama_server: Path, models_dir: Path) -> None:
    d: Daemon = daemon_factory(llama_server, models_dir, NOTIFY_SOCKET=notify_socket.path,
                               WATCHDOG_USEC="400000")
    notify_socket.wait_for(lambda m: m == "READY=1")
    notify_socket.wait_for(lambda m: m.startswith("STATUS=") and "loaded: none" in m)
    notify_socket.wait_for(lambda m: m == "WATCHDOG=1")
    status, _ = d.post("/api/generate", {"model": "tiny", "prompt": "hi", "options": {"num_predict": 2}})
    assert status == 200
    notify_socket.wait_for(lambda m: m.startswith("STATUS=") and "tiny:latest 0/4 busy" in m)
    # the child must not inherit the notify socket (it would talk to systemd for us)
    (child,) = [p for p in d.children() if "llama-server" in p.name()]
    assert not {"NOTIFY_SOCKET", "WATCHDOG_USEC"} & set(child.environ())
    d.proc.send_signal(signal.SIGHUP)  # type: ignore[union-attr]
    notify_socket.wait_for(lambda m: m.startswith("RELOADING=1\nMONOTONIC_USEC="))
    notify_socket.wait_for(lambda m: m == "READY=1")
    assert d.stop(signal.SIGTERM) == 0
    notify_socket.wait_for(lambda m: m == "STOPPING=1", timeout=1)
    msgs = notify_socket.messages
    ready, stopping = first_index(msgs, "READY=1"), first_index(msgs, "STOPPING=1")
    statuses = [i for i, m in enumerate(msgs) if m.startswith("STATUS=")]
    assert ready < statuses[0] < stopping
    assert "STOPPING=1" not in msgs[:stopping] and msgs.count("STOPPING=1") == 1


def test_notifier_without_socket_does_nothing_and_unsets_env() -> None:
    env = {"NOTIFY_SOCKET": "/nonexistent/notify", "WATCHDOG_USEC": "1000000", "WATCHDOG_PID": "1"}
    n = Notifier.from_env(env)
    assert env == {}  # consumed, so children never see them
    assert n.watchdog_interval is None  # WATCHDOG_PID names another process
    assert n.send("READY=1") is False  # nobody listens there: logged, not raised
    off = Notifier.from_env({})
    assert not off.enabled and off.send("READY=1") is False


def test_notifier_abstract_socket() -> None:
    name = f"ollamad-test-{time.monotonic_ns()}"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as s:
        s.bind("\0" + name)
        s.settimeout(5)
        n = Notifier.from_env({"NOTIFY_SOCKET": "@" + name, "WATCHDOG_USEC": "3000000"})
        assert n.watchdog_interval == 1.5
        n.status("a")
        n.status("a")  # unchanged: not sent again
        n.status("b")
        assert [s.recv(100), s.recv(100)] == [b"STATUS=a", b"STATUS=b"]
        n.close()


def slow_fake(folder: Path, token_delay: float) -> Path:
    """The fake llama-server with a token delay baked in (the daemon passes children no FAKE_* env)."""
    path = folder / "slow" / "llama-server"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(f"#!/bin/sh\nexport FAKE_TOKEN_DELAY={token_delay}\n"
                    f"exec {sys.executable} {HERE / 'fake_llama_server.py'} \"$@\"\n")
    path.chmod(0o755)
    return path


def _stream(port: int, body: dict[str, Any]) -> tuple[http.client.HTTPConnection, http.client.HTTPResponse]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    conn.request("POST", "/api/generate", json.dumps(body))
    resp = conn.getresponse()
    assert resp.status == 200
    return conn, resp


def test_sigterm_drains_streaming_request_then_exits_zero(daemon_factory: Any, tmp_path: Path,
                                                          models_dir: Path) -> None:
    d: Daemon = daemon_factory(slow_fake(tmp_path, 0.05), models_dir)
    conn, resp = _stream(d.port, {"model": "tiny", "prompt": "hi", "options": {"num_predict": 40}})
    first = json.loads(resp.readline())
    assert first["done"] is False
    kids = d.children()
    assert kids, "the runner should be running"
    assert d.proc is not None
    d.proc.send_signal(signal.SIGTERM)
    # new requests are refused while the running one finishes (one that comes as the signal does
    # may still be taken: ask once the daemon says it is shutting down)
    wait_for(lambda: "shutting down" in d.log(), timeout=10, step=0.01)
    deadline = time.monotonic() + 10
    while True:
        status, body = d.post("/api/generate", {"model": "tiny", "prompt": "x"})
        if status == 503 or time.monotonic() > deadline:
            break
    assert status == 503 and body == {"error": "ollamad is shutting down; not accepting new requests"}
    lines = [json.loads(ln) for ln in resp.read().splitlines() if ln.strip()]
    conn.close()
    assert lines[-1]["done"] is True and lines[-1]["eval_count"] == 40
    assert len(lines) == 40  # 39 more tokens after the first, then the final object
    assert d.proc.wait(timeout=30) == 0
    d.stop()
    _, alive = psutil.wait_procs(kids, timeout=5)
    assert not alive
    assert "drain timed out" not in d.log()


def test_drain_timeout_cuts_requests_and_still_exits_zero(daemon_factory: Any, tmp_path: Path, models_dir: Path,
                                                          notify_socket: NotifySocket) -> None:
    d: Daemon = daemon_factory(slow_fake(tmp_path, 1), models_dir, OLLAMAD_DRAIN_TIMEOUT="0.5s",
                               NOTIFY_SOCKET=notify_socket.path)
    conn, resp = _stream(d.port, {"model": "tiny", "prompt": "hi", "options": {"num_predict": 100}})
    assert json.loads(resp.readline())["done"] is False
    kids = d.children()
    assert d.stop(signal.SIGTERM, timeout=30) == 0
    # the client learns why its stream ended: an error line, not a bare close (issue 16)
    rest = [json.loads(ln) for ln in resp.read().splitlines() if ln.strip()]
    conn.close()
    assert rest and "drain timeout" in rest[-1]["error"] and not any(ln.get("done") for ln in rest)
    _, alive = psutil.wait_procs(kids, timeout=5)
    assert not alive
    log = d.log()
    assert "drain timed out" in log
    (line,) = [json.loads(ln) for ln in log.splitlines() if '"route": "/api/generate"' in ln]
    assert line["status"] == 503 and line["cut"] == "drain timeout" and line["level"] == "warning"  # not 499
    notify_socket.wait_for(lambda m: m == "STATUS=stopped", timeout=5)  # not "draining (1 requests left)"


def test_sighup_lists_a_new_model_file(daemon_factory: Any, tmp_path: Path) -> None:
    models = tmp_path / "models"
    write_llama(models / "tiny.gguf", name="tiny")
    d: Daemon = daemon_factory(slow_fake(tmp_path, 0.05), models)
    names = {m["name"] for m in d.get("/api/tags")[1]["models"]}
    assert names == {"tiny:latest"}
    # a request streaming across the reload is not dropped
    conn, resp = _stream(d.port, {"model": "tiny", "prompt": "hi", "options": {"num_predict": 30}})
    assert json.loads(resp.readline())["done"] is False
    write_llama(models / "fresh.gguf", name="fresh")
    assert d.proc is not None
    d.proc.send_signal(signal.SIGHUP)
    lines = [json.loads(ln) for ln in resp.read().splitlines() if ln.strip()]
    conn.close()
    assert lines[-1]["done"] is True and lines[-1]["eval_count"] == 30
    logged = [json.loads(ln) for ln in d.log().splitlines() if ln.startswith("{")]
    events = [(e.get("event"), e.get("route")) for e in logged]
    assert events.index(("reloaded", None)) < events.index(("request", "/api/generate"))  # mid-stream
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        names = {m["name"] for m in d.get("/api/tags")[1]["models"]}
        if "fresh:latest" in names:
            break
        time.sleep(0.05)
    assert names == {"tiny:latest", "fresh:latest"}
    status, lines = d.post("/api/generate", {"model": "fresh", "prompt": "hi", "options": {"num_predict": 3}})
    assert status == 200 and lines[-1]["done"] is True
    assert d.proc.poll() is None  # HUP did not stop it


def test_second_sigterm_cuts_the_drain_short(daemon_factory: Any, tmp_path: Path, models_dir: Path) -> None:
    d: Daemon = daemon_factory(slow_fake(tmp_path, 1), models_dir)
    conn, resp = _stream(d.port, {"model": "tiny", "prompt": "hi", "options": {"num_predict": 100}})
    assert json.loads(resp.readline())["done"] is False
    kids = d.children()
    assert d.proc is not None
    d.proc.send_signal(signal.SIGTERM)
    wait_for(lambda: "shutting down" in d.log(), timeout=10, step=0.05)
    d.proc.send_signal(signal.SIGTERM)
    assert d.proc.wait(timeout=30) == 0
    d.stop()
    conn.close()
    _, alive = psutil.wait_procs(kids, timeout=5)
    assert not alive
    assert "second signal" in d.log()


def _journal_stream(path: Path) -> tuple[Any, str]:
    """A file standing in for journald's stream, and the JOURNAL_STREAM value naming it."""
    f = path.open("w")
    st = os.fstat(f.fileno())
    return f, f"{st.st_dev}:{st.st_ino}"


def test_log_lines_carry_their_syslog_priority_under_journald(tmp_path: Path,
                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    f, stream = _journal_stream(tmp_path / "journal")
    monkeypatch.setenv("JOURNAL_STREAM", stream)
    try:
        configure(stream=f)
        logger = structlog.get_logger("t")
        logger.warning("careful", n=1)
        logger.info("fine")
        logger.error("bad")
        f.flush()
        lines = (tmp_path / "journal").read_text().splitlines()
        assert [ln[:3] for ln in lines] == ["<4>", "<6>", "<3>"]
        assert json.loads(lines[0][3:])["event"] == "careful"  # JSON after the prefix, as before
        monkeypatch.setenv("JOURNAL_STREAM", "1:2")  # another stream: journald is not ours
        configure(stream=f)
        structlog.get_logger("t").warning("plain")
        f.flush()
        assert (tmp_path / "journal").read_text().splitlines()[-1].startswith("{")
    finally:
        structlog.reset_defaults()
        f.close()


def _serve_into_journal(tmp_path: Path, **env: str) -> tuple[int, str]:
    f, stream = _journal_stream(tmp_path / "journal")
    base = {k: v for k, v in os.environ.items() if not k.startswith(("OLLAMA", "NOTIFY_", "JOURNAL_"))}
    with f:
        r = subprocess.run([sys.executable, "-m", "ollamad.cli", "serve"], stdout=f, stderr=f, timeout=60,
                           env={**base, "JOURNAL_STREAM": stream, "OLLAMA_HOST": "127.0.0.1:1",
                                "OLLAMA_MODELS": str(tmp_path), **env})
    return r.returncode, (tmp_path / "journal").read_text()


def test_a_bad_setting_exits_78_at_priority_err(tmp_path: Path, fake_server: Path) -> None:
    code, out = _serve_into_journal(tmp_path, OLLAMAD_LLAMA_SERVER=str(fake_server), OLLAMA_NUM_PARALLEL="banana")
    assert code == 78 and out.startswith("<3>ollamad: ") and "OLLAMA_NUM_PARALLEL" in out


def test_a_llama_server_that_cannot_run_is_refused_at_start_up(tmp_path: Path) -> None:
    broken = tmp_path / "llama-server"
    broken.write_text("#!/bin/sh\necho \"$0: error while loading shared libraries: libgomp.so.1: cannot open shared "
                      "object file: No such file or directory\" >&2\nexit 127\n")
    broken.chmod(0o755)
    code, out = _serve_into_journal(tmp_path, OLLAMAD_LLAMA_SERVER=str(broken))
    assert code == 78, out
    assert out.startswith("<3>ollamad: ") and "cannot run" in out and "libgomp.so.1" in out and "127" in out
