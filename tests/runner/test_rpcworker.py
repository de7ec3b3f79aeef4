"""``ollamad worker``: supervises a real ggml-rpc-server (restart, stop with the parent, cache)."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from ollamad.memory.workers import probe_worker
from ollamad.runner.rpcworker import WorkerConfigError, check_host
from tests.conftest import free_port
from tests.rpcworkers import Worker, wait_closed, wait_listening

pytestmark = pytest.mark.timeout(120)


@pytest.mark.parametrize(("host", "bind_any", "result"), [
    ("127.0.0.1", False, "127.0.0.1"),
    ("10.0.0.5", False, "10.0.0.5"),
    ("[fd00::5]", False, "fd00::5"),
    ("0.0.0.0", False, None),
    ("::", False, None),
    ("", False, None),
    ("0.0.0.0", True, "0.0.0.0"),
])
def test_wildcard_addresses_need_bind_any(host: str, bind_any: bool, result: str | None) -> None:
    if result is None:
        with pytest.raises(WorkerConfigError, match="no authentication"):
            check_host(host, bind_any)
    else:
        assert check_host(host, bind_any) == result


def test_cli_refuses_every_address_with_exit_78() -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("OLLAMAD_")}
    r = subprocess.run([sys.executable, "-m", "ollamad.cli", "worker", "--host", "0.0.0.0", "--port", "50999"],
                       env=env, capture_output=True, text=True, timeout=30)
    assert r.returncode == 78 and "no authentication" in r.stderr
    r = subprocess.run([sys.executable, "-m", "ollamad.cli", "worker", "--port", "50999"],
                       env={**env, "OLLAMAD_WORKER_HOST": "::"}, capture_output=True, text=True, timeout=30)
    assert r.returncode == 78 and "--bind-any" in r.stderr
    r = subprocess.run([sys.executable, "-m", "ollamad.cli", "worker", "--port", "50999"],
                       env={**env, "OLLAMAD_RPC_SERVER": "/nonexistent/ggml-rpc-server"}, capture_output=True,
                       text=True, timeout=30)
    assert r.returncode == 78 and "OLLAMAD_RPC_SERVER" in r.stderr


def test_worker_serves_restarts_after_a_crash_and_stops_on_sigterm(tmp_path: Path) -> None:
    w = Worker(free_port(), tmp_path / "worker.log")
    try:
        first = w.child()
        assert asyncio.run(probe_worker(w.endpoint)).state == "up"
        first.kill()  # a crash
        wait_closed(w.port)
        second = w.child()
        assert second.pid != first.pid
        wait_listening(w.port)
        assert asyncio.run(probe_worker(w.endpoint)).state == "up"
        assert "rpc worker died; restarting" in (tmp_path / "worker.log").read_text()
    finally:
        code = w.stop()
    assert code == 0
    assert not psutil.pid_exists(second.pid) or psutil.Process(second.pid).status() == psutil.STATUS_ZOMBIE
    wait_closed(w.port)


def test_worker_child_dies_with_its_parent(tmp_path: Path) -> None:
    w = Worker(free_port(), tmp_path / "worker.log")
    child = w.child()
    w.kill()  # SIGKILL: no chance to clean up; the parent-death signal takes the child along
    child.wait(10)
    wait_closed(w.port)
    w.stop()


def test_cache_flag_and_sigpipe(tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    w = Worker(free_port(), tmp_path / "worker.log", "--cache", str(cache))
    try:
        child = w.child()
        assert "--cache" in child.cmdline()
        assert child.environ().get("LLAMA_CACHE") == str(cache)
        deadline = time.monotonic() + 10
        while not (cache / "rpc").is_dir() and time.monotonic() < deadline:
            time.sleep(0.05)
        assert (cache / "rpc").is_dir()  # the worker's tensor cache lives in $LLAMA_CACHE/rpc
        status = Path(f"/proc/{child.pid}/status").read_text()
        ignored = int(next(ln.split()[1] for ln in status.splitlines() if ln.startswith("SigIgn:")), 16)
        assert ignored & (1 << (signal.SIGPIPE - 1)), "a client leaving mid-reply must not kill the worker"
    finally:
        w.stop()
