"""The daemon's HTTP client to its runners: pooled connections, and a request the runner's
closing of a kept-alive connection cut before any reply is sent again on a new one.

llama-server closes idle connections after 5 s, and, unless built with runners/patches/0002,
every connection after a streamed reply, without saying so (no ``Connection: close``). A request that goes out on such a
socket in the moment before its close is seen fails with "Server disconnected" or "Can not
write request body": the runner never read it, so it is safe to send again. Go's net/http
does the same for a request nothing was written for on a reused connection.
"""

from __future__ import annotations

from typing import Any

import aiohttp
import structlog

log = structlog.get_logger("ollamad.upstream")

KEEPALIVE = 2.0  # seconds a pooled connection is kept; below llama-server's 5 s
# a request, and again while pooled connections turn out closed: each failure drops one, and
# several streams ending together leave as many (3 attempts failed once in four suite runs)
ATTEMPTS = 6
# Cut before any reply: the runner closed the socket. Not ClientConnectorError (a subclass of
# ClientOSError): a refused connection means the runner is gone, and is reported at once.
CLOSED_UNDER_US = (aiohttp.ServerDisconnectedError, aiohttp.ClientOSError, aiohttp.ClientConnectionResetError)


async def resend_when_closed(req: aiohttp.ClientRequest, handler: aiohttp.ClientHandlerType) -> aiohttp.ClientResponse:
    """Client middleware: send ``req`` again when the connection closed before the reply began.

    (Sending streamed requests with ``Connection: close`` instead cost ~300 µs of daemon CPU per
    request in scripts/bench.py's relay section, with a runner that keeps connections open.)"""
    for attempt in range(1, ATTEMPTS):
        try:
            return await handler(req)
        except aiohttp.ClientConnectorError:
            raise
        except CLOSED_UNDER_US as e:
            log.debug("runner closed the connection before replying; sending again", url=str(req.url),
                      error=str(e) or type(e).__name__, attempt=attempt)
    return await handler(req)  # the last attempt: its error is the caller's


def runner_session(**kw: Any) -> aiohttp.ClientSession:
    """A session for talking to runners: no pool limit, short keep-alive, resend when closed."""
    connector = aiohttp.TCPConnector(limit=0, keepalive_timeout=KEEPALIVE)
    return aiohttp.ClientSession(connector=connector, middlewares=(resend_when_closed,), **kw)
