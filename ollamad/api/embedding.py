"""Embedding work shared by the native and OpenAI embedding routes: bound the request, tokenize
only what may not fit, embed in batches, and stream the reply's encoding so memory stays flat.

A request may carry OLLAMAD_EMBED_MAX_INPUTS inputs and OLLAMAD_EMBED_MAX_TOKENS tokens (400
past either). An input whose UTF-8 length cannot reach the context is sent as text (llama-server
tokenizes it); a longer one is tokenized first (a few at a time), to truncate it to the context
or refuse it. Token counts are exact where tokenized and an upper bound elsewhere; when the
bound passes the cap, the rest are tokenized too, so a 400 is never a guess.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import aiohttp
import anyio
import structlog
from aiohttp import web

from ollamad.api.common import ApiError, AppContext
from ollamad.api.limits import check_prompt
from ollamad.api.reqlog import RequestRecord, record_of
from ollamad.api.runner_calls import runner_json
from ollamad.models.catalog import Model
from ollamad.models.options import Options
from ollamad.runner.events import UpstreamError, error_of
from ollamad.sched.lease import Lease
from ollamad.sched.scheduler import SchedulerError

log = structlog.get_logger("ollamad.api")
BATCH = 64  # inputs per /v1/embeddings call: the slot is shared, the reply stays small
TOKENIZE_AT_ONCE = 8  # /tokenize runs on llama-server's HTTP threads, not on the slot


def shorten(vector: list[float], dimensions: int | None) -> list[float]:
    """Ollama's ``dimensions``: keep the first N values and re-normalise (pure)."""
    if dimensions is None or dimensions >= len(vector):
        return vector
    cut = vector[:dimensions]
    norm = math.sqrt(sum(x * x for x in cut)) or 1.0
    return [x / norm for x in cut]


def token_bound(text: str) -> int:
    """Most tokens ``text`` can make (pure): every token covers a byte of the normalised text,
    which SentencePiece and WordPiece grow at most 3-4 fold (" " -> "▁"), plus special tokens."""
    return 4 * len(text.encode("utf-8", "surrogatepass")) + 8


def check_count(ctx: AppContext, texts: list[str]) -> None:
    """400 before anything is loaded when a request has too many inputs, or too much text."""
    most = ctx.settings.embed_max_inputs
    if len(texts) > most:
        raise ApiError(400, f"too many inputs: {len(texts)} (at most {most}, OLLAMAD_EMBED_MAX_INPUTS)")
    check_prompt(ctx.settings, texts)


async def _tokenize(ctx: AppContext, lease: Lease, text: str) -> list[int]:
    assert ctx.session is not None
    async with ctx.session.post(f"{lease.runner.url}/tokenize", json={"content": text, "add_special": True},
                                headers=lease.runner.headers) as up:
        if up.status != 200:
            raise await error_of(up)
        body = await up.json()
    return [int(t) for t in body.get("tokens", [])]


async def _tokenize_some(ctx: AppContext, lease: Lease, texts: list[str], which: list[int]) -> dict[int, list[int]]:
    out: dict[int, list[int]] = {}
    errors: list[Exception] = []
    limiter = anyio.CapacityLimiter(TOKENIZE_AT_ONCE)

    async def one(i: int) -> None:
        async with limiter:
            if errors:
                return
            try:
                out[i] = await _tokenize(ctx, lease, texts[i])
            except (UpstreamError, aiohttp.ClientError, ValueError) as e:  # the caller's, not a group's
                errors.append(e)

    async with anyio.create_task_group() as tg:
        for i in which:
            tg.start_soon(one, i)
    if errors:
        raise errors[0]
    return out


async def prepare(ctx: AppContext, lease: Lease, texts: list[str], truncate: bool) -> list[str | list[int]]:
    """What to send for each text: the text, or its tokens cut to the context; 400s here."""
    n_ctx, most = lease.runner.plan.ctx, ctx.settings.embed_max_tokens
    bounds = [token_bound(t) for t in texts]
    which = [i for i, b in enumerate(bounds) if b > n_ctx]
    if sum(min(b, n_ctx) for b in bounds) > most:
        which = list(range(len(texts)))  # the bound is not enough: count exactly
    tokens = await _tokenize_some(ctx, lease, texts, which)
    inputs: list[str | list[int]] = list(texts)
    total = 0
    for i, bound in enumerate(bounds):
        toks = tokens.get(i)
        if toks is None:
            total += min(bound, n_ctx)
            continue
        if len(toks) > n_ctx:
            if not truncate:
                raise ApiError(400, "input exceeds maximum context length")
            toks = toks[:n_ctx]
        inputs[i] = toks
        total += len(toks)
    if total > most:
        raise ApiError(400, f"too many tokens: {total} (at most {most}, OLLAMAD_EMBED_MAX_TOKENS)")
    return inputs


async def embed_batch(ctx: AppContext, lease: Lease, part: list[str | list[int]]) -> tuple[list[list[float]], int]:
    """(vectors, prompt tokens) for one batch of inputs, in order."""
    body = await runner_json(ctx, lease, "/v1/embeddings", {"input": part})
    data = sorted(body.get("data") or [], key=lambda d: d.get("index", 0))
    if len(data) != len(part):
        raise UpstreamError(500, f"llama-server returned {len(data)} embeddings for {len(part)} inputs")
    return [[float(x) for x in d["embedding"]] for d in data], int((body.get("usage") or {}).get("prompt_tokens", 0))


async def embed_texts(ctx: AppContext, model: Model, name: str, texts: list[str], *, truncate: bool,
                      options: Options, keep_alive: float | None,
                      record: RequestRecord | None = None) -> tuple[list[list[float]], int, float]:
    """Embed ``texts`` whole (for small requests): (vectors, prompt tokens, seconds queued+loading).

    ``record`` (the request's log line) gets the model, queue wait, load time and token count.
    """
    lease = await _acquire(ctx, model, name, options, keep_alive, record)
    vectors: list[list[float]] = []
    tokens = 0
    async with lease:
        inputs = await prepare(ctx, lease, texts, truncate)
        for start in range(0, len(inputs), BATCH):
            part, n = await embed_batch(ctx, lease, inputs[start : start + BATCH])
            vectors += part
            tokens += n
    if record is not None:
        record.prompt_tokens, record.tokens = tokens, 0
    return vectors, tokens, lease.queued_for


async def _acquire(ctx: AppContext, model: Model, name: str, options: Options, keep_alive: float | None,
                   record: RequestRecord | None = None) -> Lease:
    if record is not None:
        record.model = model.name
    facts = ctx.catalog.facts(model)
    if not facts.embedding:
        raise ApiError(400, f'"{name}" does not support embeddings')
    lease = await ctx.scheduler.acquire(model, num_ctx=options.num_ctx, load=options.load_options(),
                                        keep_alive=keep_alive, facts=facts)
    if record is not None:
        record.dispatched(model.name, lease)
    return lease


Item = Callable[[int, list[float]], bytes]
Tail = Callable[[int, float], bytes]


async def stream_embeddings(request: web.Request, ctx: AppContext, model: Model, name: str, texts: list[str], *,
                            truncate: bool, options: Options, keep_alive: float | None,
                            head: bytes, item: Item, tail: Tail) -> web.StreamResponse:
    """One JSON object written as it is made: ``head``, each vector as ``item``, ``tail``.

    Between batches the slot is given back and taken again, so other requests for the model
    (queued first) wait for one batch, not for the whole request; the request's keep_alive
    applies with its last batch. Every client mistake (a 400) and the first batch come before
    the reply starts, so they get a status; a failure after that cuts the connection (a JSON
    body cannot carry an error).
    """
    starts = range(0, len(texts), BATCH)
    rec = record_of(request)
    lease = await _acquire(ctx, model, name, options, keep_alive if len(starts) == 1 else None, rec)
    queued = lease.queued_for
    try:
        inputs = await prepare(ctx, lease, texts, truncate)
        first = await embed_batch(ctx, lease, inputs[:BATCH])
        resp = web.StreamResponse(headers={"Content-Type": "application/json"})
        await resp.prepare(request)
        index, tokens = 0, 0
        try:
            await resp.write(head)
            for start in starts:
                if start:
                    lease.release()
                    last = start == starts[-1]
                    lease = await _acquire(ctx, model, name, options, keep_alive if last else None)
                    vectors, n = await embed_batch(ctx, lease, inputs[start : start + BATCH])
                else:
                    vectors, n = first
                tokens += n
                for v in vectors:
                    await resp.write((b"," if index else b"") + item(index, v))
                    index += 1
            await resp.write(tail(tokens, queued))
            rec.prompt_tokens, rec.tokens = tokens, 0
        except (UpstreamError, ApiError, SchedulerError, aiohttp.ClientError) as e:
            log.warning("embedding cut after the reply began", model=name, error=str(e), done=index)
            if request.transport is not None:
                request.transport.close()
        return resp
    finally:
        lease.release()
