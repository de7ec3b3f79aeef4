"""The env file (config/ollamad.env) generated from Settings, and where each value came from.

One source of truth: every field of ``Settings`` becomes a commented-out ``NAME=default``
line with its description. ``ollamad config`` layers the same sources systemd would
(unit ``Environment=`` < ``EnvironmentFile=``), then this process's environment, and says
which one each effective value came from.
"""

from __future__ import annotations

import math
import shlex
import shutil
import subprocess
import typing
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pydantic.fields import FieldInfo

from ollamad.durations import FOREVER
from ollamad.settings import Settings, env_name, load_settings

DEFAULT_ENV_FILE = Path("/etc/ollamad/ollamad.env")
DEFAULT_UNIT = "ollamad.service"
UNIT_FILE = Path("/etc/systemd/system") / DEFAULT_UNIT  # where scripts/install.sh puts it
# Defaults computed at run time (they follow $HOME / XDG): the value the service unit sets,
# and the default outside the service.
FACTORY_DEFAULTS = {
    "models": ("/var/lib/ollamad/models", "~/.local/share/ollamad/models"),
    "runners_dir": ("/opt/ollamad/runners", "~/.cache/ollamad/runners"),
    "state_dir": ("/var/lib/ollamad/state", "~/.local/state/ollamad"),
}

HEADER = """\
# ollamad settings, read by the systemd unit (EnvironmentFile=-/etc/ollamad/ollamad.env).
#
# Generated from ollamad's Settings by `ollamad config --env-template`: every variable
# ollamad reads is listed, commented out, with its default. Uncomment a line to change it.
#
# Precedence: values set here override Environment= lines in the unit and in drop-ins
# (systemd gives EnvironmentFile= the last word), so set each variable in one place only.
# `ollamad config` prints the effective value of each variable and where it came from.
# After a change: systemctl restart ollamad (a reload, SIGHUP, only rescans the models).
"""


def format_value(name: str, value: Any) -> str:
    """A settings value written the way the env var takes it (5m, true, a,b)."""
    if value is None:
        return ""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float) and Settings.model_fields[name].annotation is float:
        return format_duration(value)  # every float setting is a duration (Seconds, KeepAliveSeconds)
    if isinstance(value, tuple):
        return ",".join(str(v) for v in value)
    return str(value)


def format_duration(seconds: float) -> str:
    if seconds == FOREVER or math.isinf(seconds):
        return "-1"
    for unit, size in (("h", 3600), ("m", 60)):
        if seconds >= size and seconds % size == 0:
            return f"{int(seconds // size)}{unit}"
    return f"{seconds:g}s"


def default_text(name: str, field: FieldInfo) -> str:
    """The default as written on the env file's line (for the service, where it differs)."""
    if field.default_factory is not None:
        return FACTORY_DEFAULTS[name][0]  # KeyError: add the new factory field to FACTORY_DEFAULTS
    return format_value(name, field.default)


def _choices(field: FieldInfo) -> tuple[str, ...]:
    if typing.get_origin(field.annotation) is typing.Literal:
        return tuple(str(a) for a in typing.get_args(field.annotation))
    return ()


def render_env_file() -> str:
    """The whole env file; config/ollamad.env is this text (a test keeps them equal)."""
    out = [HEADER]
    for name, field in Settings.model_fields.items():
        meaning = field.description or ""
        choices = _choices(field)
        if choices:
            meaning += f" (one of: {', '.join(choices)})"
        if field.default_factory is not None:
            meaning += f"; set by the unit (default outside the service: {FACTORY_DEFAULTS[name][1]})"
        out.append(f"# {meaning}\n#{env_name(name)}={default_text(name, field)}\n")
    return "\n".join(out)


def parse_env_file(text: str) -> dict[str, str]:
    """KEY=VALUE lines as systemd's EnvironmentFile= reads them (# and ; start comments)."""
    env: dict[str, str] = {}
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line[0] in "#;" or "=" not in line:
            continue
        key, value = line.split("=", 1)
        value = value.strip()
        if len(value) >= 2 and value[0] == value[-1] and value[0] in "\"'":
            value = value[1:-1]
        env[key.strip()] = value
    return env


def parse_unit_environment(text: str) -> dict[str, str]:
    """The value of ``systemctl show -p Environment --value``: shell-quoted KEY=VALUE words."""
    env: dict[str, str] = {}
    for word in shlex.split(text):
        if "=" in word:
            key, value = word.split("=", 1)
            env[key] = value
    return env


def unit_file_environment(unit: Path) -> dict[str, str]:
    """Environment= of a unit file and its drop-ins (UNIT.d/*.conf, in name order), read offline."""
    env: dict[str, str] = {}
    for path in [unit, *sorted(unit.with_name(unit.name + ".d").glob("*.conf"))]:
        if not path.is_file():
            continue
        section = ""
        for raw in path.read_text().splitlines():
            line = raw.strip()
            if line.startswith("["):
                section = line
            elif section == "[Service]" and line.startswith("Environment="):
                value = line.removeprefix("Environment=")
                if value:
                    env.update(parse_unit_environment(value))
                else:
                    env.clear()  # an empty assignment resets the list
    return env


def unit_environment(unit: str = DEFAULT_UNIT) -> dict[str, str]:
    """Environment= of the installed unit and its drop-ins: from systemd when it runs, else the files."""
    systemctl = shutil.which("systemctl")
    if systemctl is None or not Path("/run/systemd/system").is_dir():
        return unit_file_environment(UNIT_FILE)
    try:
        out = subprocess.run([systemctl, "show", unit, "-p", "Environment", "--value"],
                             capture_output=True, text=True, timeout=10, check=True).stdout
    except (OSError, subprocess.SubprocessError):
        return unit_file_environment(UNIT_FILE)
    return parse_unit_environment(out)


@dataclass(frozen=True)
class Effective:
    name: str  # the variable
    value: str  # as the variable would be written
    source: str  # "default", "unit", "env file PATH" or "environment"


def effective(environ: Mapping[str, str], env_file: Path | None,
              unit_env: Mapping[str, str] | None = None) -> tuple[Settings, list[Effective]]:
    """Settings from the layered sources (SettingsError on a bad value) and each one's source."""
    layers: list[tuple[str, Mapping[str, str]]] = [("unit", unit_env or {})]
    if env_file is not None and env_file.is_file():
        layers.append((f"env file {env_file}", parse_env_file(env_file.read_text())))
    layers.append(("environment", environ))
    merged: dict[str, str] = {}
    sources: dict[str, str] = {}
    for label, env in layers:
        for key, value in env.items():
            if key.startswith("OLLAMA") and merged.get(key) != value:
                merged[key] = value
                sources[key] = label
    settings = load_settings(merged)
    rows = [Effective(env_name(f), format_value(f, getattr(settings, f)), sources.get(env_name(f), "default"))
            for f in Settings.model_fields]
    return settings, rows


def unknown_variables(environ: Mapping[str, str], env_file: Path | None) -> list[str]:
    """OLLAMA*/OLLAMAD* names that are set but that ollamad does not read (likely typos)."""
    known = {env_name(f) for f in Settings.model_fields}
    names = set(environ)
    if env_file is not None and env_file.is_file():
        names |= set(parse_env_file(env_file.read_text()))
    return sorted(n for n in names if n.startswith("OLLAMA") and n not in known)
