"""One log line per request (request_id, model, queue wait, load time, tokens, status).

The middleware gives each request a ``RequestRecord`` that the handlers fill in as they
learn things; when the request ends (answered, failed, or cut by the client) it writes the
line and feeds the metrics. Prompts and replies are never logged.
"""

from __future__ import annotations

import asyncio
import secrets
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import structlog
from aiohttp import web
from aiohttp.typedefs import Middleware

from ollamad.sched.lease import Lease
from ollamad.service.metrics import Metrics, RequestOutcome

log = structlog.get_logger("ollamad.request")
RECORD = "ollamad.record"
CLIENT_GONE = 499  # nginx's code for "the client closed the connection"
SERVER_CUT = 503  # logged for a request the drain timeout cut (its stream got an error line)
QUIET = {"/", "/metrics", "/api/version", "/api/ps"}  # polled by monitors: logged at debug

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


@dataclass
class RequestRecord:
    request_id: str
    started: float  # time.monotonic()
    model: str | None = None
    queue_wait: float | None = None
    load_time: float | None = None
    ttft: float | None = None
    prompt_tokens: int | None = None
    tokens: int | None = None
    cut: str | None = None  # why the server ended it early ("drain timeout")
    pieces: int = 0  # streamed pieces (about one token each): the count when no final chunk came
    sent_ahead: bool = False  # it waited for its slot in llama-server's queue: that wait is in ttft

    def dispatched(self, model: str, lease: Lease) -> None:
        """Split the lease's wait into queue and load time (runner start/ready are monotonic)."""
        self.model = model
        self.sent_ahead = lease.sent_ahead
        queued_for, ready_at, started_at = lease.queued_for, lease.runner.ready_at, lease.runner.started_at
        arrived = time.monotonic() - queued_for
        load = max(0.0, ready_at - max(started_at, arrived)) if ready_at > arrived else 0.0
        self.load_time = min(load, queued_for)
        self.queue_wait = queued_for - self.load_time

    def first_token(self) -> None:
        """A piece of the reply was made (called for each one): the first sets ttft; all are counted."""
        self.pieces += 1
        if self.ttft is None:
            self.ttft = time.monotonic() - self.started

    def finished(self, final: dict[str, Any]) -> None:
        self.tokens = final.get("eval_count")
        self.prompt_tokens = final.get("prompt_eval_count")


def record_of(request: web.Request) -> RequestRecord:
    rec = request.get(RECORD)
    if rec is None:  # a handler called outside the middleware (tests)
        rec = request[RECORD] = RequestRecord(secrets.token_hex(8), time.monotonic())
    assert isinstance(rec, RequestRecord)
    return rec


def route_of(request: web.Request) -> str:
    """The route pattern, not the path, so labels stay bounded."""
    resource = request.match_info.route.resource
    return resource.canonical if resource is not None else "unmatched"


def request_log(metrics: Metrics, cutting: Callable[[], bool] = lambda: False) -> Middleware:
    """``cutting()`` is True once the drain timed out: a handler cancelled then was cut by us, not the client."""

    @web.middleware
    async def middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
        rec = RequestRecord(secrets.token_hex(8), time.monotonic())
        request[RECORD] = rec
        status = 500
        with structlog.contextvars.bound_contextvars(request_id=rec.request_id):
            try:
                resp = await handler(request)
                status = SERVER_CUT if rec.cut else resp.status
                return resp
            except asyncio.CancelledError:
                if cutting():
                    rec.cut = rec.cut or "drain timeout"
                status = SERVER_CUT if rec.cut else CLIENT_GONE
                raise
            except web.HTTPException as e:
                status = e.status
                raise
            finally:
                _done(metrics, request, rec, status)

    return middleware


def _done(metrics: Metrics, request: web.Request, rec: RequestRecord, status: int) -> None:
    seconds = time.monotonic() - rec.started
    if rec.tokens is None and rec.pieces:  # cut short (the client left): what was made until then
        rec.tokens = rec.pieces
    route = route_of(request)
    metrics.request_done(RequestOutcome(route, status, seconds, rec.model, rec.ttft, rec.tokens,
                                        rec.prompt_tokens))
    fields: dict[str, Any] = {"method": request.method, "route": route, "status": status,
                              "seconds": round(seconds, 4)}
    if rec.cut:
        fields["cut"] = rec.cut
    if rec.sent_ahead:
        fields["sent_ahead"] = True
    if rec.model is not None:
        fields.update(model=rec.model, queue_wait=_r(rec.queue_wait), load_time=_r(rec.load_time),
                      ttft=_r(rec.ttft), prompt_tokens=rec.prompt_tokens, tokens=rec.tokens)
    quiet = request.path in QUIET and status < 400
    (log.warning if rec.cut else log.debug if quiet else log.info)("request", **fields)


def _r(x: float | None) -> float | None:
    return None if x is None else round(x, 4)
