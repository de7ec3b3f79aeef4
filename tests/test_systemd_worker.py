"""systemd/ollamad-worker.service under a real systemd (tests/sysd.py), as an admin sets it up
after scripts/install.sh: it runs hardened, a daemon's model is split onto it, it restarts
after a SIGKILL, a wildcard address stops it with exit 78 and no restart loop, and stopping it
leaves no ggml-rpc-server behind."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from typing import Any

import pytest

from tests import sysd
from tests.streams import wait_until

pytestmark = [pytest.mark.systemd, pytest.mark.timeout(300)]

ADMIN = sysd.ADMIN
WORKER = "127.0.0.1:50052"
PROBE = ("import asyncio, sys; from ollamad.memory.workers import probe_worker; "
         f"print(asyncio.run(probe_worker('{WORKER}')).state)")


@pytest.fixture(scope="module")
def box(tmp_path_factory: pytest.TempPathFactory) -> Iterator[sysd.Container]:
    with sysd.booted(tmp_path_factory, "sysd-worker", ("small",)) as c:
        r = c.run(["sudo", "/project/scripts/install.sh"], user=ADMIN, check=False, timeout=240)
        assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
        yield c


def sh(c: sysd.Container, cmd: str, check: bool = True) -> str:
    return c.run(cmd, check=check).stdout


def probe(c: sysd.Container) -> str:
    return sh(c, f'/opt/ollamad/venv/bin/python -c "{PROBE}"', check=False).strip()


def test_the_worker_runs_hardened(box: sysd.Container) -> None:
    c = box
    sh(c, "install -m 0644 /project/systemd/ollamad-worker.service /etc/systemd/system/ && "
          "systemctl daemon-reload && systemctl start ollamad-worker")
    assert wait_until(lambda: probe(c) == "up", "the worker to answer")
    main_pid = sh(c, "systemctl show -p MainPID --value ollamad-worker").strip()
    status = sh(c, f"cat /proc/$(pgrep -P {main_pid} ggml-rpc-server)/status")
    assert "NoNewPrivs:\t1" in status and "CapEff:\t0000000000000000" in status
    assert sh(c, "stat -c %U /var/cache/ollamad-worker/rpc").strip() == "ollamad"  # --cache, its own folder
    score = sh(c, "systemd-analyze security --no-pager ollamad-worker | tail -n 1")
    assert float(score.split(":")[1].split()[0]) <= 2.0, score


def test_a_daemon_splits_a_model_onto_it(box: sysd.Container) -> None:
    c = box
    # the model in the service's own folder, forced onto the workers by the per-model setting
    sh(c, "install -o ollamad -g ollamad -m 0640 /srv/models/small.gguf /var/lib/ollamad/models/ && "
          "printf '[models.\"small\"]\\nrpc = \"always\"\\n' > /var/lib/ollamad/models.toml && "
          "chown ollamad /var/lib/ollamad/models.toml && "
          "mkdir -p /etc/systemd/system/ollamad.service.d && printf '[Service]\\n"
          f"Environment=OLLAMAD_RPC_WORKERS={WORKER}\\n"
          "Environment=OLLAMAD_MODEL_SETTINGS=/var/lib/ollamad/models.toml\\n' "
          "> /etc/systemd/system/ollamad.service.d/rpc.conf && systemctl daemon-reload")
    r = c.run("systemctl restart ollamad", check=False)
    assert r.returncode == 0, sh(c, "journalctl -u ollamad --no-pager | tail -n 20")
    body = json.dumps({"model": "small", "prompt": "hi", "stream": False, "options": {"num_predict": 4}})
    out = wait_until(lambda: sh(c, f"curl -s localhost:11434/api/generate -d '{body}'", check=False).strip(),
                     "an answer", timeout=60)
    assert json.loads(out)["done"] is True, out
    ps: dict[str, Any] = json.loads(sh(c, "curl -s localhost:11434/api/ps"))
    (m,) = ps["models"]
    assert m["processor"].endswith("% RPC") and [w["endpoint"] for w in m["rpc_workers"]] == [WORKER]
    sh(c, "curl -s localhost:11434/api/generate -d '{\"model\": \"small\", \"keep_alive\": 0}'")
    wait_until(lambda: not json.loads(sh(c, "curl -s localhost:11434/api/ps"))["models"], "the unload")


def test_sigkill_restarts_it(box: sysd.Container) -> None:
    c = box
    before = sh(c, "systemctl show -p MainPID --value ollamad-worker").strip()
    sh(c, "systemctl kill -s SIGKILL ollamad-worker")
    wait_until(lambda: sh(c, "systemctl show -p MainPID --value ollamad-worker").strip() not in ("0", before),
               "a restart", timeout=20)
    assert wait_until(lambda: probe(c) == "up", "the worker to answer again")


def test_a_wildcard_address_exits_78_without_a_restart_loop(box: sysd.Container) -> None:
    c = box
    sh(c, "mkdir -p /etc/systemd/system/ollamad-worker.service.d && printf '[Service]\\n"
          "Environment=OLLAMAD_WORKER_HOST=0.0.0.0\\n' > /etc/systemd/system/ollamad-worker.service.d/any.conf && "
          "systemctl daemon-reload && systemctl restart ollamad-worker", check=False)
    wait_until(lambda: sh(c, "systemctl is-active ollamad-worker", check=False).strip() == "failed", "the failure")
    assert sh(c, "systemctl show -p ExecMainStatus --value ollamad-worker").strip() == "78"
    time.sleep(6)  # longer than RestartSec: still failed, not restarting
    assert sh(c, "systemctl is-active ollamad-worker", check=False).strip() == "failed"
    assert "no authentication" in sh(c, "journalctl -u ollamad-worker --no-pager")


def test_stop_leaves_no_worker_behind(box: sysd.Container) -> None:
    c = box
    sh(c, "rm /etc/systemd/system/ollamad-worker.service.d/any.conf && systemctl daemon-reload && "
          "systemctl reset-failed ollamad-worker && systemctl start ollamad-worker")
    assert wait_until(lambda: probe(c) == "up", "the worker to answer")
    sh(c, "systemctl stop ollamad-worker")
    assert sh(c, "pgrep -c ggml-rpc-server", check=False).strip() == "0"
    assert probe(c) == "down"
