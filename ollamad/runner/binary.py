"""Which llama-server binary runs: OLLAMAD_LLAMA_SERVER, the project-built one, or PATH."""

from __future__ import annotations

import os
import shutil
import subprocess
from collections.abc import Mapping
from pathlib import Path

HOW_TO_GET = (
    "build one with runners/build.sh from the ollamad repository (about 7 minutes on 2 cores), "
    "set OLLAMAD_LLAMA_SERVER=/path/to/llama-server, or put llama-server on PATH"
)


class BinaryNotFound(Exception):
    pass


class BinaryBroken(BinaryNotFound):
    """The binary is there but cannot run (a missing shared library, the wrong architecture)."""


VERSION_TIMEOUT = 30.0


def check_runs(binary: Path, env: Mapping[str, str], timeout: float = VERSION_TIMEOUT) -> str:
    """Run ``binary --version`` (with the runners' environment); its version line, or BinaryBroken.

    A copied llama-server without its libraries would otherwise fail every load with
    "exited with code 127"; this says why once, at start-up, in the loader's words.
    """
    try:
        done = subprocess.run([str(binary), "--version"], env=dict(env), stdin=subprocess.DEVNULL,
                              capture_output=True, text=True, errors="replace", timeout=timeout, check=False)
    except subprocess.TimeoutExpired:
        raise BinaryBroken(f"{binary} --version did not answer in {timeout:g} s") from None
    except OSError as e:
        raise BinaryBroken(f"{binary} cannot run: {e.strerror or e}") from None
    lines = [ln.strip() for ln in (done.stderr + "\n" + done.stdout).splitlines() if ln.strip()]
    if done.returncode != 0:
        said = " | ".join(lines[-3:]) or "no output"
        raise BinaryBroken(f"{binary} cannot run (--version exited with code {done.returncode}): {said}")
    return next((ln for ln in lines if ln.startswith("version")), lines[0] if lines else "unknown")


# runners/patches/ fixes the relay relies on when the build has them (its PATCHES file)
PROMPT_CANCEL = "0001-server-stop-polling-deadline"  # a one-answer request stops within ~1 s of its client
STREAM_KEEP_ALIVE = "0002-server-keep-alive-after-stream"  # a streamed reply leaves its connection open
STREAM_TOKENS = "0003-server-stream-tokens-of-split-characters"  # a stream's tokens: every generated one


def patches(binary: Path) -> frozenset[str]:
    """The runners/patches/ fixes built into ``binary``: its build's PATCHES file; none if unknown."""
    try:
        text = (binary.resolve().parent.parent / "PATCHES").read_text()
    except OSError:
        return frozenset()
    return frozenset(line.strip() for line in text.splitlines() if line.strip())


def built_binary(runners_dir: Path) -> Path:
    return runners_dir / "current" / "bin" / "llama-server"


def find_llama_server(configured: Path | None, runners_dir: Path) -> Path:
    """Resolve the llama-server to run, or raise BinaryNotFound saying how to get one."""
    if configured is not None:
        if configured.is_file() and os.access(configured, os.X_OK):
            return configured
        raise BinaryNotFound(f"OLLAMAD_LLAMA_SERVER={configured} is not an executable file; {HOW_TO_GET}")
    built = built_binary(runners_dir)
    if built.is_file() and os.access(built, os.X_OK):
        return built.resolve()
    on_path = shutil.which("llama-server")
    if on_path:
        return Path(on_path)
    raise BinaryNotFound(f"no llama-server found: {HOW_TO_GET}")
