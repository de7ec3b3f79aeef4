"""runners/patches/ against the real llama-server built with them (runners/build.sh)."""

from __future__ import annotations

import asyncio
import contextlib
import json
import socket
import time
from pathlib import Path

import aiohttp
import pytest

from ollamad.models.testmodels import write_llama
from ollamad.runner.binary import PROMPT_CANCEL, STREAM_KEEP_ALIVE, STREAM_TOKENS, patches
from ollamad.runner.child import Runner
from ollamad.runner.upstream import runner_session
from tests.conftest import model_plan


async def _busy(session: aiohttp.ClientSession, runner: Runner) -> int:
    async with session.get(f"{runner.url}/slots", headers=runner.headers) as r:
        return sum(1 for s in await r.json() if s.get("is_processing"))


@pytest.mark.real
async def test_a_one_answer_request_stops_soon_after_its_client_while_another_slot_streams(
        llama_server: Path, tmp_path: Path) -> None:
    """0001: a one-answer request's handler polls its client only when no result for any task
    came for a whole second, so while another slot streams it never did: the slot generated
    on for its client long gone (6 to 160 s measured, up to its n_predict). With the patch the
    poll comes every second whatever the other slots do."""
    if PROMPT_CANCEL not in patches(llama_server):
        pytest.skip(f"{llama_server} is not built by runners/build.sh with runners/patches/ (no PATCHES file)")
    write_llama(tmp_path / "endless.gguf", name="endless", endless=True)
    runner = Runner(model_plan(tmp_path, "endless", num_parallel=2, ctx=8192), str(llama_server))
    long = {"prompt": "hi", "n_predict": 100000, "seed": 1}
    async with runner_session() as session:
        await runner.start(session)
        try:
            async def stream_on() -> None:
                async with session.post(f"{runner.url}/completion", json={**long, "stream": True},
                                        headers=runner.headers) as r:
                    async for _ in r.content.iter_any():
                        pass

            streaming = asyncio.create_task(stream_on())
            one = asyncio.create_task(session.post(f"{runner.url}/completion", json={**long, "stream": False},
                                                   headers=runner.headers))
            deadline = time.monotonic() + 30
            while await _busy(session, runner) < 2:
                assert time.monotonic() < deadline, "the two requests never ran together"
                await asyncio.sleep(0.05)
            await asyncio.sleep(0.5)
            one.cancel()  # the client goes away: its connection closes
            with contextlib.suppress(asyncio.CancelledError):
                await one
            gone = time.monotonic()
            while await _busy(session, runner) > 1:
                assert time.monotonic() - gone < 5, "the one-answer request's slot still generates"
                await asyncio.sleep(0.05)
            assert not streaming.done()  # the stream was running all along
            streaming.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await streaming
        finally:
            await runner.stop()


def _reply(sock: socket.socket) -> bytes:
    """One chunked HTTP reply, read to its last chunk; what came before a close if it closed."""
    data = b""
    while not data.partition(b"\r\n\r\n")[2].endswith(b"\r\n0\r\n\r\n"):  # the body's last chunk
        more = sock.recv(65536)
        if not more:
            break
        data += more
    return data


@pytest.mark.real
async def test_a_streamed_reply_leaves_its_connection_open(llama_server: Path, tmp_path: Path) -> None:
    """0002: cpp-httplib took the stream provider's last ``false`` for a cancel and closed the
    connection after every streamed reply, so each streamed request the daemon relays needed a
    new connection (12% of its CPU while streaming, py-spy). With the patch a second request on
    the same socket is answered; without it the socket is closed after the first."""
    if STREAM_KEEP_ALIVE not in patches(llama_server):
        pytest.skip(f"{llama_server} is not built by runners/build.sh with runners/patches/ (no PATCHES file)")
    write_llama(tmp_path / "m.gguf", name="m")
    runner = Runner(model_plan(tmp_path, "m", num_parallel=1, ctx=1024), str(llama_server))
    async with runner_session() as session:
        await runner.start(session)
        try:
            body = json.dumps({"prompt": "hi", "n_predict": 4, "stream": True}).encode()
            auth = "".join(f"{k}: {v}\r\n" for k, v in runner.headers.items())
            request = (f"POST /completion HTTP/1.1\r\nHost: 127.0.0.1\r\n{auth}Content-Type: application/json\r\n"
                       f"Content-Length: {len(body)}\r\n\r\n").encode() + body
            port = int(runner.url.rsplit(":", 1)[1])

            def twice() -> tuple[bytes, bytes]:
                with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
                    sock.sendall(request)
                    first = _reply(sock)
                    try:
                        sock.sendall(request)
                        second = _reply(sock)
                    except OSError:
                        second = b""
                    return first, second

            first, second = await asyncio.to_thread(twice)
            assert first.startswith(b"HTTP/1.1 200") and b'"stop":true' in first
            assert second.startswith(b"HTTP/1.1 200") and b'"stop":true' in second, \
                "the connection was closed after a streamed reply"
        finally:
            await runner.stop()


@pytest.mark.real
async def test_a_stream_carries_the_tokens_of_a_character_split_over_several(llama_server: Path,
                                                                           tmp_path: Path) -> None:
    """0003: a token that is only part of a UTF-8 character sends no chunk, and its id was in no
    chunk's ``tokens`` (nor in the final event's): Ollama's ``context`` of a streamed generate
    lacked it. With the patch the next chunk, or the final event, carries every token since the
    last chunk: the stream's tokens are the one answer's."""
    if STREAM_TOKENS not in patches(llama_server):
        pytest.skip(f"{llama_server} is not built by runners/build.sh with runners/patches/ (no PATCHES file)")
    write_llama(tmp_path / "m.gguf", name="m")  # random weights: byte tokens, split characters
    runner = Runner(model_plan(tmp_path, "m", num_parallel=1, ctx=1024), str(llama_server))
    split_seen = 0
    async with runner_session() as session:
        await runner.start(session)
        try:
            for seed in range(1, 9):
                ask = {"prompt": "hi", "n_predict": 16, "seed": seed, "return_tokens": True, "cache_prompt": False}
                async with session.post(f"{runner.url}/completion", json={**ask, "stream": False},
                                        headers=runner.headers) as r:
                    whole = (await r.json())["tokens"]
                streamed: list[int] = []
                async with session.post(f"{runner.url}/completion", json={**ask, "stream": True},
                                        headers=runner.headers) as r:
                    for line in (await r.read()).decode().splitlines():
                        if line.startswith("data: "):
                            event = json.loads(line[6:])
                            streamed += event.get("tokens", [])
                            if len(event.get("tokens", [])) > 1 or (event.get("stop") and event.get("tokens")):
                                split_seen += 1  # tokens that sent no chunk of their own
                assert len(whole) == 16 and streamed == whole, f"seed {seed}"
        finally:
            await runner.stop()
    assert split_seen, "no seed generated a character split over tokens: the test proved nothing"
