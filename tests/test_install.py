"""scripts/install.sh and uninstall.sh: the dry-run path (prints every step, changes nothing)."""

from __future__ import annotations

import configparser
import os
import shlex
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
INSTALL = ROOT / "scripts" / "install.sh"
UNINSTALL = ROOT / "scripts" / "uninstall.sh"
TOUCHED = ("/opt/ollamad", "/etc/ollamad", "/etc/systemd/system/ollamad.service", "/var/lib/ollamad")


def _run(script: Path, *args: str, home: Path, **env: str) -> subprocess.CompletedProcess[str]:
    base = {k: v for k, v in os.environ.items() if not k.startswith(("OLLAMA", "XDG_"))}
    base.update(HOME=str(home), **env)
    return subprocess.run(["bash", str(script), *args], env=base, capture_output=True, text=True, timeout=120)


def _commands(out: str) -> list[list[str]]:
    """The steps a dry run printed ('+ cmd args'), split as the shell would."""
    return [shlex.split(ln[2:]) for ln in out.splitlines() if ln.startswith("+ ")]


def _before() -> dict[str, bool]:
    return {p: os.path.lexists(p) for p in TOUCHED}


def _unit_service() -> configparser.SectionProxy:
    cp = configparser.ConfigParser(strict=False, interpolation=None)
    cp.optionxform = str  # type: ignore[assignment,method-assign]
    cp.read(ROOT / "systemd" / "ollamad.service")
    return cp["Service"]


def test_install_dry_run_with_a_given_llama_server(tmp_path: Path, fake_server: Path) -> None:
    before = _before()
    r = _run(INSTALL, "--dry-run", home=tmp_path, OLLAMAD_LLAMA_SERVER=str(fake_server))
    assert r.returncode == 0, r.stderr
    assert _before() == before  # nothing was created or removed
    cmds = _commands(r.stdout)
    flat = [" ".join(c) for c in cmds]
    venv = next(c for c in cmds if c[1:3] == ["-m", "venv"])
    assert venv[3] == "/opt/ollamad/venv"
    assert not venv[0].startswith(("/root/", "/home/"))  # the service cannot see those (ProtectHome)
    # the package is built from a copy (the checkout may be read-only), before the user is created
    copy = next(c for c in cmds if c[:2] == ["cp", "-r"])
    assert copy[2:5] == [f"{ROOT}/pyproject.toml", f"{ROOT}/README.md", f"{ROOT}/ollamad"]
    stage = copy[5].rstrip("/")
    assert not stage.startswith(str(ROOT)) and not os.path.exists(stage)  # a temporary folder, removed
    pip = f"/opt/ollamad/venv/bin/python -m pip install --quiet --disable-pip-version-check --upgrade {stage}"
    assert pip in flat
    if not _user_exists():
        assert flat.index(pip) < next(i for i, c in enumerate(cmds) if c[0] == "useradd")
    assert "ln -sfn /opt/ollamad/venv/bin/ollamad /usr/local/bin/ollamad" in flat
    assert f"install -D -m 0755 {fake_server} /opt/ollamad/runners/local/bin/llama-server" in flat
    assert "ln -sfn local /opt/ollamad/runners/current" in flat
    assert f"install -D -m 0644 {ROOT}/systemd/ollamad.service /etc/systemd/system/ollamad.service" in flat
    env_target = "ollamad.env.new" if before["/etc/ollamad"] and os.path.exists("/etc/ollamad/ollamad.env") \
        else "ollamad.env"
    assert f"install -m 0644 {ROOT}/config/ollamad.env /etc/ollamad/{env_target}" in flat
    assert any(c[0] == "useradd" and c[-1] == "ollamad" for c in cmds) == (not _user_exists())
    if os.path.isdir("/run/systemd/system"):
        assert "systemctl daemon-reload" in flat and "systemctl enable --now ollamad.service" in flat
    else:  # no systemd here: it says what it would run
        assert "systemctl daemon-reload\n  systemctl enable --now ollamad.service" in r.stdout
        assert "systemd is not running" in r.stderr
    # the unit runs what the script installs
    svc = _unit_service()
    assert svc["ExecStart"].split()[0] == "/opt/ollamad/venv/bin/ollamad"
    unit_text = (ROOT / "systemd" / "ollamad.service").read_text()
    assert "Environment=OLLAMAD_RUNNERS_DIR=/opt/ollamad/runners\n" in unit_text


def _user_exists() -> bool:
    return subprocess.run(["getent", "passwd", "ollamad"], capture_output=True).returncode == 0


def test_install_dry_run_builds_when_no_llama_server_is_found(tmp_path: Path) -> None:
    empty = tmp_path / "bin"
    empty.mkdir()
    r = _run(INSTALL, "--dry-run", home=tmp_path, PATH=f"{empty}:/usr/sbin:/usr/bin:/sbin:/bin")
    assert r.returncode == 0, r.stderr
    flat = [" ".join(c) for c in _commands(r.stdout)]
    assert f"env OLLAMAD_RUNNERS_DIR=/opt/ollamad/runners {ROOT}/runners/build.sh" in flat
    assert "building it" in r.stderr


def test_install_uses_the_cached_build(tmp_path: Path) -> None:
    build = tmp_path / ".cache" / "ollamad" / "runners" / "src-cpu-abc"
    (build / "bin").mkdir(parents=True)
    exe = build / "bin" / "llama-server"
    exe.write_text("#!/bin/sh\n")
    exe.chmod(0o755)
    (build.parent / "current").symlink_to(build.name)
    r = _run(INSTALL, "--dry-run", home=tmp_path)
    assert r.returncode == 0, r.stderr
    flat = [" ".join(c) for c in _commands(r.stdout)]
    assert f"cp -a {build} /opt/ollamad/runners/" in flat
    assert "ln -sfn src-cpu-abc /opt/ollamad/runners/current" in flat


def test_install_finds_the_sudo_users_cached_build(tmp_path: Path) -> None:
    """Under sudo HOME is root's; the build in the invoking user's cache is used (no 7-minute rebuild)."""
    user = subprocess.run(["getent", "passwd", "1000"], capture_output=True, text=True)
    if user.returncode != 0:  # the systemd tier checks the same with a real sudo
        pytest.skip("no user with uid 1000 here")
    name, home = user.stdout.split(":")[0], Path(user.stdout.split(":")[5])
    build = home / ".cache" / "ollamad" / "runners" / "current"
    r = _run(INSTALL, "--dry-run", home=tmp_path, SUDO_USER=name)
    assert r.returncode == 0, r.stderr
    if build.exists():
        assert f"the cached build {build.resolve()}" in r.stderr
    else:
        assert str(build.parent) in r.stderr and "OLLAMAD_RUNNERS_DIR=" in r.stderr


def test_install_refuses_a_llama_server_that_cannot_run(tmp_path: Path) -> None:
    broken = tmp_path / "llama-server"
    broken.write_text("#!/bin/sh\necho 'llama-server: error while loading shared libraries: libgomp.so.1' >&2\n"
                      "exit 127\n")
    broken.chmod(0o755)
    before = _before()
    r = _run(INSTALL, "--dry-run", home=tmp_path, OLLAMAD_LLAMA_SERVER=str(broken))
    assert r.returncode == 1 and "libgomp.so.1" in r.stderr and "cannot run" in r.stderr
    assert _commands(r.stdout) == []  # refused before the first step
    assert _before() == before


def test_install_rejects_unknown_arguments(tmp_path: Path) -> None:
    r = _run(INSTALL, "--bogus", home=tmp_path)
    assert r.returncode == 2 and "unknown argument" in r.stderr


def test_uninstall_dry_run_keeps_data_unless_purged(tmp_path: Path) -> None:
    before = _before()
    keep = _run(UNINSTALL, "--dry-run", home=tmp_path)
    assert keep.returncode == 0, keep.stderr
    flat = [" ".join(c) for c in _commands(keep.stdout)]
    assert "rm -f /etc/systemd/system/ollamad.service" in flat and "rm -rf /opt/ollamad" in flat
    assert not any("ollamad.service.d" in c for c in flat)  # the admin's `systemctl edit` drop-ins stay
    assert not any("/var/lib/ollamad" in c for c in flat) and "kept /etc/ollamad" in keep.stderr
    purge = _run(UNINSTALL, "--dry-run", "--purge", home=tmp_path)
    assert purge.returncode == 0
    assert "rm -rf /etc/ollamad /var/lib/ollamad /etc/systemd/system/ollamad.service.d" in [
        " ".join(c) for c in _commands(purge.stdout)]
    assert _before() == before
