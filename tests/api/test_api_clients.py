"""The whole API driven by the official ``ollama`` and ``openai`` clients (real llama-server)."""

from __future__ import annotations

import json
import math
import signal
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import ollama
import openai
import pytest
from aiohttp import web

from ollamad.models import store
from ollamad.models.testmodels import write_all
from tests.conftest import Daemon
from tests.streams import ThreadedApp

pytestmark = pytest.mark.real


@pytest.fixture
def api_models(tmp_path: Path) -> Path:
    folder = tmp_path / "models"
    write_all(folder, ("tiny", "chat", "embed", "code"))
    return folder


@pytest.fixture
def daemon(daemon_factory: Any, llama_server: Path, api_models: Path) -> Daemon:
    # the local registry of the pull test is on loopback, which /api/pull refuses unless allowed
    return daemon_factory(llama_server, api_models, OLLAMAD_PULL_ALLOW="127.0.0.1")  # type: ignore[no-any-return]


@pytest.fixture
def client(daemon: Daemon) -> ollama.Client:
    return ollama.Client(host=daemon.url)


def test_generate_and_chat_with_ollama_client(client: ollama.Client) -> None:
    r = client.generate(model="tiny", prompt="hi", options={"num_predict": 8, "seed": 3}, stream=False)
    assert r.done and r.eval_count and r.eval_count > 0 and r.model == "tiny"
    chunks = list(client.generate(model="tiny", prompt="hi", options={"num_predict": 8}, stream=True))
    assert chunks[-1].done and not any(c.done for c in chunks[:-1])
    msgs = [{"role": "user", "content": "hello"}]
    c = client.chat(model="chat", messages=msgs, options={"num_predict": 8}, stream=False)
    assert c.message.role == "assistant" and c.done and c.eval_count
    parts = list(client.chat(model="chat", messages=msgs, options={"num_predict": 8}, stream=True))
    assert parts[-1].done and parts[-1].eval_count
    # an unknown option is ignored, a wrong type named
    r = client.generate(model="tiny", prompt="x", options={"num_predict": 2, "bogus_option": 1}, stream=False)
    assert r.done
    with pytest.raises(ollama.ResponseError) as e:
        client.generate(model="tiny", prompt="x", options={"top_k": "many"}, stream=False)
    assert e.value.status_code == 400 and "options.top_k" in e.value.error


def test_embed_with_ollama_client(client: ollama.Client, daemon: Daemon) -> None:
    r = client.embed(model="embed", input=["hello world", "goodbye"])
    assert len(r.embeddings) == 2 and len(r.embeddings[0]) == 128
    assert math.isclose(sum(x * x for x in r.embeddings[0]), 1.0, rel_tol=1e-3)
    assert r.embeddings[0] != r.embeddings[1] and r.prompt_eval_count and r.prompt_eval_count > 0
    one = client.embed(model="embed", input="hello world", dimensions=16)
    assert len(one.embeddings) == 1 and len(one.embeddings[0]) == 16
    assert math.isclose(sum(x * x for x in one.embeddings[0]), 1.0, rel_tol=1e-3)
    legacy = client.embeddings(model="embed", prompt="hello world")
    assert len(legacy.embedding) == 128
    # truncate false with an input longer than the context: 400; true: it is cut and embedded
    long = "word " * 3000
    status, body = daemon.post("/api/embed", {"model": "embed", "input": long, "truncate": False})
    assert status == 400 and "context length" in body["error"]
    status, body = daemon.post("/api/embed", {"model": "embed", "input": long})
    assert status == 200 and len(body["embeddings"][0]) == 128
    # the embedding runner was started with llama-server's embedding flags
    (child,) = [p for p in daemon.children() if "llama-server" in p.name()]
    assert "--embeddings" in child.cmdline()
    # capabilities both ways
    with pytest.raises(ollama.ResponseError) as e:
        client.generate(model="embed", prompt="hi")
    assert e.value.status_code == 400 and e.value.error == '"embed" does not support generate'
    with pytest.raises(ollama.ResponseError) as e:
        client.embed(model="tiny", input="hi")
    assert e.value.status_code == 400 and "does not support embeddings" in e.value.error


def test_list_show_ps(client: ollama.Client) -> None:
    names = {m.model for m in client.list().models}
    assert {"tiny:latest", "chat:latest", "embed:latest"} <= names
    tiny = next(m for m in client.list().models if m.model == "tiny:latest")
    assert tiny.details and tiny.details.family == "llama" and tiny.details.format == "gguf"
    assert tiny.size and tiny.digest and len(tiny.digest) == 64 and tiny.modified_at
    s = client.show("chat")
    assert s.capabilities and {"completion", "tools"} <= set(s.capabilities)
    assert s.modelinfo and s.modelinfo["general.architecture"] == "llama"
    assert s.modelinfo["llama.context_length"] == 8192 and s.template and "im_start" in s.template
    assert client.show("embed").capabilities == ["embedding"]
    client.generate(model="tiny", prompt="hi", options={"num_predict": 2})
    ps = client.ps().models
    assert [m.model for m in ps] == ["tiny:latest"] and ps[0].size and ps[0].details


def test_copy_delete_create(client: ollama.Client, daemon: Daemon, api_models: Path, tmp_path: Path) -> None:
    client.copy("tiny", "mine:v1")
    assert "mine:v1" in {m.model for m in client.list().models}
    assert client.generate(model="mine:v1", prompt="hi", options={"num_predict": 2}).done
    client.delete("mine:v1")
    assert "mine:v1" not in {m.model for m in client.list().models}
    assert (api_models / "tiny.gguf").is_file()  # the source is untouched
    with pytest.raises(ollama.ResponseError) as e:
        client.delete("mine:v1")
    assert e.value.status_code == 404

    # create from an uploaded blob, with a system prompt and parameters
    digest = client.create_blob(api_models / "tiny.gguf")
    steps = list(client.create(model="made", files={"tiny.gguf": digest}, system="You are terse.",
                               parameters={"temperature": 0.3, "num_ctx": 512, "stop": ["</s>"]}, stream=True))
    assert steps[-1].status == "success"
    shown = client.show("made")
    assert shown.parameters and "temperature" in shown.parameters
    assert shown.modelfile and 'SYSTEM """You are terse."""' in shown.modelfile
    assert daemon.post("/api/show", {"model": "made"})[1]["system"] == "You are terse."
    client.generate(model="made", prompt="hi", options={"num_predict": 2})
    ctx = {m.model: m.context_length for m in client.ps().models}
    assert ctx["made:latest"] == 512  # num_ctx from the params layer
    # the older Modelfile form
    status, body = daemon.post("/api/create", {"model": "old-style", "stream": False,
                                               "modelfile": "FROM made\nPARAMETER top_k 7\nSYSTEM Be kind."})
    assert status == 200 and body == {"status": "success"}
    old = daemon.post("/api/show", {"model": "old-style"})[1]
    assert old["system"] == "Be kind." and "top_k" in old["parameters"]
    assert "temperature" in old["parameters"]  # the base model's parameters stay under the new ones
    # create from a GGUF path inside the models folder; a path elsewhere is refused
    assert client.create(model="frompath", from_=str(api_models / "chat.gguf")).status == "success"
    assert "frompath:latest" in {m.model for m in client.list().models}
    outside = tmp_path / "elsewhere" / "x.gguf"
    write_all(outside.parent, ("tiny",))
    with pytest.raises(ollama.ResponseError) as e:
        client.create(model="bad", from_=str(outside.parent / "tiny.gguf"))
    assert e.value.status_code == 400 and "outside" in e.value.error
    # a blob upload with the wrong digest is refused
    status, _ = daemon.request("POST", "/api/blobs/sha256:" + "0" * 64, raw=b"not this")
    assert status == 400
    status, _ = daemon.request("HEAD", f"/api/blobs/{digest}")
    assert status == 200


def _store_model(root: Path, name: str, gguf: Path, **texts: str) -> None:
    layers = [store.Layer(store.MODEL, store.sha256_file(gguf), gguf.stat().st_size)]
    store.link_blob(root, gguf, layers[0].digest)
    for media, text in texts.items():
        blob = store.write_blob(root, text.encode())
        layers.append(store.Layer(store.MEDIA_PREFIX + media, blob.digest, blob.size))
    store.write_manifest(root, store.parse_name(name), layers)


def test_serves_ollama_store_by_ollama_names(daemon_factory: Any, llama_server: Path, tmp_path: Path) -> None:
    src = tmp_path / "src"
    write_all(src, ("tiny", "chat"))
    root = tmp_path / "ollama-models"
    _store_model(root, "gemma3:4b", src / "tiny.gguf", params=json.dumps({"temperature": 0.1, "num_ctx": 256}),
                 system="Answer in French.", license="MIT")
    _store_model(root, "someone/chatty:q4", src / "chat.gguf", system="Always answer in one long sentence.")
    (root / "plain.gguf").write_bytes((src / "tiny.gguf").read_bytes())  # plain files work beside it
    d = daemon_factory(llama_server, root)
    client = ollama.Client(host=d.url)
    names = {m.model for m in client.list().models}
    assert {"gemma3:4b", "someone/chatty:q4", "plain:latest"} <= names
    for name in ("gemma3:4b", "registry.ollama.ai/library/gemma3:4b", "library/gemma3:4b"):
        assert client.generate(model=name, prompt="bonjour", options={"num_predict": 2}).done
    assert client.chat(model="someone/chatty:q4", messages=[{"role": "user", "content": "x"}],
                       options={"num_predict": 2}).done
    # the system layer is applied to a chat without a system message, not over the client's own
    (root / "chat.gguf").write_bytes((src / "chat.gguf").read_bytes())
    d.proc.send_signal(signal.SIGHUP)  # rescan to see the plain file
    deadline = time.monotonic() + 10
    while "chat:latest" not in {m.model for m in client.list().models} and time.monotonic() < deadline:
        time.sleep(0.05)
    user = [{"role": "user", "content": "x"}]
    plain = client.chat(model="chat", messages=user, options={"num_predict": 1})
    with_system = client.chat(model="someone/chatty:q4", messages=user, options={"num_predict": 1})
    assert with_system.prompt_eval_count and plain.prompt_eval_count
    assert with_system.prompt_eval_count > plain.prompt_eval_count + 20
    own = [{"role": "system", "content": "s"}, *user]
    mine = client.chat(model="someone/chatty:q4", messages=own, options={"num_predict": 1})
    same = client.chat(model="chat", messages=own, options={"num_predict": 1})
    assert mine.prompt_eval_count == same.prompt_eval_count
    shown = client.show("gemma3:4b")
    assert shown.license == "MIT" and shown.parameters and "temperature" in shown.parameters
    assert d.post("/api/show", {"model": "gemma3:4b"})[1]["system"] == "Answer in French."
    ps = {m.model: m.context_length for m in client.ps().models}
    assert ps["gemma3:4b"] == 256
    listed = next(m for m in client.list().models if m.model == "gemma3:4b")
    manifest = root / "manifests/registry.ollama.ai/library/gemma3/4b"
    assert listed.digest == store.sha256_file(manifest).split(":")[1]


def test_openai_client(daemon: Daemon) -> None:
    client = openai.OpenAI(base_url=daemon.url + "/v1", api_key="ollama")
    msgs: Any = [{"role": "user", "content": "hi"}]
    r = client.chat.completions.create(model="chat", messages=msgs, max_tokens=8)
    assert r.model == "chat" and r.choices[0].message.role == "assistant"
    assert r.usage and r.usage.completion_tokens > 0 and r.usage.prompt_tokens > 0
    chunks = list(client.chat.completions.create(model="chat", messages=msgs, max_tokens=8, stream=True,
                                                 stream_options={"include_usage": True}))
    assert chunks and all(c.model == "chat" for c in chunks)
    assert chunks[-1].usage and chunks[-1].usage.completion_tokens > 0
    c = client.completions.create(model="tiny", prompt="once upon", max_tokens=8)
    assert c.choices and c.usage and c.usage.completion_tokens > 0
    streamed = list(client.completions.create(model="tiny", prompt="once", max_tokens=4, stream=True))
    assert streamed
    e = client.embeddings.create(model="embed", input=["a b c", "d e f"])  # base64 under the hood
    assert len(e.data) == 2 and len(e.data[0].embedding) == 128 and e.usage.prompt_tokens > 0
    e = client.embeddings.create(model="embed", input="a b c", encoding_format="float", dimensions=8)
    assert len(e.data[0].embedding) == 8
    ids = {m.id for m in client.models.list()}
    assert {"tiny:latest", "chat:latest", "embed:latest"} <= ids
    assert client.models.retrieve("tiny").id == "tiny:latest"
    with pytest.raises(openai.NotFoundError) as nf:
        client.models.retrieve("nope")
    assert 'model "nope" not found' in str(nf.value)
    with pytest.raises(openai.BadRequestError) as bad:
        client.chat.completions.create(model="embed", messages=msgs)
    assert "does not support chat" in str(bad.value)
    picture: Any = [{"role": "user", "content": [
        {"type": "text", "text": "what is it?"},
        {"type": "image_url", "image_url": {"url": "data:image/png;base64,iVBORw0KGgo="}}]}]
    with pytest.raises(openai.BadRequestError) as bad:
        client.chat.completions.create(model="chat", messages=picture)
    assert '"chat" does not support vision' in str(bad.value)
    status, raw = daemon.request("POST", "/v1/chat/completions",
                                 {"model": "chat", "messages": msgs, "max_tokens": 4, "stream": True})
    assert status == 200 and raw.rstrip().endswith(b"data: [DONE]")


def test_per_model_settings_file(daemon_factory: Any, llama_server: Path, api_models: Path, tmp_path: Path) -> None:
    cfg = tmp_path / "models.toml"
    cfg.write_text('[models."tiny"]\nnum_ctx = 640\nnum_parallel = 2\nkeep_alive = "7m"\n'
                   'aliases = ["mini"]\noptions = { num_predict = 3 }\n')
    d = daemon_factory(llama_server, api_models, OLLAMAD_MODEL_SETTINGS=str(cfg))
    status, body = d.post("/api/generate", {"model": "mini", "prompt": "hi", "stream": False})
    assert status == 200 and body["eval_count"] <= 3
    (m,) = d.get("/api/ps")[1]["models"]
    # llama-server rounds its context up (to 256 per sequence set); ps shows what each slot really has
    assert m["name"] == "tiny:latest" and 640 <= m["context_length"] < 640 + 256 and m["num_parallel"] == 2
    # a malformed file stops start-up with a message naming the field
    cfg.write_text('[models."tiny"]\nnum_ctx = "big"\n')
    with pytest.raises(RuntimeError, match=r"models\.tiny\.num_ctx"):
        daemon_factory(llama_server, api_models, OLLAMAD_MODEL_SETTINGS=str(cfg))


BAD: list[tuple[str, str, bytes, str]] = [
    ("POST", "/api/embed", b"{oops", "invalid JSON"),
    ("POST", "/api/embed", b'{"input": "x"}', "model is required"),
    ("POST", "/api/embed", b'{"model": "embed", "input": 5}', "input"),
    ("POST", "/api/embed", b'{"model": "embed", "input": "x", "dimensions": "a"}', "dimensions"),
    ("POST", "/api/embeddings", b'{"model": "embed", "prompt": 3}', "prompt"),
    ("POST", "/api/show", b"{}", "model is required"),
    ("POST", "/api/show", b'{"model": "../../etc/passwd"}', "invalid model name"),
    ("POST", "/api/copy", b'{"source": "tiny"}', "destination is required"),
    ("POST", "/api/copy", b'{"source": "tiny", "destination": "../x"}', "invalid model name"),
    ("DELETE", "/api/delete", b"", "missing request body"),
    ("DELETE", "/api/delete", b'{"model": 7}', "model must be"),
    ("POST", "/api/create", b'{"model": "x"}', "neither 'from' or 'files'"),
    ("POST", "/api/create", b'{"model": "x", "files": {"a.gguf": "sha256:zz"}}', "invalid digest"),
    ("POST", "/api/create", b'{"model": "x", "from": "tiny", "stream": false, "system": 5}', "system must be"),
    ("POST", "/api/create", b'{"model": "x", "from": "tiny", "quantize": "q4_K_M"}', "quantize"),
    ("POST", "/api/pull", b'{"model": "a/b/c/d"}', "invalid model name"),
    ("POST", "/api/pull", b'{"model": "x", "insecure": "yes"}', "insecure"),
    ("POST", "/api/blobs/sha256:123", b"x", "invalid digest"),
    ("POST", "/v1/chat/completions", b'{"model": "chat"}', "messages"),
    ("POST", "/v1/chat/completions", b'{"model": "chat", "messages": [], "temperature": "x"}', "temperature"),
    ("POST", "/v1/completions", b'{"model": "tiny"}', "prompt"),
    ("POST", "/v1/completions", b"[]", "JSON object"),
    ("POST", "/v1/embeddings", b'{"model": "embed"}', "input"),
    ("POST", "/v1/embeddings", b'{"model": "embed", "input": "x", "encoding_format": "hex"}', "encoding_format"),
    ("POST", "/api/generate", b'{"model": "tiny", "prompt": 3}', "prompt"),
    ("POST", "/api/generate", b'{"model": "tiny", "prompt": "x", "format": 5}', "format"),
    ("POST", "/api/generate", b'{"model": "tiny", "prompt": "x", "images": "abc"}', "images"),
    ("POST", "/api/chat", b'{"model": "chat", "messages": [{"content": "x"}]}', "messages.0.role"),
    ("POST", "/api/chat", b'{"model": "chat", "messages": [], "tools": {}}', "tools"),
    ("POST", "/api/embed", b'{"model": "embed", "input": "x", "truncate": "no"}', "truncate"),
    ("POST", "/api/show", b'{"model": "tiny", "verbose": "yes"}', "verbose"),
    ("POST", "/api/pull", b'{"model": "x", "stream": "no"}', "stream"),
    ("POST", "/api/create", b'{"model": "x", "files": ["a"]}', "files must map"),
    ("POST", "/api/create", b'{"model": "x", "from": "/etc/passwd"}', "outside"),
    ("HEAD", "/api/blobs/md5:abc", b"", ""),
    ("GET", "/v1/models/a:b:c", b"", "invalid model name"),
    ("POST", "/v1/chat/completions", b'{"model": "chat", "messages": [{"role": "user"}], "max_tokens": -1}',
     "max_tokens"),
    ("POST", "/api/chat", b'{"model": "chat", "messages": "hi"}', "messages"),
]


@pytest.fixture(scope="module")
def shared_daemon(tmp_path_factory: pytest.TempPathFactory, llama_server: Path) -> Iterator[Daemon]:
    """One daemon for the many bad-request cases (none of them changes anything)."""
    folder = tmp_path_factory.mktemp("bad")
    write_all(folder / "models", ("tiny", "chat", "embed"))
    d = Daemon(llama_server, folder / "models").start(folder / "daemon.log")
    yield d
    d.stop()


@pytest.mark.parametrize(("method", "path", "raw", "needle"), BAD, ids=[f"{m} {p} {n}" for m, p, _, n in BAD])
def test_malformed_requests_are_400_naming_the_problem(shared_daemon: Daemon, method: str, path: str, raw: bytes,
                                                       needle: str) -> None:
    status, body = shared_daemon.request(method, path, raw=raw or None)
    assert status == 400, (path, body)
    if method == "HEAD":
        return
    err = json.loads(body)["error"]
    message = err["message"] if path.startswith("/v1/") else err
    assert needle in message


class LocalRegistry(ThreadedApp):
    """A small Ollama-compatible registry (manifests and blobs over HTTP) on loopback, in a thread."""

    def __init__(self, root: Path) -> None:
        super().__init__()
        self.root = root

    def make_app(self) -> web.Application:
        async def manifest(request: web.Request) -> web.StreamResponse:
            ns, model, tag = (request.match_info[k] for k in ("ns", "model", "tag"))
            path = self.root / "manifests" / "registry.ollama.ai" / ns / model / tag
            if not path.is_file():
                return web.json_response({"errors": [{"code": "MANIFEST_UNKNOWN"}]}, status=404)
            return web.Response(body=path.read_bytes(), content_type=store.MANIFEST_TYPE)

        async def blob(request: web.Request) -> web.StreamResponse:
            path = self.root / "blobs" / request.match_info["digest"].replace(":", "-")
            if not path.is_file():
                return web.Response(status=404)
            return web.FileResponse(path)

        app = web.Application()
        app.router.add_get("/v2/{ns}/{model}/manifests/{tag}", manifest)
        app.router.add_get("/v2/{ns}/{model}/blobs/{digest}", blob)
        return app


def test_pull_from_local_registry(client: ollama.Client, daemon: Daemon, api_models: Path, tmp_path: Path) -> None:
    remote = tmp_path / "remote"
    _store_model(remote, "pullme:v2", api_models / "tiny.gguf", params=json.dumps({"num_predict": 3}),
                 system="pulled")
    _store_model(remote, "broken:latest", api_models / "chat.gguf")
    manifest = json.loads((remote / "manifests/registry.ollama.ai/library/broken/latest").read_text())
    bad = remote / "blobs" / manifest["layers"][0]["digest"].replace(":", "-")
    bad.unlink()
    bad.write_bytes(b"corrupted")  # served bytes no longer match the digest
    with LocalRegistry(remote) as reg:
        name = f"127.0.0.1:{reg.port}/library/pullme:v2"
        steps = list(client.pull(name, insecure=True, stream=True))
        statuses = [s.status for s in steps]
        assert statuses[0] == "pulling manifest" and statuses[-1] == "success"
        model_digest = store.sha256_file(api_models / "tiny.gguf")
        model_steps = [s for s in steps if s.digest == model_digest]
        size = (api_models / "tiny.gguf").stat().st_size
        assert model_steps and model_steps[-1].completed == model_steps[-1].total == size
        assert name in {m.model for m in client.list().models}
        r = client.generate(model=name, prompt="hi", stream=False)
        assert r.done and r.eval_count is not None and r.eval_count <= 3  # the params layer applies
        # pulling again finds every blob already there
        assert client.pull(name, insecure=True).status == "success"
        with pytest.raises(ollama.ResponseError) as e:
            client.pull(f"127.0.0.1:{reg.port}/library/absent:latest", insecure=True)
        assert e.value.status_code == 404 and "file does not exist" in e.value.error
        status, lines = daemon.post("/api/pull", {"model": f"127.0.0.1:{reg.port}/library/broken", "insecure": True})
        assert status == 200 and "the manifest declares" in lines[-1]["error"]  # 9 bytes, not the declared size
        assert not any(p.name.startswith(".") for p in (api_models / "blobs").iterdir())  # no partial left
        assert f"127.0.0.1:{reg.port}/library/broken:latest" not in {m.model for m in client.list().models}


def test_chat_tools_format_and_head_routes(client: ollama.Client, daemon: Daemon) -> None:
    tools: Any = [{"type": "function", "function": {
        "name": "get_weather", "description": "weather for a city",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}]
    msgs = [{"role": "user", "content": "weather in Paris?"}]
    r = client.chat(model="chat", messages=msgs, tools=tools, options={"num_predict": 8})
    assert r.done and r.message.role == "assistant"
    with pytest.raises(ollama.ResponseError) as e:  # no chat template that knows tools
        client.chat(model="tiny", messages=msgs, tools=tools)
    assert e.value.status_code == 400 and e.value.error == '"tiny" does not support tools'
    # format: "json" and a JSON schema constrain the output (a grammar in llama-server)
    schema = {"type": "object", "properties": {"a": {"type": "integer"}}, "required": ["a"]}
    for fmt in ("json", schema):
        g = client.generate(model="tiny", prompt="x", format=fmt, options={"num_predict": 64, "seed": 1})
        assert g.done and g.response.lstrip().startswith("{")
    c = client.chat(model="chat", messages=msgs, format=schema, options={"num_predict": 64, "seed": 1})
    assert c.message.content.lstrip().startswith("{") and c.eval_count
    parts = list(client.chat(model="chat", messages=msgs, format="json", stream=True, options={"num_predict": 32}))
    assert parts[-1].done and not any(p.done for p in parts[:-1])
    assert "".join(p.message.content for p in parts).lstrip().startswith("{")
    # suffix: fill in the middle where the model has FIM tokens
    assert "insert" in (client.show("code").capabilities or [])
    g = client.generate(model="code", prompt="def f(", suffix="return x", options={"num_predict": 4})
    assert g.done and g.eval_count and g.prompt_eval_count and g.prompt_eval_count > 6
    with pytest.raises(ollama.ResponseError) as e:
        client.generate(model="tiny", prompt="def f(", suffix="return x")
    assert e.value.status_code == 400 and e.value.error == '"tiny" does not support insert'
    with pytest.raises(ollama.ResponseError) as e:
        client.generate(model="tiny", prompt="x", images=[b"\x89PNG"])
    assert e.value.error == '"tiny" does not support vision'
    for path in ("/", "/api/version", "/api/tags", "/api/ps", "/v1/models"):
        status, _ = daemon.request("HEAD", path)
        assert status == 200, path
