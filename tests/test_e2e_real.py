"""End to end with the real llama-server and generated models (issue 2's path)."""

from __future__ import annotations

import signal
import time
from typing import Any

import psutil
import pytest

from ollamad.models.plan import http_threads
from tests.conftest import Daemon

pytestmark = pytest.mark.real


def test_generate_streams_ndjson_ending_in_done(real_daemon: Daemon) -> None:
    status, lines = real_daemon.post("/api/generate", {"model": "tiny", "prompt": "hi",
                                                       "options": {"num_predict": 16, "seed": 1}})
    assert status == 200, lines
    assert isinstance(lines, list) and len(lines) >= 2
    assert all(not ln["done"] for ln in lines[:-1])
    final = lines[-1]
    assert final["done"] is True and final["done_reason"] in ("stop", "length")
    assert final["eval_count"] > 0 and final["eval_duration"] > 0
    assert final["prompt_eval_count"] > 0
    assert final["total_duration"] >= final["load_duration"] > 0
    assert "".join(ln["response"] for ln in lines[:-1]) != "" or final["eval_count"] == 1


def test_generate_not_streamed_is_one_object(real_daemon: Daemon) -> None:
    status, body = real_daemon.post("/api/generate", {"model": "tiny:latest", "prompt": "hello", "stream": False,
                                                      "options": {"num_predict": 8, "temperature": 0}})
    assert status == 200, body
    assert isinstance(body, dict) and body["done"] is True
    assert body["eval_count"] > 0 and body["model"] == "tiny:latest"
    if body["eval_count"] == 8:
        assert body["done_reason"] == "length"


def test_chat_streams_and_not(real_daemon: Daemon) -> None:
    msgs = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"}]
    status, lines = real_daemon.post("/api/chat", {"model": "tiny", "messages": msgs, "options": {"num_predict": 8}})
    assert status == 200, lines
    assert lines[-1]["done"] is True and lines[-1]["eval_count"] > 0
    assert all(ln["message"]["role"] == "assistant" for ln in lines)
    status, body = real_daemon.post("/api/chat", {"model": "tiny", "messages": msgs, "stream": False,
                                                  "options": {"num_predict": 8}})
    assert status == 200 and body["done"] is True and body["eval_count"] > 0
    assert body["message"]["role"] == "assistant"


def test_unknown_model_is_404(real_daemon: Daemon) -> None:
    status, body = real_daemon.post("/api/generate", {"model": "nope", "prompt": "hi"})
    assert status == 404 and body == {"error": "model 'nope' not found"}
    status, body = real_daemon.post("/api/chat", {"model": "nope:7b", "messages": [{"role": "user", "content": "x"}]})
    assert status == 404 and body == {"error": "model 'nope:7b' not found"}


@pytest.mark.parametrize(("raw", "needle"), [
    (b"{not json", "invalid JSON"),
    (b"", "missing request body"),
    (b'{"prompt": "hi"}', "model is required"),
    (b"[1, 2]", "JSON object"),
    (b'{"model": "tiny", "options": {"temperature": "hot"}}', "options.temperature"),
    (b'{"model": "tiny", "keep_alive": "300"}', "keep_alive"),
])
def test_bad_requests_are_400(real_daemon: Daemon, raw: bytes, needle: str) -> None:
    for path in ("/api/generate", "/api/chat"):
        status, body = real_daemon.request("POST", path, raw=raw)
        assert status == 400, (path, body)
        assert needle in body.decode()


def test_simple_routes(real_daemon: Daemon) -> None:
    status, raw = real_daemon.request("GET", "/")
    assert status == 200 and raw == b"Ollama is running"
    assert real_daemon.get("/api/version")[1]["version"]
    status, tags = real_daemon.get("/api/tags")
    names = {m["name"] for m in tags["models"]}
    assert {"tiny:latest", "small:latest"} <= names
    tiny = next(m for m in tags["models"] if m["name"] == "tiny:latest")
    assert tiny["details"]["family"] == "llama" and tiny["details"]["format"] == "gguf" and tiny["size"] > 0
    deadline = time.monotonic() + 30  # "" until the background hash is done (catalog.digest never waits)
    while not tiny["digest"] and time.monotonic() < deadline:
        time.sleep(0.1)
        tiny = next(m for m in real_daemon.get("/api/tags")[1]["models"] if m["name"] == "tiny:latest")
    assert len(tiny["digest"]) == 64


def test_ps_shows_loaded_model_and_slots_have_ctx(real_daemon: Daemon, llama_server: Any) -> None:
    real_daemon.post("/api/generate", {"model": "tiny", "prompt": "hi", "options": {"num_predict": 2, "num_ctx": 1024}})
    _, ps = real_daemon.get("/api/ps")
    (m,) = ps["models"]
    assert m["name"] == "tiny:latest" and m["context_length"] == 1024 and m["size"] > 0
    assert m["num_parallel"] == 4  # auto: 4 fits easily
    # the child really got --parallel 4 --ctx-size 4096: each slot has 1024
    (child,) = [p for p in real_daemon.children() if "llama-server" in p.name()]
    argv = child.cmdline()
    assert argv[argv.index("--parallel") + 1] == "4" and argv[argv.index("--ctx-size") + 1] == "4096"


def test_runner_has_an_http_thread_for_every_connection_the_daemon_may_hold(real_daemon: Daemon) -> None:
    # llama-server serves a connection on one thread of a fixed pool for its whole life; its own
    # default (max(--parallel + 2, cores - 1)) is fewer than the completions, requests sent ahead,
    # their /tokenize and the probes the daemon may hold at once, and a request past the pool
    # waits for a thread
    real_daemon.post("/api/generate", {"model": "tiny", "prompt": "hi", "options": {"num_predict": 2}})
    (child,) = [p for p in real_daemon.children() if "llama-server" in p.name()]
    argv = child.cmdline()
    parallel = int(argv[argv.index("--parallel") + 1])
    want = http_threads(parallel, 1)  # OLLAMAD_SEND_AHEAD's default
    assert want >= 2 * parallel * 2 and int(argv[argv.index("--threads-http") + 1]) == want
    assert child.num_threads() >= want  # the real binary made the pool


def test_empty_prompt_loads_and_keep_alive_zero_unloads(real_daemon: Daemon) -> None:
    status, body = real_daemon.post("/api/generate", {"model": "tiny"})
    assert status == 200 and body["done_reason"] == "load"
    assert len(real_daemon.get("/api/ps")[1]["models"]) == 1
    status, body = real_daemon.post("/api/generate", {"model": "tiny", "keep_alive": 0})
    assert status == 200 and body["done_reason"] == "unload"
    deadline = time.monotonic() + 10
    while real_daemon.get("/api/ps")[1]["models"] and time.monotonic() < deadline:
        time.sleep(0.05)
    assert real_daemon.get("/api/ps")[1]["models"] == []
    assert not [p for p in real_daemon.children() if "llama-server" in p.name()]


def test_sigterm_leaves_no_llama_server(real_daemon: Daemon) -> None:
    real_daemon.post("/api/generate", {"model": "tiny", "prompt": "hi", "options": {"num_predict": 2}})
    kids = [p for p in real_daemon.children() if "llama-server" in p.name()]
    assert kids
    assert real_daemon.stop(signal.SIGTERM) == 0
    _, alive = psutil.wait_procs(kids, timeout=5)
    assert not alive
