"""/api/embed and the legacy /api/embeddings over llama-server's embedding endpoint."""

from __future__ import annotations

import json
import time

from aiohttp import web
from pydantic import BaseModel, ConfigDict, Field, StrictBool

from ollamad.api.common import (
    CTX,
    ApiError,
    dumps,
    own_options,
    parse_keep_alive,
    read_json,
    reply,
    resolve,
    validate,
)
from ollamad.api.embedding import check_count, embed_texts, shorten, stream_embeddings
from ollamad.api.reqlog import record_of
from ollamad.models.options import Options


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



async def embed(request: web.Request) -> web.StreamResponse:
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
    check_count(ctx, texts)

    def tail(tokens: int, queued: float) -> bytes:
        return b"]," + dumps({"total_duration": time.monotonic_ns() - t0, "load_duration": int(queued * 1e9),
                              "prompt_eval_count": tokens})[1:]

    return await stream_embeddings(
        request, ctx, model, req.model, texts, truncate=req.truncate, options=own_options(ctx, req.options),
        keep_alive=keep_alive,
        head=dumps({"model": req.model})[:-2] + b',"embeddings":[',
        item=lambda _, v: json.dumps(shorten(v, req.dimensions), separators=(",", ":")).encode(), tail=tail)


async def embeddings_legacy(request: web.Request) -> web.Response:
    ctx = request.app[CTX]
    req: LegacyEmbedRequest = validate(LegacyEmbedRequest, await read_json(request))
    model = resolve(ctx, req.model)
    keep_alive = parse_keep_alive(req.keep_alive)
    if not req.prompt:
        return reply({"embedding": []})
    check_count(ctx, [req.prompt])
    vectors, _, _ = await embed_texts(ctx, model, req.model, [req.prompt], truncate=True,
                                      options=own_options(ctx, req.options), keep_alive=keep_alive,
                                      record=record_of(request))
    return reply({"embedding": vectors[0]})


def register(app: web.Application) -> None:
    app.router.add_post("/api/embed", embed)
    app.router.add_post("/api/embeddings", embeddings_legacy)
