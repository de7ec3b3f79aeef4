"""``ollamad worker``: run llama.cpp's RPC worker (ggml-rpc-server) and keep it running.

The worker lends this machine's memory and compute to a daemon elsewhere that starts
``llama-server --rpc host:port``. The RPC protocol has no authentication, so the worker
binds to one explicit address and refuses the wildcard ones unless told otherwise.
Supervision: the child gets a parent-death signal (it never outlives ``ollamad worker``),
is restarted with a doubling backoff when it dies, and is stopped on SIGTERM/SIGINT.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import signal
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

import structlog

from ollamad.runner.binary import HOW_TO_GET, BinaryNotFound
from ollamad.runner.child import _child_setup, describe_exit

log = structlog.get_logger("ollamad.worker")

NAMES = ("ggml-rpc-server", "rpc-server")  # the cmake target's name in newer llama.cpp, then older
WILDCARD = ("0.0.0.0", "::", "", "*", "[::]")
BACKOFF_FIRST = 1.0
BACKOFF_MAX = 30.0
STABLE_AFTER = 60.0  # a child that ran this long starts the backoff over


class WorkerConfigError(ValueError):
    """The worker cannot start as configured (bad address, no binary)."""


def find_rpc_server(configured: Path | None, runners_dir: Path) -> Path:
    """OLLAMAD_RPC_SERVER, else the one runners/build.sh built beside llama-server, else PATH."""
    if configured is not None:
        if configured.is_file() and os.access(configured, os.X_OK):
            return configured
        raise BinaryNotFound(f"OLLAMAD_RPC_SERVER={configured} is not an executable file")
    for name in NAMES:
        built = runners_dir / "current" / "bin" / name
        if built.is_file() and os.access(built, os.X_OK):
            return built.resolve()
    for name in NAMES:
        on_path = shutil.which(name)
        if on_path:
            return Path(on_path)
    raise BinaryNotFound(f"no ggml-rpc-server found: {HOW_TO_GET} (it builds the RPC worker too)")


def check_host(host: str, bind_any: bool) -> str:
    """The address to bind; WorkerConfigError for a wildcard one unless ``bind_any``."""
    h = host.strip()
    if h in WILDCARD and not bind_any:
        raise WorkerConfigError(
            f"refusing to listen on {h or 'every address'!r}: the RPC protocol has no authentication, so "
            "anyone who can reach the port can use this machine's memory and CPU/GPU. Give a private "
            "address (--host 10.0.0.5) or, knowingly, --bind-any (OLLAMAD_WORKER_BIND_ANY=1)")
    if not h:
        return "0.0.0.0"
    return h.removeprefix("[").removesuffix("]")


def has_cache_flag(binary: Path) -> bool:
    """Whether this build's worker knows ``--cache`` (older ones do not)."""
    try:
        out = subprocess.run([str(binary), "--help"], capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return False
    return "--cache" in out.stdout + out.stderr


@dataclass
class WorkerSupervisor:
    """Run one ggml-rpc-server; restart it when it dies; stop it on request."""

    binary: Path
    host: str
    port: int
    threads: int = 0
    cache: Path | None = None
    backoff_first: float = BACKOFF_FIRST
    backoff_max: float = BACKOFF_MAX
    proc: asyncio.subprocess.Process | None = None
    starts: int = 0
    _stop: asyncio.Event = field(default_factory=asyncio.Event)

    def argv(self) -> list[str]:
        args = [str(self.binary), "--host", self.host, "--port", str(self.port),
                "--threads", str(self.threads or os.cpu_count() or 1)]
        if self.cache is not None:
            if has_cache_flag(self.binary):
                args.append("--cache")
            else:
                log.warning("this ggml-rpc-server has no --cache; running without a tensor cache")
        return args

    def env(self) -> dict[str, str]:
        keep = ("PATH", "HOME", "LANG", "LC_ALL", "TZ", "LD_LIBRARY_PATH", "CUDA_VISIBLE_DEVICES",
                "HIP_VISIBLE_DEVICES", "XDG_CACHE_HOME")
        env = {k: v for k, v in os.environ.items() if k in keep or k.startswith("GGML_")}
        if self.cache is not None:  # the worker keeps its cache in $LLAMA_CACHE/rpc
            env["LLAMA_CACHE"] = str(self.cache)
        return env

    async def run(self) -> None:
        """Keep the worker running until ``stop`` is called."""
        backoff = self.backoff_first
        if self.cache is not None:
            self.cache.mkdir(parents=True, exist_ok=True)
        while not self._stop.is_set():
            started = time.monotonic()
            code = await self._run_once()
            if self._stop.is_set():
                break
            ran = time.monotonic() - started
            if ran >= STABLE_AFTER:
                backoff = self.backoff_first
            log.error("rpc worker died; restarting", how=describe_exit(code), ran_for=round(ran, 1),
                      restart_in=backoff)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._stop.wait(), backoff)
            backoff = min(backoff * 2, self.backoff_max)
        log.info("rpc worker stopped")

    async def _run_once(self) -> int:
        argv = self.argv()
        try:
            # SIGPIPE stays ignored in the child (restore_signals=False): when a client (a
            # llama-server) goes away mid-reply the worker gets EPIPE and serves the next one,
            # instead of being killed by the signal.
            self.proc = await asyncio.create_subprocess_exec(
                *argv, stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.STDOUT, env=self.env(), start_new_session=True,
                preexec_fn=_child_setup, restore_signals=False)
        except OSError as e:
            log.error("cannot start the rpc worker", binary=argv[0], error=e.strerror or str(e))
            return 127
        self.starts += 1
        log.info("rpc worker started", pid=self.proc.pid, argv=" ".join(argv))
        assert self.proc.stdout is not None
        async for raw in self.proc.stdout:
            line = raw.decode("utf-8", errors="replace").rstrip()
            if line.startswith(("Accepted client", "Client connection")):  # every health check
                log.debug("rpc-server", line=line)
            elif line:
                log.info("rpc-server", line=line)
        return await self.proc.wait()

    def request_stop(self) -> None:
        """Stop the worker (SIGTERM) and do not restart it; ``run`` returns once it exited."""
        self._stop.set()
        if self.proc is not None and self.proc.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGTERM)

    async def stop(self, grace: float = 5.0) -> None:
        """SIGTERM the worker, SIGKILL it after ``grace`` seconds; no restart."""
        self.request_stop()
        proc = self.proc
        if proc is None or proc.returncode is not None:
            return
        try:
            await asyncio.wait_for(asyncio.shield(proc.wait()), grace)
        except TimeoutError:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            await proc.wait()


async def serve_worker(sup: WorkerSupervisor) -> None:
    """Run the supervisor until SIGTERM or SIGINT, then stop the worker."""
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, sup.request_stop)
    log.info("ollamad worker starting", host=sup.host, port=sup.port, cache=str(sup.cache or ""),
             note="the RPC protocol has no authentication: keep this port on a private network")
    await sup.run()
