"""A real systemd in a container, for the systemd test tier (tests/test_systemd.py).

The root filesystem (Debian bookworm, minbase + systemd + python3) is built once with
debootstrap and cached under ~/.cache/ollamad/sysroot/<key>; a finished one has the marker
file ``.ollamad-sysroot``. Each boot runs ``systemd-nspawn --volatile=overlay`` on it, so the
cache never changes. The container has loopback only: the Python wheels that install.sh
needs are downloaded on the host (~/.cache/ollamad/wheels/<key>) and pip inside is pointed at
them by /etc/pip.conf. Commands run inside through nsenter.

    python -m tests.sysd build      build (or find) the cached root filesystem and wheels
                                    (scripts/test.sh runs this; it skips where the tier cannot run)
    python -m tests.sysd shell      boot it with this checkout at /project and open a shell
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import os
import shutil
import signal
import subprocess
import sys
import time
import tomllib
from collections.abc import Iterator, Sequence
from pathlib import Path

import pytest

from ollamad.models.testmodels import write_all
from ollamad.runner.binary import built_binary
from ollamad.settings import load_settings

SUITE = "bookworm"
PACKAGES = ("systemd", "systemd-sysv", "dbus", "python3", "python3-venv", "python3-wheel-whl", "procps",
            "libgomp1", "curl", "sudo")
MARKER = ".ollamad-sysroot"
ADMIN = "admin"      # the admin who runs `sudo scripts/install.sh` (uid 1000)
RUNNERS_INSIDE = f"/home/{ADMIN}/.cache/ollamad/runners"  # where `sudo install.sh` must find the build
OTHER = "mallory"    # another local user (uid 1001)
PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
PROJECT = Path(__file__).resolve().parent.parent
WHEEL_PYTHON = "3.11"    # bookworm's python3
WHEEL_PLATFORMS = ("manylinux_2_36_x86_64", "manylinux_2_28_x86_64", "manylinux_2_17_x86_64",
                   "manylinux2014_x86_64", "linux_x86_64")


def cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "ollamad"


def missing_tools() -> list[str]:
    return [t for t in ("systemd-nspawn", "debootstrap", "nsenter") if shutil.which(t) is None]


def why_not() -> str | None:
    """Why the tier cannot run here, in words, or None when it can."""
    if os.environ.get("OLLAMAD_TEST_SYSTEMD", "1") == "0":
        return "OLLAMAD_TEST_SYSTEMD=0"
    if sys.platform != "linux":
        return "needs Linux"
    if os.geteuid() != 0:
        return "needs root (systemd-nspawn and debootstrap)"
    if missing := missing_tools():
        return f"needs {', '.join(missing)} (Debian: apt-get install systemd-container debootstrap)"
    return None


def _mirror() -> str:
    """The Debian mirror the host uses (the first deb.debian.org-like URI), else deb.debian.org."""
    for path in [Path("/etc/apt/sources.list"), *sorted(Path("/etc/apt/sources.list.d").glob("*"))]:
        with contextlib.suppress(OSError):
            for line in path.read_text().splitlines():
                words = line.split()
                uris = words[1:] if words[:1] == ["URIs:"] else words[1:2] if words[:1] == ["deb"] else []
                for uri in uris:
                    if uri.startswith("http") and "security" not in uri:
                        return uri
    return "http://deb.debian.org/debian"


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        yield


def sysroot() -> Path:
    """The cached root filesystem, built on first use (about a minute)."""
    key = hashlib.sha256(" ".join((SUITE, *PACKAGES, ADMIN, OTHER, "v1")).encode()).hexdigest()[:10]
    root = cache_dir() / "sysroot" / f"{SUITE}-{key}"
    if (root / MARKER).exists():
        return root
    with _locked(root.parent / ".lock"):
        if (root / MARKER).exists():
            return root
        tmp = root.with_name(root.name + ".tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        print(f"[sysd] building {root} with debootstrap (about a minute)", file=sys.stderr)
        subprocess.run(["debootstrap", "--variant=minbase", f"--include={','.join(PACKAGES)}", SUITE, str(tmp),
                        _mirror()], check=True, stdout=subprocess.DEVNULL)
        chroot = ["chroot", str(tmp)]
        subprocess.run([*chroot, "useradd", "-m", "-u", "1000", "-s", "/bin/bash", ADMIN], check=True)
        subprocess.run([*chroot, "useradd", "-m", "-u", "1001", "-s", "/bin/bash", OTHER], check=True)
        (tmp / "etc/sudoers.d/admin").write_text(f"{ADMIN} ALL=(ALL) NOPASSWD:ALL\n")
        (tmp / "etc/sudoers.d/admin").chmod(0o440)
        (tmp / "etc/pip.conf").write_text("[global]\nno-index = true\nfind-links = /wheels\n")
        (tmp / "etc/hostname").write_text("sysd\n")
        # no getty on the read-only console, no waiting on a network that is not there
        for unit in ("console-getty.service", "getty@tty1.service", "systemd-networkd-wait-online.service"):
            (tmp / "etc/systemd/system" / unit).unlink(missing_ok=True)
            (tmp / "etc/systemd/system" / unit).symlink_to("/dev/null")
        (tmp / MARKER).write_text(f"{SUITE} {' '.join(PACKAGES)}\n")
        tmp.rename(root)
    return root


def _runtime_requirements() -> list[str]:
    meta = tomllib.loads((PROJECT / "pyproject.toml").read_text())
    return [*meta["project"]["dependencies"], *meta["build-system"]["requires"], "wheel"]


def wheels() -> Path:
    """Wheels for install.sh inside the container (bookworm's Python), downloaded once."""
    reqs = _runtime_requirements()
    key = hashlib.sha256("\n".join([WHEEL_PYTHON, *reqs]).encode()).hexdigest()[:10]
    folder = cache_dir() / "wheels" / key
    if (folder / MARKER).exists():
        return folder
    with _locked(folder.parent / ".lock"):
        if not (folder / MARKER).exists():
            plats = [a for p in WHEEL_PLATFORMS for a in ("--platform", p)]
            subprocess.run([sys.executable, "-m", "pip", "download", "--quiet", "--disable-pip-version-check",
                            "-d", str(folder), "--python-version", WHEEL_PYTHON, "--only-binary=:all:", *plats,
                            *reqs], check=True)
            (folder / MARKER).write_text("\n".join(reqs) + "\n")
    return folder


class Container:
    """One booted container; use as a context manager (powers off on exit)."""

    def __init__(self, root: Path, binds_ro: dict[Path, str], log: Path) -> None:
        self.root = root
        self.binds_ro = binds_ro
        self.log_path = log
        self.proc: subprocess.Popen[bytes] | None = None
        self.pid1 = 0

    def __enter__(self) -> Container:
        self.boot()
        return self

    def __exit__(self, *exc: object) -> None:
        self.poweroff()

    def boot(self, timeout: float = 60) -> None:
        binds = [f"--bind-ro={src}:{dst}" for src, dst in self.binds_ro.items()]
        env = {**os.environ, "SYSTEMD_NSPAWN_UNIFIED_HIERARCHY": "1"}
        with self.log_path.open("wb") as log:
            self.proc = subprocess.Popen(
                ["systemd-nspawn", "-q", "-D", str(self.root), "-b", "--register=no", "--keep-unit",
                 "--link-journal=no", "--console=read-only", "--volatile=overlay", "--private-network",
                 *binds], stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT, env=env,
                start_new_session=True)
        deadline = time.monotonic() + timeout
        while not self.pid1:
            if self.proc.poll() is not None:
                raise RuntimeError(f"systemd-nspawn exited {self.proc.returncode}: {self.log_path.read_text()[-2000:]}")
            if time.monotonic() > deadline:
                raise TimeoutError("the container's systemd did not start")
            self.pid1 = self._find_pid1()
            time.sleep(0.05)
        state = ""
        while time.monotonic() < deadline:
            state = self.run(["systemctl", "is-system-running"], check=False).stdout.strip()
            if state in ("running", "degraded"):
                return
            time.sleep(0.1)
        raise TimeoutError(f"the container's systemd is {state!r} after {timeout} s")

    def _find_pid1(self) -> int:
        assert self.proc is not None
        todo = [self.proc.pid]
        while todo:
            pid = todo.pop()
            with contextlib.suppress(OSError):
                for task in Path(f"/proc/{pid}/task").iterdir():
                    for child in (task / "children").read_text().split():
                        if Path(f"/proc/{child}/comm").read_text().strip() == "systemd":
                            return int(child)
                        todo.append(int(child))
        return 0

    def popen(self, cmd: Sequence[str], user: str = "root", env: dict[str, str] | None = None,
              **kw: object) -> subprocess.Popen[str]:
        """Start a command inside (as `user`, with a login-like environment)."""
        home = "/root" if user == "root" else f"/home/{user}"
        envs = [f"PATH={PATH}", f"HOME={home}", f"USER={user}", "LANG=C.UTF-8",
                *(f"{k}={v}" for k, v in (env or {}).items())]
        setpriv = [] if user == "root" else ["setpriv", f"--reuid={user}", f"--regid={user}", "--init-groups"]
        argv = ["nsenter", "-t", str(self.pid1), "-a", "--", *setpriv, "env", "-i", *envs, *cmd]
        return subprocess.Popen(argv, text=True, errors="replace", start_new_session=True, **kw)  # type: ignore[call-overload]

    def run(self, cmd: Sequence[str] | str, user: str = "root", check: bool = True, timeout: float = 120,
            input: str | None = None, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
        """Run a command inside and wait; a string runs under bash -c."""
        argv = ["bash", "-c", cmd] if isinstance(cmd, str) else list(cmd)
        p = self.popen(argv, user=user, env=env, stdin=subprocess.PIPE if input is not None else subprocess.DEVNULL,
                       stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        try:
            out, err = p.communicate(input, timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(p.pid, signal.SIGKILL)
            out, err = p.communicate()
            raise AssertionError(f"{argv} timed out after {timeout} s\n{out}\n{err}") from None
        res = subprocess.CompletedProcess(argv, p.returncode, out, err)
        if check and p.returncode != 0:
            raise AssertionError(f"{argv} exited {p.returncode}\nstdout: {out}\nstderr: {err}")
        return res

    def poweroff(self, timeout: float = 30) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        with contextlib.suppress(Exception):
            self.run(["systemctl", "poweroff", "--no-block"], check=False, timeout=10)
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()


def main(argv: list[str]) -> int:
    if reason := why_not():
        print(f"[sysd] the systemd tier cannot run here: {reason}", file=sys.stderr)
        return 0 if argv[1:2] in ([], ["build"]) else 1
    root = sysroot()
    print(f"[sysd] root filesystem: {root}", file=sys.stderr)
    w = wheels()
    print(f"[sysd] wheels: {w}", file=sys.stderr)
    if argv[1:2] == ["shell"]:
        with Container(root, {PROJECT: "/project", w: "/wheels"}, Path("/tmp/sysd-boot.log")) as c:
            c.popen(["bash", "-l"]).wait()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))


@contextlib.contextmanager
def booted(tmp: pytest.TempPathFactory, name: str, models: tuple[str, ...]) -> Iterator[Container]:
    """A booted container with the checkout, the wheels, the runner build (where `sudo install.sh`
    looks for it) and these generated models (at /srv/models) bound in; the test is skipped with
    the reason where the tier cannot run, and fails where the llama-server build is missing."""
    if reason := why_not():
        pytest.skip(f"systemd tier skipped: {reason}")
    runners = load_settings().runners_dir
    if not built_binary(runners).is_file():
        pytest.fail(f"no llama-server build in {runners} (scripts/setup.sh builds it)")
    root, wheel_dir = sysroot(), wheels()
    folder = tmp.mktemp(f"{name}-models")
    write_all(folder, models)
    log = tmp.mktemp(name) / "boot.log"
    with Container(root, {PROJECT: "/project", wheel_dir: "/wheels", runners: RUNNERS_INSIDE,
                          folder: "/srv/models"}, log) as c:
        yield c
