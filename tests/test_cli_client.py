"""The ``ollamad`` client commands against a running daemon (real llama-server)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from ollamad.models.testmodels import write_all
from tests.conftest import Daemon

pytestmark = pytest.mark.real


def cli(d: Daemon, *args: str, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
    env = {**d.env}
    return subprocess.run([sys.executable, "-m", "ollamad.cli", *args], env=env, input=stdin, text=True,
                          capture_output=True, timeout=120)


def test_cli_commands(daemon_factory: Any, llama_server: Path, tmp_path: Path) -> None:
    models = tmp_path / "models"
    write_all(models, ("tiny", "chat"))
    d = daemon_factory(llama_server, models)
    out = cli(d, "list")
    assert out.returncode == 0 and "tiny:latest" in out.stdout and "NAME" in out.stdout
    out = cli(d, "show", "chat")
    assert out.returncode == 0 and "llama" in out.stdout and "completion" in out.stdout
    assert "im_start" in cli(d, "show", "chat", "--template").stdout
    out = cli(d, "run", "tiny", "say", "something")
    assert out.returncode == 0, out.stderr
    out = cli(d, "ps")
    assert out.returncode == 0 and "tiny:latest" in out.stdout
    assert cli(d, "stop", "tiny").returncode == 0
    out = cli(d, "run", "chat", stdin="hello there\n")  # piped stdin is the prompt, as with ollama
    assert out.returncode == 0, out.stderr
    assert cli(d, "cp", "tiny", "copied:v1").returncode == 0
    assert "copied:v1" in cli(d, "list").stdout
    out = cli(d, "rm", "copied:v1")
    assert out.returncode == 0 and "deleted 'copied:v1'" in out.stdout
    assert "copied:v1" not in cli(d, "list").stdout
    out = cli(d, "show", "nope")
    assert out.returncode == 1 and "model 'nope' not found" in out.stderr
    out = cli(d, "pull", "127.0.0.1:1/library/x", "--insecure")  # nothing listens on port 1
    assert out.returncode == 1 and "pull model manifest" in out.stderr


def test_cli_run_without_prompt_chats_on_a_terminal(daemon_factory: Any, llama_server: Path, tmp_path: Path) -> None:
    import os
    import pty

    models = tmp_path / "models"
    write_all(models, ("chat",))
    d = daemon_factory(llama_server, models)
    leader, follower = pty.openpty()
    proc = subprocess.Popen([sys.executable, "-m", "ollamad.cli", "run", "chat"], env=d.env, stdin=follower,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    os.close(follower)
    os.write(leader, b"hello\nand again\n/bye\n")
    out, err = proc.communicate(timeout=120)
    os.close(leader)
    assert proc.returncode == 0, err
    assert out.count(">>> ") == 3  # two turns, then /bye
    _, ps = d.get("/api/ps")
    assert [m["name"] for m in ps["models"]] == ["chat:latest"]


def test_cli_run_into_a_closed_pipe_exits_quietly(daemon_factory: Any, fake_server: Path, models_dir: Path) -> None:
    """`ollamad run tiny hi | head -c 3`: no BrokenPipeError traceback when the reader is gone (issue 16)."""
    d = daemon_factory(fake_server, models_dir)
    proc = subprocess.Popen([sys.executable, "-m", "ollamad.cli", "run", "tiny", "hi"], env=d.env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    assert proc.stdout is not None
    proc.stdout.close()  # the reader is gone before the first word: every write fails with EPIPE
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 141 and err == "", err
