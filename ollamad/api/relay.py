"""The relay: llama-server's answers to the client, at the least cost per token.

- Streams (native and ``/v1``) are read through runner/wire.py and translated and written in
  the runner connection's ``data_received`` (api/stream.py): no task woken per token.
- Native streams: each event is decoded into a small typed struct (msgspec reads only the
  fields named here and skips the rest) and the NDJSON chunk is written from prefixes made once
  per request; every event that one read brings is written to the client in one write.
- Native requests with ``stream: false`` ask llama-server for one answer when its build has
  runners/patches/0001 (``ctx.one_answer``): nothing per token on either side, and a client
  that goes away still stops the task within about a second. Without the fix, llama-server
  noticed a one-answer client gone only after 6 to 160 s while other slots streamed (measured),
  holding the slot: such requests are streamed from llama-server all the same and gathered here
  (one decode per event, nothing written per token). So are requests with a grammar (a format,
  tools): llama-server compiles it before it answers, and only a streamed request shows, by
  its headers, that it got past that within OLLAMAD_ACCEPT_TIMEOUT.
- ``/v1`` streams are llama-server's own bytes with the ``model`` field (and the fingerprint
  beside it) replaced: no parse-and-rebuild.
"""

from __future__ import annotations

import time
from typing import Any

import aiohttp
import msgspec
import structlog
from aiohttp import web

from ollamad.api.chunks import Shape, encode
from ollamad.api.common import CUT_BY_SHUTDOWN, NDJSON, AppContext, cuttable, dumps, reply
from ollamad.api.reqlog import RequestRecord, record_of
from ollamad.api.runner_calls import error_reply, not_answering, one_reply, pushed, upstream
from ollamad.api.stream import StreamRelay
from ollamad.runner.events import UpstreamError, data_of, error_of, sse_data
from ollamad.sched.lease import Lease
from ollamad.sched.rpcplace import split_note

log = structlog.get_logger("ollamad.api")
CONSTRAINED = ("json_schema", "grammar", "response_format", "tools")


async def relay(request: web.Request, ctx: AppContext, lease: Lease, path: str, payload: dict[str, Any],
                stream: bool, t0: int, shape: Shape) -> web.StreamResponse:
    """Send ``payload`` to the runner; answer with NDJSON chunks, or with one object."""
    try:
        return await _relay(request, ctx, lease, path, payload, stream, t0, shape)
    except UpstreamError as e:
        if e.lost:
            lease.lost(e.message)
            e.message += split_note(lease.runner.plan, e.lost)
        raise
    except aiohttp.ClientError as e:  # could not connect, or cut before the reply began
        if request.transport is None or request.transport.is_closing():
            # our own client went away (a write to it failed): the runner is fine, keep it
            return web.Response(status=499)
        raise not_answering(lease, e) from None


async def _relay(request: web.Request, ctx: AppContext, lease: Lease, path: str, payload: dict[str, Any],
                 stream: bool, t0: int, shape: Shape) -> web.StreamResponse:
    assert ctx.session is not None
    load_ns = int(lease.queued_for * 1e9)
    # a grammar (format, tools) is compiled before llama-server answers: such requests stay
    # streamed, so that OLLAMAD_ACCEPT_TIMEOUT replaces a runner stuck compiling one
    one_answer = not stream and ctx.one_answer and not any(k in payload for k in CONSTRAINED)
    if one_answer:
        payload = {k: v for k, v in payload.items() if k not in ("stream_options", "timings_per_token")}
        payload["stream"] = False
    if stream:
        return await _stream(request, ctx, lease, path, payload, t0, load_ns, shape)
    if one_answer:
        # a client that leaves cancels this, the connection is dropped, and the runner stops within ~1 s
        shape.answer(await one_reply(ctx, lease, path, payload))
        await shape.settle()
        final = shape.whole(time.monotonic_ns() - t0, load_ns)
        rec = record_of(request)
        rec.first_token()
        rec.finished(final)
        return reply(final)
    async with upstream(ctx, lease, path, payload) as up:
        if up.status != 200:
            raise await error_of(up)
        return await _gather(up, shape, record_of(request), t0, load_ns)


async def _stream(request: web.Request, ctx: AppContext, lease: Lease, path: str, payload: dict[str, Any],
                  t0: int, load_ns: int, shape: Shape) -> web.StreamResponse:
    """NDJSON chunks written as llama-server's events arrive (api/stream.py); the final object
    with the chunks of the read that brought the final event."""
    reply = await pushed(ctx, lease, path, payload)
    complete = False
    try:
        if reply.status != 200:
            raise await error_reply(reply)
        rec = record_of(request)
        resp = web.StreamResponse(headers={"Content-Type": NDJSON})
        await resp.prepare(request)
        held: list[bytes] = []  # the final event's read: written with the final object

        def translate(block: bytes) -> tuple[bytes, bool]:
            batch, done = data_of(block)
            out: list[bytes] = []
            if _take(shape, batch, out) or done:
                held.extend(out)
                return b"", True
            return out[0] if len(out) == 1 else b"".join(out), False

        relay = StreamRelay(request, resp, reply, translate, rec)
        error: UpstreamError | None = None
        with cuttable(ctx) as scope:
            try:
                await relay.run()
            except UpstreamError as e:
                error = e
        error = error or relay.failed
        if error is not None:
            log.warning("stream cut", model=shape.model, error=error.message)
            if error.lost:
                lease.lost(error.message)
            held.append(dumps({"error": error.message + split_note(lease.runner.plan, error.lost)}))
            await resp.write(b"".join(held))
            return resp
        if scope.cancelled_caught:  # the drain timeout ran out: say so instead of just closing
            rec.cut = "drain timeout"
            held.append(dumps({"error": CUT_BY_SHUTDOWN}))
            await resp.write(b"".join(held))
            return resp
        await shape.settle()
        final = shape.final(time.monotonic_ns() - t0, load_ns)
        rec.first_token()
        rec.finished(final)
        held.append(dumps(final))
        await resp.write(b"".join(held))
        complete = relay.ended or reply.done.done()  # the rest of the reply, if any, is its end
        return resp
    finally:
        if not complete:
            reply.abort()


def _take(shape: Shape, batch: list[bytes], out: list[bytes]) -> bool:
    """Add the chunks of one read's events to ``out``; True once the final event is among them
    (the events after it are left unread)."""
    for data in batch:
        chunk = shape.piece(data)
        if chunk is not None:
            out.append(chunk)
        if shape.is_final():
            return True
    return False


async def _gather(up: aiohttp.ClientResponse, shape: Shape, rec: RequestRecord, t0: int,
                  load_ns: int) -> web.Response:
    """The whole reply as one object: events decoded as they come, nothing written per token."""
    shape.keep = True
    unused: list[bytes] = []  # ``keep``: pieces add to shape.text, no chunk is made
    async for batch in sse_data(up):
        if _take(shape, batch, unused):
            break
        if shape.text:
            rec.first_token()
    await shape.settle()
    final = shape.whole(time.monotonic_ns() - t0, load_ns)
    rec.first_token()
    rec.finished(final)
    return reply(final)


# --- /v1: llama-server's own SSE bytes, with the client's model name ---------------------
class _Head(msgspec.Struct):
    model: str | None = None
    system_fingerprint: str | None = None


_head = msgspec.json.Decoder(_Head)


class ModelField:
    """Puts the client's model name, and Ollama's fingerprint, into llama-server's SSE bytes.

    The bytes to replace are learnt from the first event that has them (``"model":"<path>"``
    and the ``"system_fingerprint"`` beside it, as llama-server writes every chunk); then each
    block is one ``bytes.replace``. Inside a JSON string every quote is escaped, so the pattern
    only matches the key itself. Should the learnt bytes not be found verbatim, events are
    decoded and re-encoded instead.
    """

    def __init__(self, name: str) -> None:
        self.name = name
        self.new = b'"model":' + encode(name)
        self.old: bytes | None = None
        self.rebuild = False

    def __call__(self, block: bytes) -> bytes:
        if self.old is not None:
            return block.replace(self.old, self.new)
        if not self.rebuild:
            self._learn(block)
            if self.old is not None:
                return block.replace(self.old, self.new)
            if not self.rebuild:
                return block
        return b"\n".join(self._rebuilt(line) for line in block.split(b"\n"))

    def _learn(self, block: bytes) -> None:
        for line in block.split(b"\n"):
            if not line.startswith(b"data: {"):
                continue
            try:
                head = _head.decode(line[6:])
            except msgspec.DecodeError:
                continue
            if head.model is None:
                continue
            old, new = b'"model":' + encode(head.model), self.new
            if head.system_fingerprint is not None:
                both = old + b',"system_fingerprint":' + encode(head.system_fingerprint)
                if both in line:
                    old, new = both, new + b',"system_fingerprint":"fp_ollama"'
            if old in line:
                self.old, self.new = old, new
            else:
                self.rebuild = True
            return

    def _rebuilt(self, line: bytes) -> bytes:
        if not line.startswith(b"data: {"):
            return line
        try:
            ev = msgspec.json.decode(line[6:])
        except msgspec.DecodeError:
            return line
        if isinstance(ev, dict) and "model" in ev:
            ev["model"] = self.name
            ev["system_fingerprint"] = "fp_ollama"
        return b"data: " + encode(ev)


async def forward_pushed(request: web.Request, ctx: AppContext, lease: Lease, path: str, payload: dict[str, Any],
                         name: str) -> web.StreamResponse:
    """Relay a /v1 stream as its events arrive (api/stream.py): llama-server's events as they are
    but for the model field."""
    reply = await pushed(ctx, lease, path, payload)
    complete = False
    try:
        if reply.status != 200:
            raise await error_reply(reply)
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"})
        await resp.prepare(request)
        field = ModelField(name)
        relay = StreamRelay(request, resp, reply, lambda block: (field(block), False), record_of(request))
        message = None
        with cuttable(ctx) as scope:
            try:
                await relay.run()
            except UpstreamError as e:
                if e.lost:
                    lease.lost(e.message)
                message = e.message + split_note(lease.runner.plan, e.lost)
        if scope.cancelled_caught:  # the drain timeout ran out
            record_of(request).cut = "drain timeout"
            message = CUT_BY_SHUTDOWN
        if message is not None:
            err = {"error": {"message": message, "type": "api_error", "param": None, "code": None}}
            await resp.write(b"data: " + encode(err) + b"\n\ndata: [DONE]\n\n")
        else:
            complete = reply.done.done()
        return resp
    finally:
        if not complete:
            reply.abort()
