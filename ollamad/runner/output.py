"""A runner's output pipe: every line as it comes while llama-server loads, in batches once it serves.

llama-server runs at ``--verbosity 4`` (the buffer-size lines the memory accountant reads are
printed only there) and so prints about 27 lines per request, each written to the pipe on its
own. Read as they come, each line woke the daemon: 17% of its busy samples with a real
llama-server and one-answer requests (py-spy), and llama-server's log thread woke it for
each. Once the runner is ready nothing needs a line at once, so the pipe is left out of the
event loop and read every ``BATCH_EVERY`` seconds, and whenever the runner ends, all that is
there. The pipe is enlarged so that a burst of output between two reads does not fill it (a
full pipe would only hold up llama-server's log thread, not its work).
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import os
from collections.abc import Callable

BATCH_EVERY = 0.25  # seconds between reads of a ready runner's output
PIPE_SIZE = 1 << 20  # bytes: /proc/sys/fs/pipe-max-size's default; smaller where that is lower
LONGEST_LINE = 1 << 16  # bytes kept of a line; the rest of a longer one is dropped
READ_SIZE = 1 << 16


class OutputPipe:
    """A pipe for a child's stdout and stderr; ``on_lines`` gets the lines of each read, decoded,
    stripped, without empty ones.

    ``child_end`` goes to the child; ``close_child_end()`` once it has it. ``pump()`` reads the
    lines until the pipe ends: each as it comes until ``batch()`` is called, then in batches.
    ``drain()`` reads what is left at once (the child has ended), and closes the pipe.
    """

    def __init__(self, on_lines: Callable[[list[str]], None]) -> None:
        self.on_lines = on_lines
        self.fd, self.child_end = os.pipe2(os.O_CLOEXEC)  # the child gets its end dup'ed, without the flag
        os.set_blocking(self.fd, False)
        with contextlib.suppress(OSError):  # EPERM above pipe-max-size: keep the default
            fcntl.fcntl(self.child_end, fcntl.F_SETPIPE_SZ, PIPE_SIZE)
        self._partial = b""
        self._batched = False
        self._wake = asyncio.Event()
        self.ended = False

    def close_child_end(self) -> None:
        if self.child_end >= 0:
            os.close(self.child_end)
            self.child_end = -1

    def batch(self) -> None:
        """From now on read in batches, every BATCH_EVERY seconds."""
        self._batched = True
        self._wake.set()

    async def pump(self) -> None:
        loop = asyncio.get_running_loop()
        loop.add_reader(self.fd, self._wake.set)
        try:
            while not self._batched:
                await self._wake.wait()
                self._wake.clear()
                if not self.read():
                    return
        finally:
            with contextlib.suppress(ValueError):  # the pipe was closed by drain()
                loop.remove_reader(self.fd)
        self._wake.clear()
        while self.read():  # every BATCH_EVERY seconds, or at once when drain() has ended the pipe
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), BATCH_EVERY)

    def read(self) -> bool:
        """Hand on every whole line the pipe holds now; False once it has ended."""
        if self.ended:
            return False
        while True:
            try:
                data = os.read(self.fd, READ_SIZE)
            except BlockingIOError:
                return True
            except OSError:  # closed
                data = b""
            if not data:
                self.ended = True
                if self._partial:
                    self._hand_on(self._partial)
                    self._partial = b""
                return False
            data = self._partial + data
            cut = data.rfind(b"\n")
            if cut < 0:
                self._partial = data[:LONGEST_LINE]
                continue
            self._partial = data[cut + 1 : cut + 1 + LONGEST_LINE]
            self._hand_on(data[:cut])

    def drain(self) -> None:
        """Read what the ended child left, and close the pipe."""
        self.read()
        if self._partial:
            self._hand_on(self._partial)
            self._partial = b""
        self.ended = True
        self._wake.set()  # a pump still waiting for a line ends
        if self.fd >= 0:
            with contextlib.suppress(ValueError):
                asyncio.get_running_loop().remove_reader(self.fd)
            os.close(self.fd)
            self.fd = -1
        self.close_child_end()

    def _hand_on(self, data: bytes) -> None:
        """Whole lines, decoded at once (a line cut by the read size is decoded with its rest)."""
        lines = [ln.rstrip() for ln in data.decode("utf-8", errors="replace").split("\n")]
        lines = [ln[:LONGEST_LINE] for ln in lines if ln]
        if lines:
            self.on_lines(lines)
