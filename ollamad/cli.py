"""Command line: ``ollamad serve`` and a few client commands that talk to the daemon."""

from __future__ import annotations

import argparse
import json
import os
import sys
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, NoReturn

from ollamad import __version__


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="ollamad", description="Ollama-compatible daemon over llama-server")
    parser.add_argument("--version", action="version", version=f"ollamad {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("serve", help="run the daemon (settings come from OLLAMA_* / OLLAMAD_* variables)")
    sub.add_parser("list", aliases=["ls"], help="list models")
    sub.add_parser("ps", help="list loaded models")
    cfg = sub.add_parser("config", help="print every setting's effective value and where it came from")
    cfg.add_argument("--env-file", type=Path, default=None,
                     help="env file the service reads (default /etc/ollamad/ollamad.env)")
    cfg.add_argument("--env-template", action="store_true",
                     help="print the documented env file (config/ollamad.env) generated from the settings")
    p = sub.add_parser("show", help="show a model's details")
    p.add_argument("model")
    for flag in ("modelfile", "parameters", "template", "system", "license"):
        p.add_argument(f"--{flag}", action="store_true", help=f"show only the {flag}")
    p = sub.add_parser("run", help="run a model: answer PROMPT, or chat with lines from stdin")
    p.add_argument("model")
    p.add_argument("prompt", nargs="*")
    p.add_argument("--keepalive", help="how long the model stays loaded (e.g. 5m)")
    p = sub.add_parser("stop", help="unload a model")
    p.add_argument("model")
    p = sub.add_parser("pull", help="pull a model from a registry")
    p.add_argument("model")
    p.add_argument("--insecure", action="store_true", help="use plain http to the registry")
    p = sub.add_parser("cp", help="copy a model")
    p.add_argument("source")
    p.add_argument("destination")
    p = sub.add_parser("rm", help="remove models")
    p.add_argument("models", nargs="+")
    w = sub.add_parser("worker", help="run a llama.cpp RPC worker that a daemon elsewhere spreads models onto")
    w.add_argument("--host", help="address to listen on (OLLAMAD_WORKER_HOST, default 127.0.0.1); "
                                  "the protocol has no authentication: use a private address")
    w.add_argument("--port", type=int, help="port (OLLAMAD_WORKER_PORT, default 50052)")
    w.add_argument("--cache", type=Path, help="folder for the worker's tensor cache (OLLAMAD_WORKER_CACHE)")
    w.add_argument("--threads", type=int, help="CPU threads (OLLAMAD_WORKER_THREADS; default one per core)")
    w.add_argument("--bind-any", action="store_true", help="allow 0.0.0.0 or :: (every network can use it)")
    args = parser.parse_args(argv)
    commands: dict[str, Callable[[argparse.Namespace], None]] = {
        "serve": lambda a: serve_command(), "list": lambda a: list_command(), "ls": lambda a: list_command(),
        "ps": lambda a: ps_command(), "show": show_command, "run": run_command, "stop": stop_command,
        "pull": pull_command, "cp": cp_command, "rm": rm_command,
        "config": lambda a: config_command(a.env_file, a.env_template), "worker": worker_command,
    }
    try:
        commands[args.command](args)
        sys.stdout.flush()  # here, not at exit: a closed pipe then raises where it is caught
    except BrokenPipeError:
        # the reader went away (`ollamad run chat | head -c 300`): stop quietly, as cat does; stdout
        # goes to /dev/null so that the flush at exit does not raise again
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        sys.exit(141)  # 128 + SIGPIPE, what a shell reports for a command SIGPIPE killed


def serve_command() -> None:
    import os

    import anyio

    from ollamad.app import CannotListen, serve
    from ollamad.models.config import ModelConfigError
    from ollamad.runner.binary import BinaryNotFound
    from ollamad.service.logs import configure
    from ollamad.settings import SettingsError, load_settings

    os.umask(0o027)  # models, records and state are the service's (and its group's) alone, as under the unit
    try:
        settings = load_settings()
    except SettingsError as e:
        _config_error(str(e))
    configure(debug=settings.debug)
    try:
        anyio.run(serve, settings, backend_options={"use_uvloop": settings.event_loop == "uvloop"})
    except (BinaryNotFound, ModelConfigError) as e:
        _config_error(str(e))
    except BaseExceptionGroup as group:  # raised in the daemon's task group
        taken, rest = group.split(CannotListen)
        if taken is None or rest is not None:
            raise
        from ollamad.service.logs import priority_prefix

        sys.exit(f"{priority_prefix('error')}ollamad: {_first(taken)}")
    except OSError as e:  # e.g. a models folder it cannot write
        from ollamad.service.logs import priority_prefix

        sys.exit(f"{priority_prefix('error')}ollamad: {e}")


def _first(group: BaseExceptionGroup[Exception]) -> BaseException:
    """The first exception in ``group``, however deeply grouped."""
    first = group.exceptions[0]
    return _first(first) if isinstance(first, BaseExceptionGroup) else first


EX_CONFIG = 78  # sysexits.h; the unit's RestartPreventExitStatus= stops restarting on it


def worker_command(args: argparse.Namespace) -> None:
    import asyncio

    from ollamad.runner.binary import BinaryNotFound
    from ollamad.runner.rpcworker import WorkerConfigError, WorkerSupervisor, check_host, find_rpc_server, serve_worker
    from ollamad.service.logs import configure
    from ollamad.settings import SettingsError, load_settings

    try:
        s = load_settings()
        host = check_host(args.host if args.host is not None else s.worker_host, args.bind_any or s.worker_bind_any)
        binary = find_rpc_server(s.rpc_server, s.runners_dir)
    except (SettingsError, WorkerConfigError, BinaryNotFound) as e:
        _config_error(str(e))
    port = args.port if args.port is not None else s.worker_port
    if not 0 < port < 65536:
        _config_error(f"invalid port {port}")
    configure(debug=s.debug)
    sup = WorkerSupervisor(binary, host, port, threads=args.threads if args.threads is not None else s.worker_threads,
                           cache=args.cache if args.cache is not None else s.worker_cache)
    asyncio.run(serve_worker(sup))


def _config_error(message: str) -> NoReturn:
    """A start-up error that a restart cannot fix: say so (at priority err under journald), exit EX_CONFIG."""
    from ollamad.service.logs import priority_prefix

    print(f"{priority_prefix('error')}ollamad: {message}", file=sys.stderr)
    sys.exit(EX_CONFIG)


def config_command(env_file: Path | None, template: bool) -> None:
    from ollamad.service.envfile import (
        DEFAULT_ENV_FILE,
        effective,
        render_env_file,
        unit_environment,
        unknown_variables,
    )
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


def _call(method: str, path: str, body: dict[str, Any]) -> Iterator[dict[str, Any]]:
    """Send ``body``; yield each JSON line of the answer; exit with the daemon's error message."""
    req = urllib.request.Request(_base_url() + path, data=json.dumps(body).encode(), method=method,
                                 headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=3600) as r:
            for line in r:
                if line.strip():
                    item = json.loads(line)
                    if isinstance(item, dict) and "error" in item:
                        sys.exit(f"Error: {item['error']}")
                    yield item
    except urllib.error.HTTPError as e:
        raw = e.read().decode(errors="replace")
        try:
            message = json.loads(raw).get("error", raw)
        except ValueError:
            message = raw or e.reason
        sys.exit(f"Error: {message}")
    except urllib.error.URLError as e:
        sys.exit(f"ollamad: cannot reach the daemon at {_base_url()}: {e.reason}")


def _send(method: str, path: str, body: dict[str, Any]) -> None:
    for _ in _call(method, path, body):
        pass


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
    from ollamad.memory.fit import processor

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
    if body.get("rpc_workers"):
        print("rpc workers: " + ", ".join(f"{w['endpoint']} {w['state']}" for w in body["rpc_workers"]))


def show_command(args: argparse.Namespace) -> None:
    (info,) = list(_call("POST", "/api/show", {"model": args.model}))
    for flag in ("modelfile", "parameters", "template", "system", "license"):
        if getattr(args, flag):
            print(info.get(flag, ""))
            return
    d = info.get("details", {})
    mi = info.get("model_info", {})
    arch = mi.get("general.architecture", d.get("family", ""))
    print("  Model")
    rows = [("architecture", arch), ("parameters", d.get("parameter_size", "")),
            ("context length", mi.get(f"{arch}.context_length", "")),
            ("embedding length", mi.get(f"{arch}.embedding_length", "")),
            ("quantization", d.get("quantization_level", ""))]
    for key, value in rows:
        print(f"    {key:<20}{value}")
    print("\n  Capabilities")
    for cap in info.get("capabilities", []):
        print(f"    {cap}")
    if info.get("parameters"):
        print("\n  Parameters")
        for line in info["parameters"].splitlines():
            print(f"    {line}")
    if info.get("system"):
        print(f"\n  System\n    {info['system']}")


def run_command(args: argparse.Namespace) -> None:
    base: dict[str, Any] = {"model": args.model}
    if args.keepalive:
        base["keep_alive"] = args.keepalive
    prompt = " ".join(args.prompt)
    if not prompt and not sys.stdin.isatty():
        prompt = sys.stdin.read()
    if prompt:
        for chunk in _call("POST", "/api/generate", {**base, "prompt": prompt}):
            print(chunk.get("response", ""), end="", flush=True)
        print()
        return
    _send("POST", "/api/generate", base)  # load it first, as ollama run does
    messages: list[dict[str, Any]] = []
    while True:
        try:
            line = input(">>> ")
        except (EOFError, KeyboardInterrupt):
            print()
            return
        if line.strip() in ("/bye", "/exit"):
            return
        if not line.strip():
            continue
        messages.append({"role": "user", "content": line})
        reply: list[str] = []
        for chunk in _call("POST", "/api/chat", {**base, "messages": messages}):
            piece = chunk.get("message", {}).get("content", "")
            reply.append(piece)
            print(piece, end="", flush=True)
        print("\n")
        messages.append({"role": "assistant", "content": "".join(reply)})


def stop_command(args: argparse.Namespace) -> None:
    _send("POST", "/api/generate", {"model": args.model, "keep_alive": 0})


def pull_command(args: argparse.Namespace) -> None:
    last = ""
    for step in _call("POST", "/api/pull", {"model": args.model, "insecure": args.insecure}):
        status = step.get("status", "")
        if step.get("total"):
            pct = 100 * step.get("completed", 0) // max(step["total"], 1)
            line = f"{status} {pct:3d}% {_size(step.get('completed', 0))}/{_size(step['total'])}"
        else:
            line = status
        if line != last:
            print(line, flush=True)
            last = line


def cp_command(args: argparse.Namespace) -> None:
    _send("POST", "/api/copy", {"source": args.source, "destination": args.destination})
    print(f"copied '{args.source}' to '{args.destination}'")


def rm_command(args: argparse.Namespace) -> None:
    for model in args.models:
        _send("DELETE", "/api/delete", {"model": model})
        print(f"deleted '{model}'")


if __name__ == "__main__":
    main()
