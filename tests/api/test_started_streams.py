"""An error after a streamed answer began ends the stream with an error line (issue 17),
never a second HTTP response inside the body."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator

import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer

from ollamad.api.common import ApiError, errors_middleware, mark_started, started_middleware


async def _stream_then_fail(request: web.Request) -> web.StreamResponse:
    sse = request.path.startswith("/v1/")
    resp = web.StreamResponse(headers={"Content-Type": "text/event-stream" if sse else "application/x-ndjson"})
    await resp.prepare(request)
    await resp.write(b'data: {"n":1}\n\n' if sse else b'{"n":1}\n')
    if request.query.get("kind") == "api":
        raise ApiError(507, "disk full")
    raise RuntimeError("boom")


async def _plain_fail(request: web.Request) -> web.StreamResponse:
    raise ApiError(400, "bad")


@pytest.fixture
async def client() -> AsyncIterator[TestClient[web.Request, web.Application]]:
    app = web.Application(middlewares=[started_middleware, errors_middleware])
    app.on_response_prepare.append(mark_started)
    app.router.add_get("/api/stream", _stream_then_fail)
    app.router.add_get("/v1/stream", _stream_then_fail)
    app.router.add_get("/api/plain", _plain_fail)
    async with TestClient(TestServer(app)) as c:
        yield c


@pytest.mark.parametrize(("kind", "message"), [("api", "disk full"), ("bug", "internal error: RuntimeError: boom")])
async def test_ndjson_stream_ends_with_an_error_line(client: TestClient[web.Request, web.Application], kind: str,
                                                     message: str) -> None:
    async with client.get("/api/stream", params={"kind": kind}) as r:
        assert r.status == 200
        body = await r.read()  # a second response in the body breaks the chunked framing here
    assert b"HTTP/1.1" not in body
    lines = [json.loads(ln) for ln in body.splitlines()]
    assert lines == [{"n": 1}, {"error": message}]
    async with client.get("/api/plain") as r:  # the connection is still good for the next request
        assert r.status == 400 and await r.json() == {"error": "bad"}


async def test_sse_stream_ends_with_an_error_event(client: TestClient[web.Request, web.Application]) -> None:
    async with client.get("/v1/stream", params={"kind": "api"}) as r:
        body = await r.read()
    events = [ln.removeprefix(b"data: ") for ln in body.split(b"\n\n") if ln]
    assert json.loads(events[0]) == {"n": 1}
    assert json.loads(events[1])["error"]["message"] == "disk full"
    assert events[2] == b"[DONE]"

