"""Faults the daemon must survive (issue 7): each test fails if the behaviour regresses.

The real llama-server is used except where a fault cannot be injected into it (a hang).
"""

from __future__ import annotations

import json
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import psutil
import pytest

from ollamad.models.testmodels import write_llama
from ollamad.runner.leftovers import ChildRecord, ChildRecords
from tests.conftest import Daemon, fake_with, runner_key
from tests.streams import Stream, busy_slots, child_get, flag, queued, runners, wait_for

LONG = {"num_predict": 100000, "num_ctx": 8192, "seed": 1}  # with "endless": runs until cut


@pytest.fixture(scope="module")
def endless_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """tiny, plus "endless": a model whose streams do not stop by themselves (no eos)."""
    folder = tmp_path_factory.mktemp("endless")
    write_llama(folder / "tiny.gguf", name="tiny")
    write_llama(folder / "endless.gguf", name="endless", endless=True)
    return folder


def _generate(d: Daemon, model: str = "tiny", **options: Any) -> tuple[int, Any]:
    return d.post("/api/generate", {"model": model, "prompt": "hi", "options": {"num_predict": 4, **options}})


@pytest.mark.real
def test_child_sigkilled_mid_stream(daemon_factory: Any, llama_server: Path, endless_dir: Path) -> None:
    d = daemon_factory(llama_server, endless_dir, OLLAMA_NUM_PARALLEL="1")
    a = Stream(d, "/api/generate", {"model": "endless", "prompt": "hi", "options": LONG})
    assert a.status == 200 and a.line() is not None
    (child,) = runners(d)
    with ThreadPoolExecutor(1) as pool:
        waiting = pool.submit(_generate, d, "endless", num_ctx=8192)
        wait_for(lambda: queued(d) == 1)
        child.kill()
        t0 = time.monotonic()
        lines = a.rest()
        cut_after = time.monotonic() - t0
        status, body = waiting.result(60)
    assert "error" in lines[-1] and "llama-server" in lines[-1]["error"], lines[-3:]
    assert not any(ln.get("done") for ln in lines)
    assert cut_after < 1.0  # the deadline: an error line within a second
    assert status == 200 and body[-1]["done"] is True, body  # the waiting request got a new child
    (new,) = runners(d)
    assert new.pid != child.pid
    died = [json.loads(ln) for ln in d.log().splitlines() if '"runner died"' in ln]
    assert died and "SIGKILL" in died[0]["how"] and "out of memory" in died[0]["how"]


def test_hung_child_is_killed_and_replaced(daemon_factory: Any, models_dir: Path, tmp_path: Path) -> None:
    fake = fake_with(tmp_path, FAKE_HANG_AFTER_TOKENS="3")
    d = daemon_factory(fake, models_dir, OLLAMA_NUM_PARALLEL="1",
                       OLLAMAD_HEALTH_INTERVAL="0.2s", OLLAMAD_HEALTH_TIMEOUT="1s")
    a = Stream(d, "/api/generate", {"model": "tiny", "prompt": "hi", "options": {"num_predict": 50}})
    assert a.status == 200 and a.line() is not None
    (child,) = runners(d)
    with ThreadPoolExecutor(1) as pool:
        waiting = pool.submit(_generate, d, num_predict=2)  # below the hang point: the new child serves it
        wait_for(lambda: queued(d) == 1)
        lines = a.rest()
        status, body = waiting.result(30)
    assert "error" in lines[-1], lines
    assert not child.is_running() or child.status() == psutil.STATUS_ZOMBIE
    assert status == 200 and body[-1]["done"] is True, body
    (new,) = runners(d)
    assert new.pid != child.pid
    assert "runner not responding; killing it" in d.log()


def _broken(folder: Path, models_dir: Path) -> Path:
    """tiny, plus "broken": small with a tensor renamed (same length, so the header still parses)."""
    folder.mkdir()
    shutil.copy(models_dir / "tiny.gguf", folder / "tiny.gguf")
    data = (models_dir / "small.gguf").read_bytes()
    assert b"blk.0.attn_q.weight" in data
    (folder / "broken.gguf").write_bytes(data.replace(b"blk.0.attn_q.weight", b"blk.0.attn_X.weight", 1))
    (folder / "truncated.gguf").write_bytes(data[: len(data) * 2 // 3])
    return folder


@pytest.mark.real
def test_child_that_cannot_start_backs_off(daemon_factory: Any, llama_server: Path, models_dir: Path,
                                           tmp_path: Path) -> None:
    folder = _broken(tmp_path / "m", models_dir)
    d = daemon_factory(llama_server, folder, OLLAMAD_LOAD_BACKOFF="60s")
    status, body = d.post("/api/generate", {"model": "broken", "prompt": "hi"})
    assert status == 500 and "llama-server" in body["error"] and "attn_q" in body["error"], body
    t0 = time.monotonic()
    status, again = d.post("/api/generate", {"model": "broken", "prompt": "hi"})
    assert status == 500 and "next attempt in" in again["error"], again
    assert time.monotonic() - t0 < 5  # refused from the backoff record, not after another load
    assert d.log().count('"runner starting"') == 1  # no respawn loop
    status, body = d.post("/api/generate", {"model": "truncated", "prompt": "hi"})
    assert status == 500 and "truncated" in body["error"], body  # found before any child starts
    assert d.log().count('"runner starting"') == 1
    status, ok = _generate(d)  # another model is unaffected
    assert status == 200 and ok[-1]["done"] is True


def test_missing_binary_at_runtime_backs_off(daemon_factory: Any, fake_server: Path, models_dir: Path,
                                             tmp_path: Path) -> None:
    binary = tmp_path / "llama-server"
    shutil.copy(fake_server, binary)
    d = daemon_factory(binary, models_dir, OLLAMAD_LOAD_BACKOFF="60s")
    binary.unlink()
    status, body = d.post("/api/generate", {"model": "tiny", "prompt": "hi"})
    assert status == 500 and "cannot start" in body["error"], body
    status, again = d.post("/api/generate", {"model": "tiny", "prompt": "hi"})
    assert status == 500 and "next attempt in" in again["error"]
    assert d.proc is not None and d.proc.poll() is None


def test_missing_binary_at_start_is_a_clear_error(models_dir: Path, tmp_path: Path) -> None:
    d = Daemon(tmp_path / "no-such-llama-server", models_dir)
    with pytest.raises(RuntimeError, match="llama-server"):
        d.start(tmp_path / "d.log")
    assert d.proc is not None and d.proc.returncode not in (0, None)


@pytest.mark.real
def test_daemon_sigkilled_children_exit_and_are_recorded(daemon_factory: Any, llama_server: Path,
                                                         models_dir: Path, tmp_path: Path) -> None:
    d = daemon_factory(llama_server, models_dir)
    assert _generate(d)[0] == 200
    (child,) = runners(d)
    records = ChildRecords.for_port(Path(d.env["OLLAMAD_STATE_DIR"]), d.port).read()
    assert [(r.pid, r.model) for r in records] == [(child.pid, "tiny:latest")]
    assert abs(records[0].create_time - child.create_time()) < 0.05
    key_file = Path(flag(child, "--api-key-file"))
    assert records[0].key_file == str(key_file)
    d.stop(signal.SIGKILL)
    _, alive = psutil.wait_procs([child], timeout=2)
    assert not alive
    assert key_file.exists()  # nobody left to remove it: the daemon's next start does (as here)
    ChildRecords.for_port(Path(d.env["OLLAMAD_STATE_DIR"]), d.port).clean_up()
    assert not key_file.exists()


def test_a_runner_unloading_as_the_daemon_stops_leaves_no_key_file(daemon_factory: Any, fake_server: Path,
                                                                   models_dir: Path, tmp_path: Path) -> None:
    """A model deleted (so unloaded) just before the daemon is stopped: its runner's stop is cut by
    the shutdown, and the runner's key file must still be removed (it was left in /tmp in about
    one run in six of a test that deletes a model and ends; here, before the fix, in 1 of 20)."""
    left = []
    for i in range(6):
        folder = tmp_path / f"models{i}"
        folder.mkdir()
        shutil.copy(models_dir / "tiny.gguf", folder / "tiny.gguf")
        d = daemon_factory(fake_server, folder)
        assert _generate(d)[0] == 200
        (child,) = runners(d)
        key_file = Path(flag(child, "--api-key-file"))
        assert d.request("DELETE", "/api/delete", {"model": "tiny"})[0] == 200  # unloads it
        assert d.stop() == 0
        _, alive = psutil.wait_procs([child], timeout=5)
        assert not alive
        left += [key_file] if key_file.exists() else []
    assert left == []


def test_a_second_daemon_on_a_taken_port_leaves_the_first_ones_runners(
        daemon_factory: Any, llama_server: Path, models_dir: Path, tmp_path: Path) -> None:
    """`ollamad serve` run again by mistake (same user, state and port) fails to listen, and must not
    end the runners the records list: they are the first daemon's, alive and busy."""
    first = daemon_factory(llama_server, models_dir)
    assert _generate(first)[0] == 200
    (child,) = runners(first)
    second = Daemon(llama_server, models_dir)
    second.port, second.url = first.port, first.url
    second.env.update({"OLLAMA_HOST": first.env["OLLAMA_HOST"], "OLLAMAD_STATE_DIR": first.env["OLLAMAD_STATE_DIR"]})
    second.start(tmp_path / "second.log")  # returns at once: the first one answers on the port
    assert second.proc is not None and second.proc.wait(30) != 0
    second.stop()
    assert "cannot listen" in second.log()
    assert child.is_running() and runners(first) == [child]
    assert _generate(first)[0] == 200  # on the same runner, no reload
    assert "loading model" not in first.log().split("runner ready", 1)[1]


def _sleeper() -> subprocess.Popen[bytes]:
    return subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"], start_new_session=True)


def test_restarted_daemon_ends_only_its_own_leftovers(fake_server: Path, models_dir: Path, tmp_path: Path) -> None:
    leftover, foreign = _sleeper(), _sleeper()
    try:
        d = Daemon(fake_server, models_dir)
        state = tmp_path / "state"
        d.env["OLLAMAD_STATE_DIR"] = str(state)
        key_file = tmp_path / "ollamad-runner-x1.key"  # the killed daemon's runner's key file
        key_file.write_text("k\n")
        other = tmp_path / "other.key"  # not named as runner key files are: left alone
        other.write_text("k\n")
        own = ChildRecord(leftover.pid, psutil.Process(leftover.pid).create_time(), "tiny:latest", str(key_file))
        # same pid, other start time: the pid now belongs to someone else
        reused = ChildRecord(foreign.pid, psutil.Process(foreign.pid).create_time() - 100, "tiny:latest", str(other))
        state.mkdir()
        (state / f"runners-{d.port}.json").write_text(json.dumps(
            {"children": [own.__dict__, reused.__dict__]}))
        d.start(tmp_path / "d.log")
        try:
            assert leftover.wait(5) == -signal.SIGKILL
            assert foreign.poll() is None
            assert ChildRecords.for_port(state, d.port).read() == []
            assert not key_file.exists() and other.exists()
        finally:
            d.stop()
    finally:
        for p in (leftover, foreign):
            p.kill()
            p.wait()


@pytest.mark.real
def test_client_disconnect_mid_stream_frees_the_slot(daemon_factory: Any, llama_server: Path,
                                                     endless_dir: Path) -> None:
    d = daemon_factory(llama_server, endless_dir, OLLAMA_NUM_PARALLEL="1")
    a = Stream(d, "/api/generate", {"model": "endless", "prompt": "hi", "options": LONG})
    assert a.line() is not None
    (child,) = runners(d)
    assert busy_slots(child) == 1
    a.close()
    t0 = time.monotonic()
    wait_for(lambda: busy_slots(child) == 0, timeout=5, step=0.005)
    # The endless stream would hold the slot for good: freed at all means the disconnect reached
    # llama-server. Not the 100 ms as a bound: the /slots polls that observe it queue behind
    # llama-server's decoding, and in one full-suite run on this 2-core machine it took 132 ms.
    assert time.monotonic() - t0 < 1.0
    assert _generate(d, "endless", num_ctx=8192)[0] == 200
    assert runners(d) == [child]


@pytest.mark.real
def test_client_disconnect_while_queued_leaves_the_queue(daemon_factory: Any, llama_server: Path,
                                                         endless_dir: Path) -> None:
    d = daemon_factory(llama_server, endless_dir, OLLAMA_NUM_PARALLEL="1")
    a = Stream(d, "/api/generate", {"model": "endless", "prompt": "hi", "options": LONG})
    assert a.line() is not None
    (child,) = runners(d)
    body = json.dumps({"model": "endless", "prompt": "queued", "options": LONG}).encode()
    with socket.create_connection(("127.0.0.1", d.port)) as b:
        b.sendall(b"POST /api/generate HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\n"
                  b"Content-Length: %d\r\n\r\n%s" % (len(body), body))
        wait_for(lambda: queued(d) == 1)
    wait_for(lambda: queued(d) == 0, timeout=2, step=0.005)
    # sent ahead (OLLAMAD_SEND_AHEAD) it waited in llama-server's queue, and left it: only the first ran
    assert "request sent ahead ended before its runner answered" in d.log()
    assert busy_slots(child) == 1
    a.close()
    wait_for(lambda: busy_slots(child) == 0, timeout=5, step=0.005)
    time.sleep(0.3)
    assert busy_slots(child) == 0 and queued(d) == 0


def _deferred(child: psutil.Process) -> int:
    """Requests llama-server holds in its own queue (its /metrics: llamacpp:requests_deferred)."""
    req = urllib.request.Request(f"http://127.0.0.1:{flag(child, '--port')}/metrics")
    key = runner_key(child.cmdline())
    if key:
        req.add_header("Authorization", f"Bearer {key}")
    with urllib.request.urlopen(req, timeout=5) as r:
        text = r.read().decode()
    return int(float(next(ln.split()[-1] for ln in text.splitlines() if ln.startswith("llamacpp:requests_deferred"))))


@pytest.mark.real
def test_request_sent_ahead_waits_in_llama_servers_queue_past_the_accept_timeout(
        daemon_factory: Any, llama_server: Path, endless_dir: Path) -> None:
    """OLLAMAD_SEND_AHEAD: the second request goes to the busy runner at once and llama-server
    holds it; it waits there longer than OLLAMAD_ACCEPT_TIMEOUT (every slot is busy meanwhile, so
    the runner is not stuck), and is served by the same runner once the first ends."""
    d = daemon_factory(llama_server, endless_dir, OLLAMA_NUM_PARALLEL="1", OLLAMAD_ACCEPT_TIMEOUT="1s")
    a = Stream(d, "/api/generate", {"model": "endless", "prompt": "hi", "options": LONG})
    assert a.line() is not None
    (child,) = runners(d)
    with ThreadPoolExecutor(1) as pool:
        second = pool.submit(d.post, "/api/generate",
                             {"model": "endless", "prompt": "next", "options": {**LONG, "num_predict": 4}})
        wait_for(lambda: queued(d) == 1)
        wait_for(lambda: _deferred(child) == 1)  # in llama-server's queue, not ours
        time.sleep(1.5)
        assert busy_slots(child) == 1 and not second.done()
        a.close()
        status, body = second.result(30)
    assert status == 200 and body[-1]["done"] is True, body
    assert runners(d) == [child]
    assert "every slot is busy: it waits on" in d.log()


@pytest.mark.real
def test_sigterm_under_load(daemon_factory: Any, llama_server: Path, endless_dir: Path) -> None:
    d = daemon_factory(llama_server, endless_dir)
    opts = {"num_predict": 1000, "num_ctx": 2048}
    streams = [Stream(d, "/api/generate", {"model": "endless", "prompt": "hi", "options": {**opts, "seed": i}})
               for i in range(4)]
    assert all(s.line() is not None for s in streams)
    kids = runners(d)
    assert d.proc is not None
    d.proc.send_signal(signal.SIGTERM)
    # a request that comes as the signal does may still be taken: ask once the daemon says it is shutting down
    wait_for(lambda: '"shutting down"' in d.log(), timeout=10, step=0.005)
    status, body = wait_for(lambda: (r := _generate(d, "endless", num_ctx=2048))[0] != 200 and r, timeout=10, step=0.01)
    assert status == 503 and "shutting down" in body["error"], body
    following = [s.line() for s in streams]
    assert any(ln is not None and not ln["done"] for ln in following)  # refused while streams still ran
    for s, first in zip(streams, following, strict=True):
        lines = [first, *s.rest()]
        assert lines[-1] is not None and lines[-1]["done"] is True and "error" not in lines[-1], lines[-1]
    assert d.proc.wait(30) == 0
    _, alive = psutil.wait_procs(kids, timeout=5)
    assert not alive


def test_runner_closing_a_kept_alive_connection_loses_nothing(daemon_factory: Any, models_dir: Path,
                                                              tmp_path: Path) -> None:
    """A runner that closes a kept-alive connection just as a request goes out on it (what
    llama-server does after streams, unannounced): the request is sent again on a new
    connection. Every request is answered and the healthy runner is kept."""
    d = daemon_factory(fake_with(tmp_path, FAKE_DROP_REUSED="1"), models_dir)
    for stream in (True, False, True, True, False, True):
        status, body = d.post("/api/generate", {"model": "tiny", "prompt": "hi", "stream": stream,
                                                "options": {"num_predict": 3}})
        final = body[-1] if stream else body
        assert status == 200 and final["done"] is True and final["eval_count"] == 3, body
    (child,) = runners(d)
    assert child_get(child, "/fake/stats")[1]["dropped"] >= 3  # the fault did happen
    assert "runner lost" not in d.log() and "not answering" not in d.log()

