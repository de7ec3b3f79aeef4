"""Prompts longer than the context, cut as Ollama cuts them, with a log line that says so.

A chat keeps its system messages and as many of the newest messages as fit (the last one always);
a prompt that still does not fit (or a generate prompt) keeps its first ``num_keep`` tokens and
as many of its last ones as fit. llama-server itself refuses such a request with a 400, so the
routes send the request as it is and cut it only when that 400 comes back: a prompt that fits
costs nothing extra.
"""

from __future__ import annotations

from typing import Any

import structlog

from ollamad.api.common import ApiError, AppContext
from ollamad.api.runner_calls import runner_json
from ollamad.models.catalog import Model
from ollamad.runner.events import UpstreamError
from ollamad.sched.lease import Lease

log = structlog.get_logger("ollamad.api")
TOO_LONG = "exceeds the available context size"


def too_long(e: UpstreamError) -> bool:
    """Is this llama-server's answer to a prompt longer than the slot's context?"""
    return e.status == 400 and TOO_LONG in e.message


def limit_of(lease: Lease) -> int:
    """The most prompt tokens a slot of the lease's runner takes (llama-server wants fewer than n_ctx)."""
    return max(lease.runner.plan.ctx - 1, 1)


def keep_tokens(tokens: list[int], limit: int, num_keep: int, bos: int | None = None) -> list[int]:
    """Ollama's runner truncation: the first ``num_keep`` tokens (+ BOS) and the last ones that fit (pure)."""
    if len(tokens) <= limit:
        return tokens
    keep = len(tokens) if num_keep < 0 else num_keep
    if bos is not None and tokens and tokens[0] == bos:
        keep += 1
    keep = max(min(keep, limit - 1), 0)  # at least one token of the end survives
    return tokens[:keep] + tokens[len(tokens) - (limit - keep):]


def with_systems(messages: list[dict[str, Any]], start: int) -> list[dict[str, Any]]:
    """The system messages before ``start``, then every message from ``start`` on (pure)."""
    return [m for m in messages[:start] if m.get("role") == "system"] + messages[start:]


async def tokenize(ctx: AppContext, lease: Lease, text: str, special: bool = True) -> list[int]:
    body = await runner_json(ctx, lease, "/tokenize",
                             {"content": text, "add_special": special, "parse_special": True})
    return [int(t) for t in body.get("tokens", [])]


async def rendered(ctx: AppContext, lease: Lease, messages: list[dict[str, Any]],
                   tools: list[dict[str, Any]] | None) -> str:
    payload: dict[str, Any] = {"messages": messages}
    if tools:
        payload["tools"] = tools
    body = await runner_json(ctx, lease, "/apply-template", payload)
    return str(body.get("prompt", ""))


async def fit_messages(ctx: AppContext, lease: Lease, model: str, messages: list[dict[str, Any]],
                       tools: list[dict[str, Any]] | None = None) -> tuple[list[dict[str, Any]], bool]:
    """The newest messages that fit (with every earlier system message): (messages, whether they fit).

    As Ollama's chatPrompt, which walks back from the newest message; a binary search finds the
    same cut with log2(n) renderings instead of n.
    """
    limit = limit_of(lease)

    async def size(start: int) -> int:
        return len(await tokenize(ctx, lease, await rendered(ctx, lease, with_systems(messages, start), tools)))

    last = len(messages) - 1
    lo, hi = 0, last  # the answer lies in [lo, hi]; ``hi`` (the last message alone) is always taken
    while lo < hi:
        mid = (lo + hi) // 2
        if await size(mid) <= limit:
            hi = mid
        else:
            lo = mid + 1
    kept = with_systems(messages, lo)
    fits = lo < last or await size(lo) <= limit
    log.warning("truncating input messages which exceed context length", model=model, limit=limit,
                messages=len(messages), kept=len(kept), dropped=len(messages) - len(kept))
    return kept, fits


def cut_prompt(model: str, tokens: list[int], limit: int, num_keep: int, bos: int | None) -> list[int]:
    """keep_tokens with Ollama's log line when it cuts anything."""
    kept = keep_tokens(tokens, limit, num_keep, bos)
    if len(kept) < len(tokens):
        log.warning("truncating input prompt", model=model, limit=limit, prompt=len(tokens),
                    keep=num_keep, new=len(kept))
    return kept


async def fit_openai(ctx: AppContext, model: Model, name: str, path: str, payload: dict[str, Any]) -> dict[str, Any]:
    """An OpenAI body llama-server refused as too long, cut as Ollama cuts it (for /v1, which passes
    llama-server's answers through: a chat keeps the messages that fit; a single message longer than
    the context is still refused, since only /completion takes a cut token prompt and answers
    in another shape)."""
    lease = await ctx.scheduler.acquire(model)
    async with lease:
        if path == "/v1/chat/completions":
            kept, _ = await fit_messages(ctx, lease, name, payload["messages"], payload.get("tools"))
            return {**payload, "messages": kept}
        prompt = payload.get("prompt")
        if not isinstance(prompt, str):
            raise ApiError(400, "a prompt list longer than the context cannot be truncated; send one prompt")
        num_keep = payload.get("n_keep", 4)
        tokens = await tokenize(ctx, lease, prompt)
        bos = ctx.catalog.facts(model).bos_token
        return {**payload, "prompt": cut_prompt(name, tokens, limit_of(lease), num_keep, bos)}
