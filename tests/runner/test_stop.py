"""Stopping a runner: SIGTERM, a second SIGTERM for a shutdown that hangs, SIGKILL last."""

from __future__ import annotations

import time
from pathlib import Path

from ollamad.runner.child import SECOND_TERM_AFTER, Runner
from ollamad.runner.upstream import runner_session
from tests.conftest import fake_with, model_plan


async def test_a_shutdown_that_hangs_gets_a_second_sigterm_not_the_whole_grace(models_dir: Path,
                                                                              tmp_path: Path) -> None:
    """The fake ignores its first SIGTERM and ends at the second, as llama-server does."""
    binary = fake_with(tmp_path, FAKE_STUCK_ON_TERM="1")
    runner = Runner(model_plan(models_dir, "tiny"), str(binary), stop_grace=10)
    async with runner_session() as session:
        await runner.start(session)
        t0 = time.monotonic()
        await runner.stop()
        took = time.monotonic() - t0
    assert runner.proc is not None and runner.proc.returncode == 1  # its own exit, not our SIGKILL
    assert SECOND_TERM_AFTER <= took < SECOND_TERM_AFTER + 2, took
    assert runner.ended_on_request(runner.proc.returncode)
    assert any("Received second interrupt" in line for line in runner.lines)


async def test_a_runner_that_stops_at_once_gets_one_sigterm(models_dir: Path, tmp_path: Path) -> None:
    runner = Runner(model_plan(models_dir, "tiny"), str(fake_with(tmp_path)), stop_grace=10)
    async with runner_session() as session:
        await runner.start(session)
        t0 = time.monotonic()
        await runner.stop()
        assert time.monotonic() - t0 < SECOND_TERM_AFTER
    assert runner.proc is not None and runner.proc.returncode == -15
