"""HTTP routes: Ollama's native API (first slice) over the scheduler and runners."""

from __future__ import annotations

import json
import math
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, TypeVar

import aiohttp
import anyio
import structlog
from aiohttp import web
from aiohttp.typedefs import Middleware
from pydantic import BaseModel, ValidationError

from ollamad import __version__
from ollamad.catalog import Catalog, InvalidName, Model
from ollamad.describe import capabilities, details
from ollamad.durations import FOREVER, keep_alive_from_request
from ollamad.ggufmeta import GGUFError
from ollamad.guard import add_cors_headers, auth_middleware, cors_middleware, request_log_middleware
from ollamad.metrics import CONTENT_TYPE, Metrics
from ollamad.modelfacts import ModelFacts
from ollamad.proxy import UpstreamError, error_of, sse_events
from ollamad.reqlog import record_of, request_log
from ollamad.scheduler import Lease, Scheduler, SchedulerError
from ollamad.settings import Settings
from ollamad.translate import (
    ChatRequest,
    GenerateRequest,
    Message,
    Options,
    chat_messages,
    chat_payload,
    completion_payload,
    describe_validation,
    done_reason,
    durations,
    image_data,
    multimodal_prompt,
    now_iso,
    ollama_tool_calls,
    with_media_markers,
)

log = structlog.get_logger("ollamad.api")
NDJSON = "application/x-ndjson"
_Req = TypeVar("_Req", GenerateRequest, ChatRequest)
_Body = TypeVar("_Body", bound=BaseModel)


@dataclass
class AppContext:
    settings: Settings
    catalog: Catalog
    scheduler: Scheduler
    session: aiohttp.ClientSession | None = None
    extra: dict[str, Any] = field(default_factory=dict)


CTX = web.AppKey("ctx", AppContext)


class ApiError(Exception):
    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


def dumps(obj: Any) -> bytes:
    return json.dumps(obj, ensure_ascii=False, separators=(",", ":")).encode() + b"\n"


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
        log.exception("unhandled error", path=request.path)
        return shape(500, f"internal error: {type(e).__name__}: {e}")


async def read_json(request: web.Request) -> dict[str, Any]:
    raw = await request.read()
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
    return body


def resolve(ctx: AppContext, name: str) -> Model:
    try:
        model = ctx.catalog.resolve(name)
    except InvalidName as e:
        raise ApiError(400, str(e)) from None
    if model is None:
        raise ApiError(404, f"model '{name}' not found")
    return model


def parse_keep_alive(value: object) -> float | None:
    if value is None:
        return None
    try:
        return keep_alive_from_request(value)
    except ValueError as e:
        raise ApiError(400, f"invalid keep_alive: {e}") from None


def with_defaults(req: _Req, model: Model) -> _Req:
    """Model defaults (store params, per-model settings) under the request's own options."""
    if not model.defaults.options:
        return req
    merged = {**model.defaults.options, **req.options.model_dump(exclude_none=True)}
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


# --- simple routes ----------------------------------------------------------------------
async def root(request: web.Request) -> web.Response:
    return web.Response(text="Ollama is running")


async def version(request: web.Request) -> web.Response:
    return reply({"version": __version__})


async def tags(request: web.Request) -> web.Response:
    ctx = request.app[CTX]
    out = []
    for m in sorted(ctx.catalog.list(), key=lambda m: -m.modified):
        try:
            facts = ctx.catalog.facts(m)
        except (GGUFError, OSError):
            continue
        digest = await anyio.to_thread.run_sync(ctx.catalog.digest, m)
        out.append({
            "name": m.name, "model": m.name, "modified_at": _iso(m.modified), "size": m.size,
            "digest": digest, "details": details(facts),
        })
    return reply({"models": out})


async def ps(request: web.Request) -> web.Response:
    ctx = request.app[CTX]
    return reply(await ps_body(ctx))


async def ps_body(ctx: AppContext) -> dict[str, Any]:
    sched = ctx.scheduler
    now_mono, now_wall = sched.clock(), time.time()
    models = []
    for rid, r in sorted(sched.state.runners.items()):
        model = ctx.catalog.resolve(r.plan.model)
        facts = ctx.catalog.facts(model) if model else None
        expires: float | None
        if r.status == "stopping":
            expires = now_wall
        elif r.in_flight or r.expires_at is None:
            expires = now_wall + r.keep_alive if r.keep_alive != FOREVER else None
        else:
            expires = now_wall + (r.expires_at - now_mono)
        if expires is not None and math.isinf(expires):
            expires = None
        digest = await anyio.to_thread.run_sync(ctx.catalog.digest, model) if model else ""
        size, memory = r.memory, _memory_fields(sched, rid, r.memory)
        if memory.get("measured_size"):
            size = memory["measured_size"]
        models.append({
            "name": r.plan.model, "model": r.plan.model, "size": size, "digest": digest,
            "details": details(facts) if facts else {},
            "expires_at": _iso(expires) if expires is not None else "2318-08-07T02:09:33.437417Z",
            "size_vram": memory.get("size_vram", 0), "context_length": r.ctx,
            # beyond Ollama's fields
            "runner_id": rid, "status": r.status, "num_parallel": r.plan.num_parallel,
            "busy_slots": r.in_flight, "queued": sched.state.waiting(r.plan.model),
            "pid": sched.runners[rid].pid if rid in sched.runners else None,
            "estimated_size": r.plan.estimate, **memory,
        })
    return {"models": models, "queue": {"waiting": sched.state.waiting(), "max": sched.state.max_queue}}


def _memory_fields(sched: Scheduler, rid: int, memory: int) -> dict[str, Any]:
    """Measured figures beyond Ollama's: RSS, VRAM, what llama-server reported, the split."""
    acct = sched.accountant
    rm = acct.runners.get(rid) if acct is not None else None
    if rm is None:
        return {"size_vram": 0, "processor": "100% CPU"}
    out: dict[str, Any] = {"size_vram": rm.size_vram, "processor": rm.processor,
                           "reported_size": rm.reported.total, "accounted_size": memory}
    if rm.measured:
        out.update(measured_size=rm.used, size_rss=rm.rss)
    if rm.placement is not None:
        out.update(gpus=list(rm.placement.gpus), n_gpu_layers=rm.placement.n_gpu_layers)
    return out


def _iso(ts: float) -> str:
    import datetime as dt

    return dt.datetime.fromtimestamp(ts, dt.UTC).isoformat(timespec="microseconds").replace("+00:00", "Z")


# --- generate and chat ------------------------------------------------------------------
async def generate(request: web.Request) -> web.StreamResponse:
    ctx = request.app[CTX]
    t0 = time.monotonic_ns()
    req = validate(GenerateRequest, await read_json(request))
    model = resolve(ctx, req.model)
    record_of(request).model = model.name
    facts = ctx.catalog.facts(model)
    check_capable(req.model, facts, "generate" if facts.embedding else "completion")
    images: list[str] = []
    if req.images:
        check_capable(req.model, facts, "vision")
        try:
            images = image_data(req.images)
        except ValueError as e:
            raise ApiError(400, str(e)) from None
    if req.suffix:
        check_capable(req.model, facts, "insert")
    if req.system is None and model.system:
        req = req.model_copy(update={"system": model.system})
    req = with_defaults(req, model)
    keep_alive = parse_keep_alive(req.keep_alive)
    if not req.prompt and not req.images:
        return await load_or_unload(ctx, model, req.model, keep_alive, req.options.num_ctx,
                                    {"response": ""})
    lease = await ctx.scheduler.acquire(model, num_ctx=req.options.num_ctx,
                                        load=req.options.load_options(), keep_alive=keep_alive)
    _dispatched(request, model, lease)
    async with lease:
        if req.suffix:  # fill in the middle: the prompt is the prefix, no chat template
            payload = completion_payload(req, "", stream=True)
            payload.update(input_prefix=req.prompt, input_suffix=req.suffix)
            return await relay(request, ctx, lease, "/infill", payload, req.stream, t0, _GenerateShape(req.model))
        prompt = await _generate_prompt(ctx, lease, req, facts, len(images))
        payload = completion_payload(req, multimodal_prompt(prompt, images), stream=True)
        return await relay(request, ctx, lease, "/completion", payload, req.stream, t0,
                           _GenerateShape(req.model))


async def _generate_prompt(ctx: AppContext, lease: Lease, req: GenerateRequest, facts: ModelFacts,
                           images: int = 0) -> str:
    """Ollama applies the model's chat template to a generate prompt unless raw is set."""
    if req.raw or not facts.chat_template:
        return with_media_markers(req.prompt, images)
    messages = []
    if req.system:
        messages.append({"role": "system", "content": req.system})
    messages.append({"role": "user", "content": with_media_markers(req.prompt, images)})
    return await apply_template(ctx, lease, messages)


async def runner_json(ctx: AppContext, lease: Lease, path: str, payload: dict[str, Any]) -> Any:
    """POST ``payload`` to the lease's runner and return its JSON answer; UpstreamError otherwise."""
    assert ctx.session is not None
    async with ctx.session.post(f"{lease.runner.url}{path}", json=payload, headers=lease.runner.headers) as up:
        if up.status != 200:
            raise await error_of(up)
        return await up.json()


async def apply_template(ctx: AppContext, lease: Lease, messages: list[dict[str, Any]]) -> str:
    """The prompt llama-server's chat template makes of ``messages``."""
    body = await runner_json(ctx, lease, "/apply-template", {"messages": messages})
    return str(body.get("prompt", ""))


async def chat(request: web.Request) -> web.StreamResponse:
    ctx = request.app[CTX]
    t0 = time.monotonic_ns()
    req = validate(ChatRequest, await read_json(request))
    model = resolve(ctx, req.model)
    record_of(request).model = model.name
    facts = ctx.catalog.facts(model)
    check_capable(req.model, facts, "chat" if facts.embedding else "completion")
    if any(m.images for m in req.messages):
        check_capable(req.model, facts, "vision")
    if req.tools:
        check_capable(req.model, facts, "tools")
    if model.system and req.messages and not any(m.role == "system" for m in req.messages):
        req = req.model_copy(update={"messages": [Message(role="system", content=model.system), *req.messages]})
    req = with_defaults(req, model)
    keep_alive = parse_keep_alive(req.keep_alive)
    if not req.messages:
        return await load_or_unload(ctx, model, req.model, keep_alive, req.options.num_ctx,
                                    {"message": {"role": "assistant", "content": ""}})
    try:
        payload = chat_payload(req, stream=True)
    except ValueError as e:
        raise ApiError(400, str(e)) from None
    lease = await ctx.scheduler.acquire(model, num_ctx=req.options.num_ctx,
                                        load=req.options.load_options(), keep_alive=keep_alive)
    _dispatched(request, model, lease)
    async with lease:
        if req.format and not req.tools and not any(m.images for m in req.messages):
            # As Ollama does: render the template, then constrain only the reply with the grammar
            prompt = await apply_template(ctx, lease, chat_messages(req))
            gen = GenerateRequest(model=req.model, prompt=prompt, format=req.format, options=req.options)
            return await relay(request, ctx, lease, "/completion", completion_payload(gen, prompt), req.stream,
                               t0, _TemplatedChatShape(req.model))
        return await relay(request, ctx, lease, "/v1/chat/completions", payload, req.stream, t0,
                           _ChatShape(req.model))


def _dispatched(request: web.Request, model: Model, lease: Lease) -> None:
    r = lease.runner
    record_of(request).dispatched(model.name, lease.queued_for, r.ready_at, r.started_at)


async def load_or_unload(ctx: AppContext, model: Model, name: str, keep_alive: float | None,
                         num_ctx: int | None, empty: dict[str, Any]) -> web.Response:
    """Empty prompt: load the model (done_reason "load"), or with keep_alive 0 unload it."""
    if keep_alive == 0:
        ctx.scheduler.unload(model)
        reason = "unload"
    else:
        lease = await ctx.scheduler.acquire(model, num_ctx=num_ctx, keep_alive=keep_alive, load_only=True)
        lease.release()
        reason = "load"
    return reply({"model": name, "created_at": now_iso(), **empty, "done": True,
                              "done_reason": reason})


class _GenerateShape:
    """How generate chunks look."""

    def __init__(self, model: str) -> None:
        self.model = model
        self.text: list[str] = []

    def piece(self, event: dict[str, Any]) -> dict[str, Any] | None:
        content = event.get("content") or ""
        if not content:
            return None
        self.text.append(content)
        return {"model": self.model, "created_at": now_iso(), "response": content, "done": False}

    def is_final(self, event: dict[str, Any]) -> bool:
        return bool(event.get("stop"))

    def final(self, event: dict[str, Any], total_ns: int, load_ns: int, whole: bool) -> dict[str, Any]:
        return {
            "model": self.model, "created_at": now_iso(), "response": "".join(self.text) if whole else "",
            "done": True, "done_reason": done_reason(event.get("stop_type")),
            **durations(event.get("timings"), total_ns, load_ns, event.get("tokens_evaluated")),
        }


class _TemplatedChatShape(_GenerateShape):
    """Chat chunks made from a /completion stream (chat with ``format``)."""

    def piece(self, event: dict[str, Any]) -> dict[str, Any] | None:
        return _as_chat(super().piece(event))

    def final(self, event: dict[str, Any], total_ns: int, load_ns: int, whole: bool) -> dict[str, Any]:
        out = _as_chat(super().final(event, total_ns, load_ns, whole))
        assert out is not None
        return out


def _as_chat(chunk: dict[str, Any] | None) -> dict[str, Any] | None:
    """A generate chunk as a chat chunk, in Ollama's key order (message before done)."""
    if chunk is None:
        return None
    out: dict[str, Any] = {"model": chunk["model"], "created_at": chunk["created_at"],
                           "message": {"role": "assistant", "content": chunk["response"]}}
    out.update((k, v) for k, v in chunk.items() if k not in out and k != "response")
    return out


class _ChatShape:
    """How chat chunks look; tool calls are gathered and sent whole."""

    def __init__(self, model: str) -> None:
        self.model = model
        self.text: list[str] = []
        self.thinking: list[str] = []
        self.calls: dict[int, dict[str, Any]] = {}
        self.finish: str | None = None
        self.timings: dict[str, Any] | None = None
        self.prompt_tokens: int | None = None

    def piece(self, event: dict[str, Any]) -> dict[str, Any] | None:
        if event.get("timings"):
            self.timings = event["timings"]
        if event.get("usage"):
            self.prompt_tokens = event["usage"].get("prompt_tokens")
        choices = event.get("choices") or []
        if not choices:
            return None
        choice = choices[0]
        self.finish = choice.get("finish_reason") or self.finish
        delta = choice.get("delta") or {}
        for tc in delta.get("tool_calls") or []:
            slot = self.calls.setdefault(tc.get("index", 0), {"function": {"name": "", "arguments": ""}})
            fn = tc.get("function") or {}
            slot["function"]["name"] += fn.get("name") or ""
            slot["function"]["arguments"] += fn.get("arguments") or ""
        content = delta.get("content") or ""
        thinking = delta.get("reasoning_content") or ""
        if not content and not thinking:
            return None
        self.text.append(content)
        self.thinking.append(thinking)
        msg: dict[str, Any] = {"role": "assistant", "content": content}
        if thinking:
            msg["thinking"] = thinking
        return {"model": self.model, "created_at": now_iso(), "message": msg, "done": False}

    def is_final(self, event: dict[str, Any]) -> bool:
        return False  # the chat stream ends with [DONE], after the usage chunk

    def final(self, event: dict[str, Any], total_ns: int, load_ns: int, whole: bool) -> dict[str, Any]:
        msg: dict[str, Any] = {"role": "assistant", "content": "".join(self.text) if whole else ""}
        if whole and any(self.thinking):
            msg["thinking"] = "".join(self.thinking)
        if self.calls:
            msg["tool_calls"] = ollama_tool_calls([self.calls[i] for i in sorted(self.calls)])
        return {
            "model": self.model, "created_at": now_iso(), "message": msg, "done": True,
            "done_reason": done_reason(None, self.finish),
            **durations(self.timings, total_ns, load_ns, self.prompt_tokens),
        }


async def relay(request: web.Request, ctx: AppContext, lease: Lease, path: str, payload: dict[str, Any],
                stream: bool, t0: int, shape: _GenerateShape | _ChatShape) -> web.StreamResponse:
    """Send ``payload`` to the runner and translate its event stream into NDJSON (or one object)."""
    try:
        return await _relay(request, ctx, lease, path, payload, stream, t0, shape)
    except UpstreamError as e:
        if e.lost:
            lease.lost(e.message)
        raise
    except aiohttp.ClientError as e:  # could not connect, or cut before the reply began
        if request.transport is None or request.transport.is_closing():
            # our own client went away (a write to it failed): the runner is fine, keep it
            return web.Response(status=499)
        lease.lost(str(e))
        raise UpstreamError(500, f"llama-server is not answering: {e or type(e).__name__}") from None


async def _relay(request: web.Request, ctx: AppContext, lease: Lease, path: str, payload: dict[str, Any],
                 stream: bool, t0: int, shape: _GenerateShape | _ChatShape) -> web.StreamResponse:
    assert ctx.session is not None
    load_ns = int(lease.queued_for * 1e9)
    async with ctx.session.post(f"{lease.runner.url}{path}", json=payload, headers=lease.runner.headers) as up:
        if up.status != 200:
            raise await error_of(up)
        rec = record_of(request)
        if not stream:
            last: dict[str, Any] = {}
            async for event in sse_events(up):
                if shape.piece(event) is not None:
                    rec.first_token()
                last = event
            final = shape.final(last, time.monotonic_ns() - t0, load_ns, whole=True)
            rec.finished(final)
            return reply(final)
        resp = web.StreamResponse(headers={"Content-Type": NDJSON})
        await resp.prepare(request)
        last = {}
        try:
            async for event in sse_events(up):
                last = event
                chunk = shape.piece(event)
                if chunk is not None:
                    rec.first_token()
                    await resp.write(dumps(chunk))
                if shape.is_final(event):
                    break
        except UpstreamError as e:
            log.warning("stream cut", model=shape.model, error=e.message)
            if e.lost:
                lease.lost(e.message)
            await resp.write(dumps({"error": e.message}))
            return resp
        final = shape.final(last, time.monotonic_ns() - t0, load_ns, whole=False)
        rec.finished(final)
        await resp.write(dumps(final))
        return resp


async def metrics(request: web.Request) -> web.Response:
    body = request.app[METRICS].render()
    return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE})


METRICS = web.AppKey("metrics", Metrics)


def make_app(ctx: AppContext) -> web.Application:
    from ollamad import api_embed, api_models, api_openai

    s = ctx.settings
    observed = Metrics(ctx.scheduler)
    # CORS outermost (preflights), then one log line and metrics for every request, auth included
    middlewares: list[Middleware] = [cors_middleware(s.origins), request_log(observed)]
    if s.api_key:
        middlewares.append(auth_middleware(s.api_key))
    middlewares += [errors_middleware, request_log_middleware(s.log_requests)]
    app = web.Application(middlewares=middlewares, client_max_size=s.max_body)
    app.on_response_prepare.append(add_cors_headers)
    app[CTX] = ctx
    app[METRICS] = observed
    app.router.add_get("/metrics", metrics)
    app.router.add_get("/", root)
    app.router.add_get("/api/version", version)
    app.router.add_get("/api/tags", tags)
    app.router.add_get("/api/ps", ps)
    app.router.add_post("/api/generate", generate)
    app.router.add_post("/api/chat", chat)
    api_models.register(app)
    api_embed.register(app)
    api_openai.register(app)
    return app
