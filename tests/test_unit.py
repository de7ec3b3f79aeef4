"""systemd/ollamad.service: systemd-analyze verify is clean, security exposure <= 3.0.

systemd-analyze comes from Debian's systemd package; these tests install it when it is
missing and apt-get can (as root), and otherwise skip only the checks that need it, saying so.
"""

from __future__ import annotations

import configparser
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from ollamad.cli import EX_CONFIG
from ollamad.settings import Settings, env_name

ROOT = Path(__file__).resolve().parent.parent
UNIT = ROOT / "systemd" / "ollamad.service"
DROPIN = ROOT / "systemd" / "override.conf.example"
MAX_EXPOSURE = 3.0
pytestmark = pytest.mark.timeout(900)  # the first test may install the systemd package


@pytest.fixture
def root(tmp_path: Path) -> Path:
    """A file-system root holding what verify looks up: systemd's units, the unit, its commands.

    ExecStart= must exist for verify to pass, and the real /opt/ollamad exists only after
    scripts/install.sh, so the unit is checked inside this root with a stand-in executable.
    """
    r = tmp_path / "root"
    (r / "usr" / "lib" / "systemd").mkdir(parents=True)
    shutil.copytree("/usr/lib/systemd/system", r / "usr" / "lib" / "systemd" / "system", symlinks=True)
    (r / "usr" / "bin").mkdir()
    (r / "lib").symlink_to("usr/lib")
    (r / "bin").symlink_to("usr/bin")
    shutil.copy("/usr/bin/kill", r / "usr" / "bin" / "kill")
    exe = r / "opt" / "ollamad" / "venv" / "bin" / "ollamad"
    exe.parent.mkdir(parents=True)
    exe.write_text("#!/bin/sh\n")
    exe.chmod(0o755)
    units = r / "etc" / "systemd" / "system"
    (units / "ollamad.service.d").mkdir(parents=True)
    shutil.copy(UNIT, units / "ollamad.service")
    return r


def _verify(analyze: str, root: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([analyze, "verify", f"--root={root}", "--man=no", "--generators=no",
                           "/etc/systemd/system/ollamad.service"], capture_output=True, text=True, timeout=120)


def _exposure(analyze: str, root: Path) -> float:
    r = subprocess.run([analyze, "security", "--offline=true", f"--root={root}", "--no-pager",
                        "ollamad.service"], capture_output=True, text=True, timeout=120)
    m = re.search(r"Overall exposure level for ollamad\.service: ([0-9.]+)", r.stdout)
    assert m, r.stdout[-2000:] + r.stderr
    return float(m.group(1))


def test_verify_is_clean(analyze: str, root: Path) -> None:
    r = _verify(analyze, root)
    assert r.returncode == 0 and r.stdout.strip() == "" and r.stderr.strip() == "", r.stdout + r.stderr


def test_verify_reports_a_bad_key(analyze: str, root: Path) -> None:
    """The check above can fail: a typo in the unit shows up in verify's output."""
    unit = root / "etc" / "systemd" / "system" / "ollamad.service"
    unit.write_text(unit.read_text().replace("KillMode=mixed", "KillMode=mixed\nKillMood=mixed"))
    assert "KillMood" in _verify(analyze, root).stderr


def test_verify_is_clean_with_the_dropin_example(analyze: str, root: Path) -> None:
    shutil.copy(DROPIN, root / "etc" / "systemd" / "system" / "ollamad.service.d" / "override.conf")
    r = _verify(analyze, root)
    assert r.returncode == 0 and r.stdout.strip() == "" and r.stderr.strip() == "", r.stdout + r.stderr
    assert _exposure(analyze, root) <= MAX_EXPOSURE


def test_security_exposure_is_at_most_3(analyze: str, root: Path) -> None:
    score = _exposure(analyze, root)
    print(f"systemd-analyze security: exposure {score}")
    assert score <= MAX_EXPOSURE


def _unit() -> configparser.ConfigParser:
    cp = configparser.ConfigParser(strict=False, interpolation=None)
    cp.optionxform = str  # type: ignore[assignment,method-assign]
    cp.read_string(UNIT.read_text())
    return cp


def test_unit_shape() -> None:
    svc = _unit()["Service"]
    assert svc["Type"] == "notify" and svc["KillMode"] == "mixed" and svc["Restart"] == "on-failure"
    assert svc["ExecReload"] == "/bin/kill -HUP $MAINPID"
    assert svc["EnvironmentFile"] == "-/etc/ollamad/ollamad.env"
    assert svc["User"] == "ollamad" and svc["NoNewPrivileges"] == "yes" and svc["ProtectSystem"] == "strict"
    assert svc["RestartPreventExitStatus"] == str(EX_CONFIG)


def _serve(tmp_path: Path, **env: str) -> subprocess.CompletedProcess[str]:
    base = {k: v for k, v in os.environ.items() if not k.startswith("OLLAMA")}
    base.update(OLLAMA_MODELS=str(tmp_path), **env)
    return subprocess.run([sys.executable, "-m", "ollamad.cli", "serve"], env=base, capture_output=True,
                          text=True, timeout=60)


def test_configuration_errors_exit_78_so_systemd_stops_restarting(tmp_path: Path) -> None:
    r = _serve(tmp_path, OLLAMA_NUM_PARALLEL="many")
    assert r.returncode == EX_CONFIG and "OLLAMA_NUM_PARALLEL" in r.stderr
    r = _serve(tmp_path, OLLAMAD_LLAMA_SERVER=str(tmp_path / "missing"))
    assert r.returncode == EX_CONFIG and "OLLAMAD_LLAMA_SERVER" in r.stderr


def test_stop_timeout_outlasts_drain_and_runner_grace() -> None:
    """systemd must not SIGKILL a drain that is going as configured by default."""
    stop = float(_unit()["Service"]["TimeoutStopSec"])
    fields = Settings.model_fields
    assert stop > float(fields["drain_timeout"].default) + float(fields["stop_grace"].default) + 5


def test_unit_environment_names_are_settings() -> None:
    """Environment= lines in the unit and the drop-in example use variables ollamad reads."""
    known = {env_name(f) for f in Settings.model_fields}
    text = UNIT.read_text() + DROPIN.read_text()
    names = re.findall(r'^#?Environment="?([A-Z_]+)=', text, re.M)
    assert names
    assert {n for n in names if n != "HOME"} <= known
