"""Fixtures: generated models, the real and the fake llama-server, a daemon subprocess."""

from __future__ import annotations

import json
import os
import resource
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psutil
import pytest

from ollamad.models.facts import facts_from_gguf
from ollamad.models.ggufmeta import read_gguf
from ollamad.models.plan import LoadOptions, ModelDefaults, PlanSettings, RunnerPlan, plan_candidates
from ollamad.models.testmodels import write_all
from ollamad.runner.binary import BinaryNotFound, find_llama_server
from ollamad.settings import load_settings

HERE = Path(__file__).parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def model_plan(models_dir: Path, name: str, num_parallel: int = 1, ctx: int = 2048) -> RunnerPlan:
    """The one plan (no GPU) for a generated model at default settings."""
    path = models_dir / f"{name}.gguf"
    (plan,) = plan_candidates(name, path, facts_from_gguf(read_gguf(path)), PlanSettings(num_parallel=num_parallel),
                              ModelDefaults(), ctx, LoadOptions())
    return plan


@pytest.fixture(scope="session")
def models_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("models")
    write_all(folder, ("tiny", "small", "meta"))
    return folder


@pytest.fixture(scope="session")
def llama_server() -> Path:
    """The project-built llama-server (scripts/setup.sh builds it); tests fail loudly without it."""
    s = load_settings()
    try:
        return find_llama_server(s.llama_server, s.runners_dir)
    except BinaryNotFound as e:
        pytest.fail(f"{e} (run scripts/test.sh, which builds it)")


@pytest.fixture(scope="session")
def fake_server(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("fake") / "llama-server"
    path.write_text(f"#!/bin/sh\nexec {sys.executable} {HERE / 'fake_llama_server.py'} \"$@\"\n")
    path.chmod(0o755)
    return path


def fake_with(folder: Path, **knobs: str) -> Path:
    """A fake llama-server launcher with FAKE_* knobs baked in (a runner's environment is explicit)."""
    path = folder / "llama-server"
    exports = " ".join(f"{k}={v}" for k, v in knobs.items())
    path.write_text(f"#!/bin/sh\n{exports} exec {sys.executable} {HERE / 'fake_llama_server.py'} \"$@\"\n")
    path.chmod(0o755)
    return path


class Daemon:
    """``ollamad serve`` as a subprocess on a free port."""

    def __init__(self, binary: Path, models: Path, env: dict[str, str] | None = None) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.env = {k: v for k, v in os.environ.items() if not k.startswith(("OLLAMA_", "OLLAMAD_"))}
        self.env.update({"OLLAMA_HOST": f"127.0.0.1:{self.port}", "OLLAMA_MODELS": str(models),
                         "OLLAMAD_LLAMA_SERVER": str(binary), "OLLAMAD_STOP_GRACE": "5s",
                         "OLLAMAD_RUNNER_ENV_PASS": "FAKE_*"})
        self.env.update(env or {})
        self.proc: subprocess.Popen[bytes] | None = None
        self.log_path: Path | None = None
        self.nofile: int | None = None  # an open-file limit (soft and hard) for the daemon, as `ulimit -n`

    def start(self, log_path: Path) -> Daemon:
        self.log_path = log_path
        self.env.setdefault("OLLAMAD_STATE_DIR", str(log_path.parent / "state"))
        self.log_file = open(log_path, "wb")  # noqa: SIM115 (held for the daemon's life)
        nofile = self.nofile
        limit = None if nofile is None else lambda: resource.setrlimit(resource.RLIMIT_NOFILE, (nofile, nofile))
        self.proc = subprocess.Popen([sys.executable, "-m", "ollamad.cli", "serve"], env=self.env,
                                     stdout=self.log_file, stderr=subprocess.STDOUT, preexec_fn=limit)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"daemon exited: {self.log()}")
            try:
                with urllib.request.urlopen(self.url + "/", timeout=1):
                    return self
            except OSError:
                time.sleep(0.05)
        raise RuntimeError("daemon did not start listening")

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path else ""

    def children(self) -> list[psutil.Process]:
        assert self.proc is not None
        try:
            return psutil.Process(self.proc.pid).children(recursive=True)
        except psutil.NoSuchProcess:
            return []

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 30) -> int:
        assert self.proc is not None
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        try:
            code = self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            code = self.proc.wait()
        self.log_file.close()
        return code

    # --- small sync client ---------------------------------------------------------------
    def request(self, method: str, path: str, body: Any = None, raw: bytes | None = None,
                timeout: float = 60) -> tuple[int, bytes]:
        status, _, data = self._exchange(method, path, body, raw, timeout)
        return status, data

    def _exchange(self, method: str, path: str, body: Any = None, raw: bytes | None = None,
                  timeout: float = 60) -> tuple[int, str, bytes]:
        data = raw if raw is not None else (json.dumps(body).encode() if body is not None else None)
        req = urllib.request.Request(self.url + path, data=data, method=method)
        try:
            with urllib.request.urlopen(req, timeout=timeout) as r:
                return r.status, r.headers.get("Content-Type", ""), r.read()
        except urllib.error.HTTPError as e:
            return e.code, e.headers.get("Content-Type", ""), e.read()

    def post(self, path: str, body: Any = None, **kw: Any) -> tuple[int, Any]:
        status, kind, raw = self._exchange("POST", path, body, **kw)
        return status, _decode(raw, kind)

    def get(self, path: str) -> tuple[int, Any]:
        status, kind, raw = self._exchange("GET", path)
        return status, _decode(raw, kind)


def _decode(raw: bytes, kind: str = "") -> Any:
    """JSON, or a list of lines for NDJSON: a stream of one line (a reply whose tokens were all
    held back as incomplete UTF-8, say) is still a list."""
    text = raw.decode(errors="replace")
    lines = [ln for ln in text.splitlines() if ln.strip()]
    try:
        if len(lines) > 1 or "ndjson" in kind:
            return [json.loads(ln) for ln in lines]
        return json.loads(text) if text.strip() else None
    except ValueError:
        return text


@pytest.fixture
def daemon_factory(tmp_path: Path) -> Iterator[Any]:
    started: list[Daemon] = []

    def make(binary: Path, models: Path, **env: str) -> Daemon:
        d = Daemon(binary, models, env).start(tmp_path / f"daemon{len(started)}.log")
        started.append(d)
        return d

    yield make
    for d in started:
        if d.proc and d.proc.poll() is None:
            d.stop()


@pytest.fixture
def real_daemon(daemon_factory: Any, llama_server: Path, models_dir: Path) -> Daemon:
    return daemon_factory(llama_server, models_dir)  # type: ignore[no-any-return]


def runner_children(d: Daemon) -> list[dict[str, Any]]:
    """The daemon's runner children: pid, port, api key and argv (read from their command lines)."""
    out = []
    for p in d.children():
        try:
            argv = p.cmdline()
        except psutil.Error:
            continue
        if "--port" in argv and "--model" in argv:
            key = runner_key(argv)
            out.append({"pid": p.pid, "port": int(argv[argv.index("--port") + 1]), "key": key, "argv": argv,
                        "model": argv[argv.index("--model") + 1]})
    return out


def runner_key(argv: list[str]) -> str | None:
    """A runner's API key, read (as the daemon's user) from the file named by --api-key-file."""
    assert "--api-key" not in argv, "the key must not be on the command line"
    if "--api-key-file" not in argv:
        return None
    return Path(argv[argv.index("--api-key-file") + 1]).read_text().strip()


def child_get(child: dict[str, Any], path: str) -> Any:
    req = urllib.request.Request(f"http://127.0.0.1:{child['port']}{path}",
                                 headers={"Authorization": f"Bearer {child['key']}"} if child["key"] else {})
    with urllib.request.urlopen(req, timeout=10) as r:
        return json.load(r)


# --- systemd-analyze, for the unit checks (tests/test_unit.py, tests/test_unit_worker.py) ---
def _install_systemd() -> str | None:
    """Why systemd-analyze is unavailable, or None once it is there."""
    if shutil.which("systemd-analyze"):
        return None
    if os.geteuid() != 0 or not shutil.which("apt-get"):
        return "systemd-analyze is missing and apt-get cannot install it here (not root or no apt-get)"
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    for cmd in (["apt-get", "update"], ["apt-get", "install", "-y", "--no-install-recommends", "systemd"]):
        r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
        if r.returncode != 0:
            return f"{' '.join(cmd)} failed: {r.stderr.strip()[-300:]}"
    return None if shutil.which("systemd-analyze") else "systemd-analyze still missing after installing systemd"


@pytest.fixture(scope="module")
def analyze() -> str:
    why = _install_systemd()
    if why is not None:
        pytest.skip(f"skipping the systemd-analyze checks: {why}")
    path = shutil.which("systemd-analyze")
    assert path is not None
    return path
