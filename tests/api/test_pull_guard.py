"""/api/pull against a hostile or broken registry (issue 17, point 7), with the fake llama-server.

The registry runs in a thread on 127.0.0.1; loopback is refused unless OLLAMAD_PULL_ALLOW lists it.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web

from ollamad.api.registry import PullPolicy
from ollamad.models import store
from tests.conftest import Daemon, free_port
from tests.models.test_gguf_hostile import nested
from tests.streams import ThreadedApp

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


class Registry(ThreadedApp):
    """Serves ``routes`` (path -> handler); counts the requests it got."""

    def __init__(self) -> None:
        super().__init__()
        self.routes: dict[str, Handler] = {}
        self.hits: list[str] = []

    async def _any(self, request: web.Request) -> web.StreamResponse:
        self.hits.append(request.path)
        handler = self.routes.get(request.path)
        return await handler(request) if handler else web.Response(status=404)

    def make_app(self) -> web.Application:
        app = web.Application()
        app.router.add_get("/{tail:.*}", self._any)
        return app

    def serve(self, model: str, manifest: Any, blobs: dict[str, bytes]) -> None:
        raw = manifest if isinstance(manifest, bytes) else json.dumps(manifest).encode()
        self.routes[f"/v2/library/{model}/manifests/latest"] = _const(raw)
        for digest, data in blobs.items():
            self.routes[f"/v2/library/{model}/blobs/{digest}"] = _const(data)


def _const(body: bytes) -> Handler:
    async def handler(request: web.Request) -> web.StreamResponse:
        return web.Response(body=body)
    return handler


def _manifest(model: bytes, size: int | None = None) -> tuple[dict[str, Any], dict[str, bytes]]:
    digest = "sha256:" + hashlib.sha256(model).hexdigest()
    layer = {"mediaType": store.MODEL, "digest": digest, "size": len(model) if size is None else size}
    return {"schemaVersion": 2, "mediaType": store.MANIFEST_TYPE, "layers": [layer]}, {digest: model}


@pytest.fixture
def registry() -> Iterator[Registry]:
    with Registry() as reg:
        yield reg


def _pull(d: Daemon, reg: Registry, model: str) -> tuple[int, Any]:
    return d.post("/api/pull", {"model": f"127.0.0.1:{reg.port}/library/{model}", "insecure": True,
                                "stream": False}, timeout=30)


def _stored(models: Path) -> list[str]:
    return [p.name for p in models.rglob("*") if p.is_file()]


@pytest.fixture
def folder(tmp_path: Path) -> Path:
    (tmp_path / "models").mkdir()
    return tmp_path / "models"


def test_loopback_registry_is_refused_by_default(daemon_factory: Any, fake_server: Path, folder: Path,
                                                 registry: Registry, models_dir: Path) -> None:
    model = (models_dir / "tiny.gguf").read_bytes()
    registry.serve("tiny", *_manifest(model))
    d = daemon_factory(fake_server, folder)
    status, body = _pull(d, registry, "tiny")
    assert status == 403 and "OLLAMAD_PULL_ALLOW" in body["error"], body
    assert registry.hits == [] and _stored(folder) == []
    for host in ("localhost", "169.254.169.254", "10.0.0.1", "2130706433", "127.1"):
        status, body = d.post("/api/pull", {"model": f"{host}:{registry.port}/library/tiny", "insecure": True,
                                            "stream": False}, timeout=30)
        # numeric forms of 127.0.0.1 are refused too (403, or 502 where aiohttp refuses the form)
        assert status == 403 or (status == 502 and host[0].isdigit() and "." not in host[4:]), (host, body)
    assert registry.hits == []
    allowed = daemon_factory(fake_server, folder, OLLAMAD_PULL_ALLOW="127.0.0.1")
    assert _pull(allowed, registry, "tiny") == (200, {"status": "success"})
    assert "tiny:latest" in {m["name"].rsplit("/", 1)[-1] for m in allowed.get("/api/tags")[1]["models"]}


def test_hostile_registry_answers(daemon_factory: Any, fake_server: Path, folder: Path, registry: Registry,
                                  models_dir: Path) -> None:
    model = (models_dir / "tiny.gguf").read_bytes()
    registry.serve("notamanifest", {"hello": "world"}, {})
    registry.serve("undersized", *_manifest(model, size=1000))
    registry.serve("notgguf", *_manifest(b"this is not a model file"))
    registry.serve("nested", *_manifest(nested(20_000)))
    manifest, blobs = _manifest(b"a" * 100)
    registry.serve("wrongbytes", manifest, {d: b"b" * 100 for d in blobs})
    bad_params = store.write_blob(folder.parent / "x", b'{"temperature": "hot"}')
    manifest, blobs = _manifest(model)
    manifest["layers"].append({"mediaType": store.PARAMS, "digest": bad_params.digest, "size": bad_params.size})
    registry.serve("badparams", manifest, {**blobs, bad_params.digest: b'{"temperature": "hot"}'})
    link_local = "http://169.254.169.254/latest/meta-data/"
    manifest, _ = _manifest((models_dir / "small.gguf").read_bytes())

    async def redirect(request: web.Request) -> web.StreamResponse:
        raise web.HTTPFound(link_local)

    registry.serve("redirected", manifest, {})
    registry.routes[f"/v2/library/redirected/blobs/{manifest['layers'][0]['digest']}"] = redirect

    async def silent(request: web.Request) -> web.StreamResponse:
        await asyncio.sleep(60)
        return web.Response()

    registry.routes["/v2/library/silent/manifests/latest"] = silent
    d = daemon_factory(fake_server, folder, OLLAMAD_PULL_ALLOW="127.0.0.1", OLLAMAD_PULL_TIMEOUT="1s")
    cases = {
        "notamanifest": (502, "not an image manifest"),
        "undersized": (502, "larger than the manifest declares"),
        "notgguf": (502, "invalid model file"),
        "nested": (502, "invalid model file"),
        "wrongbytes": (502, "digest mismatch"),
        "badparams": (502, "invalid params"),
        "redirected": (403, "not allowed"),
        "silent": (504, "did not answer in time"),
    }
    for name, (status, needle) in cases.items():
        got, body = _pull(d, registry, name)
        assert got == status and needle in body["error"], (name, got, body)
    # no manifest, no partial file; only the checked model blob of "badparams" stays (as Ollama keeps blobs)
    assert _stored(folder) == [f"sha256-{hashlib.sha256(model).hexdigest()}"]
    # a registry that is not there: a generic text, no connection details
    port = free_port()
    got, body = d.post("/api/pull", {"model": f"127.0.0.1:{port}/library/x", "insecure": True, "stream": False})
    assert got == 502 and body["error"] == "pull model manifest: could not reach the registry"


@pytest.mark.parametrize(("allow", "address", "ok"), [
    ((), "8.8.8.8", True), ((), "127.0.0.1", False), ((), "10.1.2.3", False), ((), "169.254.169.254", False),
    ((), "::1", False), ((), "::ffff:127.0.0.1", False), ((), "fe80::1", False), ((), "100.64.0.1", False),
    ((), "224.0.0.1", False), (("10.0.0.0/8",), "10.1.2.3", True), (("*",), "127.0.0.1", True),
])
def test_pull_policy(allow: tuple[str, ...], address: str, ok: bool) -> None:
    assert PullPolicy.parse(allow).address_allowed(address) is ok
