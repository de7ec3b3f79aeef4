"""The daemon's client to its runners, against a real llama-server (ollamad/upstream.py)."""

from __future__ import annotations

import asyncio
from pathlib import Path

import aiohttp
import pytest

from ollamad.runner.child import Runner
from ollamad.runner.upstream import runner_session
from tests.conftest import model_plan


@pytest.mark.real
async def test_connections_llama_server_closes_lose_no_request(llama_server: Path, models_dir: Path) -> None:
    """llama-server closes connections after streamed replies without a Connection: close. Four
    clients each sending a request the moment a stream ends: a plain pooled session
    (TCPConnector, 2 s keep-alive) met a closed socket ("Server disconnected", "Can not write
    request body") in 5 runs of 5 of this test. The runner session sends such a request again."""
    runner = Runner(model_plan(models_dir, "tiny", num_parallel=4, ctx=256), str(llama_server))
    errors: list[str] = []
    async with runner_session() as session:
        await runner.start(session)
        try:
            async def client(c: int) -> None:
                for i in range(30):
                    body = {"prompt": "hi", "n_predict": 4, "stream": i % 2 == 0, "seed": i}
                    try:
                        async with session.post(f"{runner.url}/completion", json=body,
                                                headers=runner.headers) as r:
                            await r.read()
                            if r.status != 200:
                                errors.append(f"status {r.status}")
                    except aiohttp.ClientError as e:
                        errors.append(f"{type(e).__name__}: {e}")
                    await asyncio.sleep(0 if i % 2 == 0 else 0.02)  # the next request at once after a stream

            await asyncio.gather(*(client(c) for c in range(4)))
        finally:
            await runner.stop()
    assert errors == []
