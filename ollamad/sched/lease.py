"""A lease: the right to send one request to one runner, and when that request has a slot."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import anyio

from ollamad.runner.child import Runner


@dataclass
class Lease:
    """The right to send one request to one runner; release it exactly once."""

    runner: Runner
    runner_id: int
    request_id: int
    queued_for: float  # seconds from arrival to dispatch (queue wait and load)
    holds_slot: bool
    _release: Callable[[Lease], None]
    _lost: Callable[[Lease, str], None]
    released: bool = False
    running: bool = True  # False while it waits in llama-server's queue (sent ahead of a free slot)
    sent_ahead: bool = False
    _on_running: Callable[[], None] | None = None

    def started(self) -> None:
        """An earlier request on its runner ended: this one has a slot now."""
        self.running = True
        if self._on_running is not None:
            self._on_running()

    def accept_scope(self, limit: float) -> anyio.CancelScope:
        """A deadline for the runner to accept the request: ``limit`` seconds from when it has a slot
        (a request sent ahead waits in llama-server's queue first, as long as the one before it runs)."""
        scope = anyio.CancelScope(deadline=anyio.current_time() + limit if self.running else math.inf)
        if not self.running:
            self._on_running = lambda: setattr(scope, "deadline", anyio.current_time() + limit)
        return scope

    def lost(self, reason: str) -> None:
        """The runner broke this request's connection: take no more requests for it."""
        self._lost(self, reason)

    def release(self) -> None:
        if not self.released:
            self.released = True
            self._release(self)

    async def __aenter__(self) -> Lease:
        return self

    async def __aexit__(self, *exc: object) -> None:
        self.release()
