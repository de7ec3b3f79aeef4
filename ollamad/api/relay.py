"""The relay: llama-server's event stream translated into Ollama's NDJSON chunks (or one
object), with the shapes of generate and chat chunks."""

from __future__ import annotations

import time
from typing import Any

import aiohttp
import structlog
from aiohttp import web

from ollamad.api.common import CUT_BY_SHUTDOWN, NDJSON, AppContext, cuttable, dumps, reply, upstream
from ollamad.api.reqlog import record_of
from ollamad.api.translate import (
    done_reason,
    durations,
    now_iso,
    ollama_tool_calls,
)
from ollamad.runner.events import UpstreamError, error_of, sse_events
from ollamad.sched.rpcplace import split_note
from ollamad.sched.scheduler import Lease

log = structlog.get_logger("ollamad.api")



class GenerateShape:
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


class TemplatedChatShape(GenerateShape):
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


class ChatShape:
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
                stream: bool, t0: int, shape: GenerateShape | ChatShape) -> web.StreamResponse:
    """Send ``payload`` to the runner and translate its event stream into NDJSON (or one object)."""
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
                 stream: bool, t0: int, shape: GenerateShape | ChatShape) -> web.StreamResponse:
    assert ctx.session is not None
    load_ns = int(lease.queued_for * 1e9)
    async with upstream(ctx, lease, path, payload) as up:
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
        with cuttable(ctx) as scope:
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
                await resp.write(dumps({"error": e.message + split_note(lease.runner.plan, e.lost)}))
                return resp
        if scope.cancelled_caught:  # the drain timeout ran out: say so instead of just closing
            rec.cut = "drain timeout"
            await resp.write(dumps({"error": CUT_BY_SHUTDOWN}))
            return resp
        final = shape.final(last, time.monotonic_ns() - t0, load_ns, whole=False)
        rec.finished(final)
        await resp.write(dumps(final))
        return resp

