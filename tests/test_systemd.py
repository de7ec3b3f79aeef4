"""The service under a real systemd, driven as an admin would (issue 16).

One container (tests/sysd.py: systemd 252 as PID 1 of systemd-nspawn, on a cached Debian
root filesystem) is booted for the module; the tests run in order on it: install with sudo
from a read-only checkout, status and requests, the secret out of `ps`, hardening, a
drop-in, the env file winning, SIGKILL and the restart, reload while streaming, stop while
streaming (drain, then cut), exit 78 without a restart loop, journal priorities, uninstall
and purge, then a failed install leaving nothing behind. Skipped, with the reason, where it
cannot run (not root, no systemd-nspawn, OLLAMAD_TEST_SYSTEMD=0).
"""

from __future__ import annotations

import json
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests import sysd
from tests.streams import wait_until

pytestmark = [pytest.mark.systemd, pytest.mark.timeout(300)]

URL = "http://127.0.0.1:11434"
ADMIN = sysd.ADMIN
RUNNERS_INSIDE = sysd.RUNNERS_INSIDE
FAKE = "/usr/local/lib/ollamad-test/llama-server"  # the fake llama-server, slowed down, for drain tests
FAKE_DROP_IN = "/etc/systemd/system/ollamad.service.d/test-fake.conf"


@pytest.fixture(scope="module")
def box(tmp_path_factory: pytest.TempPathFactory) -> Iterator[sysd.Container]:
    with sysd.booted(tmp_path_factory, "sysd", ("tiny",)) as c:
        yield c


def sh(c: sysd.Container, cmd: str, user: str = "root", check: bool = True, timeout: float = 120) -> str:
    return c.run(cmd, user=user, check=check, timeout=timeout).stdout


def api(c: sysd.Container, path: str, body: Any = None, user: str = "root") -> tuple[int, Any]:
    """A request from inside the container (curl), as a local user would make it."""
    data = ["-H", "Content-Type: application/json", "--data-binary", "@-"] if body is not None else []
    r = c.run(["curl", "-s", "-w", "\n%{http_code}", *data, URL + path], user=user,
              input=json.dumps(body) if body is not None else None, check=False)
    text, _, code = r.stdout.rpartition("\n")
    try:
        return int(code), json.loads(text)
    except ValueError:
        return int(code or 0), text


def show(c: sysd.Container, prop: str) -> str:
    return sh(c, f"systemctl show -p {prop} --value ollamad").strip()


def runner_argv(c: sysd.Container) -> list[list[str]]:
    return [ln.split() for ln in sh(c, "ps -C llama-server -o args= || true").splitlines() if ln.strip()]


def generate(c: sysd.Container, n: int = 4) -> dict[str, Any]:
    status, body = api(c, "/api/generate", {"model": "tiny", "prompt": "hi", "stream": False,
                                            "options": {"num_predict": n}})
    assert status == 200 and body["done"] is True, body
    assert isinstance(body, dict)
    return body


class Stream:
    """A streaming /api/generate from inside the container; lines read as they come."""

    def __init__(self, c: sysd.Container, n: int) -> None:
        body = json.dumps({"model": "tiny", "prompt": "count", "options": {"num_predict": n}})
        self.proc = c.popen(["curl", "-sN", "--data-binary", body, URL + "/api/generate"],
                            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)

    def line(self) -> dict[str, Any]:
        assert self.proc.stdout is not None
        raw = self.proc.stdout.readline()
        assert raw, "the stream ended"
        out = json.loads(raw)
        assert isinstance(out, dict)
        return out

    def rest(self) -> list[dict[str, Any]]:
        assert self.proc.stdout is not None
        out = [json.loads(ln) for ln in self.proc.stdout.read().splitlines() if ln.strip()]
        self.proc.wait(30)
        return out


def journal(c: sysd.Container, since: str, *args: str) -> str:
    return sh(c, f"journalctl -u ollamad -o cat --no-pager --since @{since} {' '.join(args)}")


def now(c: sysd.Container) -> str:
    return sh(c, "date +%s").strip()


def use_slow_fake(c: sysd.Container) -> None:
    """The fake llama-server at 0.1 s a token, and a 2 s drain timeout, through a drop-in (kept if there)."""
    if c.run(f"test -e {FAKE_DROP_IN}", check=False).returncode == 0:
        return
    c.run(f"mkdir -p {Path(FAKE).parent} && cat > {FAKE} && chmod 755 {FAKE}", input=(
        "#!/bin/sh\nexport FAKE_TOKEN_DELAY=0.1\n"
        "exec /opt/ollamad/venv/bin/python /project/tests/fake_llama_server.py \"$@\"\n"))
    c.run(f"cat > {FAKE_DROP_IN} && systemctl daemon-reload && systemctl restart ollamad", input=(
        f"[Service]\nEnvironment=OLLAMAD_LLAMA_SERVER={FAKE}\nEnvironment=OLLAMAD_DRAIN_TIMEOUT=2s\n"))


def edit_unit(c: sysd.Container, text: str) -> None:
    """`systemctl edit ollamad` as an admin does it (systemd 252 wants a terminal: script gives one)."""
    c.run("cat > /tmp/override.conf", input=text)
    sh(c, "script -qec 'SYSTEMD_EDITOR=\"cp /tmp/override.conf\" systemctl edit ollamad' /dev/null")


# --- install ------------------------------------------------------------------------------

def test_install_with_sudo_from_a_read_only_checkout(box: sysd.Container) -> None:
    c = box
    assert c.run("touch /project/x", check=False).returncode != 0  # the checkout is read-only
    r = c.run(["sudo", "/project/scripts/install.sh"], user=ADMIN, check=False, timeout=240)
    assert r.returncode == 0, r.stderr
    # HOME is /root under sudo: the admin's cached build is found, not rebuilt (7 minutes)
    assert f"the cached build {RUNNERS_INSIDE}/" in r.stderr and "building it" not in r.stderr
    assert show(c, "ActiveState") == "active" and show(c, "Type") == "notify"
    # the client is on the admin's PATH, as the README's `ollamad list` assumes
    assert sh(c, "command -v ollamad", user=ADMIN).strip() == "/usr/local/bin/ollamad"
    assert sh(c, "ls /opt/ollamad/runners/current/bin/llama-server")
    sh(c, "install -o ollamad -g ollamad -m 0640 /srv/models/tiny.gguf /var/lib/ollamad/models/ "
          "&& systemctl reload ollamad")
    wait_until(lambda: "tiny:latest" in sh(c, "ollamad list", user=ADMIN), what="tiny in ollamad list")


def test_status_a_request_and_the_client(box: sysd.Container) -> None:
    c = box
    status = sh(c, "systemctl status --no-pager ollamad")
    assert "active (running)" in status and 'Status: "loaded: none' in status
    body = generate(c)
    assert body["eval_count"] == 4
    assert "tiny:latest 0/" in show(c, "StatusText") or wait_until(
        lambda: "tiny:latest 0/" in show(c, "StatusText"), timeout=5, what="STATUS= with the model")
    # a client reading only the start: no BrokenPipeError traceback
    r = c.run("set -o pipefail; ollamad run tiny hello there | head -c 3", user=ADMIN, check=False)
    assert "Traceback" not in r.stderr and "BrokenPipe" not in r.stderr, r.stderr


def test_other_users_see_no_runner_secret(box: sysd.Container) -> None:
    c = box
    generate(c)
    (argv,) = runner_argv(c)
    assert "--api-key" not in argv and "--api-key-file" in argv
    port = argv[argv.index("--port") + 1]
    pid = sh(c, "pgrep -x llama-server").split()[0]
    key_file = argv[argv.index("--api-key-file") + 1]
    # the file is in the service's private /tmp, 0600, owned by the service user
    st = sh(c, f"stat -c '%a %U' /proc/{pid}/root{key_file}").split()
    assert st == ["600", "ollamad"]
    key = sh(c, f"cat /proc/{pid}/root{key_file}").strip()
    assert len(key) >= 24
    seen = sh(c, "ps -eo user,args", user=sysd.OTHER)
    assert "llama-server" in seen and key not in seen
    assert c.run(f"cat {key_file}", user=sysd.OTHER, check=False).returncode != 0
    code = sh(c, f"curl -s -o /dev/null -w '%{{http_code}}' http://127.0.0.1:{port}/slots", user=sysd.OTHER)
    assert code == "401"
    assert key not in sh(c, "journalctl -u ollamad -o cat --no-pager")


def test_hardening_is_applied_inside_the_service(box: sysd.Container) -> None:
    c = box
    pid = show(c, "MainPID")
    status = dict(ln.split(":\t", 1) for ln in sh(c, f"cat /proc/{pid}/status").splitlines() if ":\t" in ln)
    assert status["NoNewPrivs"].strip() == "1" and status["Seccomp"].strip() == "2"
    assert int(status["CapEff"], 16) == 0 and int(status["CapBnd"], 16) == 0
    assert sh(c, f"ps -o user= -p {pid}").strip() == "ollamad"
    inside = f"nsenter -t {pid} -m --"
    assert sh(c, f"{inside} ls -A /home /root 2>&1 || true").split() in (["/home:", "/root:"], [])
    assert c.run(f"{inside} touch /usr/local/x", check=False).returncode != 0  # ProtectSystem=strict
    assert c.run(f"{inside} touch /etc/x", check=False).returncode != 0
    sh(c, f"{inside} touch /var/lib/ollamad/x && rm /var/lib/ollamad/x")  # its state is writable
    sh(c, "touch /tmp/host-side")
    assert c.run(f"{inside} ls /tmp/host-side", check=False).returncode != 0  # PrivateTmp
    exposure = sh(c, "systemd-analyze security --no-pager ollamad | tail -1")
    assert "Overall exposure level for ollamad.service:" in exposure
    assert float(exposure.split(":")[1].split()[0]) <= 2.0, exposure


# --- settings -----------------------------------------------------------------------------

def test_a_drop_in_sets_parallel(box: sysd.Container) -> None:
    c = box
    edit_unit(c, "[Service]\nEnvironment=OLLAMA_NUM_PARALLEL=3\n")
    assert "OLLAMA_NUM_PARALLEL=3" in show(c, "Environment")
    sh(c, "systemctl restart ollamad")
    generate(c)
    (argv,) = runner_argv(c)
    assert argv[argv.index("--parallel") + 1] == "3"
    _, ps = api(c, "/api/ps")
    assert [m["num_parallel"] for m in ps["models"]] == [3]


def test_the_env_file_wins_over_the_drop_in(box: sysd.Container) -> None:
    c = box
    sh(c, "echo OLLAMA_NUM_PARALLEL=2 >> /etc/ollamad/ollamad.env && systemctl restart ollamad")
    generate(c)
    (argv,) = runner_argv(c)
    assert argv[argv.index("--parallel") + 1] == "2"
    config = sh(c, "ollamad config")
    assert any(ln.startswith("OLLAMA_NUM_PARALLEL=2") and "ollamad.env" in ln for ln in config.splitlines()), config


# --- signals ------------------------------------------------------------------------------

def test_sigkill_restarts_with_no_orphans(box: sysd.Container) -> None:
    c = box
    generate(c)
    old_pid, old_runner = show(c, "MainPID"), sh(c, "pgrep -x llama-server").split()
    restarts = int(show(c, "NRestarts"))
    sh(c, "systemctl kill --kill-whom=main -s SIGKILL ollamad")
    wait_until(lambda: int(show(c, "NRestarts")) == restarts + 1 and show(c, "ActiveState") == "active",
               timeout=30, what="the restart")
    assert show(c, "MainPID") != old_pid
    for pid in old_runner:  # the old daemon's llama-server went with it
        assert c.run(f"kill -0 {pid}", check=False).returncode != 0
    generate(c)
    (runner,) = sh(c, "pgrep -x llama-server").split()
    assert sh(c, f"ps -o ppid= -p {runner}").strip() == show(c, "MainPID")


def test_reload_while_streaming(box: sysd.Container) -> None:
    c = box
    use_slow_fake(c)  # 0.1 s a token: the stream surely outlasts the reload
    generate(c)  # loaded, so the stream starts at once
    pid, since = show(c, "MainPID"), now(c)
    s = Stream(c, 30)
    assert s.line()["done"] is False
    sh(c, "install -o ollamad -g ollamad -m 0640 /srv/models/tiny.gguf /var/lib/ollamad/models/second.gguf"
          " && systemctl reload ollamad")
    wait_until(lambda: "reloaded" in journal(c, since), what="the reload in the journal")
    middle = s.line()  # still streaming after the reload
    assert middle["done"] is False
    rest = s.rest()
    assert rest[-1]["done"] is True and rest[-1]["eval_count"] == 30
    assert show(c, "MainPID") == pid and show(c, "ActiveState") == "active"
    assert "second:latest" in sh(c, "ollamad list")


def test_stop_while_streaming_drains_then_cuts(box: sysd.Container) -> None:
    """One stream ends within OLLAMAD_DRAIN_TIMEOUT, one does not: it gets an error line, logged as cut."""
    c = box
    use_slow_fake(c)
    try:
        generate(c)
        time.sleep(1)  # journalctl --since has whole seconds
        since = now(c)
        short, long = Stream(c, 8), Stream(c, 200)
        assert short.line()["done"] is False and long.line()["done"] is False
        t0 = time.monotonic()
        sh(c, "systemctl stop ollamad")
        assert time.monotonic() - t0 < 10
        assert short.rest()[-1]["done"] is True
        cut = long.rest()
        assert "drain timeout" in cut[-1]["error"] and not any(ln.get("done") for ln in cut)
        assert show(c, "ActiveState") == "inactive" and show(c, "ExecMainStatus") == "0"
        assert "draining" not in show(c, "StatusText")
        lines = [json.loads(ln) for ln in journal(c, since).splitlines() if ln.startswith("{")]
        requests = [ln for ln in lines if ln.get("route") == "/api/generate" and ln["event"] == "request"]
        assert sorted(ln["status"] for ln in requests) == [200, 503], requests
        assert any(ln.get("cut") == "drain timeout" for ln in requests)
        # priorities: warnings show under -p warning, info lines do not
        warnings = journal(c, since, "-p", "warning")
        assert "drain timed out" in warnings and '"listening"' not in warnings and '"status": 200' not in warnings
    finally:
        sh(c, f"rm -f {FAKE_DROP_IN} && systemctl daemon-reload && systemctl start ollamad")


def test_a_bad_setting_exits_78_without_a_restart_loop(box: sysd.Container) -> None:
    c = box
    since = now(c)
    sh(c, "echo OLLAMA_NUM_PARALLEL=banana >> /etc/ollamad/ollamad.env")
    try:
        assert c.run("systemctl restart ollamad", check=False).returncode != 0
        assert show(c, "ExecMainStatus") == "78"
        time.sleep(1)
        assert show(c, "ActiveState") == "failed" and show(c, "SubState") == "failed"  # not auto-restart
        errors = journal(c, since, "-p", "err")
        assert "OLLAMA_NUM_PARALLEL" in errors and "banana" in errors
    finally:
        sh(c, "sed -i '/=banana$/d' /etc/ollamad/ollamad.env && systemctl reset-failed ollamad"
              " && systemctl start ollamad")


def test_a_llama_server_that_cannot_run_exits_78(box: sysd.Container) -> None:
    """A build missing libgomp.so.1 is refused at start with the loader's words, not 500 per load."""
    c = box
    lib = sh(c, "readlink -f /usr/lib/x86_64-linux-gnu/libgomp.so.1").strip()
    since = now(c)
    sh(c, f"mv {lib} /root/libgomp.so.1")
    try:
        assert c.run("systemctl restart ollamad", check=False).returncode != 0
        assert show(c, "ExecMainStatus") == "78" and show(c, "ActiveState") == "failed"
        errors = journal(c, since, "-p", "err")
        assert "libgomp.so.1" in errors and "cannot run" in errors
        r = c.run(["sudo", "/project/scripts/install.sh"], user=ADMIN, check=False)  # refused up front too
        assert r.returncode == 1 and "libgomp.so.1" in r.stderr
    finally:
        sh(c, f"mv /root/libgomp.so.1 {lib} && systemctl reset-failed ollamad && systemctl start ollamad")
    generate(c)


# --- uninstall ----------------------------------------------------------------------------

def test_uninstall_keeps_settings_and_purge_removes_everything(box: sysd.Container) -> None:
    c = box
    dropins = "/etc/systemd/system/ollamad.service.d"
    assert sh(c, f"ls {dropins}").split() == ["override.conf"]  # from `systemctl edit`
    r = c.run(["sudo", "/project/scripts/uninstall.sh"], user=ADMIN, check=False)
    assert r.returncode == 0, r.stderr
    assert "inactive" in c.run("systemctl is-active ollamad", check=False).stdout
    assert c.run("pgrep -u ollamad", check=False).returncode != 0  # nothing left running
    for gone in ("/etc/systemd/system/ollamad.service", "/opt/ollamad", "/usr/local/bin/ollamad"):
        assert c.run(f"test -e {gone}", check=False).returncode != 0, gone
    for kept in ("/etc/ollamad/ollamad.env", f"{dropins}/override.conf", "/var/lib/ollamad/models/tiny.gguf"):
        sh(c, f"test -e {kept}")
    sh(c, "id ollamad")
    assert "kept /etc/ollamad" in r.stderr and dropins in r.stderr
    r = c.run(["sudo", "/project/scripts/uninstall.sh", "--purge"], user=ADMIN, check=False)
    assert r.returncode == 0, r.stderr
    for gone in ("/etc/ollamad", dropins, "/var/lib/ollamad"):
        assert c.run(f"test -e {gone}", check=False).returncode != 0, gone
    assert c.run("id ollamad", check=False).returncode != 0
    assert "ollamad" not in sh(c, "systemctl list-unit-files --no-pager")


def test_a_failed_install_leaves_nothing_behind(box: sysd.Container) -> None:
    """On a clean system, an install whose package build fails creates no user, venv, unit or link."""
    c = box
    sh(c, "mkdir -p /tmp/no-wheels")
    r = c.run(["sudo", "env", "PIP_FIND_LINKS=/tmp/no-wheels", "/project/scripts/install.sh"], user=ADMIN,
              check=False, timeout=240)
    assert r.returncode != 0 and "removing the /opt/ollamad" in r.stderr, r.stderr
    for gone in ("/opt/ollamad", "/etc/systemd/system/ollamad.service", "/usr/local/bin/ollamad", "/etc/ollamad"):
        assert c.run(f"test -e {gone}", check=False).returncode != 0, gone
    assert c.run("id ollamad", check=False).returncode != 0
