"""config/ollamad.env is generated from Settings and documents every variable the code reads."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

from ollamad.service.envfile import (
    effective,
    parse_env_file,
    parse_unit_environment,
    render_env_file,
    unit_file_environment,
)
from ollamad.settings import Settings, env_name, load_settings

ROOT = Path(__file__).resolve().parents[2]
ENV_FILE = ROOT / "config" / "ollamad.env"
REGENERATE = ".venv/bin/ollamad config --env-template > config/ollamad.env"


def documented() -> dict[str, str]:
    """The commented-out NAME=default lines of the env file."""
    return dict(re.findall(r"^#(OLLAMAD?_[A-Z0-9_]+)=(.*)$", ENV_FILE.read_text(), re.M))


def test_env_file_is_generated_from_settings() -> None:
    assert ENV_FILE.read_text() == render_env_file(), f"config/ollamad.env is stale; run: {REGENERATE}"


def test_env_file_documents_every_setting_with_a_meaning() -> None:
    names = {env_name(f) for f in Settings.model_fields}
    assert set(documented()) == names
    text = ENV_FILE.read_text()
    for name in names:  # each variable has a one-line meaning right above it
        above = text.split(f"\n#{name}=")[0].rsplit("\n", 1)[-1]
        assert above.startswith("# ") and len(above) > 10, name


def test_code_reads_no_variable_the_env_file_does_not_document() -> None:
    """Any OLLAMA_*/OLLAMAD_* name spelled out in the package must be a documented setting."""
    used: set[str] = set()
    for path in (ROOT / "ollamad").glob("*.py"):
        used |= set(re.findall(r"[\"'](OLLAMAD?_[A-Z0-9_]+)[\"']", path.read_text()))
    assert used, "the scan should find the settings' aliases"
    assert used <= set(documented()), used - set(documented())


def test_documented_defaults_are_the_defaults() -> None:
    """Uncommenting every line as written changes nothing (except the service's own paths)."""
    s = load_settings(documented())
    d = Settings.model_construct()
    for field in Settings.model_fields:
        if Settings.model_fields[field].default_factory is None:
            assert getattr(s, field) == getattr(d, field), field
    assert s.models == Path("/var/lib/ollamad/models")


def test_env_file_parsing_as_systemd_does() -> None:
    text = "# comment\n; also\nOLLAMA_HOST = \"0.0.0.0:1\"\nOLLAMA_KEEP_ALIVE='1h'\nNOEQUALS\n\nX=a=b\n"
    assert parse_env_file(text) == {"OLLAMA_HOST": "0.0.0.0:1", "OLLAMA_KEEP_ALIVE": "1h", "X": "a=b"}
    shown = 'HOME=/var/lib/ollamad "OLLAMA_ORIGINS=a b" OLLAMA_NUM_PARALLEL=3'
    assert parse_unit_environment(shown) == {"HOME": "/var/lib/ollamad", "OLLAMA_ORIGINS": "a b",
                                             "OLLAMA_NUM_PARALLEL": "3"}


def test_effective_layers_unit_env_file_environment(tmp_path: Path) -> None:
    env_file = tmp_path / "ollamad.env"
    env_file.write_text("OLLAMA_NUM_PARALLEL=3\nOLLAMA_MAX_QUEUE=9\n")
    unit = {"OLLAMA_NUM_PARALLEL": "2", "OLLAMA_KEEP_ALIVE": "1h"}
    environ = {"OLLAMA_MAX_QUEUE": "9", "OLLAMA_CONTEXT_LENGTH": "8192", "PATH": "/bin"}
    settings, rows = effective(environ, env_file, unit)
    src = {r.name: (r.value, r.source) for r in rows}
    assert src["OLLAMA_NUM_PARALLEL"] == ("3", f"env file {env_file}")  # EnvironmentFile= beats Environment=
    assert src["OLLAMA_KEEP_ALIVE"] == ("1h", "unit")
    assert src["OLLAMA_MAX_QUEUE"] == ("9", f"env file {env_file}")  # same value: it came from the file
    assert src["OLLAMA_CONTEXT_LENGTH"] == ("8192", "environment")
    assert src["OLLAMA_HOST"] == ("127.0.0.1:11434", "default")
    assert settings.num_parallel == 3 and settings.keep_alive == 3600
    assert len(rows) == len(Settings.model_fields)


def _config(*args: str, **env: str) -> subprocess.CompletedProcess[str]:
    base = {k: v for k, v in os.environ.items() if not k.startswith("OLLAMA")}
    return subprocess.run([sys.executable, "-m", "ollamad.cli", "config", *args], env={**base, **env},
                          capture_output=True, text=True, timeout=60)


def test_ollamad_config_prints_values_and_sources(tmp_path: Path) -> None:
    env_file = tmp_path / "ollamad.env"
    env_file.write_text("OLLAMA_NUM_PARALLEL=3\nOLLAMA_NOPRUNE=1\n")
    r = _config("--env-file", str(env_file), OLLAMA_KEEP_ALIVE="-1")
    assert r.returncode == 0, r.stderr
    lines = {ln.split("=", 1)[0]: ln for ln in r.stdout.splitlines() if not ln.startswith("#")}
    assert set(lines) == {env_name(f) for f in Settings.model_fields}
    assert re.match(rf"OLLAMA_NUM_PARALLEL=3 +# env file {re.escape(str(env_file))}$", lines["OLLAMA_NUM_PARALLEL"])
    assert re.match(r"OLLAMA_KEEP_ALIVE=-1 +# environment$", lines["OLLAMA_KEEP_ALIVE"])
    assert re.match(r"OLLAMA_MAX_QUEUE=512 +# default$", lines["OLLAMA_MAX_QUEUE"])
    assert "OLLAMA_NOPRUNE is set but ollamad does not read it" in r.stderr


def test_ollamad_config_names_a_bad_variable(tmp_path: Path) -> None:
    env_file = tmp_path / "ollamad.env"
    env_file.write_text("OLLAMA_KEEP_ALIVE=forever\n")
    r = _config("--env-file", str(env_file))
    assert r.returncode != 0 and "OLLAMA_KEEP_ALIVE" in r.stderr
    assert _config("--env-file", str(tmp_path / "missing")).returncode != 0


def test_env_template_is_the_file() -> None:
    r = _config("--env-template")
    assert r.returncode == 0 and r.stdout == ENV_FILE.read_text()


def test_unit_file_and_dropin_environment_read_offline(tmp_path: Path) -> None:
    """Without a running systemd, ollamad config reads Environment= from the installed files."""
    unit = tmp_path / "ollamad.service"
    shutil.copy(ROOT / "systemd" / "ollamad.service", unit)
    (tmp_path / "ollamad.service.d").mkdir()
    shutil.copy(ROOT / "systemd" / "override.conf.example", tmp_path / "ollamad.service.d" / "override.conf")
    env = unit_file_environment(unit)
    assert env == {"HOME": "/var/lib/ollamad", "OLLAMA_MODELS": "/var/lib/ollamad/models",
                   "OLLAMAD_RUNNERS_DIR": "/opt/ollamad/runners", "OLLAMAD_STATE_DIR": "/var/lib/ollamad/state",
                   "OLLAMA_NUM_PARALLEL": "3"}
    env_file = tmp_path / "ollamad.env"
    env_file.write_text(ENV_FILE.read_text() + "OLLAMA_NUM_PARALLEL=2\n")
    settings, rows = effective({}, env_file, env)
    src = {r.name: (r.value, r.source) for r in rows}
    assert src["OLLAMA_MODELS"] == ("/var/lib/ollamad/models", "unit")
    assert src["OLLAMA_NUM_PARALLEL"] == ("2", f"env file {env_file}")  # the drop-in loses to the file
    assert settings.runners_dir == Path("/opt/ollamad/runners")
    assert unit_file_environment(tmp_path / "absent.service") == {}
