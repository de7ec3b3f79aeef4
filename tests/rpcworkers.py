"""Helpers for tests with llama.cpp RPC workers: start ``ollamad worker`` (or a bare
ggml-rpc-server) on a loopback port and wait until it answers."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from ollamad.runner.binary import BinaryNotFound
from ollamad.runner.rpcworker import find_rpc_server
from ollamad.settings import load_settings


def rpc_server_binary() -> Path:
    s = load_settings()
    try:
        return find_rpc_server(s.rpc_server, s.runners_dir)
    except BinaryNotFound as e:
        pytest.fail(f"{e} (runners/build.sh builds ggml-rpc-server beside llama-server)")


def wait_listening(port: int, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.05)
    raise RuntimeError(f"nothing listens on 127.0.0.1:{port}")


def wait_closed(port: int, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) != 0:
                return
        time.sleep(0.05)
    raise RuntimeError(f"127.0.0.1:{port} still listens")


class Worker:
    """``ollamad worker --host 127.0.0.1 --port P`` as a subprocess."""

    def __init__(self, port: int, log: Path, *extra: str, env: dict[str, str] | None = None) -> None:
        self.port = port
        self.endpoint = f"127.0.0.1:{port}"
        base = {k: v for k, v in os.environ.items() if not k.startswith(("OLLAMA_", "OLLAMAD_"))}
        self.log_file = open(log, "wb")  # noqa: SIM115 (held for the worker's life)
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "ollamad.cli", "worker", "--host", "127.0.0.1", "--port", str(port), *extra],
            env={**base, **(env or {})}, stdout=self.log_file, stderr=subprocess.STDOUT)
        wait_listening(port)

    def child(self) -> psutil.Process:
        """The ggml-rpc-server it runs (waits for a restart to finish)."""
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            kids = [p for p in psutil.Process(self.proc.pid).children() if "rpc-server" in p.name()]
            with contextlib.suppress(psutil.Error):  # a crashed one the supervisor has not reaped yet is no child
                kids = [p for p in kids if p.status() != psutil.STATUS_ZOMBIE]
            if kids:
                return kids[0]
            time.sleep(0.05)
        raise RuntimeError("the worker runs no ggml-rpc-server")

    def kill(self) -> None:
        """SIGKILL the supervisor: its child dies with it (parent-death signal)."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(10)

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            code = self.proc.wait(15)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            code = self.proc.wait()
        self.log_file.close()
        return code
