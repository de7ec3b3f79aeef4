"""The child-pid records: round trip, damaged files, and never touching another process."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import psutil

from ollamad.runner.leftovers import ChildRecord, ChildRecords, is_same_process
from ollamad.settings import load_settings


def test_records_round_trip(tmp_path: Path) -> None:
    records = ChildRecords.for_port(tmp_path / "state", 1234)
    proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        records.add(proc.pid, "tiny:latest")
        (rec,) = ChildRecords(records.path).read()
        assert rec.pid == proc.pid and rec.model == "tiny:latest"
        assert is_same_process(rec) is not None
        assert is_same_process(ChildRecord(proc.pid, rec.create_time + 10, "x")) is None
        records.remove(proc.pid)
        assert ChildRecords(records.path).read() == []
    finally:
        proc.kill()
        proc.wait()
    assert is_same_process(rec) is None  # gone


def test_damaged_or_missing_file_is_empty(tmp_path: Path) -> None:
    path = tmp_path / "runners-1.json"
    assert ChildRecords(path).read() == []
    for text in ("{not json", "[]", '{"children": [{"pid": "x"}]}', '{"children": 3}'):
        path.write_text(text)
        assert ChildRecords(path).read() == []
        assert ChildRecords(path).clean_up() == []


def test_a_live_process_matches_by_pid_and_start_time(tmp_path: Path) -> None:
    me = psutil.Process()
    rec = ChildRecord(me.pid, me.create_time(), "x")
    assert is_same_process(rec) is not None


def test_new_settings_defaults() -> None:
    s = load_settings({})
    assert s.api_key == "" and not s.log_requests and s.max_body == 64 * 1024**2
    assert s.health_interval == 5 and s.health_timeout == 20
    s = load_settings({"OLLAMAD_MAX_BODY": "1KiB", "OLLAMAD_HEALTH_TIMEOUT": "3s", "OLLAMAD_API_KEY": " 'k' ",
                       "OLLAMA_ORIGINS": "http://a, http://b"})
    assert s.max_body == 1024 and s.health_timeout == 3 and s.api_key == "k"
    assert s.origins == ("http://a", "http://b")
