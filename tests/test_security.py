"""Security (issue 7): loopback children with a key, bearer auth, CORS, body limit, log hygiene."""

from __future__ import annotations

import urllib.request
from pathlib import Path
from typing import Any

import psutil
import pytest

from ollamad.api.guard import allowed_origins, origin_allowed
from ollamad.models.catalog import InvalidName, normalize
from tests.conftest import Daemon
from tests.streams import child_get, runners, wait_for


def _load(d: Daemon) -> psutil.Process:
    status, body = d.post("/api/generate", {"model": "tiny", "prompt": "hi", "options": {"num_predict": 2}})
    assert status == 200, body
    (child,) = runners(d)
    return child


def _headers(d: Daemon, path: str, headers: dict[str, str], method: str = "GET",
             body: bytes | None = None) -> tuple[int, dict[str, str], bytes]:
    req = urllib.request.Request(d.url + path, data=body, method=method, headers=headers)
    try:
        with urllib.request.urlopen(req, timeout=30) as r:
            return r.status, dict(r.headers), r.read()
    except urllib.error.HTTPError as e:
        return e.code, dict(e.headers), e.read()


@pytest.mark.real
def test_child_listens_on_loopback_and_needs_its_key(real_daemon: Daemon) -> None:
    child = _load(real_daemon)
    listening = [c.laddr for c in child.net_connections("inet") if c.status == psutil.CONN_LISTEN]
    assert listening and all(addr.ip == "127.0.0.1" for addr in listening)
    assert child_get(child, "/slots", key=None)[0] == 401
    assert child_get(child, "/slots", key="wrong")[0] == 401
    assert child_get(child, "/slots")[0] == 200
    status, _ = _post_child(child, "/completion", None)
    assert status == 401


@pytest.mark.real
def test_the_key_is_in_a_private_file_not_on_the_command_line(real_daemon: Daemon) -> None:
    """`ps` shows argv to every local user: the key travels in a 0600 file instead (issue 16)."""
    child = _load(real_daemon)
    argv = child.cmdline()
    key_file = Path(argv[argv.index("--api-key-file") + 1])
    key = key_file.read_text().strip()
    assert len(key) >= 24 and key not in " ".join(argv) and "--api-key" not in argv
    assert key_file.stat().st_mode & 0o777 == 0o600
    assert key not in real_daemon.log()
    assert real_daemon.post("/api/generate", {"model": "tiny", "keep_alive": 0})[0] == 200  # unload
    wait_for(lambda: not runners(real_daemon))
    assert not key_file.exists()  # the file goes with the runner


def _post_child(child: psutil.Process, path: str, key: str | None) -> tuple[int, bytes]:
    argv = child.cmdline()
    port = argv[argv.index("--port") + 1]
    req = urllib.request.Request(f"http://127.0.0.1:{port}{path}", data=b'{"prompt":"x","n_predict":1}',
                                 method="POST", headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=10) as r:
            return r.status, r.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()


def test_daemon_binds_loopback_by_default() -> None:
    from ollamad.settings import load_settings

    assert load_settings({}).bind[0] == "127.0.0.1"


def test_bearer_auth(daemon_factory: Any, fake_server: Path, models_dir: Path) -> None:
    d = daemon_factory(fake_server, models_dir, OLLAMAD_API_KEY="s3cret")
    assert d.request("GET", "/")[0] == 200  # health-style routes stay open
    assert d.request("GET", "/api/version")[0] == 200
    status, _, body = _headers(d, "/api/tags", {})
    assert status == 401 and b"unauthorized" in body
    assert _headers(d, "/api/tags", {"Authorization": "Bearer nope"})[0] == 401
    assert _headers(d, "/api/tags", {"Authorization": "Bearer s3cret"})[0] == 200
    gen = b'{"model": "tiny", "prompt": "hi"}'
    assert _headers(d, "/api/generate", {}, "POST", gen)[0] == 401
    assert _headers(d, "/api/generate", {"Authorization": "Bearer s3cret"}, "POST", gen)[0] == 200


def test_auth_is_off_by_default(daemon_factory: Any, fake_server: Path, models_dir: Path) -> None:
    d = daemon_factory(fake_server, models_dir)
    assert _headers(d, "/api/tags", {})[0] == 200


@pytest.mark.parametrize(("origin", "ok"), [
    ("http://localhost", True), ("http://localhost:3000", True), ("https://127.0.0.1:8443", True),
    ("http://0.0.0.0:1", True), ("app://obsidian.md", True), ("chrome-extension://abc", True),
    ("vscode-webview://x", True), ("tauri://localhost", True),
    ("http://evil.example", False), ("http://localhost.evil.example", False), ("null", False),
    ("https://example.com", False),
])
def test_default_origins(origin: str, ok: bool) -> None:
    assert origin_allowed(origin, allowed_origins(())) is ok


def test_cors_over_http(daemon_factory: Any, fake_server: Path, models_dir: Path) -> None:
    d = daemon_factory(fake_server, models_dir, OLLAMA_ORIGINS="https://good.example, http://*.corp.example")
    status, headers, _ = _headers(d, "/api/tags", {"Origin": "http://localhost:5173"})
    assert status == 200 and headers["Access-Control-Allow-Origin"] == "http://localhost:5173"
    status, headers, _ = _headers(d, "/api/tags", {"Origin": "https://good.example"})
    assert status == 200 and headers["Access-Control-Allow-Origin"] == "https://good.example"
    assert _headers(d, "/api/tags", {"Origin": "http://a.corp.example"})[0] == 200
    status, headers, _ = _headers(d, "/api/tags", {"Origin": "https://evil.example"})
    assert status == 403 and "Access-Control-Allow-Origin" not in headers
    status, headers, _ = _headers(d, "/api/chat", {"Origin": "http://localhost:5173",
                                                   "Access-Control-Request-Method": "POST",
                                                   "Access-Control-Request-Headers": "content-type"}, "OPTIONS")
    assert status == 204 and "POST" in headers["Access-Control-Allow-Methods"]
    assert "Content-Type" in headers["Access-Control-Allow-Headers"]
    # a streamed reply carries the header too
    status, headers, _ = _headers(d, "/api/generate", {"Origin": "http://127.0.0.1:8080"}, "POST",
                                  b'{"model": "tiny", "prompt": "hi"}')
    assert status == 200 and headers["Access-Control-Allow-Origin"] == "http://127.0.0.1:8080"


def test_all_origins(daemon_factory: Any, fake_server: Path, models_dir: Path) -> None:
    d = daemon_factory(fake_server, models_dir, OLLAMA_ORIGINS="*")
    assert _headers(d, "/api/tags", {"Origin": "https://anything.example"})[0] == 200


def test_body_over_the_limit_is_413(daemon_factory: Any, fake_server: Path, models_dir: Path) -> None:
    d = daemon_factory(fake_server, models_dir, OLLAMAD_MAX_BODY="4KiB")
    big = b'{"model": "tiny", "prompt": "' + b"x" * 8192 + b'"}'
    status, body = d.request("POST", "/api/generate", raw=big)
    assert status == 413 and b"error" in body
    status, _ = d.request("POST", "/api/generate", raw=b'{"model": "tiny", "prompt": "small"}')
    assert status == 200


@pytest.mark.parametrize("name", [
    "../tiny", "..", "tiny/../../etc/passwd", "/etc/passwd", "tiny:../x", "a/b/c/d", "tiny\x00", "~root/x",
    "tiny:latest/..", "%2e%2e/tiny", "C:\\windows", "tiny\\..\\x", "",
])
def test_names_cannot_traverse(name: str) -> None:
    with pytest.raises(InvalidName):
        normalize(name)


def test_traversal_names_are_400_over_http(daemon_factory: Any, fake_server: Path, models_dir: Path) -> None:
    d = daemon_factory(fake_server, models_dir)
    for name in ("../tiny", "../../../etc/passwd", "tiny/../small"):
        status, body = d.post("/api/generate", {"model": name, "prompt": "hi"})
        assert status == 400 and "invalid model name" in body["error"], (name, body)


@pytest.mark.real
def test_prompts_stay_out_of_logs(daemon_factory: Any, llama_server: Path, models_dir: Path) -> None:
    secret = "zebra-umbrella-4417"
    quiet = daemon_factory(llama_server, models_dir)
    assert quiet.post("/api/generate", {"model": "tiny", "prompt": secret, "options": {"num_predict": 2}})[0] == 200
    assert quiet.post("/api/chat", {"model": "tiny", "messages": [{"role": "user", "content": secret}],
                                    "options": {"num_predict": 2}})[0] == 200
    assert secret not in quiet.log()
    loud = daemon_factory(llama_server, models_dir, OLLAMAD_LOG_REQUESTS="1")
    assert loud.post("/api/generate", {"model": "tiny", "prompt": secret, "options": {"num_predict": 2}})[0] == 200
    assert secret in loud.log()
