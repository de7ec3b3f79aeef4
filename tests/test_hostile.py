"""Hostile clients (issue 17): DNS rebinding, socket floods and slow clients, errors after a
stream began, clients that never read. Daemons run over the fake llama-server."""

from __future__ import annotations

import http.client
import json
from pathlib import Path
from typing import Any

import pytest

from ollamad.api.guard import host_allowed, host_name
from tests.conftest import Daemon


def _raw(d: Daemon, method: str, path: str, headers: dict[str, str], body: Any = None) -> tuple[int, bytes]:
    conn = http.client.HTTPConnection("127.0.0.1", d.port, timeout=30)
    try:
        data = json.dumps(body).encode() if body is not None else None
        conn.request(method, path, body=data, headers=headers)
        resp = conn.getresponse()
        return resp.status, resp.read()
    finally:
        conn.close()


# --- 1. DNS rebinding -------------------------------------------------------------------
@pytest.mark.parametrize(("header", "ok"), [
    ("", True), ("localhost", True), ("localhost:11434", True), ("LOCALHOST.:1", True),
    ("127.0.0.1:11434", True), ("[::1]:11434", True), ("[::1]", True), ("0.0.0.0:1", True),
    ("app.localhost:8080", True), ("printer.local", True), ("host.docker.internal:11434", True),
    ("192.168.1.20:11434", True), ("10.0.0.1", True),
    ("evil.example", False), ("evil.example:11434", False), ("localhost.evil.example:11434", False),
    ("127.0.0.1.nip.io:11434", False), ("8.8.8.8:11434", False), ("evil.localhost.example", False),
])
def test_host_rules_follow_ollama(header: str, ok: bool) -> None:
    assert host_allowed(header) is ok


def test_allowed_hosts_opt_in() -> None:
    assert host_allowed("llm.example.com:443", ["llm.example.com"])
    assert host_allowed("a.b.example.com", ["*.example.com"])
    assert not host_allowed("example.com.evil.net", ["*.example.com"])
    assert host_allowed("anything.at.all", ["*"])
    assert host_name("[::1]:80") == "::1" and host_name("Foo.Local.:9") == "foo.local"


def test_rebinding_is_refused_on_loopback(daemon_factory: Any, fake_server: Path, models_dir: Path) -> None:
    d = daemon_factory(fake_server, models_dir)
    evil = {"Host": f"evil.example:{d.port}", "Origin": f"http://evil.example:{d.port}"}
    status, body = _raw(d, "GET", "/api/tags", evil)
    assert status == 403 and b"not allowed" in body
    assert _raw(d, "POST", "/api/copy", evil, {"source": "tiny", "destination": "stolen"})[0] == 403
    assert _raw(d, "DELETE", "/api/delete", evil, {"model": "tiny"})[0] == 403
    assert _raw(d, "POST", "/api/generate", evil, {"model": "tiny", "prompt": "hi"})[0] == 403
    assert _raw(d, "GET", "/api/tags", {"Host": "evil.example"})[0] == 403  # no Origin: still refused
    status, body = _raw(d, "GET", "/api/tags", {})
    assert status == 200 and any(m["name"].startswith("tiny") for m in json.loads(body)["models"])
    for host in (f"localhost:{d.port}", f"127.0.0.1:{d.port}", f"app.localhost:{d.port}"):
        assert _raw(d, "GET", "/api/tags", {"Host": host})[0] == 200, host


def test_allowed_hosts_setting(daemon_factory: Any, fake_server: Path, models_dir: Path) -> None:
    d = daemon_factory(fake_server, models_dir, OLLAMAD_ALLOWED_HOSTS="llm.example.com")
    assert _raw(d, "GET", "/api/tags", {"Host": f"llm.example.com:{d.port}"})[0] == 200
    assert _raw(d, "GET", "/api/tags", {"Host": f"evil.example:{d.port}"})[0] == 403
