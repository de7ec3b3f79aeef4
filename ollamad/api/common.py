"""What every route family shares: the app context, errors in Ollama's and OpenAI's shapes,
reading and validating JSON bodies, resolving a model name (calling a runner: runner_calls.py).
Route modules import this one, never each other."""

from __future__ import annotations

import asyncio
import contextlib
import errno
import json
import re
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from typing import Any, TypeVar

import aiohttp
import anyio
import msgspec
import structlog
from aiohttp import web
from pydantic import BaseModel, ValidationError

from ollamad.api.translate import (
    ChatRequest,
    GenerateRequest,
    describe_validation,
)
from ollamad.durations import keep_alive_from_request
from ollamad.models.catalog import Catalog, InvalidName, Model
from ollamad.models.describe import capabilities
from ollamad.models.facts import ModelFacts
from ollamad.models.ggufmeta import GGUFError
from ollamad.models.options import Options, with_ollama_defaults
from ollamad.runner.events import UpstreamError
from ollamad.runner.wire import RunnerClient
from ollamad.sched.scheduler import Scheduler, SchedulerError
from ollamad.settings import LOAD_OPTIONS, Settings

log = structlog.get_logger("ollamad.api")
NDJSON = "application/x-ndjson"
_SURROGATE = re.compile(rb"\\u[dD][89a-fA-F][0-9a-fA-F]{2}")
_Req = TypeVar("_Req", GenerateRequest, ChatRequest)
_Body = TypeVar("_Body", bound=BaseModel)


@dataclass
class AppContext:
    settings: Settings
    catalog: Catalog
    scheduler: Scheduler
    session: aiohttp.ClientSession | None = None
    wire: RunnerClient = field(default_factory=RunnerClient)  # the streams' client (runner/wire.py)
    extra: dict[str, Any] = field(default_factory=dict)
    cutting: bool = False  # the drain timeout ran out: streams still running are being cut
    # the runner stops a one-answer request when its client goes away (runners/patches/):
    # native stream:false requests ask for one answer instead of a stream gathered here
    one_answer: bool = False
    streams: set[anyio.CancelScope] = field(default_factory=set)

    def cut_streams(self) -> int:
        """The drain timed out: end every stream still running (each writes an error line); how many."""
        self.cutting = True
        for scope in list(self.streams):
            scope.cancel()
        return len(self.streams)


CUT_BY_SHUTDOWN = ("ollamad is stopping and the drain timeout (OLLAMAD_DRAIN_TIMEOUT) ran out "
                   "before this request finished")


@contextlib.contextmanager
def cuttable(ctx: AppContext) -> Iterator[anyio.CancelScope]:
    """A stream's body: cancelled when the drain timeout runs out (see ``scope.cancelled_caught``)."""
    with anyio.CancelScope() as scope:
        if ctx.cutting:
            scope.cancel()
        ctx.streams.add(scope)
        try:
            yield scope
        finally:
            ctx.streams.discard(scope)


CTX = web.AppKey("ctx", AppContext)


class ApiError(Exception):
    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


DISK_FULL = "not enough disk space for the models folder"


def disk_full(e: OSError) -> bool:
    if e.errno in (errno.ENOSPC, errno.EDQUOT):
        log.error("disk full", error=str(e))
        return True
    return False


_ENCODER = msgspec.json.Encoder()


def dumps(obj: Any) -> bytes:
    """Compact JSON and a newline, as Ollama writes it (msgspec: a NaN is null, not the stdlib's NaN)."""
    return _ENCODER.encode(obj) + b"\n"


def reply(body: Any, status: int = 200) -> web.Response:
    """A JSON answer, compact as Ollama writes it."""
    return web.Response(body=dumps(body), status=status, content_type="application/json")


def error(status: int, message: str) -> web.Response:
    return reply({"error": message}, status)


Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def openai_error(status: int, message: str) -> web.Response:
    """OpenAI's error object, as Ollama's /v1 routes answer."""
    kind = "invalid_request_error" if status < 500 else "api_error"
    if status == 404:
        kind = "not_found_error"
    return reply({"error": {"message": message, "type": kind, "param": None, "code": None}}, status)


@web.middleware
async def errors_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Every failure becomes Ollama's ``{"error": ...}`` (OpenAI's object under /v1) with the right status."""
    shape = openai_error if request.path.startswith("/v1/") else error
    try:
        return await handler(request)
    except (ApiError, SchedulerError, UpstreamError) as e:
        return shape(e.status, e.message)
    except web.HTTPException as e:
        if e.status >= 400:
            return shape(e.status, e.reason)
        raise
    except GGUFError as e:
        return shape(500, str(e))
    except Exception as e:  # a bug: answer in Ollama's shape, log it with its traceback
        if isinstance(e, OSError) and disk_full(e):
            return shape(507, DISK_FULL)
        log.exception("unhandled error", path=request.path)
        return shape(500, f"internal error: {type(e).__name__}: {e}")


@web.middleware
async def retry_unstarted_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    """A request sent ahead of a free slot (OLLAMAD_SEND_AHEAD) waits in its runner's own queue;
    if that runner ends before the request got any reply, it never ran, and here it was only
    queued: it is handled once more, and gets a new runner, as a request in our queue would."""
    try:
        return await handler(request)
    except UpstreamError as e:
        if not e.unstarted or request.get(STARTED) is not None:
            raise
        log.info("runner went before a request sent ahead to it started; sending it again", error=e.message)
        return await handler(request)


STARTED = "ollamad.started"  # request key: the first answer that began to be sent


async def mark_started(request: web.Request, resp: web.StreamResponse) -> None:
    """on_response_prepare hook: remember the answer whose head went out first."""
    request.setdefault(STARTED, resp)


@web.middleware
async def started_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Once an answer has begun (a stream), an error answer made after it cannot be sent as a
    second HTTP response: its error object ends the stream as a last NDJSON line (an SSE
    ``data:`` event and ``[DONE]`` for event streams). Wraps errors_middleware."""
    resp = await handler(request)
    started: web.StreamResponse | None = request.get(STARTED)
    if started is None or started is resp or not started.prepared or not isinstance(resp, web.Response):
        return resp
    body = resp.body if isinstance(resp.body, bytes) else b""
    try:
        message = json.loads(body)["error"]
    except (ValueError, KeyError, TypeError):
        message = resp.reason or "internal error"
        body = dumps({"error": message})
    log.warning("error after the answer began; ending the stream with it", path=request.path, status=resp.status,
                error=message.get("message") if isinstance(message, dict) else message)
    if started.content_type == "text/event-stream":
        line = b"data: " + body.strip() + b"\n\ndata: [DONE]\n\n"
    else:
        line = body.strip() + b"\n"
    with contextlib.suppress(ConnectionError):  # the client may be gone already
        await started.write(line)
    return started


def _body_deadline(request: web.Request) -> float | None:
    return request.app[CTX].settings.body_timeout or None


def _too_slow(request: web.Request) -> ApiError:
    return ApiError(408, f"request body not received within {_body_deadline(request)} s (OLLAMAD_BODY_TIMEOUT)")


async def read_json(request: web.Request) -> dict[str, Any]:
    try:
        async with asyncio.timeout(_body_deadline(request)):
            raw = await request.read()
    except TimeoutError:
        raise _too_slow(request) from None
    if not raw.strip():
        raise ApiError(400, "missing request body")
    try:
        body = json.loads(raw)
    except (ValueError, UnicodeDecodeError) as e:
        raise ApiError(400, f"invalid JSON: {e}") from None
    except RecursionError:
        raise ApiError(400, "invalid JSON: nested too deeply") from None
    if not isinstance(body, dict):
        raise ApiError(400, "request body must be a JSON object")
    if _SURROGATE.search(raw):  # an escaped lone surrogate cannot be encoded again: a 500 later
        try:
            json.dumps(body, ensure_ascii=False).encode()
        except UnicodeEncodeError:
            raise ApiError(400, "invalid JSON: a string holds a lone surrogate (\\ud800-\\udfff)") from None
    return body


async def read_chunks(request: web.Request, size: int = 1 << 20) -> AsyncIterator[bytes]:
    """An upload's body in chunks; 408 if it pauses longer than OLLAMAD_BODY_TIMEOUT."""
    while True:
        try:
            async with asyncio.timeout(_body_deadline(request)):
                chunk = await request.content.read(size)
        except TimeoutError:
            raise _too_slow(request) from None
        if not chunk:
            return
        yield chunk


def resolve(ctx: AppContext, name: str, need_file: bool = True) -> Model:
    try:
        model = ctx.catalog.resolve(name)
    except InvalidName as e:
        raise ApiError(400, str(e)) from None
    if model is None or (need_file and not model.path.is_file()):  # deleted since the last scan: gone
        raise ApiError(404, f"model '{name}' not found")
    return model


def model_facts(ctx: AppContext, name: str) -> tuple[Model, ModelFacts]:
    """``resolve``, and the model's GGUF facts, with one stat of its file (cached facts are checked
    by size and mtime); a file deleted since the last scan is 404."""
    model = resolve(ctx, name, need_file=False)
    try:
        return model, ctx.catalog.facts(model)
    except FileNotFoundError:
        raise ApiError(404, f"model '{name}' not found") from None


def parse_keep_alive(value: object) -> float | None:
    if value is None:
        return None
    try:
        return keep_alive_from_request(value)
    except ValueError as e:
        raise ApiError(400, f"invalid keep_alive: {e}") from None


def own_options(ctx: AppContext, options: Options) -> Options:
    """A request's options less the load-time ones it may not set (OLLAMAD_REQUEST_LOAD_OPTIONS)."""
    drop = {k: None for k in LOAD_OPTIONS
            if k not in ctx.settings.request_load_options and getattr(options, k) is not None}
    if drop:
        log.debug("load options from the request ignored (OLLAMAD_REQUEST_LOAD_OPTIONS)", options=sorted(drop))
    return options.model_copy(update=drop) if drop else options


def with_defaults(req: _Req, model: Model) -> _Req:
    """The request's own options over the model's (store params, per-model settings), over Ollama's."""
    merged = {**with_ollama_defaults(model.defaults.options), **req.options.model_dump(exclude_none=True)}
    try:
        options = Options.model_validate(merged)
    except ValidationError as e:
        raise ApiError(500, f"model defaults for {model.name}: {describe_validation(e)}") from None
    return req.model_copy(update={"options": options})


def check_capable(name: str, facts: ModelFacts, need: str) -> None:
    """400 ``"x" does not support <need>`` as Ollama answers."""
    caps = capabilities(facts)
    if need not in caps:
        raise ApiError(400, f'"{name}" does not support {need}')


def validate(cls: type[_Body], body: dict[str, Any]) -> _Body:
    """The body as ``cls``; 400 naming the missing model or the wrong fields."""
    if not body.get("model"):
        raise ApiError(400, "model is required")
    try:
        return cls.model_validate(body)
    except ValidationError as e:
        raise ApiError(400, describe_validation(e)) from None


def iso_time(ts: float) -> str:
    import datetime as dt

    return dt.datetime.fromtimestamp(ts, dt.UTC).isoformat(timespec="microseconds").replace("+00:00", "Z")
