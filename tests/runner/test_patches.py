"""runners/patches/ against the real llama-server built with them (runners/build.sh)."""

from __future__ import annotations

import asyncio
import contextlib
import time
from pathlib import Path

import aiohttp
import pytest

from ollamad.models.testmodels import write_llama
from ollamad.runner.binary import PROMPT_CANCEL, patches
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
