"""The relay: llama-server's answers to the client, at the least cost per token.

- Native streams: each event is decoded into a small typed struct (msgspec reads only the
  fields named here and skips the rest) and the NDJSON chunk is written from prefixes made once
  per request; every event that one read brings is written to the client in one write.
- Native requests with ``stream: false`` are streamed from llama-server all the same and
  gathered here (in batches, one decode per event, nothing written per token): llama-server
  stops a streamed task within a write of its client going away, but in a one-answer request
  it noticed a closed connection only after 6 to 160 s (measured, this build), holding the slot.
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

from ollamad.api.common import CUT_BY_SHUTDOWN, NDJSON, AppContext, cuttable, dumps, reply, upstream
from ollamad.api.reqlog import RequestRecord, record_of
from ollamad.api.translate import done_reason, durations, ollama_tool_calls
from ollamad.runner.events import UpstreamError, error_of, event_error, sse_blocks, sse_data
from ollamad.sched.rpcplace import split_note
from ollamad.sched.scheduler import Lease

log = structlog.get_logger("ollamad.api")
encode = msgspec.json.Encoder().encode
_second: list[Any] = [0, b""]


def created_at() -> bytes:
    """UTC now as Ollama writes ``created_at``; the date-time part is formatted once a second."""
    t = time.time()
    sec = int(t)
    if sec != _second[0]:
        _second[0], _second[1] = sec, time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(sec)).encode()
    return b"%s.%06dZ" % (_second[1], int((t - sec) * 1e6))


# --- what the relay reads of llama-server's events (everything else is skipped unread) ------
class CompletionEvent(msgspec.Struct):
    """A /completion or /infill event, streamed or the one answer."""

    content: str = ""
    stop: bool = False
    stop_type: str | None = None
    timings: dict[str, Any] | None = None
    tokens_evaluated: int | None = None
    tokens: list[int] = []  # with return_tokens (generate's ``context``)
    error: Any = None


class ToolCall(msgspec.Struct):
    index: int = 0
    function: dict[str, Any] | None = None


class Message(msgspec.Struct):
    """A chat delta."""

    content: str | None = None
    reasoning_content: str | None = None
    tool_calls: list[ToolCall] | None = None


class Choice(msgspec.Struct):
    delta: Message | None = None
    finish_reason: str | None = None


class ChatEvent(msgspec.Struct):
    choices: list[Choice] = []
    timings: dict[str, Any] | None = None
    usage: dict[str, Any] | None = None
    error: Any = None


_completion = msgspec.json.Decoder(CompletionEvent)
_chat = msgspec.json.Decoder(ChatEvent)


def _decode(decoder: msgspec.json.Decoder[Any], data: bytes) -> Any:
    try:
        ev = decoder.decode(data)
    except msgspec.DecodeError as e:
        raise UpstreamError(500, f"llama-server sent an event the relay cannot read: {e}") from None
    if ev.error is not None and not getattr(ev, "choices", None):
        raise event_error(data)
    return ev


# --- the shapes of Ollama's chunks --------------------------------------------------------
class GenerateShape:
    """Generate chunks from a /completion stream or answer."""

    def __init__(self, model: str) -> None:
        self.model = model
        self.head = b'{"model":' + encode(model) + b',"created_at":"'
        self.last = CompletionEvent()
        self.text: list[str] = []  # the reply so far, when gathered (``keep``) rather than sent
        self.keep = False

    def piece(self, data: bytes) -> bytes | None:
        """The NDJSON chunk for one event (None: nothing to send); remembers the last event."""
        ev = self.last = _decode(_completion, data)
        if not ev.content:
            return None
        if self.keep:
            self.text.append(ev.content)
            return None
        return self.chunk(ev.content)

    def chunk(self, content: str) -> bytes:
        return b"".join((self.head, created_at(), b'","response":', encode(content), b',"done":false}\n'))

    def is_final(self) -> bool:
        return self.last.stop

    def final(self, total_ns: int, load_ns: int, text: str = "") -> dict[str, Any]:
        ev = self.last
        return {
            "model": self.model, "created_at": created_at().decode(), "response": text,
            "done": True, "done_reason": done_reason(ev.stop_type),
            **durations(ev.timings, total_ns, load_ns, ev.tokens_evaluated),
        }

    def whole(self, total_ns: int, load_ns: int) -> dict[str, Any]:
        """The final object with the gathered reply (``keep``)."""
        return self.final(total_ns, load_ns, "".join(self.text))


class TemplatedChatShape(GenerateShape):
    """Chat chunks made from a /completion stream (chat with ``format``)."""

    def chunk(self, content: str) -> bytes:
        return b"".join((self.head, created_at(), b'","message":{"role":"assistant","content":', encode(content),
                         b'},"done":false}\n'))

    def final(self, total_ns: int, load_ns: int, text: str = "") -> dict[str, Any]:
        out = super().final(total_ns, load_ns, text)
        msg = {"role": "assistant", "content": out.pop("response")}
        return {"model": out.pop("model"), "created_at": out.pop("created_at"), "message": msg, **out}


class ChatShape:
    """Chat chunks from a /v1/chat/completions stream or answer; tool calls are gathered and sent whole."""

    def __init__(self, model: str) -> None:
        self.model = model
        self.head = b'{"model":' + encode(model) + b',"created_at":"'
        self.calls: dict[int, dict[str, Any]] = {}
        self.finish: str | None = None
        self.timings: dict[str, Any] | None = None
        self.prompt_tokens: int | None = None
        self.text: list[str] = []
        self.thinking: list[str] = []
        self.keep = False

    def piece(self, data: bytes) -> bytes | None:
        ev = _decode(_chat, data)
        if ev.timings:
            self.timings = ev.timings
        if ev.usage:
            self.prompt_tokens = ev.usage.get("prompt_tokens")
        if not ev.choices:
            return None
        choice = ev.choices[0]
        self.finish = choice.finish_reason or self.finish
        delta = choice.delta
        if delta is None:
            return None
        if delta.tool_calls:
            self._gather(delta.tool_calls)
        content, thinking = delta.content or "", delta.reasoning_content
        if self.keep:
            self.text.append(content)
            self.thinking.append(thinking or "")
            return None
        if thinking:
            return b"".join((self.head, created_at(), b'","message":{"role":"assistant","content":', encode(content),
                             b',"thinking":', encode(thinking), b'},"done":false}\n'))
        if not content:
            return None
        return b"".join((self.head, created_at(), b'","message":{"role":"assistant","content":', encode(content),
                         b'},"done":false}\n'))

    def _gather(self, calls: list[ToolCall]) -> None:
        for tc in calls:
            slot = self.calls.setdefault(tc.index, {"function": {"name": "", "arguments": ""}})
            fn = tc.function or {}
            slot["function"]["name"] += fn.get("name") or ""
            args = fn.get("arguments") or ""
            slot["function"]["arguments"] += args if isinstance(args, str) else encode(args).decode()

    def is_final(self) -> bool:
        return False  # the chat stream ends with [DONE], after the usage chunk

    def final(self, total_ns: int, load_ns: int, text: str = "", thinking: str = "") -> dict[str, Any]:
        msg: dict[str, Any] = {"role": "assistant", "content": text}
        if thinking:
            msg["thinking"] = thinking
        if self.calls:
            msg["tool_calls"] = ollama_tool_calls([self.calls[i] for i in sorted(self.calls)])
        return {
            "model": self.model, "created_at": created_at().decode(), "message": msg, "done": True,
            "done_reason": done_reason(None, self.finish),
            **durations(self.timings, total_ns, load_ns, self.prompt_tokens),
        }

    def whole(self, total_ns: int, load_ns: int) -> dict[str, Any]:
        return self.final(total_ns, load_ns, "".join(self.text), "".join(self.thinking))


Shape = GenerateShape | ChatShape


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
        lease.lost(str(e))
        raise UpstreamError(500, f"llama-server is not answering: {e or type(e).__name__}") from None


async def _relay(request: web.Request, ctx: AppContext, lease: Lease, path: str, payload: dict[str, Any],
                 stream: bool, t0: int, shape: Shape) -> web.StreamResponse:
    assert ctx.session is not None
    load_ns = int(lease.queued_for * 1e9)
    async with upstream(ctx, lease, path, payload) as up:
        if up.status != 200:
            raise await error_of(up)
        rec = record_of(request)
        if not stream:
            return await _gather(up, shape, rec, t0, load_ns)
        resp = web.StreamResponse(headers={"Content-Type": NDJSON})
        await resp.prepare(request)
        out: list[bytes] = []
        done = False
        with cuttable(ctx) as scope:
            try:
                async for batch in sse_data(up):
                    for data in batch:
                        chunk = shape.piece(data)
                        if chunk is not None:
                            out.append(chunk)
                        if shape.is_final():
                            done = True
                            break
                    if done:
                        break
                    if out:  # all that one read brought, in one write
                        rec.first_token()
                        await resp.write(out[0] if len(out) == 1 else b"".join(out))
                        out.clear()
            except UpstreamError as e:
                log.warning("stream cut", model=shape.model, error=e.message)
                if e.lost:
                    lease.lost(e.message)
                out.append(dumps({"error": e.message + split_note(lease.runner.plan, e.lost)}))
                await resp.write(b"".join(out))
                return resp
        if scope.cancelled_caught:  # the drain timeout ran out: say so instead of just closing
            rec.cut = "drain timeout"
            out.append(dumps({"error": CUT_BY_SHUTDOWN}))
            await resp.write(b"".join(out))
            return resp
        final = shape.final(time.monotonic_ns() - t0, load_ns)
        rec.first_token()
        rec.finished(final)
        out.append(dumps(final))
        await resp.write(b"".join(out))
        return resp


async def _gather(up: aiohttp.ClientResponse, shape: Shape, rec: RequestRecord, t0: int,
                  load_ns: int) -> web.Response:
    """The whole reply as one object: events decoded as they come, nothing written per token."""
    shape.keep = True
    async for batch in sse_data(up):
        for data in batch:
            shape.piece(data)
            if shape.is_final():
                break
        else:
            if shape.text:
                rec.first_token()
            continue
        break
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


async def forward_sse(request: web.Request, ctx: AppContext, lease: Lease, up: aiohttp.ClientResponse,
                      name: str) -> web.StreamResponse:
    """Relay a /v1 stream: llama-server's events as they are but for the model field."""
    resp = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"})
    await resp.prepare(request)
    field = ModelField(name)
    rec = record_of(request)
    message = None
    with cuttable(ctx) as scope:
        try:
            async for block in sse_blocks(up):
                rec.first_token()
                await resp.write(field(block))
        except UpstreamError as e:
            if e.lost:
                lease.lost(e.message)
            message = e.message + split_note(lease.runner.plan, e.lost)
    if scope.cancelled_caught:  # the drain timeout ran out
        rec.cut = "drain timeout"
        message = CUT_BY_SHUTDOWN
    if message is not None:
        err = {"error": {"message": message, "type": "api_error", "param": None, "code": None}}
        await resp.write(b"data: " + encode(err) + b"\n\ndata: [DONE]\n\n")
    return resp
