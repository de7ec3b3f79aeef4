"""One llama-server child process: spawn, wait for /health, capture output, stop.

Knows nothing about other runners or the queue. The child gets a parent-death signal so it
never outlives the daemon, runs in its own process group, listens on loopback only, and
gets a random API key so other local users cannot talk to it directly. The key travels in a
0600 file (--api-key-file), never on the command line, where `ps` would show it to anyone;
the file lives as long as the child does.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import errno
import functools
import logging
import os
import secrets
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import aiohttp
import psutil
import structlog

from ollamad.models.plan import RunnerPlan
from ollamad.procs import descendants
from ollamad.runner.leftovers import KEY_FILE
from ollamad.runner.output import OutputPipe
from ollamad.runner.spawn import Process, spawn

log = structlog.get_logger("ollamad.runner")

PR_SET_PDEATHSIG = 1
SECOND_TERM_AFTER = 0.5  # seconds after the first SIGTERM before a second one (an idle one exits in 3-55 ms)
HEALTH_POLL = 0.02  # seconds between /health polls while loading
# Lines llama-server prints as it becomes ready: /health is asked at once, not at the next poll.
READY_LINES = ("model loaded", "listening on", "all slots are idle")
ENV_PASS = ("PATH", "HOME", "LANG", "LC_ALL", "TZ", "LD_LIBRARY_PATH", "CUDA_VISIBLE_DEVICES",
            "HIP_VISIBLE_DEVICES", "GGML_CUDA_ENABLE_UNIFIED_MEMORY", "TMPDIR")


class RunnerError(Exception):
    """A runner failed to start or died; the message says why, with llama-server's words."""


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _child_setup() -> None:  # runs in the child between fork and exec
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL)


@functools.cache
def _setpriv() -> str | None:
    """util-linux's setpriv, if it sets the parent-death signal here (2.33+), else None.

    Tried once for real: under the systemd unit's hardening setpriv cannot apply its
    capabilities ("activate capabilities: Operation not permitted") and exits 127.
    """
    path, true = shutil.which("setpriv"), shutil.which("true")
    if path is None or true is None:
        return None
    try:
        done = subprocess.run([path, "--pdeathsig", "KILL", "--", true], capture_output=True, timeout=5, check=False)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return path if done.returncode == 0 else None


async def _exited(proc: Process, seconds: float) -> bool:
    """Whether ``proc`` exits within ``seconds``."""
    try:
        await asyncio.wait_for(asyncio.shield(proc.wait()), seconds)
    except TimeoutError:
        return False
    return True


def _cannot_exec(path: str) -> str | None:
    """Why ``path`` cannot be executed, as strerror says it, or None if it can."""
    if os.access(path, os.X_OK):
        return None
    return "Permission denied" if os.path.exists(path) else "No such file or directory"


def spawn_options(argv: list[str]) -> tuple[list[str], dict[str, Any]]:
    """``argv`` and the keywords for spawn() (runner/spawn.py) that give the child a parent-death SIGKILL.

    Through ``setpriv --pdeathsig KILL`` (it sets the signal and execs, keeping the pid) where
    there is one: a ``preexec_fn`` makes Python fork its whole heap instead of vfork, 7 to 10 ms
    per load measured in the daemon against 1.5 ms this way.
    """
    setpriv = _setpriv()
    if setpriv is not None:
        return [setpriv, "--pdeathsig", "KILL", "--", *argv], {}
    return argv, {"preexec_fn": _child_setup}


def child_environment(env_pass: tuple[str, ...] = (), extra: dict[str, str] | None = None) -> dict[str, str]:
    """What a llama-server child sees: ENV_PASS, the names or NAME* patterns in ``env_pass``, ``extra``."""
    env = {k: v for k, v in os.environ.items() if k in ENV_PASS or _matches(k, env_pass)}
    env.update(extra or {})
    return env


def _matches(name: str, patterns: tuple[str, ...]) -> bool:
    return any(name == p or (p.endswith("*") and name.startswith(p[:-1])) for p in patterns)


def describe_exit(code: int | None) -> str:
    """How a child ended, with an out-of-memory hint for SIGKILL (as gunicorn does)."""
    if code is None:
        return "still running"
    if code < 0:
        sig = signal.Signals(-code).name if -code in signal.Signals._value2member_map_ else -code
        hint = " (perhaps out of memory?)" if code == -signal.SIGKILL else ""
        return f"killed by signal {sig}{hint}"
    return f"exited with code {code}"


@dataclass
class Runner:
    plan: RunnerPlan
    binary: str
    load_timeout: float = 300.0
    stop_grace: float = 10.0
    env: dict[str, str] | None = None
    env_pass: tuple[str, ...] = ()
    on_line: Callable[[str], None] | None = None
    on_spawn: Callable[[Runner], None] | None = None  # e.g. record the pid for crash cleanup
    port: int = field(default_factory=free_port)
    api_key: str = field(default_factory=lambda: secrets.token_urlsafe(24))
    key_file: str | None = None  # the 0600 file llama-server reads the key from, while it runs
    proc: Process | None = None
    started_at: float = 0.0
    ready_at: float = 0.0
    last_output: float = 0.0
    stopping: bool = False
    kill_sent: bool = False
    signal_sent: bool = False
    lines: deque[str] = field(default_factory=lambda: deque(maxlen=200))
    _pump: asyncio.Task[None] | None = None
    _output: OutputPipe | None = None
    _ready_hint: asyncio.Event = field(default_factory=asyncio.Event)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc else None

    @property
    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.api_key}"}

    def argv(self) -> list[str]:
        return self.plan.argv(self.binary, self.port, self.key_file)

    def _write_key(self) -> None:
        """The key in a new file only this user can read (mkstemp makes it 0600)."""
        fd, path = tempfile.mkstemp(prefix=KEY_FILE[0], suffix=KEY_FILE[1])
        with os.fdopen(fd, "w") as f:
            f.write(self.api_key + "\n")
        self.key_file = path

    def _forget_key(self) -> None:
        if self.key_file is not None:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.key_file)
            self.key_file = None

    def child_env(self) -> dict[str, str]:
        return child_environment(self.env_pass, self.env)

    async def start(self, session: aiohttp.ClientSession) -> None:
        """Spawn llama-server and return once /health answers 200; RunnerError otherwise."""
        try:
            self._write_key()
        except OSError as e:
            raise RunnerError(f"cannot write the runner's key file in {tempfile.gettempdir()}: {e}") from None
        argv = self.argv()
        self.started_at = self.last_output = time.monotonic()
        exec_argv, deathsig = spawn_options(argv)
        why = _cannot_exec(argv[0])  # said here: through setpriv it would be an exit code 127
        if why is not None:
            self._forget_key()
            raise RunnerError(f"cannot start {argv[0]}: {why}")
        self._output = OutputPipe(self._lines)
        try:
            self.proc = await spawn(exec_argv, stdout=self._output.child_end, env=self.child_env(), **deathsig)
        except OSError as e:
            self._forget_key()
            self._output.drain()
            raise RunnerError(f"cannot start {argv[0]}: {e.strerror or e}") from None
        finally:
            self._output.close_child_end()
        if self.on_spawn is not None:
            self.on_spawn(self)
        self._log().info("runner starting", argv=" ".join(argv))
        self._pump = asyncio.create_task(self._output.pump())
        try:
            await self._wait_healthy(session)
        except BaseException:
            await self.stop()
            raise
        self.ready_at = time.monotonic()
        self._output.batch()
        self._log().info("runner ready", seconds=round(self.ready_at - self.started_at, 3))

    async def _wait_healthy(self, session: aiohttp.ClientSession) -> None:
        assert self.proc is not None
        url = f"{self.url}/health"
        while True:
            if self.proc.returncode is not None:
                await self._drain_pump()
                raise RunnerError(f"llama-server {describe_exit(self.proc.returncode)}: {self.tail()}")
            if time.monotonic() - self.last_output > self.load_timeout:
                raise RunnerError(f"timed out waiting for llama-server to start - {self.tail()}")
            with contextlib.suppress(aiohttp.ClientError, asyncio.TimeoutError):
                async with session.get(url, timeout=aiohttp.ClientTimeout(total=2)) as r:
                    if r.status == 200:
                        return
            with contextlib.suppress(TimeoutError):  # the next poll, or sooner on a ready line
                await asyncio.wait_for(self._ready_hint.wait(), HEALTH_POLL)
            self._ready_hint.clear()

    def _lines(self, lines: list[str]) -> None:
        """Lines of llama-server's output (runner/output.py: as they come while loading, then in batches)."""
        self.last_output = time.monotonic()
        self.lines.extend(lines)
        if self.on_line is not None:
            for line in lines:
                try:  # the pipe must keep being read, or llama-server blocks writing to it
                    self.on_line(line)
                except Exception:
                    self._log().exception("reading a llama-server line failed", line=line)
        if not self.ready_at and any(m in line for line in lines for m in READY_LINES):
            self._ready_hint.set()
        low = "\n".join(lines).lower()  # one search for the batch (most have neither word)
        if "error" in low or "failed" in low:
            for line in lines:
                if "error" in line.lower() or "failed" in line.lower():
                    self._log().warning("llama-server", line=line)
        if log.is_enabled_for(logging.DEBUG):  # with --verbosity 4 a load prints ~150 lines
            for line in lines:
                log.debug("llama-server", line=line, model=self.plan.model, runner_pid=self.pid)

    async def _drain_pump(self) -> None:
        """All the output of a child that ended (or is being stopped), read now."""
        if self._output is not None and self.proc is not None and self.proc.returncode is not None:
            self._output.drain()
        if self._pump is not None:
            with contextlib.suppress(asyncio.TimeoutError, asyncio.CancelledError):
                await asyncio.wait_for(asyncio.shield(self._pump), 1.0)

    def tail(self, n: int = 5) -> str:
        """The last lines llama-server printed, for error messages."""
        interesting = [ln for ln in self.lines if "error" in ln.lower() or "failed" in ln.lower()]
        picked = interesting[-n:] or list(self.lines)[-n:]
        return " | ".join(picked) if picked else "no output"

    async def wait(self) -> int:
        assert self.proc is not None
        code = await self.proc.wait()
        self._forget_key()
        await self._drain_pump()
        return code

    async def stop(self) -> None:
        """SIGTERM the process group; again after SECOND_TERM_AFTER; SIGKILL after stop_grace; reap.

        llama-server exits within a few ms of a SIGTERM when idle, but its shutdown sometimes
        hangs (4 of 32 runs of the swap benchmark's daemon were killed only at the 10 s grace,
        with every request for the next model waiting); a second SIGTERM ends it at once
        ("Received second interrupt, terminating immediately"). The scheduler stops only runners
        with nothing in flight, and the drain waits for requests first, so nothing is cut.
        """
        self.stopping = True
        proc = self.proc
        if proc is None:
            return
        if proc.returncode is None:
            kids = descendants(proc.pid)  # before signalling: orphans are lost later
            self._signal_group(signal.SIGTERM)
            first = min(SECOND_TERM_AFTER, self.stop_grace)
            if not await _exited(proc, first):
                self._log().info("runner slow to stop; sending SIGTERM again", after=first)
                self._signal_group(signal.SIGTERM)
                if not await _exited(proc, max(self.stop_grace - first, 0.1)):
                    self._log().warning("runner did not stop in time; killing", grace=self.stop_grace)
                    self._signal_group(signal.SIGKILL)
                    await _exited(proc, 5)
            for child in kids:
                with contextlib.suppress(psutil.Error):
                    child.kill()
        self._forget_key()
        await self._drain_pump()

    def kill(self) -> None:
        """SIGKILL the process group and every descendant at once (a hung runner); wait() reaps."""
        self.stopping = True
        if self.proc is None or self.proc.returncode is not None:
            return
        kids = descendants(self.proc.pid)
        self._signal_group(signal.SIGKILL)
        for child in kids:
            with contextlib.suppress(psutil.Error):
                child.kill()

    async def responds(self, session: aiohttp.ClientSession, timeout: float) -> bool:  # noqa: ASYNC109
        """True if /health answers at all within ``timeout`` (any status: the process is alive).

        Also True when this daemon cannot open a socket (out of file descriptors): that says
        nothing about the runner, which must not be killed for it.
        """
        try:
            async with session.get(f"{self.url}/health", timeout=aiohttp.ClientTimeout(total=timeout)) as r:
                await r.read()
                return True
        except aiohttp.ClientConnectorError as e:
            if e.os_error.errno in (errno.EMFILE, errno.ENFILE):
                self._log().warning("cannot check the runner's health: out of file descriptors")
                return True
            return False
        except (TimeoutError, aiohttp.ClientError):
            return False

    async def slot_context(self, session: aiohttp.ClientSession) -> int:
        """The context each slot really has, from llama-server's /props (plan.ctx if unknown)."""
        try:
            async with session.get(f"{self.url}/props", headers=self.headers,
                                   timeout=aiohttp.ClientTimeout(total=5)) as r:
                body = await r.json()
            return int(body["default_generation_settings"]["n_ctx"])
        except (aiohttp.ClientError, TimeoutError, KeyError, TypeError, ValueError):
            return self.plan.ctx

    def ended_on_request(self, code: int) -> bool:
        """False when the child died by itself: a crash, or a SIGKILL we did not send (OOM killer)."""
        # a child that exited before any signal was sent ended by itself, even if a stop was under way
        return self.stopping and self.signal_sent and (code != -signal.SIGKILL or self.kill_sent)

    def _signal_group(self, sig: int) -> None:
        if self.proc is None:
            return
        with contextlib.suppress(psutil.Error):  # exited by itself, not yet reaped: no signal of ours
            if psutil.Process(self.proc.pid).status() == psutil.STATUS_ZOMBIE:
                return
        self.signal_sent = True
        if sig == signal.SIGKILL:
            self.kill_sent = True
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.proc.pid, sig)

    def _log(self) -> structlog.typing.FilteringBoundLogger:
        return log.bind(model=self.plan.model, runner_pid=self.pid)  # type: ignore[no-any-return]
