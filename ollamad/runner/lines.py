"""Lines of a response body, however long.

aiohttp's ``StreamReader`` iterates lines with a limit (``readline`` raises "Chunk too big"
past about twice its read buffer), and one llama-server event is one line: the final event
of /completion echoes the whole prompt, so a long prompt makes a line longer than that.
"""

from __future__ import annotations

from collections.abc import AsyncIterator

import aiohttp


async def read_lines(stream: aiohttp.StreamReader) -> AsyncIterator[bytes]:
    """Each line with its ``\\n``; a last line without one if the body ends mid-line."""
    pending: list[bytes] = []
    async for chunk in stream.iter_any():
        start = 0
        while (end := chunk.find(b"\n", start)) >= 0:
            piece = chunk[start : end + 1]
            if pending:
                pending.append(piece)
                piece, pending = b"".join(pending), []
            yield piece
            start = end + 1
        if start < len(chunk):
            pending.append(chunk[start:])
    if pending:
        yield b"".join(pending)
