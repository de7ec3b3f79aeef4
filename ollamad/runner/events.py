"""Talking to a runner: send one request, read its server-sent events back.

Events are read in batches: every whole event that has arrived when the relay gets to read
(one read of the connection) is handed over at once, so a burst of tokens, or tokens that piled
up while the client was slow to read, is translated and written to the client in one write.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator

import aiohttp


class UpstreamError(Exception):
    """llama-server answered with an error or went away mid-request."""

    def __init__(self, status: int, message: str, lost: bool = False, unstarted: bool = False) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.lost = lost  # the connection broke: the runner died or hung
        self.unstarted = unstarted  # it was sent ahead of a slot and its runner went before any reply


async def error_of(resp: aiohttp.ClientResponse) -> UpstreamError:
    """Turn a non-200 llama-server answer into an UpstreamError with its message."""
    return error_from(resp.status, await resp.text(errors="replace"))


def error_from(status: int, text: str) -> UpstreamError:
    """An UpstreamError from a non-200 answer's status and body: 4xx kept, anything else 500."""
    message = text
    try:
        body = json.loads(text)
        err = body.get("error", body)
        message = err.get("message", text) if isinstance(err, dict) else str(err)
    except (ValueError, AttributeError):
        pass
    return UpstreamError(status if 400 <= status < 500 else 500, message or f"llama-server answered {status}")


def event_error(data: bytes) -> UpstreamError:
    """An UpstreamError from an ``error`` event's JSON (``{"error": {...}}``) or its text."""
    try:
        err = json.loads(data)
        err = err.get("error", err) if isinstance(err, dict) else err
        message = err.get("message", str(err)) if isinstance(err, dict) else str(err)
    except ValueError:
        message = data.decode(errors="replace").strip()
    return UpstreamError(500, message or "llama-server reported an error")


def cut(e: BaseException) -> UpstreamError:
    return UpstreamError(500, f"llama-server stopped mid-response: {e or type(e).__name__}", lost=True)


CUT = (aiohttp.ClientPayloadError, aiohttp.ClientConnectionError, ConnectionResetError)


class SseSplitter:
    """Whole events (``data: ...`` lines, each ending in a blank line) from the pieces of a body."""

    def __init__(self) -> None:
        self.tail = b""

    def feed(self, data: bytes) -> bytes | None:
        """The whole events this piece completes (llama-server's bytes), or None."""
        if self.tail:
            data = self.tail + data
        end = data.rfind(b"\n\n")
        if end < 0:
            self.tail = data
            return None
        self.tail = data[end + 2:]
        return data[: end + 2]

    def rest(self) -> bytes | None:
        """At the body's end: a last event without its blank line, or None."""
        tail, self.tail = self.tail, b""
        return tail + b"\n\n" if tail.strip() else None


async def sse_blocks(resp: aiohttp.ClientResponse) -> AsyncIterator[bytes]:
    """Whole events as they arrive, as many as one read brings; raise UpstreamError on a cut
    stream. The bytes are llama-server's own."""
    sse = SseSplitter()
    try:
        async for data in resp.content.iter_any():
            block = sse.feed(data)
            if block is not None:
                yield block
    except CUT as e:
        raise cut(e) from None
    rest = sse.rest()
    if rest is not None:
        yield rest


def data_of(block: bytes) -> tuple[list[bytes], bool]:
    """The JSON of each ``data:`` event of ``block``, and True if ``[DONE]`` ended it (the events
    after it are left); UpstreamError on an ``error:`` line."""
    batch: list[bytes] = []
    for line in block.split(b"\n"):
        if line.startswith(b"data: "):
            data = line[6:]
            if data.startswith(b"[DONE]"):
                return batch, True
            batch.append(data)
        elif line.startswith(b"error: "):
            raise event_error(line[7:])
    return batch, False


async def sse_data(resp: aiohttp.ClientResponse) -> AsyncIterator[list[bytes]]:
    """The JSON of each ``data:`` event, a batch per read; stop at ``[DONE]``; raise UpstreamError
    on an ``error:`` line or a cut stream."""
    async for block in sse_blocks(resp):
        batch, done = data_of(block)
        if batch:
            yield batch
        if done:
            return
