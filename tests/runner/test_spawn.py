"""runner/spawn.py: children started with Popen, their exit seen through a pidfd (or, without
pidfds, started by the loop's own subprocess_exec)."""

from __future__ import annotations

import asyncio
import os
import signal
import sys
import threading

import pytest

from ollamad.runner import spawn as spawn_mod
from ollamad.runner.spawn import Child, spawn


@pytest.fixture(params=["pidfd", "loop"])
def how(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    if request.param == "loop":
        monkeypatch.setattr(spawn_mod, "pidfds", lambda: False)
    elif not spawn_mod.pidfds():
        pytest.skip("no pidfds on this kernel")
    return str(request.param)


async def test_exit_codes_and_output(how: str) -> None:
    r, w = os.pipe()
    try:
        proc = await spawn([sys.executable, "-c", "import os, sys; print(os.getsid(0) == os.getpid()); sys.exit(3)"],
                           stdout=w, env=dict(os.environ))
    finally:
        os.close(w)
    assert isinstance(proc, Child) == (how == "pidfd")
    assert await asyncio.wait_for(proc.wait(), 10) == 3 and proc.returncode == 3
    assert os.read(r, 100) == b"True\n"  # a session of its own
    os.close(r)


async def test_a_signalled_child_and_many_waiters(how: str) -> None:
    proc = await spawn([sys.executable, "-c", "import time; time.sleep(60)"], stdout=1, env=dict(os.environ))
    assert proc.returncode is None
    waiters = [asyncio.ensure_future(proc.wait()) for _ in range(3)]
    first = asyncio.ensure_future(proc.wait())
    await asyncio.sleep(0.05)
    first.cancel()  # one waiter's cancellation is not the others'
    os.kill(proc.pid, signal.SIGKILL)
    assert await asyncio.wait_for(asyncio.gather(*waiters), 10) == [-signal.SIGKILL] * 3
    assert proc.returncode == -signal.SIGKILL and await proc.wait() == -signal.SIGKILL


async def test_a_missing_binary_is_an_oserror(how: str, tmp_path: os.PathLike[str]) -> None:
    with pytest.raises(FileNotFoundError):
        await spawn([os.path.join(tmp_path, "nope")], stdout=1, env={})


async def test_children_are_reaped_from_pidfds_without_a_thread_each() -> None:
    """Python 3.11's default child watcher starts a thread per child; through a pidfd none is started."""
    if not spawn_mod.pidfds():
        pytest.skip("no pidfds on this kernel")
    before = threading.active_count()
    proc = await spawn(["sleep", "0.2"], stdout=1, env=dict(os.environ))
    assert threading.active_count() == before
    assert await asyncio.wait_for(proc.wait(), 5) == 0
