"""Runners this daemon started, recorded on disk so that a restarted daemon can end its own.

The parent-death signal normally takes children down with the daemon; this covers what it
cannot (a child that blocked it, a kernel that lost it). A record is a pid plus the
process's start time, so a pid reused by some other process is never touched. One file per
listening port: two daemons on one machine never see each other's children. A record also
names the runner's key file: a daemon that was killed could not remove it, so the restarted
one does.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
from dataclasses import asdict, dataclass
from pathlib import Path

import psutil
import structlog

log = structlog.get_logger("ollamad.leftovers")
START_TIME_SLACK = 0.05  # seconds; create_time is rounded differently across reads
KEY_FILE = ("ollamad-runner-", ".key")  # what runner/child.py names them: nothing else is removed


@dataclass(frozen=True)
class ChildRecord:
    pid: int
    create_time: float
    model: str
    key_file: str = ""


def is_same_process(rec: ChildRecord) -> psutil.Process | None:
    """The live process ``rec`` describes, or None if it is gone or the pid now belongs to another."""
    try:
        proc = psutil.Process(rec.pid)
        if abs(proc.create_time() - rec.create_time) > START_TIME_SLACK:
            return None
        if proc.uids().real != os.getuid():
            return None
        return proc
    except (psutil.Error, OSError):
        return None


class ChildRecords:
    """The state file listing live children; rewritten atomically on every change."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._live: dict[int, ChildRecord] = {}

    @classmethod
    def for_port(cls, state_dir: Path, port: int) -> ChildRecords:
        return cls(state_dir / f"runners-{port}.json")

    def add(self, pid: int, model: str, key_file: str | None = None) -> None:
        try:
            created = psutil.Process(pid).create_time()
        except psutil.Error:
            return  # already gone: nothing to clean up later (its key file goes with it)
        self._live[pid] = ChildRecord(pid, created, model, key_file or "")
        self._write()

    def remove(self, pid: int | None) -> None:
        if pid is not None and self._live.pop(pid, None) is not None:
            self._write()

    def read(self) -> list[ChildRecord]:
        try:
            data = json.loads(self.path.read_text())
            return [ChildRecord(int(d["pid"]), float(d["create_time"]), str(d.get("model", "")),
                                str(d.get("key_file", ""))) for d in data.get("children", [])]
        except (OSError, ValueError, TypeError, KeyError, AttributeError):
            return []

    def clean_up(self, found: list[ChildRecord] | None = None) -> list[ChildRecord]:
        """SIGKILL every recorded child still alive (and its group); returns those ended.
        Every recorded key file is removed. ``found``: the records as read earlier (before this
        daemon could start runners of its own), rather than the file as it is now."""
        ended = []
        for rec in self.read() if found is None else found:
            _remove_key_file(rec.key_file)
            proc = is_same_process(rec)
            if proc is None:
                continue
            log.warning("ending a runner left over from an earlier run", pid=rec.pid, model=rec.model)
            with contextlib.suppress(psutil.Error, OSError):
                descendants = proc.children(recursive=True)
                if os.getpgid(rec.pid) == rec.pid:  # started with its own session: end the group
                    os.killpg(rec.pid, signal.SIGKILL)
                proc.kill()
                for child in descendants:
                    with contextlib.suppress(psutil.Error):
                        child.kill()
                proc.wait(5)
            ended.append(rec)
        self._write()  # this daemon's own runners, if any
        return ended

    def _write(self) -> None:
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            tmp = self.path.with_suffix(".tmp")
            tmp.write_text(json.dumps({"children": [asdict(r) for r in self._live.values()]}))
            os.replace(tmp, self.path)
        except OSError as e:
            log.warning("cannot record runner pids", path=str(self.path), error=str(e))


def _remove_key_file(path: str) -> None:
    name = os.path.basename(path)
    if name.startswith(KEY_FILE[0]) and name.endswith(KEY_FILE[1]):
        with contextlib.suppress(OSError):
            os.unlink(path)
