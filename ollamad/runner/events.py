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

    def __init__(self, status: int, message: str, lost: bool = False) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.lost = lost  # the connection broke: the runner died or hung


async def error_of(resp: aiohttp.ClientResponse) -> UpstreamError:
    """Turn a non-200 llama-server answer into an UpstreamError with its message."""
    text = await resp.text(errors="replace")
    message = text
    try:
        body = json.loads(text)
        err = body.get("error", body)
        message = err.get("message", text) if isinstance(err, dict) else str(err)
    except (ValueError, AttributeError):
        pass
    status = resp.status if 400 <= resp.status < 500 else 500
    return UpstreamError(status, message or f"llama-server answered {resp.status}")


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


async def sse_blocks(resp: aiohttp.ClientResponse) -> AsyncIterator[bytes]:
    """Whole events (``data: ...`` lines, each ending in a blank line) as they arrive, as many as one
    read brings; raise UpstreamError on a cut stream. The bytes are llama-server's own."""
    tail = b""
    try:
        async for data in resp.content.iter_any():
            if tail:
                data = tail + data
            end = data.rfind(b"\n\n")
            if end < 0:
                tail = data
                continue
            tail = data[end + 2:]
            yield data[: end + 2]
    except CUT as e:
        raise cut(e) from None
    if tail.strip():  # a last event without its blank line
        yield tail + b"\n\n"


async def sse_data(resp: aiohttp.ClientResponse) -> AsyncIterator[list[bytes]]:
    """The JSON of each ``data:`` event, a batch per read; stop at ``[DONE]``; raise UpstreamError
    on an ``error:`` line or a cut stream."""
    async for block in sse_blocks(resp):
        batch: list[bytes] = []
        for line in block.split(b"\n"):
            if line.startswith(b"data: "):
                data = line[6:]
                if data.startswith(b"[DONE]"):
                    if batch:
                        yield batch
                    return
                batch.append(data)
            elif line.startswith(b"error: "):
                raise event_error(line[7:])
        if batch:
            yield batch
