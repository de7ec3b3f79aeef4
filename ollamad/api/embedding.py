"""Embedding work shared by the native and OpenAI embedding routes: tokenize, truncate to the
runner's context, embed, and shorten to ``dimensions``."""

from __future__ import annotations

import math
from typing import Any

from ollamad.api.common import ApiError, AppContext, runner_json
from ollamad.models.catalog import Model
from ollamad.models.options import Options
from ollamad.runner.events import error_of
from ollamad.sched.scheduler import Lease


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
