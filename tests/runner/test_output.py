"""A runner's output pipe: each line as it comes while loading, in batches once ready, all at the end."""

from __future__ import annotations

import asyncio
import os
import time

from ollamad.runner.output import BATCH_EVERY, LONGEST_LINE, OutputPipe


class Got:
    def __init__(self) -> None:
        self.calls: list[list[str]] = []

    def __call__(self, lines: list[str]) -> None:
        self.calls.append(lines)

    @property
    def lines(self) -> list[str]:
        return [ln for call in self.calls for ln in call]

    async def until(self, n: int, within: float) -> float:
        t0 = time.monotonic()
        while len(self.lines) < n:
            assert time.monotonic() - t0 < within, self.lines
            await asyncio.sleep(0.002)
        return time.monotonic() - t0


async def test_lines_come_as_written_while_loading_and_in_batches_once_ready() -> None:
    got = Got()
    out = OutputPipe(got)
    pump = asyncio.create_task(out.pump())
    try:
        for i in range(10):  # a line at a time, as llama-server's log thread writes them
            os.write(out.child_end, f"load {i}\n".encode())
            await got.until(i + 1, within=1.0)
        assert len(got.calls) == 10
        out.batch()
        await asyncio.sleep(0.01)
        before = len(got.calls)
        for i in range(40):
            os.write(out.child_end, f"request {i}\n".encode())
            await asyncio.sleep(0.001)
        await got.until(50, within=BATCH_EVERY * 3)
        assert len(got.calls) - before <= 3, got.calls[before:]  # not one wake-up per line
        assert got.lines == [f"load {i}" for i in range(10)] + [f"request {i}" for i in range(40)]
    finally:
        out.drain()
        await asyncio.wait_for(pump, 1.0)


async def test_drain_reads_what_is_left_at_once_and_ends_the_pump() -> None:
    got = Got()
    out = OutputPipe(got)
    pump = asyncio.create_task(out.pump())
    out.batch()
    await asyncio.sleep(0.01)
    os.write(out.child_end, b"hel")
    os.write(out.child_end, b"lo\nbad \xff byte\nno newline at the end")
    out.close_child_end()  # the child is gone
    t0 = time.monotonic()
    out.drain()
    assert got.lines == ["hello", "bad \ufffd byte", "no newline at the end"]
    await asyncio.wait_for(pump, 1.0)
    assert time.monotonic() - t0 < BATCH_EVERY  # the pump did not sleep out its batch
    assert out.fd == -1


async def test_a_line_longer_than_the_limit_is_cut_and_the_next_one_kept() -> None:
    got = Got()
    out = OutputPipe(got)
    pump = asyncio.create_task(out.pump())
    try:
        long = b"x" * (LONGEST_LINE * 3)
        for i in range(0, len(long), 4096):  # the pipe would block a writer of it all at once
            os.write(out.child_end, long[i : i + 4096])
            await asyncio.sleep(0)
        os.write(out.child_end, b"\nnext\n")
        await got.until(2, within=1.0)
        assert got.lines == ["x" * LONGEST_LINE, "next"]
    finally:
        out.drain()
        await asyncio.wait_for(pump, 1.0)


async def test_the_pipe_is_enlarged_so_a_burst_between_batches_does_not_block_the_writer() -> None:
    out = OutputPipe(Got())
    try:
        os.set_blocking(out.child_end, False)
        written = 0
        try:
            while written < 512 * 1024:  # a thousand requests' worth of llama-server's lines
                written += os.write(out.child_end, b"y" * 4096)
        except BlockingIOError:
            pass
        assert written >= 512 * 1024, written  # a default pipe holds 64 KiB
    finally:
        out.drain()
