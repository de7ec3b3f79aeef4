"""Which llama-server binary runs: OLLAMAD_LLAMA_SERVER, the project-built one, or PATH."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

HOW_TO_GET = (
    "build one with runners/build.sh from the ollamad repository (about 7 minutes on 2 cores), "
    "set OLLAMAD_LLAMA_SERVER=/path/to/llama-server, or put llama-server on PATH"
)


class BinaryNotFound(Exception):
    pass


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
