"""Starting a runner's process: ``subprocess.Popen``, its exit awaited through a pidfd.

Python's subprocess starts a child with vfork (without a ``preexec_fn``): 0.4 ms from a process
the daemon's size, measured. uvloop's ``subprocess_exec`` forks the whole process instead:
4.5 ms there, and in the daemon 6 ms more CPU and 12 ms more wall time per model switch
(load, stop, one request). So runners are started here, on either event loop, and their
exit comes to the loop as their pidfd turning readable (Linux 5.3+): no thread per child,
where Python 3.11's default child watcher starts one for each and waits for it to run (11% of
the daemon's busy samples in a load of a small model, py-spy, the loop blocked meanwhile).
Where pidfds cannot be had, the loop's own ``subprocess_exec`` starts them.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import os
import subprocess
from collections.abc import Callable
from typing import Protocol


class Process(Protocol):
    """What a runner needs of its process (``asyncio.subprocess.Process`` has it too)."""

    @property
    def pid(self) -> int: ...

    @property
    def returncode(self) -> int | None: ...

    async def wait(self) -> int: ...


class Child:
    """A started child; ``returncode`` once its exit has come to the loop, as asyncio's has it."""

    def __init__(self, popen: subprocess.Popen[bytes], pidfd: int) -> None:
        self._popen = popen
        self._pidfd = pidfd
        self._loop = asyncio.get_running_loop()
        self._exited: asyncio.Future[int] = self._loop.create_future()
        self._loop.add_reader(pidfd, self._check)

    @property
    def pid(self) -> int:
        return self._popen.pid

    @property
    def returncode(self) -> int | None:
        return self._exited.result() if self._exited.done() else None

    async def wait(self) -> int:
        return await asyncio.shield(self._exited)

    def _check(self) -> None:
        code = self._popen.poll()  # reaps it: waitpid on this pid only
        if code is None:
            return
        self._loop.remove_reader(self._pidfd)
        os.close(self._pidfd)
        if not self._exited.done():
            self._exited.set_result(code)


@functools.cache
def pidfds() -> bool:
    """Whether this kernel (and its seccomp filter) gives pidfds."""
    if not hasattr(os, "pidfd_open"):
        return False
    try:
        os.close(os.pidfd_open(os.getpid()))
    except OSError:
        return False
    return True


async def spawn(argv: list[str], *, stdout: int, env: dict[str, str],
                preexec_fn: Callable[[], None] | None = None) -> Process:
    """Start ``argv`` in a session of its own, stdin from /dev/null, stdout and stderr to
    ``stdout``; OSError if it cannot be started."""
    if not pidfds():
        return await asyncio.create_subprocess_exec(
            *argv, stdin=subprocess.DEVNULL, stdout=stdout, stderr=subprocess.STDOUT, env=env,
            start_new_session=True, preexec_fn=preexec_fn)
    # in the loop's thread, as asyncio's own subprocess_exec calls Popen: it returns once the child has exec'd
    popen = subprocess.Popen(  # noqa: ASYNC220
        argv, stdin=subprocess.DEVNULL, stdout=stdout, stderr=subprocess.STDOUT, env=env, start_new_session=True,
        preexec_fn=preexec_fn)
    try:
        pidfd = os.pidfd_open(popen.pid)
    except OSError:  # cannot be: it is our unreaped child; but never leave it unwatched
        with contextlib.suppress(OSError):
            popen.kill()
        popen.wait()
        raise
    return Child(popen, pidfd)
