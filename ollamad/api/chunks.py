"""Ollama's chunks made from llama-server's events: what the relay reads of each event (typed
msgspec structs, everything else skipped unread) and the NDJSON it writes for each route family.
"""

from __future__ import annotations

import time
from typing import Any

import msgspec

from ollamad.api.translate import done_reason, durations, ollama_tool_calls
from ollamad.runner.events import UpstreamError, event_error

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
    delta: Message | None = None  # in a streamed event
    message: Message | None = None  # in the one answer
    finish_reason: str | None = None


class ChatEvent(msgspec.Struct):
    """A /v1/chat/completions event, streamed or the one answer."""

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
def message_chunk(head: bytes, content: str, thinking: str | None = None) -> bytes:
    """A chat chunk: ``head`` (the model, up to ``created_at``'s opening quote), then the message."""
    extra = b',"thinking":' + encode(thinking) if thinking else b""
    return b"".join((head, created_at(), b'","message":{"role":"assistant","content":', encode(content), extra,
                     b'},"done":false}\n'))


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

    async def settle(self) -> None:
        """Whatever the final object still waits for (see native.ContextShape); nothing here."""

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

    def answer(self, data: bytes) -> None:
        """Take llama-server's one answer (a request with stream false) as the whole reply."""
        self.keep = True
        self.piece(data)


class TemplatedChatShape(GenerateShape):
    """Chat chunks made from a /completion stream (chat with ``format``)."""

    def chunk(self, content: str) -> bytes:
        return message_chunk(self.head, content)

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

    async def settle(self) -> None:
        """As GenerateShape's: nothing to wait for."""

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
        if not content and not thinking:
            return None
        return message_chunk(self.head, content, thinking)

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

    def answer(self, data: bytes) -> None:
        """Take llama-server's one answer (a request with stream false) as the whole reply."""
        ev = _decode(_chat, data)
        self.keep = True
        self.timings = ev.timings
        if ev.usage:
            self.prompt_tokens = ev.usage.get("prompt_tokens")
        if not ev.choices:
            return
        choice = ev.choices[0]
        self.finish = choice.finish_reason
        msg = choice.message or Message()
        self.text.append(msg.content or "")
        self.thinking.append(msg.reasoning_content or "")
        for i, tc in enumerate(msg.tool_calls or []):
            tc.index = i
        self._gather(msg.tool_calls or [])


Shape = GenerateShape | ChatShape
