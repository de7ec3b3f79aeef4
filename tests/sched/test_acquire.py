"""Scheduler.acquire in process, with runners of the fake llama-server."""

from __future__ import annotations

from pathlib import Path

import anyio

from ollamad.models.catalog import Catalog
from ollamad.sched.scheduler import Scheduler
from ollamad.settings import Settings


async def test_a_request_granted_at_once_does_not_yield_to_the_requests_that_came_with_it(
        fake_server: Path, models_dir: Path, tmp_path: Path) -> None:
    """With a free slot the lease comes without a trip through the event loop: a burst's first
    request goes to its runner before the handlers of the others run, not after all of them."""
    settings = Settings(models=models_dir, state_dir=tmp_path / "state", num_parallel=4)
    catalog = Catalog(models_dir)
    catalog.scan()
    scheduler = Scheduler(settings, catalog, str(fake_server))
    model = catalog.resolve("tiny")
    assert model is not None
    order: list[str] = []

    async def granted(tag: str) -> None:
        lease = await scheduler.acquire(model)
        order.append(tag)
        lease.release()

    async def other() -> None:
        order.append("other")

    async with anyio.create_task_group() as tg:
        await tg.start(scheduler.run)
        (await scheduler.acquire(model)).release()  # loads the runner; its 4 slots are free now
        async with anyio.create_task_group() as burst:
            burst.start_soon(granted, "first")
            burst.start_soon(other)
        # a request that has to wait still does: 4 slots held and 4 sent ahead, a 9th waits for a release
        leases = [await scheduler.acquire(model) for _ in range(4 + settings.send_ahead * 4)]
        async with anyio.create_task_group() as burst:
            burst.start_soon(granted, "waited")
            burst.start_soon(other)
            await anyio.sleep(0.05)
            assert order[-1] == "other"
            leases[0].release()
        for lease in leases[1:]:
            lease.release()
        tg.cancel_scope.cancel()
    assert order == ["first", "other", "other", "waited"]
