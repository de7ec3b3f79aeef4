"""Talking to a runner: send one request, read its server-sent events back."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from typing import Any

import aiohttp

from ollamad.runner.lines import read_lines


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


async def sse_events(resp: aiohttp.ClientResponse) -> AsyncIterator[dict[str, Any]]:
    """Yield each ``data:`` JSON event; stop at ``[DONE]``; raise UpstreamError on a cut stream."""
    try:
        async for raw in read_lines(resp.content):  # no line limit: a final event echoes the prompt
            if not raw.startswith(b"data: "):
                if raw.startswith(b"error: "):
                    raise UpstreamError(500, raw[7:].decode(errors="replace").strip())
                continue
            data = raw[6:].strip()
            if data == b"[DONE]":
                return
            event = json.loads(data)
            if isinstance(event, dict) and "error" in event and "choices" not in event:
                err = event["error"]
                raise UpstreamError(500, err.get("message", str(err)) if isinstance(err, dict) else str(err))
            yield event
    except (aiohttp.ClientPayloadError, aiohttp.ClientConnectionError, ConnectionResetError) as e:
        raise UpstreamError(500, f"llama-server stopped mid-response: {e or type(e).__name__}", lost=True) from None
