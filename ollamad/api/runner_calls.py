"""A route's requests to its lease's runner: one POST sent (over aiohttp, or runner/wire.py), the
wait for a streamed request to be accepted (OLLAMAD_ACCEPT_TIMEOUT, /slots), one whole answer,
a JSON answer, and the runner's errors as UpstreamError."""

from __future__ import annotations

import asyncio
import contextlib
import math
import time
from collections.abc import AsyncIterator, Awaitable
from typing import Any, TypeVar

import aiohttp
import msgspec
import structlog

from ollamad.api.common import AppContext
from ollamad.runner.events import UpstreamError, cut, error_from, error_of
from ollamad.runner.wire import Reply
from ollamad.sched.lease import Lease

log = structlog.get_logger("ollamad.api")
_T = TypeVar("_T")

LOOPBACK = "127.0.0.1"  # where runners listen (runner/child.py)
# seconds /slots may take before a runner is judged stuck (``accepted``): llama-server answers it
# from its own loop, and on a loaded machine that took 1.8 s and 4.6 s in 2 of 15 test runs
SLOTS_PATIENCE = 10.0


@contextlib.asynccontextmanager
async def upstream(ctx: AppContext, lease: Lease, path: str, payload: dict[str, Any],
                   ) -> AsyncIterator[aiohttp.ClientResponse]:
    """POST ``payload`` to the lease's runner; the response once its headers came (a streamed
    request within OLLAMAD_ACCEPT_TIMEOUT, see ``accepted``)."""
    assert ctx.session is not None
    limit = ctx.settings.accept_timeout if payload.get("stream") else math.inf
    post = asyncio.ensure_future(ctx.session.post(f"{lease.runner.url}{path}", json=payload,
                                                  headers=lease.runner.headers))
    try:
        resp = await accepted(ctx, lease, limit, post)
    except aiohttp.ClientConnectionError as e:
        raise not_answering(lease, e) from None
    finally:
        post.cancel()  # nothing once it is done
    lease.answered = True
    async with resp:
        yield resp


async def accepted(ctx: AppContext, lease: Lease, limit: float, headers: asyncio.Future[_T]) -> _T:
    """``headers`` once done: the runner's reply began. llama-server answers a stream once its first
    token is made, after it has compiled a format's grammar, so a streamed request has
    OLLAMAD_ACCEPT_TIMEOUT for that, and a runner stuck there (while /health still says ok) is
    replaced. But a request may wait in llama-server's own queue until a slot frees (sent ahead
    of one, OLLAMAD_SEND_AHEAD, or taken over by one sent after it): past the timeout the runner
    is asked for /slots, and while every slot is busy the request gets another timeout's wait.
    A reply that began while /slots was asked wins over its answer (the request may have taken
    the freed slot, and ended, by then), and /slots has at least SLOTS_PATIENCE to answer."""
    if math.isinf(limit):
        return await headers
    while not headers.done():
        await asyncio.wait((headers,), timeout=limit)
        if (not headers.done() and not await _every_slot_busy(ctx, lease, max(limit, SLOTS_PATIENCE))
                and not headers.done()):
            raise _not_accepted(lease, limit)
    return headers.result()


async def _every_slot_busy(ctx: AppContext, lease: Lease, limit: float) -> bool:
    assert ctx.session is not None
    t0 = time.monotonic()
    seen: dict[str, Any] = {}
    try:
        async with ctx.session.get(f"{lease.runner.url}/slots", headers=lease.runner.headers,
                                   timeout=aiohttp.ClientTimeout(total=limit)) as r:
            slots = await r.json() if r.status == 200 else []
        seen["slots"] = len(slots)
        seen["busy_slots"] = sum(1 for s in slots if isinstance(s, dict) and s.get("is_processing"))
        busy = bool(slots) and seen["busy_slots"] == len(slots)
    except (aiohttp.ClientError, TimeoutError, ValueError) as e:
        seen["error"] = str(e) or type(e).__name__
        busy = False
    log.info("a streamed request waits past OLLAMAD_ACCEPT_TIMEOUT; "
             + ("every slot is busy: it waits on" if busy else "a slot is free, or /slots did not answer"),
             runner_id=lease.runner_id, seconds=round(time.monotonic() - t0, 3), **seen)
    return busy


async def pushed(ctx: AppContext, lease: Lease, path: str, payload: dict[str, Any]) -> Reply:
    """POST ``payload`` to the lease's runner over runner/wire.py; the reply once its headers came.
    A streamed request must be accepted within OLLAMAD_ACCEPT_TIMEOUT, as in ``upstream``; its body
    is for api/stream.py."""
    runner = lease.runner
    patience = None
    if payload.get("stream"):
        def patience(headers: asyncio.Future[None]) -> Awaitable[None]:
            return accepted(ctx, lease, ctx.settings.accept_timeout, headers)
    try:
        reply = await ctx.wire.request(LOOPBACK, runner.port, path, msgspec.json.encode(payload), runner.headers,
                                       accept=patience)
    except OSError as e:  # refused, or cut before any reply on a new connection
        raise not_answering(lease, e) from None
    lease.answered = True
    return reply


def not_answering(lease: Lease, e: Exception) -> UpstreamError:
    """The runner refused or cut the request before any reply: it is replaced. A request sent
    ahead of a slot had not started (``retry_unstarted_middleware`` sends it again)."""
    lease.lost(str(e))
    return UpstreamError(500, f"llama-server is not answering: {e or type(e).__name__}", unstarted=lease.sent_ahead)


def _not_accepted(lease: Lease, limit: float) -> UpstreamError:
    """See ``accepted``: the runner is stuck; replace it."""
    lease.lost(f"did not accept a request within {limit:g}s")
    return UpstreamError(500, f"llama-server did not accept the request within {limit:g}s "
                              "(OLLAMAD_ACCEPT_TIMEOUT); the runner is replaced")


async def one_reply(ctx: AppContext, lease: Lease, path: str, payload: dict[str, Any]) -> bytes:
    """POST a request for one answer (runner/wire.py) and return its body; UpstreamError otherwise.
    Cancelled (the client left), the connection is dropped, which stops the runner's task."""
    answer = await pushed(ctx, lease, path, payload)
    try:
        if answer.status != 200:
            raise await error_reply(answer)
        try:
            await answer.done
        except OSError as e:
            lease.lost(str(e))
            raise cut(e) from None
        return answer.body()
    finally:
        answer.abort()  # nothing, once the answer is whole


async def error_reply(reply: Reply) -> UpstreamError:
    """The UpstreamError a non-200 reply's whole body says (read here)."""
    try:
        await reply.done
    except OSError as e:
        return cut(e)
    return error_from(reply.status, reply.body().decode(errors="replace"))


async def runner_json(ctx: AppContext, lease: Lease, path: str, payload: dict[str, Any]) -> Any:
    """POST ``payload`` to the lease's runner and return its JSON answer; UpstreamError otherwise."""
    assert ctx.session is not None
    try:
        async with ctx.session.post(f"{lease.runner.url}{path}", json=payload, headers=lease.runner.headers) as up:
            if up.status != 200:
                raise await error_of(up)
            return await up.json()
    except aiohttp.ClientConnectionError as e:  # e.g. its runner died while the request waited to be sent ahead
        raise not_answering(lease, e) from None


async def apply_template(ctx: AppContext, lease: Lease, messages: list[dict[str, Any]]) -> str:
    """The prompt llama-server's chat template makes of ``messages``."""
    body = await runner_json(ctx, lease, "/apply-template", {"messages": messages})
    return str(body.get("prompt", ""))

