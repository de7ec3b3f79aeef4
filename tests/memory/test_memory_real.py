"""Done-when for the memory accountant, with the real llama-server and generated models.

A memory budget holds two of three models: loading the third evicts the least recently
used idle one, a busy one is never killed, and /api/ps sizes match the children's RSS.
"""

from __future__ import annotations

import contextlib
import http.client
import json
import socket
import threading
import time
from pathlib import Path
from typing import Any

import psutil
import pytest

from ollamad.models.estimate import PROCESS_OVERHEAD, estimate_memory
from ollamad.models.facts import facts_from_gguf
from ollamad.models.ggufmeta import read_gguf
from ollamad.models.testmodels import SMALL, write_llama
from tests.conftest import Daemon

pytestmark = pytest.mark.real
NP, CTX = 2, 4096


@pytest.fixture(scope="module")
def three_models(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("three")
    for i, name in enumerate(("m1", "m2", "m3")):
        write_llama(folder / f"{name}.gguf", SMALL, name=name, seed=i)
    return folder


def loaded(d: Daemon) -> dict[str, dict[str, Any]]:
    return {m["name"].split(":")[0]: m for m in d.get("/api/ps")[1]["models"]}


def evictions(d: Daemon, to_load: str) -> list[str]:
    """Models the daemon unloaded to make room for ``to_load``, from its JSON log."""
    out = []
    for line in d.log().splitlines():
        try:
            ev = json.loads(line)
        except ValueError:
            continue
        if ev.get("event") == "unloading model" and ev.get("reason", "").startswith(f"evicted to load {to_load}"):
            out.append(ev["model"])
    return out


def gen(d: Daemon, model: str, n: int = 4) -> None:
    status, body = d.post("/api/generate", {"model": model, "prompt": "hi", "stream": False,
                                            "options": {"num_predict": n}})
    assert status == 200, body


def test_budget_for_two_evicts_lru_idle_never_busy_and_sizes_match_rss(
        daemon_factory: Any, llama_server: Path, three_models: Path) -> None:
    facts = facts_from_gguf(read_gguf(three_models / "m1.gguf"))
    # the budget counts each runner as the larger of its RSS and its buffers plus overhead
    # (~the estimate): 2.5 estimates hold two of them, never three
    est = estimate_memory(facts, NP, CTX)
    d: Daemon = daemon_factory(llama_server, three_models, OLLAMA_NUM_PARALLEL=str(NP),
                               OLLAMA_CONTEXT_LENGTH=str(CTX), OLLAMAD_MEMORY_POLL="0.2s",
                               OLLAMAD_MEMORY_BUDGET=str(int(2.5 * est.total)), OLLAMAD_SCHED_POLICY="fifo")
    # least recently used idle one goes: m1
    gen(d, "m1")
    gen(d, "m2")
    assert set(loaded(d)) == {"m1", "m2"}
    gen(d, "m3")
    assert set(loaded(d)) == {"m2", "m3"}
    assert evictions(d, "m3") == ["m1:latest"]

    # m2 is now the least recently used, but busy with a long stream: m3 (idle) goes instead.
    # Greedy decoding: these random models never emit </s> then (checked), and no limit (-1)
    # with context shift is 10 x the context, 40960 tokens: the stream runs until the client hangs
    # up, as it does below (4000 tokens took from 1.9 s to much longer, once too short for the checks).
    m2_pid = loaded(d)["m2"]["pid"]
    conn = http.client.HTTPConnection("127.0.0.1", d.port, timeout=280)
    conn.request("POST", "/api/generate", json.dumps(
        {"model": "m2", "prompt": "go", "options": {"num_predict": -1, "temperature": 0}}))
    resp = conn.getresponse()
    got: list[dict[str, Any]] = []

    def read() -> None:
        with contextlib.suppress(OSError, ValueError, http.client.HTTPException):  # we hang up below
            for raw in resp:
                if raw.strip():
                    got.append(json.loads(raw))

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    deadline = time.monotonic() + 60
    while not got and time.monotonic() < deadline:
        time.sleep(0.01)
    assert resp.status == 200 and got and not got[0]["done"]
    assert loaded(d)["m2"]["busy_slots"] == 1
    gen(d, "m1")
    still = loaded(d)
    assert still["m2"]["busy_slots"] == 1 and still["m2"]["pid"] == m2_pid  # in flight all along
    assert reader.is_alive() and not any(x.get("done") or "error" in x for x in got)
    assert conn.sock is not None
    conn.sock.shutdown(socket.SHUT_RDWR)  # the client hangs up: the daemon cancels the request
    reader.join(30)
    conn.close()
    assert evictions(d, "m1") == ["m3:latest"]
    now = loaded(d)
    assert set(now) == {"m1", "m2"} and now["m2"]["pid"] == m2_pid

    # /api/ps sizes against psutil's RSS of each child; the estimate against llama-server's log
    time.sleep(0.5)  # a fresh snapshot after the stream ended
    for name, m in loaded(d).items():
        rss = psutil.Process(m["pid"]).memory_info().rss
        assert abs(m["size"] - rss) <= 0.10 * rss, (name, m["size"], rss)
        assert m["size_vram"] == 0 and m["processor"] == "100% CPU"
        assert m["reported_size"] > 0
        reported_total = m["reported_size"] + PROCESS_OVERHEAD
        assert abs(m["estimated_size"] - reported_total) <= 0.10 * reported_total, (name, m)
        assert m["context_length"] == CTX


@pytest.mark.parametrize(("model", "np_", "ctx"), [("tiny", 4, 2048), ("tiny", 1, 8192), ("small", 4, 4096),
                                                    ("small", 3, 1000)])
async def test_estimate_matches_what_this_llama_server_logs(llama_server: Path, models_dir: Path, model: str,
                                                            np_: int, ctx: int) -> None:
    """Live counterpart of tests/test_estimate.py: catches a llama-server whose buffers changed."""
    import aiohttp

    from ollamad.memory.accountant import Accountant
    from ollamad.memory.probe import MemoryProbe
    from ollamad.runner.child import Runner
    from tests.conftest import model_plan

    plan = model_plan(models_dir, model, num_parallel=np_, ctx=ctx)
    acct = Accountant(MemoryProbe(None))
    runner = Runner(plan, str(llama_server), on_line=acct.track(1, plan))
    async with aiohttp.ClientSession() as session:
        try:
            await runner.start(session)
            assert runner.pid is not None
            snap = acct.probe.snapshot([runner.pid])
        finally:
            await runner.stop()
    assert plan.detail is not None
    reported = acct.runners[1].reported
    assert reported.gpu == 0 and reported.host > 0
    assert abs(plan.detail.buffers - reported.host) <= 0.10 * reported.host, (plan.detail, reported)
    rss = snap.processes[runner.pid].rss  # RSS is below the buffers: compute pages are not all touched yet
    assert 0 < rss < plan.estimate
