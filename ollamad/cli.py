"""Command line: ``ollamad serve`` and a few client commands that talk to the daemon."""

from __future__ import annotations

import argparse
import json
import sys
import urllib.error
import urllib.request
from typing import Any

from ollamad import __version__


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="ollamad", description="Ollama-compatible daemon over llama-server")
    parser.add_argument("--version", action="version", version=f"ollamad {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("serve", help="run the daemon (settings come from OLLAMA_* / OLLAMAD_* variables)")
    sub.add_parser("list", help="list models")
    sub.add_parser("ps", help="list loaded models")
    args = parser.parse_args(argv)
    if args.command == "serve":
        serve_command()
    elif args.command == "list":
        list_command()
    elif args.command == "ps":
        ps_command()


def serve_command() -> None:
    import anyio

    from ollamad.app import serve
    from ollamad.binary import BinaryNotFound
    from ollamad.logs import configure
    from ollamad.modelconfig import ModelConfigError
    from ollamad.settings import SettingsError, load_settings

    try:
        settings = load_settings()
    except SettingsError as e:
        sys.exit(f"ollamad: {e}")
    configure(debug=settings.debug)
    try:
        anyio.run(serve, settings)
    except (BinaryNotFound, ModelConfigError) as e:
        sys.exit(f"ollamad: {e}")
    except OSError as e:
        sys.exit(f"ollamad: cannot listen on {settings.host}: {e.strerror or e}")


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


def ps_command() -> None:
    body = _get("/api/ps")
    rows = []
    for m in body["models"]:
        vram, size = m.get("size_vram", 0), m["size"] or 1
        if vram >= size:
            proc = "100% GPU"
        elif vram == 0:
            proc = "100% CPU"
        else:
            gpu = round(100 * vram / size)
            proc = f"{100 - gpu}%/{gpu}% CPU/GPU"
        rows.append([m["name"], m["digest"][:12], _size(m["size"]), proc, str(m["context_length"]),
                     str(m.get("num_parallel", "")), f"{m.get('busy_slots', 0)}/{m.get('queued', 0)}",
                     m["expires_at"][:19]])
    _table(rows, ["NAME", "ID", "SIZE", "PROCESSOR", "CONTEXT", "PARALLEL", "BUSY/QUEUED", "UNTIL"])
    queue = body.get("queue", {})
    print(f"queue: {queue.get('waiting', 0)} waiting (max {queue.get('max', '?')})")


if __name__ == "__main__":
    main()
