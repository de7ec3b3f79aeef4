"""systemd/ollamad-worker.service: verify is clean, security exposure <= 2.0, and its
Environment= lines are settings that ``ollamad worker`` reads, with safe defaults."""

from __future__ import annotations

import configparser
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from ollamad.cli import EX_CONFIG
from ollamad.settings import Settings, env_name, load_settings

ROOT = Path(__file__).resolve().parent.parent
UNIT = ROOT / "systemd" / "ollamad-worker.service"
NAME = "ollamad-worker.service"
MAX_EXPOSURE = 2.0
pytestmark = pytest.mark.timeout(900)  # the first test may install the systemd package


@pytest.fixture
def root(tmp_path: Path) -> Path:
    """A file-system root with systemd's units, the worker unit and a stand-in ExecStart."""
    r = tmp_path / "root"
    (r / "usr" / "lib" / "systemd").mkdir(parents=True)
    shutil.copytree("/usr/lib/systemd/system", r / "usr" / "lib" / "systemd" / "system", symlinks=True)
    (r / "usr" / "bin").mkdir()
    (r / "lib").symlink_to("usr/lib")
    (r / "bin").symlink_to("usr/bin")
    exe = r / "opt" / "ollamad" / "venv" / "bin" / "ollamad"
    exe.parent.mkdir(parents=True)
    exe.write_text("#!/bin/sh\n")
    exe.chmod(0o755)
    units = r / "etc" / "systemd" / "system"
    units.mkdir(parents=True)
    shutil.copy(UNIT, units / NAME)
    return r


def _verify(analyze: str, root: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([analyze, "verify", f"--root={root}", "--man=no", "--generators=no",
                           f"/etc/systemd/system/{NAME}"], capture_output=True, text=True, timeout=120)


def test_verify_is_clean(analyze: str, root: Path) -> None:
    r = _verify(analyze, root)
    assert r.returncode == 0 and r.stdout.strip() == "" and r.stderr.strip() == "", r.stdout + r.stderr


def test_verify_reports_a_bad_key(analyze: str, root: Path) -> None:
    unit = root / "etc" / "systemd" / "system" / NAME
    unit.write_text(unit.read_text().replace("KillMode=mixed", "KillMode=mixed\nKillMood=mixed"))
    assert "KillMood" in _verify(analyze, root).stderr


def test_security_exposure_is_at_most_2(analyze: str, root: Path) -> None:
    r = subprocess.run([analyze, "security", "--offline=true", f"--root={root}", "--no-pager", NAME],
                       capture_output=True, text=True, timeout=120)
    m = re.search(r"Overall exposure level for ollamad-worker\.service: ([0-9.]+)", r.stdout)
    assert m, r.stdout[-2000:] + r.stderr
    print(f"systemd-analyze security: exposure {m.group(1)}")
    assert float(m.group(1)) <= MAX_EXPOSURE


def _service() -> configparser.SectionProxy:
    cp = configparser.ConfigParser(strict=False, interpolation=None)
    cp.optionxform = str  # type: ignore[assignment,method-assign]
    cp.read_string(UNIT.read_text())
    return cp["Service"]


def test_unit_shape() -> None:
    svc = _service()
    assert svc["ExecStart"] == "/opt/ollamad/venv/bin/ollamad worker"
    assert svc["User"] == "ollamad" and svc["NoNewPrivileges"] == "yes" and svc["ProtectSystem"] == "strict"
    assert svc["RestartPreventExitStatus"] == str(EX_CONFIG) and svc["KillMode"] == "mixed"


def test_environment_lines_are_settings_with_a_private_default() -> None:
    text = UNIT.read_text()
    env = dict(re.findall(r"^Environment=([A-Z_]+)=(.*)$", text, re.M))
    known = {env_name(f) for f in Settings.model_fields}
    assert {"OLLAMAD_WORKER_HOST", "OLLAMAD_WORKER_PORT"} <= set(env) <= known | {"HOME"}
    s = load_settings({k: v for k, v in env.items() if k != "HOME"})
    assert s.worker_host == "127.0.0.1" and not s.worker_bind_any  # never every address by default
    assert s.worker_cache == Path("/var/cache/ollamad-worker") and "CacheDirectory=ollamad-worker" in text
    assert "no authentication" in text.lower()
