"""/api/embed and the legacy /api/embeddings over llama-server's embedding endpoint."""

from __future__ import annotations

import math
import time
from typing import Any

from aiohttp import web
from pydantic import BaseModel, ConfigDict, Field, StrictBool

from ollamad.api import (
    CTX,
    ApiError,
    AppContext,
    parse_keep_alive,
    read_json,
    reply,
    resolve,
    runner_json,
    validate,
)
from ollamad.catalog import Model
from ollamad.proxy import error_of
from ollamad.scheduler import Lease
from ollamad.translate import Options


class EmbedRequest(BaseModel):
    model_config = ConfigDict(extra="ignore")

    model: str = Field(min_length=1)
    input: str | list[str] = ""
    truncate: StrictBool = True
    dimensions: int | None = Field(None, ge=1, le=1 << 20)
    options: Options = Field(default_factory=lambda: Options())
    keep_alive: float | str | None = None


class LegacyEmbedRequest(BaseModel):
    model_config = ConfigDict(extra="ignore")

    model: str = Field(min_length=1)
    prompt: str = ""
    options: Options = Field(default_factory=lambda: Options())
    keep_alive: float | str | None = None



def shorten(vector: list[float], dimensions: int | None) -> list[float]:
    """Ollama's ``dimensions``: keep the first N values and re-normalise (pure)."""
    if dimensions is None or dimensions >= len(vector):
        return vector
    cut = vector[:dimensions]
    norm = math.sqrt(sum(x * x for x in cut)) or 1.0
    return [x / norm for x in cut]


async def embed_texts(ctx: AppContext, model: Model, name: str, texts: list[str], *, truncate: bool,
                      options: Options, keep_alive: float | None) -> tuple[list[list[float]], int, float]:
    """Embed ``texts`` on a runner for ``model``: (vectors, prompt tokens, seconds queued+loading)."""
    if not ctx.catalog.facts(model).embedding:
        raise ApiError(400, f'"{name}" does not support embeddings')
    lease = await ctx.scheduler.acquire(model, num_ctx=options.num_ctx, load=options.load_options(),
                                        keep_alive=keep_alive)
    async with lease:
        inputs: list[Any] = []
        for text in texts:
            tokens = await _tokenize(ctx, lease, text)
            if len(tokens) > lease.runner.plan.ctx:
                if not truncate:
                    raise ApiError(400, "input exceeds maximum context length")
                inputs.append(tokens[: lease.runner.plan.ctx])
            else:
                inputs.append(tokens)
        body = await runner_json(ctx, lease, "/v1/embeddings", {"input": inputs})
    data = sorted(body.get("data") or [], key=lambda d: d.get("index", 0))
    vectors = [[float(x) for x in d["embedding"]] for d in data]
    return vectors, int((body.get("usage") or {}).get("prompt_tokens", 0)), lease.queued_for


async def _tokenize(ctx: AppContext, lease: Lease, text: str) -> list[int]:
    assert ctx.session is not None
    async with ctx.session.post(f"{lease.runner.url}/tokenize", json={"content": text, "add_special": True},
                                headers=lease.runner.headers) as up:
        if up.status != 200:
            raise await error_of(up)
        body = await up.json()
    return [int(t) for t in body.get("tokens", [])]


async def embed(request: web.Request) -> web.Response:
    ctx = request.app[CTX]
    t0 = time.monotonic_ns()
    req: EmbedRequest = validate(EmbedRequest, await read_json(request))
    model = resolve(ctx, req.model)
    keep_alive = parse_keep_alive(req.keep_alive)
    texts = [req.input] if isinstance(req.input, str) else list(req.input)
    if not texts or texts == [""]:
        if not ctx.catalog.facts(model).embedding:
            raise ApiError(400, f'"{req.model}" does not support embeddings')
        return reply({"model": req.model, "embeddings": []})
    vectors, tokens, queued = await embed_texts(ctx, model, req.model, texts, truncate=req.truncate,
                                                options=req.options, keep_alive=keep_alive)
    return reply({
        "model": req.model, "embeddings": [shorten(v, req.dimensions) for v in vectors],
        "total_duration": time.monotonic_ns() - t0, "load_duration": int(queued * 1e9),
        "prompt_eval_count": tokens,
    })


async def embeddings_legacy(request: web.Request) -> web.Response:
    ctx = request.app[CTX]
    req: LegacyEmbedRequest = validate(LegacyEmbedRequest, await read_json(request))
    model = resolve(ctx, req.model)
    keep_alive = parse_keep_alive(req.keep_alive)
    if not req.prompt:
        return reply({"embedding": []})
    vectors, _, _ = await embed_texts(ctx, model, req.model, [req.prompt], truncate=True,
                                      options=req.options, keep_alive=keep_alive)
    return reply({"embedding": vectors[0]})


def register(app: web.Application) -> None:
    app.router.add_post("/api/embed", embed)
    app.router.add_post("/api/embeddings", embeddings_legacy)
