"""Command line: ``ollamad serve`` and a few client commands that talk to the daemon."""

from __future__ import annotations

import argparse
import json
import sys
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any, NoReturn

from ollamad import __version__


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="ollamad", description="Ollama-compatible daemon over llama-server")
    parser.add_argument("--version", action="version", version=f"ollamad {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("serve", help="run the daemon (settings come from OLLAMA_* / OLLAMAD_* variables)")
    sub.add_parser("list", help="list models")
    sub.add_parser("ps", help="list loaded models")
    cfg = sub.add_parser("config", help="print every setting's effective value and where it came from")
    cfg.add_argument("--env-file", type=Path, default=None,
                     help="env file the service reads (default /etc/ollamad/ollamad.env)")
    cfg.add_argument("--env-template", action="store_true",
                     help="print the documented env file (config/ollamad.env) generated from the settings")
    args = parser.parse_args(argv)
    if args.command == "serve":
        serve_command()
    elif args.command == "list":
        list_command()
    elif args.command == "ps":
        ps_command()
    elif args.command == "config":
        config_command(args.env_file, args.env_template)


def serve_command() -> None:
    import anyio

    from ollamad.app import serve
    from ollamad.binary import BinaryNotFound
    from ollamad.logs import configure
    from ollamad.settings import SettingsError, load_settings

    try:
        settings = load_settings()
    except SettingsError as e:
        _config_error(str(e))
    configure(debug=settings.debug)
    try:
        anyio.run(serve, settings)
    except BinaryNotFound as e:
        _config_error(str(e))
    except OSError as e:
        sys.exit(f"ollamad: cannot listen on {settings.host}: {e.strerror or e}")


EX_CONFIG = 78  # sysexits.h; the unit's RestartPreventExitStatus= stops restarting on it


def _config_error(message: str) -> NoReturn:
    """A start-up error that a restart cannot fix: say so and exit with EX_CONFIG."""
    print(f"ollamad: {message}", file=sys.stderr)
    sys.exit(EX_CONFIG)


def config_command(env_file: Path | None, template: bool) -> None:
    import os

    from ollamad.envfile import DEFAULT_ENV_FILE, effective, render_env_file, unit_environment, unknown_variables
    from ollamad.settings import SettingsError

    if template:
        sys.stdout.write(render_env_file())
        return
    path = env_file or DEFAULT_ENV_FILE
    if env_file is not None and not env_file.is_file():
        sys.exit(f"ollamad: no env file at {env_file}")
    try:
        _, rows = effective(os.environ, path, unit_environment())
    except SettingsError as e:
        sys.exit(f"ollamad: {e}")
    print(f"# effective settings (env file: {path}{'' if path.is_file() else ', absent'})")
    width = min(max(len(f"{r.name}={r.value}") for r in rows), 48)
    for r in rows:
        print(f"{r.name}={r.value}".ljust(width), f" # {r.source}")
    for name in unknown_variables(os.environ, path):
        print(f"# warning: {name} is set but ollamad does not read it", file=sys.stderr)


def _base_url() -> str:
    from ollamad.settings import load_settings

    host, port = load_settings().bind
    if host in ("0.0.0.0", "::", ""):
        host = "127.0.0.1"
    return f"http://{host}:{port}" if ":" not in host else f"http://[{host}]:{port}"


def _get(path: str) -> Any:
    try:
        with urllib.request.urlopen(_base_url() + path, timeout=30) as r:
            return json.load(r)
    except urllib.error.URLError as e:
        sys.exit(f"ollamad: cannot reach the daemon at {_base_url()}: {e.reason}")


def _table(rows: list[list[str]], header: list[str]) -> None:
    widths = [max(len(str(x)) for x in col) for col in zip(header, *rows, strict=False)]
    for row in [header, *rows]:
        print("    ".join(str(c).ljust(w) for c, w in zip(row, widths, strict=False)).rstrip())


def _size(n: int) -> str:
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("KB", 1e3)):
        if n >= scale:
            return f"{n / scale:.1f} {unit}"
    return f"{n} B"


def list_command() -> None:
    models = _get("/api/tags")["models"]
    _table([[m["name"], m["digest"][:12], _size(m["size"]), m["modified_at"][:19]] for m in models],
           ["NAME", "ID", "SIZE", "MODIFIED"])


def until(expires_at: str, status: str | None = None, now: float | None = None) -> str:
    """``ollama ps`` UNTIL: "4 minutes from now", "Forever", "Stopping..."."""
    import datetime as dt
    import time

    if status == "stopping":
        return "Stopping..."
    when = dt.datetime.fromisoformat(expires_at.replace("Z", "+00:00"))
    if when.year >= 2300:
        return "Forever"
    left = when.timestamp() - (time.time() if now is None else now)
    if left < 1:
        return "Less than a second from now"
    for unit, secs in (("hour", 3600), ("minute", 60), ("second", 1)):
        if left >= secs:
            n = int(left // secs)
            return f"{n} {unit}{'s' if n != 1 else ''} from now"
    return "Less than a second from now"  # pragma: no cover


def ps_command() -> None:
    from ollamad.memfit import processor

    body = _get("/api/ps")
    rows = []
    for m in body["models"]:
        proc = m.get("processor") or processor(m.get("size_vram", 0), m["size"])
        rows.append([m["name"], m["digest"][:12], _size(m["size"]), proc, str(m["context_length"]),
                     str(m.get("num_parallel", "")), f"{m.get('busy_slots', 0)}/{m.get('queued', 0)}",
                     until(m["expires_at"], m.get("status"))])
    _table(rows, ["NAME", "ID", "SIZE", "PROCESSOR", "CONTEXT", "PARALLEL", "BUSY/QUEUED", "UNTIL"])
    queue = body.get("queue", {})
    print(f"queue: {queue.get('waiting', 0)} waiting (max {queue.get('max', '?')})")


if __name__ == "__main__":
    main()
