"""A lease: the right to send one request to one runner."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

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
    sent_ahead: bool = False  # sent to a busy runner ahead of a free slot: it waits in llama-server's queue
    answered: bool = False  # the runner's reply began (its headers came)

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
