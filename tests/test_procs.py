"""procs.descendants: the whole tree from /proc's children files, the same as psutil's walk."""

from __future__ import annotations

import subprocess
import sys
import time

import psutil

from ollamad.procs import descendants

# a child that starts a grandchild from a second thread (children files are per thread)
TREE = """
import subprocess, sys, threading, time
sleep = [sys.executable, "-c", "import time; time.sleep(30)"]
kids = []
t = threading.Thread(target=lambda: kids.append(subprocess.Popen(sleep)))
t.start(); t.join()
kids.append(subprocess.Popen(sleep))
print("ready", flush=True)
time.sleep(30)
"""


def test_descendants_match_psutil_across_threads_and_generations() -> None:
    top = subprocess.Popen([sys.executable, "-c", TREE], stdout=subprocess.PIPE)
    try:
        assert top.stdout is not None and top.stdout.readline().strip() == b"ready"
        ours = sorted(p.pid for p in descendants(top.pid))
        theirs = sorted(p.pid for p in psutil.Process(top.pid).children(recursive=True))
        assert len(ours) == 2 and ours == theirs
        # from the test process itself: the child and both grandchildren
        assert {top.pid, *ours} <= {p.pid for p in descendants(psutil.Process().pid)}
    finally:
        for p in psutil.Process(top.pid).children(recursive=True):
            p.kill()
        top.kill()
        top.wait()


def test_descendants_of_a_gone_process_are_none() -> None:
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    time.sleep(0.05)
    assert descendants(p.pid) == []
    assert descendants(-1) == []
