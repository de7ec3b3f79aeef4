"""Wiring: settings -> binary -> catalog -> scheduler -> HTTP server, in one task group."""

from __future__ import annotations

import signal
from collections.abc import Callable
from pathlib import Path

import aiohttp
import anyio
import structlog
from aiohttp import web

from ollamad import __version__
from ollamad.api import AppContext, make_app
from ollamad.binary import find_llama_server
from ollamad.catalog import Catalog
from ollamad.leftovers import ChildRecords
from ollamad.scheduler import Scheduler
from ollamad.settings import Settings
from ollamad.testmodels import write_llama

log = structlog.get_logger("ollamad")
DEMO_MODEL = "tiny"


def ensure_demo_model(settings: Settings) -> Path | None:
    """With the default models folder and nothing in it, write the tiny demo model there."""
    if "models" in settings.model_fields_set:
        return None
    folder = settings.models
    if folder.is_dir() and any(folder.glob("*.gguf")):
        return None
    path = write_llama(folder / f"{DEMO_MODEL}.gguf", name=DEMO_MODEL)
    log.info("wrote the demo model", path=str(path))
    return path


async def serve(settings: Settings, *, on_ready: Callable[[AppContext], None] | None = None,
                drain_timeout: float = 30.0) -> None:
    """Run the daemon until SIGTERM or SIGINT; SIGHUP rescans the models folder."""
    binary = find_llama_server(settings.llama_server, settings.runners_dir)
    ensure_demo_model(settings)
    catalog = Catalog(settings.models)
    catalog.scan()
    host, port = settings.bind
    records = ChildRecords.for_port(settings.state_dir, port)
    records.clean_up()
    scheduler = Scheduler(settings, catalog, str(binary), records=records)
    async with anyio.create_task_group() as tg:
        await tg.start(scheduler.run)
        connector = aiohttp.TCPConnector(limit=0, keepalive_timeout=30)
        async with aiohttp.ClientSession(connector=connector, timeout=aiohttp.ClientTimeout(total=None)) as session:
            ctx = AppContext(settings, catalog, scheduler, session)
            runner = web.AppRunner(make_app(ctx), handler_cancellation=True, access_log=None)
            await runner.setup()
            site = web.TCPSite(runner, host, port, reuse_address=True)
            with anyio.open_signal_receiver(signal.SIGTERM, signal.SIGINT, signal.SIGHUP) as signals:
                await site.start()
                log.info("listening", host=host, port=port, version=__version__, llama_server=str(binary),
                         models=str(settings.models), count=len(catalog.list()))
                if on_ready is not None:
                    on_ready(ctx)
                async for sig in signals:
                    if sig == signal.SIGHUP:
                        catalog.scan()
                        log.info("reloaded", models=len(catalog.list()))
                        continue
                    log.info("shutting down", signal=signal.Signals(sig).name)
                    break
            await drain(scheduler, drain_timeout)
            await runner.cleanup()
        tg.cancel_scope.cancel()
    log.info("stopped")


async def drain(scheduler: Scheduler, grace: float) -> None:
    """Refuse new requests; let queued and in-flight ones finish, up to ``grace`` seconds."""
    scheduler.accepting = False
    with anyio.move_on_after(grace):
        await scheduler.wait_idle()
    if scheduler.busy():
        log.warning("drain timed out; cutting remaining requests", busy=scheduler.busy())
