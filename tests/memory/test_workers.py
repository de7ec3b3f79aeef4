"""RPC worker health over llama.cpp's own protocol, against a real ggml-rpc-server."""

from __future__ import annotations

import asyncio
import subprocess
from collections.abc import Iterator

import pytest

from ollamad.memory.fit import Reported, parse_buffer_line, processor
from ollamad.memory.workers import WorkerPool, WorkerStatus, probe_worker
from tests.conftest import free_port
from tests.rpcworkers import rpc_server_binary, wait_listening

pytestmark = pytest.mark.timeout(120)


@pytest.fixture
def rpc_server() -> Iterator[str]:
    port = free_port()
    proc = subprocess.Popen([str(rpc_server_binary()), "--host", "127.0.0.1", "--port", str(port)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_listening(port)
        yield f"127.0.0.1:{port}"
    finally:
        proc.terminate()
        proc.wait(10)


def test_an_idle_worker_reports_its_memory(rpc_server: str) -> None:
    st = asyncio.run(probe_worker(rpc_server))
    assert st.state == "up", st
    assert st.devices >= 1 and 0 < st.free <= st.total
    assert st.version.split(".")[0].isdigit()


def test_a_worker_serving_another_client_is_busy_then_up(rpc_server: str) -> None:
    """It serves one client at a time: a probe waits in its queue, and is answered once free."""
    async def main() -> None:
        pool = WorkerPool([rpc_server])
        host, port = rpc_server.split(":")
        _, holder = await asyncio.open_connection(host, int(port))  # accepted: the worker now serves it
        await asyncio.sleep(0.2)
        await pool.check()
        assert pool.status[rpc_server].state == "busy" and rpc_server in pool.pending
        assert pool.usable() == {}
        holder.close()
        await asyncio.sleep(0.2)
        await pool.check()  # the waiting probe is answered: no new connection needed
        assert pool.status[rpc_server].state == "up" and pool.pending == {}
        await pool.check()  # and the worker survived the probes (a bare one dies of a SIGPIPE otherwise)
        assert pool.status[rpc_server].state == "up"

    asyncio.run(main())


def test_nothing_listening_is_down() -> None:
    st = asyncio.run(probe_worker(f"127.0.0.1:{free_port()}"))
    assert st.state == "down" and st.error


def test_pool_leaves_held_workers_alone_and_counts_the_reserve(rpc_server: str) -> None:
    down = f"127.0.0.1:{free_port()}"
    probed: list[str] = []

    async def probe(ep: str) -> WorkerStatus:
        probed.append(ep)
        return await probe_worker(ep)

    async def main() -> None:
        pool = WorkerPool([rpc_server, down], reserve=1024, probe=probe)
        assert await pool.check()
        free = pool.status[rpc_server].free
        assert pool.usable() == {rpc_server: free - 1024}
        probed.clear()
        await pool.check(held={rpc_server})  # a runner of ours holds it: not probed, still usable to it
        assert probed == [down] and pool.status[rpc_server].state == "held"
        assert pool.usable(held={rpc_server}) == {rpc_server: free - 1024}
        assert pool.usable() == {}
        pool.suspect([rpc_server])  # its runner died: nothing is planned on it until checked
        assert pool.status[rpc_server].state == "unknown" and pool.usable() == {}
        task = asyncio.create_task(pool.run(lambda: None))
        await asyncio.wait_for(pool.settled(), 5)
        assert pool.status[rpc_server].state == "up"
        task.cancel()

    asyncio.run(main())


def test_a_worker_that_comes_back_is_up_again() -> None:
    port = free_port()
    ep = f"127.0.0.1:{port}"

    async def main() -> None:
        pool = WorkerPool([ep])
        await pool.check()
        assert pool.status[ep].state == "down"
        proc = await asyncio.create_subprocess_exec(
            str(rpc_server_binary()), "--host", "127.0.0.1", "--port", str(port),
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            await asyncio.to_thread(wait_listening, port)
            assert await pool.check()  # a change
            assert pool.status[ep].state == "up" and ep in pool.usable()
        finally:
            proc.terminate()
            await proc.wait()

    asyncio.run(main())


# --- what llama-server says it put on the workers ------------------------------------------
@pytest.mark.parametrize(("line", "worker", "on_host"), [
    ("load_tensors: RPC0[127.0.0.1:50101] model buffer size =     6.76 MiB", "127.0.0.1:50101", False),
    ("llama_kv_cache: RPC1[10.0.0.5:50052] KV buffer size =     3.00 MiB", "10.0.0.5:50052", False),
    ("sched_reserve: RPC0[[fd00::5]:50052] compute buffer size =    14.04 MiB", "[fd00::5]:50052", False),
    ("load_tensors:   CPU_Mapped model buffer size =     0.25 MiB", None, True),
    ("load_tensors:        CUDA0 model buffer size =   100.00 MiB", None, False),
])
def test_rpc_buffer_lines_are_counted_per_worker(line: str, worker: str | None, on_host: bool) -> None:
    b = parse_buffer_line(line)
    assert b is not None and b.worker == worker and b.on_host is on_host
    r = Reported().add(b)
    assert (r.rpc > 0) is (worker is not None)
    assert r.total == (0 if worker else b.size)  # total is what is on this machine


@pytest.mark.parametrize(("vram", "size", "rpc", "text"), [
    (0, 100, 65, "35% CPU / 65% RPC"),
    (30, 100, 60, "10% CPU / 30% GPU / 60% RPC"),
    (0, 100, 0, "100% CPU"),
    (48, 100, 0, "52%/48% CPU/GPU"),
])
def test_processor_shows_the_split(vram: int, size: int, rpc: int, text: str) -> None:
    assert processor(vram, size, rpc) == text
