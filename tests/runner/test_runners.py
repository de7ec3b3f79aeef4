"""Getting a llama-server: which binary runs, and the build script's messages and cache."""

from __future__ import annotations

import asyncio
import os
import shutil
import subprocess
from pathlib import Path

import pytest

from ollamad.runner.binary import BinaryNotFound, find_llama_server

ROOT = Path(__file__).resolve().parents[2]
BUILD = ROOT / "runners" / "build.sh"


def exe(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("#!/bin/sh\n")
    path.chmod(0o755)
    return path


def test_configured_binary_wins(tmp_path: Path) -> None:
    configured = exe(tmp_path / "mine" / "llama-server")
    exe(tmp_path / "runners" / "current" / "bin" / "llama-server")
    assert find_llama_server(configured, tmp_path / "runners") == configured


def test_configured_but_missing_is_an_error_that_says_how(tmp_path: Path) -> None:
    with pytest.raises(BinaryNotFound, match=r"OLLAMAD_LLAMA_SERVER=.* is not an executable file.*runners/build.sh"):
        find_llama_server(tmp_path / "nope", tmp_path)


def test_project_built_then_path(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    built = exe(tmp_path / "runners" / "current" / "bin" / "llama-server")
    on_path = exe(tmp_path / "path" / "llama-server")
    monkeypatch.setenv("PATH", str(on_path.parent))
    assert find_llama_server(None, tmp_path / "runners") == built.resolve()
    assert find_llama_server(None, tmp_path / "elsewhere") == on_path
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))
    with pytest.raises(BinaryNotFound, match="no llama-server found"):
        find_llama_server(None, tmp_path / "elsewhere")


def _path_without(tmp_path: Path, *missing: str) -> str:
    """A PATH with the usual tools linked in, except ``missing``."""
    bindir = tmp_path / "bin"
    bindir.mkdir()
    for tool in ("bash", "env", "grep", "sha256sum", "cut", "uname", "mkdir", "printf", "nproc", "flock",
                 "cat", "sort", "xargs", "find", "git", "c++", "g++", "cmake", "python3", "nvcc", "nvidia-smi"):
        found = shutil.which(tool)
        if found and tool not in missing:
            (bindir / tool).symlink_to(found)
    return str(bindir)


def test_build_without_cmake_says_so(tmp_path: Path) -> None:
    env = {"PATH": _path_without(tmp_path, "cmake"), "HOME": str(tmp_path), "OLLAMAD_RUNNERS_DIR": str(tmp_path / "r")}
    r = subprocess.run(["bash", str(BUILD)], env=env, capture_output=True, text=True)
    assert r.returncode == 1
    assert "cmake is not installed" in r.stderr


def test_build_without_compiler_says_so(tmp_path: Path) -> None:
    env = {"PATH": _path_without(tmp_path, "c++", "g++"), "HOME": str(tmp_path),
           "OLLAMAD_RUNNERS_DIR": str(tmp_path / "r")}
    r = subprocess.run(["bash", str(BUILD)], env=env, capture_output=True, text=True)
    assert r.returncode == 1 and "no C++ compiler found" in r.stderr


def test_build_rejects_a_folder_that_is_not_llama_cpp(tmp_path: Path) -> None:
    env = {**os.environ, "LLAMA_CPP_SRC": str(tmp_path), "OLLAMAD_RUNNERS_DIR": str(tmp_path / "r")}
    r = subprocess.run(["bash", str(BUILD)], env=env, capture_output=True, text=True)
    assert r.returncode == 1 and "does not look like a llama.cpp checkout" in r.stderr


def test_second_build_is_cached(llama_server: Path) -> None:
    if "OLLAMAD_LLAMA_SERVER" in os.environ:
        pytest.skip("a configured binary is in use, not the project-built one")
    r = subprocess.run(["bash", str(BUILD)], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0 and "cached:" in r.stderr


async def test_runner_is_ready_when_llama_server_says_so(llama_server: Path, models_dir: Path,
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    """The ready lines llama-server prints wake the /health check: with a one-minute poll
    interval the load still ends in seconds, so a real llama-server still prints them."""
    import time

    import aiohttp

    from ollamad.runner import child as runner_mod
    from tests.conftest import model_plan

    monkeypatch.setattr(runner_mod, "HEALTH_POLL", 60.0)
    runner = runner_mod.Runner(model_plan(models_dir, "tiny", ctx=256), str(llama_server))
    async with aiohttp.ClientSession() as session:
        t0 = time.monotonic()
        try:
            await asyncio.wait_for(runner.start(session), 50)
        finally:
            await runner.stop()
    assert runner.ready_at - t0 < 30
