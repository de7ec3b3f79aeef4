"""Ollama's native routes: /, /api/version, /api/tags, /api/ps, /api/generate, /api/chat."""

from __future__ import annotations

import asyncio
import math
import time
from collections.abc import Awaitable
from typing import Any

from aiohttp import web

from ollamad import __version__
from ollamad.api.chunks import ChatShape, GenerateShape, TemplatedChatShape
from ollamad.api.common import (
    CTX,
    ApiError,
    AppContext,
    check_capable,
    iso_time,
    model_facts,
    own_options,
    parse_keep_alive,
    read_json,
    reply,
    validate,
    with_defaults,
)
from ollamad.api.limits import check_prompt, check_schemas
from ollamad.api.relay import relay
from ollamad.api.reqlog import record_of
from ollamad.api.runner_calls import apply_template
from ollamad.api.translate import (
    ChatRequest,
    GenerateRequest,
    Message,
    cap_predict,
    chat_payload,
    completion_payload,
    image_data,
    multimodal_prompt,
    now_iso,
    with_media_markers,
)
from ollamad.api.truncate import cut_prompt, fit_messages, limit_of, rendered, tokenize, too_long
from ollamad.durations import FOREVER
from ollamad.models.catalog import Model
from ollamad.models.describe import details
from ollamad.models.facts import ModelFacts
from ollamad.models.ggufmeta import GGUFError
from ollamad.runner.events import UpstreamError
from ollamad.sched.lease import Lease
from ollamad.sched.scheduler import Scheduler
from ollamad.sched.workerlink import held


# --- simple routes ----------------------------------------------------------------------
async def root(request: web.Request) -> web.Response:
    return web.Response(text="Ollama is running")


async def version(request: web.Request) -> web.Response:
    return reply({"version": __version__})


async def tags(request: web.Request) -> web.Response:
    ctx = request.app[CTX]
    out = []
    for m in sorted(ctx.catalog.list(), key=lambda m: -m.modified):
        try:  # a bad or vanished file is left out (the catalog logs a bad one once)
            facts = ctx.catalog.facts(m)
            digest = ctx.catalog.digest(m)  # known, or "" while the background hash runs: never hashed here
        except (GGUFError, OSError):
            continue
        out.append({
            "name": m.name, "model": m.name, "modified_at": iso_time(m.modified), "size": m.size,
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
        facts, digest = await _facts_and_digest(ctx, model)
        expires: float | None
        if r.status == "stopping":
            expires = now_wall
        elif r.in_flight or r.expires_at is None:
            expires = now_wall + r.keep_alive if r.keep_alive != FOREVER else None
        else:
            expires = now_wall + (r.expires_at - now_mono)
        if expires is not None and math.isinf(expires):
            expires = None
        size, memory = r.memory, _memory_fields(sched, rid, r.memory)
        if memory.get("measured_size"):
            size = memory["measured_size"]
        size += memory.get("size_rpc", 0)
        models.append({
            "name": r.plan.model, "model": r.plan.model, "size": size, "digest": digest,
            "details": details(facts) if facts else {},
            "expires_at": iso_time(expires) if expires is not None else "2318-08-07T02:09:33.437417Z",
            "size_vram": memory.get("size_vram", 0), "context_length": r.ctx,
            # beyond Ollama's fields
            "runner_id": rid, "status": r.status, "num_parallel": r.plan.num_parallel,
            "busy_slots": r.running, "queued": sched.state.waiting(r.plan.model),
            "pid": sched.runners[rid].pid if rid in sched.runners else None,
            "estimated_size": r.plan.estimate, **memory,
        })
    body: dict[str, Any] = {"models": models, "queue": {"waiting": sched.state.waiting(), "max": sched.state.max_queue}}
    if sched.workers is not None:  # OLLAMAD_RPC_WORKERS: what the last check of each said, but a
        in_use = held(sched.state)  # worker a runner uses now is held, whenever that check ran
        body["rpc_workers"] = [{"endpoint": w.endpoint, "free": w.free, "error": w.error,
                                "state": "held" if w.endpoint in in_use and w.state != "down" else w.state}
                               for w in sched.workers.status.values()]
    return body


async def _facts_and_digest(ctx: AppContext, model: Model | None) -> tuple[ModelFacts | None, str]:
    """What /api/ps shows of a loaded model's file; nothing when it was deleted or broken since."""
    if model is None:
        return None, ""
    try:
        return ctx.catalog.facts(model), ctx.catalog.digest(model)
    except (GGUFError, OSError):
        return None, ""


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
    if rm.gpu_layers is not None:  # what llama-server did: a request's num_gpu wins
        out["n_gpu_layers"] = rm.gpu_layers
    if rm.plan.rpc:  # split over RPC workers: which, and what is on each (reported, else planned)
        out["rpc_workers"] = [{"endpoint": ep, "size": rm.workers.get(ep, planned), "planned_size": planned}
                              for ep, planned in zip(rm.plan.rpc, rm.plan.remote, strict=True)]
        out["size_rpc"] = sum(w["size"] for w in out["rpc_workers"])
    return out




# --- generate and chat ------------------------------------------------------------------
async def generate(request: web.Request) -> web.StreamResponse:
    ctx = request.app[CTX]
    t0 = time.monotonic_ns()
    req = validate(GenerateRequest, await read_json(request))
    req = req.model_copy(update={"options": own_options(ctx, req.options)})
    check_schemas(ctx.settings, req.format)
    check_prompt(ctx.settings, (req.prompt, req.system, req.suffix))
    model, facts = model_facts(ctx, req.model)
    record_of(request).model = model.name
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
    if req.context and not req.raw and facts.vocab and not all(0 <= t < facts.vocab for t in req.context):
        raise ApiError(400, f"context holds token ids that {req.model} does not have (0..{facts.vocab - 1})")
    if req.system is None and model.system:
        req = req.model_copy(update={"system": model.system})
    req = with_defaults(req, model)
    keep_alive = parse_keep_alive(req.keep_alive)
    if not req.prompt and not req.images:
        return await load_or_unload(ctx, model, req.model, keep_alive, req.options.num_ctx,
                                    {"response": ""})
    lease = await ctx.scheduler.acquire(model, num_ctx=req.options.num_ctx, load=req.options.load_options(),
                                        keep_alive=keep_alive, facts=facts)
    record_of(request).dispatched(model.name, lease)
    async with lease:
        if req.suffix:  # fill in the middle: the prompt is the prefix, no chat template
            payload = cap_predict(completion_payload(req, "", stream=True), lease.runner.plan.ctx)
            payload.update(input_prefix=req.prompt, input_suffix=req.suffix)
            return await relay(request, ctx, lease, "/infill", payload, req.stream, t0, GenerateShape(req.model))
        prompt = await _generate_prompt(ctx, lease, req, facts, len(images))
        if images or req.raw:  # sent as text; a raw prompt is cut only if llama-server refuses it
            payload = cap_predict(completion_payload(req, multimodal_prompt(prompt, images)), lease.runner.plan.ctx)
            try:
                return await relay(request, ctx, lease, "/completion", payload, req.stream, t0,
                                   GenerateShape(req.model))
            except UpstreamError as e:
                if images or not req.truncate or not too_long(e):
                    raise
            tokens = await tokenize(ctx, lease, prompt)
        elif not req.context:
            try:
                return await _with_context(request, ctx, lease, req, prompt, t0)
            except UpstreamError as e:
                if not too_long(e):
                    raise
            tokens = await tokenize(ctx, lease, prompt)  # cut as Ollama cuts it (or 400 with truncate false)
        else:  # as tokens: the context Ollama returned with an earlier reply, then the new prompt's
            tokens = list(req.context) + await tokenize(ctx, lease, prompt, special=False)
        tokens = _fitted(req, lease, facts, tokens)
        payload = cap_predict(completion_payload(req, tokens), lease.runner.plan.ctx)
        if req.raw:
            return await relay(request, ctx, lease, "/completion", payload, req.stream, t0, GenerateShape(req.model))
        payload["return_tokens"] = True
        return await relay(request, ctx, lease, "/completion", payload, req.stream, t0,
                           ContextShape(req.model, tokens))


def _fitted(req: GenerateRequest | ChatRequest, lease: Lease, facts: ModelFacts, tokens: list[int]) -> list[int]:
    """``tokens`` cut to the slot's context as Ollama cuts a prompt; 400 if the request said truncate false."""
    limit = limit_of(lease)
    if len(tokens) > limit and not req.truncate:
        raise ApiError(400, f"input length ({len(tokens)} tokens) exceeds the context length ({limit + 1} tokens)")
    num_keep = req.options.num_keep if req.options.num_keep is not None else 4
    return cut_prompt(req.model, tokens, limit, num_keep, facts.bos_token)


async def _with_context(request: web.Request, ctx: AppContext, lease: Lease, req: GenerateRequest, prompt: str,
                        t0: int) -> web.StreamResponse:
    """The prompt sent as text, as a client would send it straight to llama-server; its tokens, for
    the final chunk's ``context``, come from a /tokenize sent alongside: one round trip to the
    runner before the first token, not two. A prompt too long for the slot comes back as
    llama-server's 400 (raised here), and the caller cuts it as Ollama does."""
    tokens = asyncio.ensure_future(tokenize(ctx, lease, prompt))
    try:
        payload = cap_predict(completion_payload(req, prompt), lease.runner.plan.ctx)
        payload["return_tokens"] = True
        return await relay(request, ctx, lease, "/completion", payload, req.stream, t0,
                           ContextShape(req.model, tokens))
    finally:
        if not tokens.done():
            tokens.cancel()
        elif not tokens.cancelled():
            tokens.exception()  # retrieved: its failure, if any, was the reply's (or is moot after one)


class ContextShape(GenerateShape):
    """Generate chunks whose final one carries ``context``: the prompt's tokens and the reply's.
    The prompt's may still be on their way (``_with_context``): ``settle`` waits for them."""

    def __init__(self, model: str, prompt: list[int] | Awaitable[list[int]]) -> None:
        super().__init__(model)
        self.prompt: list[int] = prompt if isinstance(prompt, list) else []
        self.pending = None if isinstance(prompt, list) else prompt
        self.tokens: list[int] = []  # the reply's

    def piece(self, data: bytes) -> bytes | None:
        chunk = super().piece(data)
        self.tokens.extend(self.last.tokens)  # also a token that is only part of a character
        return chunk

    async def settle(self) -> None:
        if self.pending is not None:
            self.prompt, self.pending = await self.pending, None

    def final(self, total_ns: int, load_ns: int, text: str = "") -> dict[str, Any]:
        return {**super().final(total_ns, load_ns, text), "context": [*self.prompt, *self.tokens]}


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


async def chat(request: web.Request) -> web.StreamResponse:
    ctx = request.app[CTX]
    t0 = time.monotonic_ns()
    req = validate(ChatRequest, await read_json(request))
    req = req.model_copy(update={"options": own_options(ctx, req.options)})
    check_schemas(ctx.settings, req.format, req.tools)
    check_prompt(ctx.settings, (m.content for m in req.messages))
    model, facts = model_facts(ctx, req.model)
    record_of(request).model = model.name
    check_capable(req.model, facts, "chat" if facts.embedding else "completion")
    if any(m.images for m in req.messages):
        check_capable(req.model, facts, "vision")
    if req.tools:
        check_capable(req.model, facts, "tools")
    if model.system and req.messages and not any(m.role == "system" for m in req.messages):
        req = req.model_copy(update={"messages": [Message(role="system", content=model.system), *req.messages]})
    if not facts.chat_template:  # Ollama's {{ .Prompt }}: the user turns only (plan.PROMPT_ONLY_TEMPLATE)
        req = req.model_copy(update={"messages": [m for m in req.messages if m.role != "system"]})
    req = with_defaults(req, model)
    keep_alive = parse_keep_alive(req.keep_alive)
    if not req.messages:
        return await load_or_unload(ctx, model, req.model, keep_alive, req.options.num_ctx,
                                    {"message": {"role": "assistant", "content": ""}})
    try:
        payload = chat_payload(req, stream=True)
    except ValueError as e:
        raise ApiError(400, str(e)) from None
    lease = await ctx.scheduler.acquire(model, num_ctx=req.options.num_ctx, load=req.options.load_options(),
                                        keep_alive=keep_alive, facts=facts)
    record_of(request).dispatched(model.name, lease)
    async with lease:
        cap_predict(payload, lease.runner.plan.ctx)
        templated = bool(req.format and not req.tools and not any(m.images for m in req.messages))
        try:
            if templated:  # as Ollama does: render the template, constrain only the reply with the grammar
                prompt = await apply_template(ctx, lease, payload["messages"])
                return await _templated_chat(request, ctx, lease, req, prompt, t0)
            return await relay(request, ctx, lease, "/v1/chat/completions", payload, req.stream, t0,
                               ChatShape(req.model))
        except UpstreamError as e:
            if not req.truncate or not too_long(e) or any(m.images for m in req.messages):
                raise
        kept, fits = await fit_messages(ctx, lease, req.model, payload["messages"], req.tools)
        if fits and not templated:
            return await relay(request, ctx, lease, "/v1/chat/completions", {**payload, "messages": kept},
                               req.stream, t0, ChatShape(req.model))
        tokens = _fitted(req, lease, facts, await tokenize(ctx, lease, await rendered(ctx, lease, kept, req.tools)))
        return await _templated_chat(request, ctx, lease, req, tokens, t0)


async def _templated_chat(request: web.Request, ctx: AppContext, lease: Lease, req: ChatRequest,
                          prompt: str | list[int], t0: int) -> web.StreamResponse:
    """A chat sent to /completion as a rendered prompt (text or tokens), answered in chat chunks."""
    gen = GenerateRequest(model=req.model, format=req.format, options=req.options)
    payload = cap_predict(completion_payload(gen, prompt), lease.runner.plan.ctx)
    return await relay(request, ctx, lease, "/completion", payload, req.stream, t0, TemplatedChatShape(req.model))


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




def register(app: web.Application) -> None:
    app.router.add_get("/", root)
    app.router.add_get("/api/version", version)
    app.router.add_get("/api/tags", tags)
    app.router.add_get("/api/ps", ps)
    app.router.add_post("/api/generate", generate)
    app.router.add_post("/api/chat", chat)
