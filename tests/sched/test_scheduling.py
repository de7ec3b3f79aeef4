"""Scheduling rules through the daemon: slots, FIFO, queue limit, eviction, keep-alive, reloads.

Concurrency and fault timing use the fake llama-server (a real subprocess); the rules the
real binary decides (slots and their context) use the real llama-server.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import json
import shutil
import time
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from tests.conftest import Daemon, child_get, runner_children

QUEUE_FULL = {"error": "server busy, please try again.  maximum pending requests exceeded"}


async def gen(session: aiohttp.ClientSession, d: Daemon, prompt: str, model: str = "tiny",
              **extra: Any) -> tuple[int, list[Any]]:
    body = {"model": model, "prompt": prompt, **extra}
    async with session.post(f"{d.url}/api/generate", json=body) as r:
        text = await r.text()
    lines = [json.loads(ln) for ln in text.splitlines() if ln.strip()]
    return r.status, lines


async def ps(session: aiohttp.ClientSession, d: Daemon) -> dict[str, Any]:
    async with session.get(f"{d.url}/api/ps") as r:
        return await r.json()  # type: ignore[no-any-return]


async def wait_for(cond: Any, within: float = 20) -> None:
    deadline = time.monotonic() + within
    while not await cond():
        if time.monotonic() > deadline:
            raise AssertionError("condition not met in time")
        await asyncio.sleep(0.02)


@pytest.fixture
def two_models(tmp_path: Path, models_dir: Path) -> Path:
    folder = tmp_path / "m"
    folder.mkdir()
    for name in ("a", "b", "c"):
        shutil.copy(models_dir / "tiny.gguf", folder / f"{name}.gguf")
    return folder


@pytest.mark.parametrize("ahead", [0, 1])
async def test_n_plus_k_requests_exactly_n_in_flight_in_fifo_order(daemon_factory: Any, fake_server: Path,
                                                                   models_dir: Path, ahead: int) -> None:
    d = daemon_factory(fake_server, models_dir, OLLAMA_NUM_PARALLEL="2", FAKE_TOKEN_DELAY="0.05", FAKE_TOKENS="6",
                       OLLAMAD_SEND_AHEAD=str(ahead))
    async with aiohttp.ClientSession() as s:
        assert (await gen(s, d, ""))[1][-1]["done_reason"] == "load"
        tasks = []
        for i in range(6):
            tasks.append(asyncio.create_task(gen(s, d, f"p{i}")))
            await asyncio.sleep(0.03)  # fixes arrival order
        seen_busy, seen_queued = [], []
        while not all(t.done() for t in tasks):
            body = await ps(s, d)
            (m,) = body["models"]
            seen_busy.append(m["busy_slots"])
            seen_queued.append(body["queue"]["waiting"])
            await asyncio.sleep(0.01)
        results = await asyncio.gather(*tasks)
    assert all(st == 200 and lines[-1]["done"] for st, lines in results)
    assert max(seen_busy) == 2
    assert max(seen_queued) == 4  # sent ahead or not, a request without a slot counts as waiting
    (child,) = runner_children(d)
    stats = child_get(child, "/fake/stats")
    # sent to llama-server at once: its slots, plus OLLAMAD_SEND_AHEAD per slot in its own queue
    assert stats["peak_sent"] == 2 * (1 + ahead)
    # the request line says which waited for their slot in llama-server's queue: all but the first two
    assert d.log().count('"sent_ahead": true') == 4 * ahead
    assert stats["prompts"] == [f"p{i}" for i in range(6)]  # started in arrival order


async def test_request_past_the_queue_limit_gets_503_at_once(daemon_factory: Any, fake_server: Path,
                                                             models_dir: Path) -> None:
    d = daemon_factory(fake_server, models_dir, OLLAMA_NUM_PARALLEL="1", OLLAMA_MAX_QUEUE="2",
                       FAKE_TOKEN_DELAY="0.1", FAKE_TOKENS="20")
    async with aiohttp.ClientSession() as s:
        await gen(s, d, "")
        running = [asyncio.create_task(gen(s, d, f"p{i}")) for i in range(3)]

        async def two_waiting() -> bool:
            return (await ps(s, d))["queue"]["waiting"] == 2

        await wait_for(two_waiting)
        async with s.post(f"{d.url}/api/generate", json={"model": "tiny", "prompt": "x"}) as r:
            assert r.status == 503
            assert await r.json() == QUEUE_FULL
        results = await asyncio.gather(*running)
    assert [st for st, _ in results] == [200, 200, 200]


async def test_client_leaving_the_queue_is_never_started(daemon_factory: Any, fake_server: Path,
                                                         models_dir: Path) -> None:
    d = daemon_factory(fake_server, models_dir, OLLAMA_NUM_PARALLEL="1", FAKE_TOKEN_DELAY="0.05", FAKE_TOKENS="20")
    async with aiohttp.ClientSession() as s:
        await gen(s, d, "")
        first = asyncio.create_task(gen(s, d, "first"))
        await asyncio.sleep(0.2)
        leaver = asyncio.create_task(gen(s, d, "leaver"))

        async def one_waiting() -> bool:
            return (await ps(s, d))["queue"]["waiting"] == 1

        await wait_for(one_waiting)
        leaver.cancel()

        async def none_waiting() -> bool:
            return (await ps(s, d))["queue"]["waiting"] == 0

        await wait_for(none_waiting)
        assert (await first)[0] == 200
        assert (await gen(s, d, "last"))[0] == 200
    (child,) = runner_children(d)
    assert child_get(child, "/fake/stats")["prompts"] == ["first", "last"]


async def test_lru_idle_runner_is_evicted_at_the_cap_and_busy_stream_is_not_cut(
        daemon_factory: Any, fake_server: Path, two_models: Path) -> None:
    d = daemon_factory(fake_server, two_models, OLLAMA_MAX_LOADED_MODELS="2", FAKE_TOKEN_DELAY="0.05",
                       FAKE_TOKENS="30")
    async with aiohttp.ClientSession() as s:
        await gen(s, d, "", model="a")  # a loaded first: the least recently used...
        await gen(s, d, "", model="b")
        long_stream = asyncio.create_task(gen(s, d, "long", model="a"))  # ...but busy
        await asyncio.sleep(0.3)
        status, lines = await gen(s, d, "hi", model="c", options={"num_predict": 2})
        assert status == 200 and lines[-1]["done"]
        names = {m["name"] for m in (await ps(s, d))["models"]}
        assert names == {"a:latest", "c:latest"}
        status, lines = await long_stream
    assert status == 200 and lines[-1]["done"] is True and lines[-1]["eval_count"] == 30
    assert "error" not in lines[-1]


def _expires_in(m: dict[str, Any]) -> float:
    at = dt.datetime.fromisoformat(m["expires_at"].replace("Z", "+00:00"))
    return (at - dt.datetime.now(dt.UTC)).total_seconds()


@pytest.mark.parametrize(("keep_alive", "low", "high"), [
    (30, 25, 31), ("10m", 595, 601), (-1, 1e9, float("inf")), ("-1m", 1e9, float("inf")),
])
async def test_keep_alive_values(daemon_factory: Any, fake_server: Path, models_dir: Path, keep_alive: Any,
                                 low: float, high: float) -> None:
    d = daemon_factory(fake_server, models_dir)
    async with aiohttp.ClientSession() as s:
        status, _ = await gen(s, d, "x", keep_alive=keep_alive, options={"num_predict": 2})
        assert status == 200
        (m,) = (await ps(s, d))["models"]
        assert low <= _expires_in(m) <= high


async def test_keep_alive_zero_unloads_when_idle_and_env_default_applies(
        daemon_factory: Any, fake_server: Path, models_dir: Path) -> None:
    d = daemon_factory(fake_server, models_dir, OLLAMA_KEEP_ALIVE="3s")
    async with aiohttp.ClientSession() as s:
        await gen(s, d, "x", keep_alive=0, options={"num_predict": 2})

        async def unloaded() -> bool:
            return (await ps(s, d))["models"] == []

        await wait_for(unloaded, 5)
        assert not runner_children(d)
        assert d.log().count('"keep-alive expired"') == 1
        await gen(s, d, "x", options={"num_predict": 2})  # env default: 3s
        models = (await ps(s, d))["models"]
        assert not models or _expires_in(models[0]) <= 3.5
        await wait_for(unloaded, 15)
        assert d.log().count('"keep-alive expired"') == 2


async def test_no_head_of_line_blocking_while_another_model_loads(
        daemon_factory: Any, fake_server: Path, two_models: Path) -> None:
    d = daemon_factory(fake_server, two_models, FAKE_START_DELAY="4", FAKE_START_DELAY_FOR="/b.gguf")
    async with aiohttp.ClientSession() as s:
        await gen(s, d, "", model="a")
        slow = asyncio.create_task(gen(s, d, "hi", model="b", options={"num_predict": 2}))
        await asyncio.sleep(0.3)
        t0 = time.monotonic()
        status, _ = await gen(s, d, "hi", model="a", options={"num_predict": 2})
        took = time.monotonic() - t0
        assert status == 200 and not slow.done()
        assert took < 3.5  # a was served while b was still loading (b takes 4 s)
        assert (await slow)[0] == 200


async def test_load_failure_answers_waiting_requests_and_backs_off(
        daemon_factory: Any, fake_server: Path, models_dir: Path) -> None:
    d = daemon_factory(fake_server, models_dir, FAKE_EXIT_AT_START="3", OLLAMAD_LOAD_BACKOFF="30s")
    async with aiohttp.ClientSession() as s:
        results = await asyncio.gather(*(gen(s, d, "x") for _ in range(3)))
        for status, lines in results:
            assert status == 500
            assert "failed to load model" in lines[0]["error"]
        status, lines = await gen(s, d, "again")
        assert status == 500 and "next attempt in" in lines[0]["error"]
    assert d.log().count('"runner starting"') == 1  # no respawn loop


async def test_load_timeout_is_stall_detection(daemon_factory: Any, fake_server: Path, models_dir: Path) -> None:
    d = daemon_factory(fake_server, models_dir, FAKE_START_DELAY="30", OLLAMA_LOAD_TIMEOUT="1s")
    async with aiohttp.ClientSession() as s:
        status, lines = await gen(s, d, "x")
    assert status == 500
    assert lines[0]["error"].startswith("timed out waiting for llama-server to start")
    assert not runner_children(d)


# --- the real llama-server decides these ---------------------------------------------------
@pytest.mark.real
async def test_every_slot_really_has_the_context(daemon_factory: Any, llama_server: Path, models_dir: Path) -> None:
    d = daemon_factory(llama_server, models_dir, OLLAMA_NUM_PARALLEL="3")
    async with aiohttp.ClientSession() as s:
        await gen(s, d, "hi", options={"num_ctx": 1024, "num_predict": 2})
        (m,) = (await ps(s, d))["models"]
    (child,) = runner_children(d)
    assert child["argv"][child["argv"].index("--ctx-size") + 1] == "3072"
    slots = child_get(child, "/slots")
    assert [sl["n_ctx"] for sl in slots] == [1024, 1024, 1024]
    assert m["context_length"] == 1024 and m["num_parallel"] == 3


@pytest.mark.real
async def test_floor_of_four_and_honest_context_report(daemon_factory: Any, llama_server: Path,
                                                       models_dir: Path) -> None:
    d = daemon_factory(llama_server, models_dir, OLLAMA_NUM_PARALLEL="1")
    async with aiohttp.ClientSession() as s:
        await gen(s, d, "hi", options={"num_ctx": 1, "num_predict": 1})
        (m,) = (await ps(s, d))["models"]
    (child,) = runner_children(d)
    assert child["argv"][child["argv"].index("--ctx-size") + 1] == "4"
    (slot,) = child_get(child, "/slots")
    assert slot["n_ctx"] >= 4
    assert m["context_length"] == slot["n_ctx"]  # what the slot really has (llama.cpp rounds up)


@pytest.mark.real
async def test_forcing_list_gives_one_slot_with_a_warning(daemon_factory: Any, llama_server: Path,
                                                          models_dir: Path) -> None:
    d = daemon_factory(llama_server, models_dir, OLLAMA_NUM_PARALLEL="4", OLLAMAD_SINGLE_SLOT_ARCHITECTURES="llama")
    async with aiohttp.ClientSession() as s:
        await gen(s, d, "hi", options={"num_predict": 1})
        (m,) = (await ps(s, d))["models"]
    (child,) = runner_children(d)
    assert child_get(child, "/props")["total_slots"] == 1
    assert m["num_parallel"] == 1
    assert "model architecture llama does not currently support parallel requests" in d.log()


@pytest.mark.real
async def test_bigger_context_reloads_smaller_does_not(daemon_factory: Any, llama_server: Path,
                                                       models_dir: Path) -> None:
    d = daemon_factory(llama_server, models_dir, OLLAMA_NUM_PARALLEL="1")
    async with aiohttp.ClientSession() as s:
        await gen(s, d, "hi", options={"num_ctx": 2048, "num_predict": 1})
        (first,) = runner_children(d)
        await gen(s, d, "hi", options={"num_ctx": 512, "num_predict": 1})
        assert [c["pid"] for c in runner_children(d)] == [first["pid"]]  # served without a reload
        await gen(s, d, "hi", options={"num_ctx": 4096, "num_predict": 1})
        (second,) = runner_children(d)
        assert second["pid"] != first["pid"]
        assert (await ps(s, d))["models"][0]["context_length"] == 4096
