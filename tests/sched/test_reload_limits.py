"""Clients cannot make a shared model reload at will (issue 17, points 9 and 10), with the fake server."""

from __future__ import annotations

import threading
import time
from pathlib import Path
from typing import Any

import pytest

from ollamad.settings import SettingsError, load_settings
from tests.conftest import Daemon, fake_with


def _starts(d: Daemon) -> int:
    return d.log().count('"runner starting"')


def _gen(d: Daemon, **options: Any) -> tuple[int, Any]:
    return d.post("/api/generate", {"model": "tiny", "prompt": "hi", "stream": False,
                                    "options": {"num_predict": 1, **options}})


def test_alternating_load_options_reload_at_most_once_per_interval(daemon_factory: Any, fake_server: Path,
                                                                   models_dir: Path) -> None:
    d = daemon_factory(fake_server, models_dir, OLLAMAD_RELOAD_INTERVAL="3s")
    served = {64: 0, 128: 0}
    until = time.monotonic() + 6

    def client(num_batch: int) -> None:
        while time.monotonic() < until:
            status, body = _gen(d, num_batch=num_batch)
            assert status == 200, body
            served[num_batch] += 1

    threads = [threading.Thread(target=client, args=(n,)) for n in (64, 128)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert served[64] >= 1 and served[128] >= 1, served
    assert _starts(d) <= 4, (_starts(d), served)  # the first load, then at most one per 3 s
    assert "reload waits" in d.log()


def test_growing_num_ctx_reloads_rarely(daemon_factory: Any, fake_server: Path, models_dir: Path) -> None:
    d = daemon_factory(fake_server, models_dir, OLLAMAD_RELOAD_INTERVAL="0")
    for num_ctx in range(1000, 3000, 100):
        assert _gen(d, num_ctx=num_ctx)[0] == 200
    assert _starts(d) == 3  # 1000, then 2048 (for 1100), then 4096 (for 2100): not 20
    assert [m["context_length"] for m in d.get("/api/ps")[1]["models"]] == [4096]


def test_a_runner_dying_right_after_load_backs_off(daemon_factory: Any, models_dir: Path, tmp_path: Path) -> None:
    d = daemon_factory(fake_with(tmp_path, FAKE_CRASH_AFTER_TOKENS="0"), models_dir, OLLAMAD_LOAD_BACKOFF="60s")
    for died in (1, 2):  # once may be bad luck: a new child; twice in a row is a failed load
        status, body = _gen(d)
        assert status == 500, body
        t0 = time.monotonic()
        while d.log().count('"runner died"') < died:
            assert time.monotonic() - t0 < 10, d.log()[-3000:]
            time.sleep(0.05)
    for _ in range(3):
        status, body = _gen(d)
        assert status == 500 and "right after loading" in body["error"] and "next attempt in" in body["error"], body
    assert _starts(d) == 2  # not a new child per request


def test_load_options_a_request_may_not_set_are_ignored(daemon_factory: Any, fake_server: Path,
                                                        models_dir: Path) -> None:
    d = daemon_factory(fake_server, models_dir, OLLAMAD_REQUEST_LOAD_OPTIONS="num_ctx", OLLAMAD_RELOAD_INTERVAL="0")
    for n in (1, 2, 1, 2, 1, 2):
        assert _gen(d, num_batch=n, num_thread=n, use_mmap=n == 1)[0] == 200
    assert _starts(d) == 1
    assert "--batch-size" not in d.log() and "--no-mmap" not in d.log()
    assert _gen(d, num_ctx=8192)[0] == 200 and _starts(d) == 2  # the one it may set still reloads


def test_request_load_options_setting_is_checked() -> None:
    assert load_settings({"OLLAMAD_REQUEST_LOAD_OPTIONS": "num_ctx, num_batch"}).request_load_options == (
        "num_ctx", "num_batch")
    with pytest.raises(SettingsError, match="OLLAMAD_REQUEST_LOAD_OPTIONS"):
        load_settings({"OLLAMAD_REQUEST_LOAD_OPTIONS": "temperature"})
