"""Issue 14, where shapes matter: what ollamad sends llama-server (the fake records it), Ollama's
rules as pure functions, log lines, and /api/tags that never hashes on a request.

The fake tokenizes one token per character (its code point), so a cut prompt reads back as text.
"""

from __future__ import annotations

import asyncio
import json
import threading
import time
from pathlib import Path
from typing import Any, cast

import aiohttp
import pytest
from aiohttp import web
from aiohttp.test_utils import make_mocked_request

from ollamad.api import native
from ollamad.api.common import CTX, AppContext
from ollamad.api.manage import parameters_text
from ollamad.api.translate import cap_predict, tool_choice
from ollamad.api.truncate import keep_tokens, with_systems
from ollamad.models import catalog as catalog_mod
from ollamad.models.catalog import Catalog
from ollamad.models.options import OLLAMA_DEFAULTS, deterministic, with_ollama_defaults
from ollamad.models.plan import PROMPT_ONLY_TEMPLATE
from ollamad.models.testmodels import write_all
from ollamad.settings import load_settings
from tests.conftest import Daemon, child_get, model_plan, runner_children

TOOLS = [{"type": "function", "function": {"name": n, "parameters": {"type": "object", "properties": {}}}}
         for n in ("get_weather", "get_time")]


# --- pure rules -----------------------------------------------------------------------------------

def test_keep_tokens_is_ollamas_runner_truncation() -> None:
    tokens = list(range(100))
    assert keep_tokens(tokens, 100, 4) == tokens  # fits: untouched
    cut = keep_tokens(tokens, 20, 4)
    assert cut == [0, 1, 2, 3, *range(84, 100)] and len(cut) == 20
    assert keep_tokens([7, *range(99)], 20, 4, bos=7)[:5] == [7, 0, 1, 2, 3]  # BOS is kept on top
    assert keep_tokens(tokens, 20, -1) == [*range(19), 99]  # keep all: the last token still survives
    assert keep_tokens(tokens, 20, 0) == list(range(80, 100))


def test_with_systems_keeps_every_earlier_system_message() -> None:
    msgs = [{"role": "system", "content": "a"}, {"role": "user", "content": "1"},
            {"role": "system", "content": "b"}, {"role": "assistant", "content": "2"}, {"role": "user", "content": "3"}]
    assert [m["content"] for m in with_systems(msgs, 3)] == ["a", "b", "2", "3"]
    assert with_systems(msgs, 0) == msgs


def test_cap_predict_as_ollama() -> None:
    assert cap_predict({"n_predict": -1}, 512) == {"n_predict": 5120}
    assert cap_predict({"n_predict": 99999}, 512) == {"n_predict": 5120}
    assert cap_predict({"n_predict": 700}, 512) == {"n_predict": 700}
    assert cap_predict({"messages": [], "max_tokens": -1}, 100)["max_tokens"] == 1000
    assert cap_predict({"prompt": "x"}, 100) == {"prompt": "x", "n_predict": 1000}


def test_tool_choice_named_function_is_required_with_only_it() -> None:
    assert tool_choice("auto", TOOLS) == ("auto", TOOLS)
    choice, tools = tool_choice({"type": "function", "function": {"name": "get_time"}}, TOOLS)
    assert choice == "required" and tools == [TOOLS[1]]
    with pytest.raises(ValueError, match="'nope', which is not in tools"):
        tool_choice({"type": "function", "function": {"name": "nope"}}, TOOLS)
    with pytest.raises(ValueError, match="invalid tool_choice"):
        tool_choice("sometimes", TOOLS)
    with pytest.raises(ValueError, match="invalid tool_choice"):
        tool_choice({"type": "function"}, TOOLS)


def test_ollama_defaults_under_everything_else() -> None:
    assert with_ollama_defaults({"temperature": 0.2})["temperature"] == 0.2
    merged = with_ollama_defaults({})
    assert merged["top_k"] == 40 and merged["top_p"] == 0.9 and merged["repeat_penalty"] == 1.1
    assert merged["min_p"] == 0.0 and merged["num_keep"] == 4
    assert deterministic({"seed": 42, "temperature": 0.8}) and deterministic({"temperature": 0})
    assert not deterministic({"seed": -1, "temperature": 0.8}) and not deterministic({})
    text = parameters_text(OLLAMA_DEFAULTS).splitlines()
    assert f"{'top_k':<30} 40" in text and f"{'min_p':<30} 0" in text and f"{'top_p':<30} 0.9" in text


def test_runner_shifts_context_and_renders_template_less_models_prompt_only(models_dir: Path) -> None:
    argv = model_plan(models_dir, "tiny").argv("llama-server", 1)
    assert "--context-shift" in argv
    assert argv[argv.index("--chat-template") + 1] == PROMPT_ONLY_TEMPLATE  # tiny has no chat template


# --- /api/tags never hashes on a request -----------------------------------------------------------

async def test_tags_answers_at_once_and_digests_come_from_the_background(tmp_path: Path,
                                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    folder = tmp_path / "models"
    write_all(folder, ("tiny",))
    release, hashing = threading.Event(), threading.Event()

    def slow_hash(path: Path) -> str:  # stands for a big file
        assert threading.current_thread() is not threading.main_thread(), "hashed on the request path"
        hashing.set()
        release.wait(10)
        return "ab" * 32

    monkeypatch.setattr(catalog_mod, "hash_file", slow_hash)
    cache = tmp_path / "state" / "digests.json"
    cat = Catalog(folder, digest_cache=cache)
    cat.scan()
    assert hashing.wait(10)  # the background hash started, and waits
    app = web.Application()
    app[CTX] = AppContext(load_settings(), cat, cast(Any, None))
    t0 = time.monotonic()
    body = json.loads(cast(bytes, (await native.tags(make_mocked_request("GET", "/api/tags", app=app))).body))
    assert time.monotonic() - t0 < 0.5
    assert [(m["name"], m["digest"]) for m in body["models"]] == [("tiny:latest", "")]
    release.set()
    for _ in range(100):
        if cat.digest(cat.list()[0]):
            break
        await asyncio.sleep(0.05)
    body = json.loads(cast(bytes, (await native.tags(make_mocked_request("GET", "/api/tags", app=app))).body))
    assert body["models"][0]["digest"] == "ab" * 32

    # a restart finds it in the cache (keyed by path, size and mtime): nothing is hashed again
    hashed: list[Path] = []

    def no_hash(path: Path) -> str:
        hashed.append(path)
        raise AssertionError("hashed a file whose digest was cached")

    monkeypatch.setattr(catalog_mod, "hash_file", no_hash)
    again = Catalog(folder, digest_cache=cache)
    again.scan()
    assert again.digest(again.list()[0]) == "ab" * 32
    for t in threading.enumerate():  # its background pass must be over (a hash there would raise)
        if t.name == "ollamad-warm":
            t.join(10)
    assert hashed == []
    (folder / "tiny.gguf").write_bytes((folder / "tiny.gguf").read_bytes() + b"\0")  # changed: unknown again
    monkeypatch.setattr(catalog_mod, "hash_file", lambda p: "cd" * 32)
    changed = Catalog(folder, digest_cache=cache)
    assert changed.digest(changed.scan()["tiny:latest"]) in ("", "cd" * 32)


# --- what the daemon sends llama-server ------------------------------------------------------------

@pytest.fixture
def fake_daemon(daemon_factory: Any, fake_server: Path, tmp_path: Path) -> Daemon:
    folder = tmp_path / "m"
    write_all(folder, ("tiny", "chat"))
    return daemon_factory(fake_server, folder, OLLAMA_CONTEXT_LENGTH="64")  # type: ignore[no-any-return]


def fake_stats(d: Daemon, model: str = "tiny") -> dict[str, Any]:
    (child,) = [c for c in runner_children(d) if c["model"].endswith(f"/{model}.gguf")]
    return child_get(child, "/fake/stats")  # type: ignore[no-any-return]


def test_sampling_defaults_seed_and_show(fake_daemon: Daemon) -> None:
    d = fake_daemon
    assert d.post("/api/generate", {"model": "tiny", "prompt": "hi", "stream": False})[0] == 200
    assert d.post("/api/generate", {"model": "tiny", "prompt": "hi", "stream": False,
                                    "options": {"seed": 42, "top_k": 7}})[0] == 200
    assert d.post("/api/generate", {"model": "tiny", "prompt": "hi", "stream": False,
                                    "options": {"temperature": 0}})[0] == 200
    first, seeded, greedy = fake_stats(d)["payloads"]
    assert {k: first[k] for k in ("top_k", "top_p", "min_p", "repeat_penalty", "repeat_last_n", "n_keep",
                                  "temperature", "typical_p")} == {
        "top_k": 40, "top_p": 0.9, "min_p": 0.0, "repeat_penalty": 1.1, "repeat_last_n": 64, "n_keep": 4,
        "temperature": 0.8, "typical_p": 1.0}
    assert first["n_predict"] == 640 and first["cache_prompt"] is True  # 10 x num_ctx, as Ollama
    assert seeded["top_k"] == 7 and seeded["seed"] == 42 and seeded["cache_prompt"] is False
    assert greedy["cache_prompt"] is False
    status, show = d.post("/api/show", {"model": "tiny"})
    assert status == 200 and f"{'repeat_penalty':<30} 1.1" in show["parameters"].splitlines()


def test_long_prompts_are_cut_and_logged(fake_daemon: Daemon) -> None:
    d = fake_daemon
    prompt = "HEAD" + "x" * 100 + "TAIL"  # 108 tokens (characters) for a 64-token context
    status, body = d.post("/api/generate", {"model": "tiny", "prompt": prompt, "stream": False})
    assert status == 200, body
    sent = fake_stats(d)["prompts"][-1]
    assert sent.startswith("HEAD") and sent.endswith("TAIL") and len(sent) == 63  # num_keep 4 + the end
    assert "truncating input prompt" in d.log()
    status, body = d.post("/api/generate", {"model": "tiny", "prompt": prompt, "stream": False, "truncate": False})
    assert status == 400 and "exceeds the context length" in body["error"]

    msgs = [{"role": "system", "content": "SYS"}]
    for i in range(6):
        msgs += [{"role": "user", "content": f"question {i} " + "q" * 8}, {"role": "assistant", "content": "a" * 8}]
    msgs.append({"role": "user", "content": "LAST"})
    status, body = d.post("/api/chat", {"model": "chat", "messages": msgs, "stream": False})
    assert status == 200 and body["done"], body
    line = [json.loads(ln) for ln in d.log().splitlines() if "truncating input messages" in ln][-1]
    assert line["messages"] == 14 and 1 < line["kept"] < 14 and line["model"] == "chat"
    status, body = d.post("/api/chat", {"model": "chat", "messages": msgs, "stream": False, "truncate": False})
    assert status == 400 and "exceeds the available context size" in body["error"]
    status, body = d.post("/v1/chat/completions", {"model": "chat", "messages": msgs})
    assert status == 200, body
    assert d.log().count("truncating input messages") == 2  # /api/chat's and /v1's
    # one message longer than the context: its rendering is cut like a prompt (num_keep + the end)
    status, body = d.post("/api/chat", {"model": "chat", "stream": False,
                                        "messages": [{"role": "user", "content": prompt}]})
    assert status == 200 and body["message"]["role"] == "assistant", body
    sent = fake_stats(d, "chat")["prompts"][-1]
    assert sent.startswith("HEAD") and sent.endswith("TAIL") and len(sent) == 63


def test_generate_context_is_returned_and_taken_back(fake_daemon: Daemon) -> None:
    d = fake_daemon
    status, body = d.post("/api/generate", {"model": "tiny", "prompt": "abc", "stream": False,
                                            "options": {"num_predict": 2}})
    assert status == 200 and "".join(chr(t) for t in body["context"]) == "abct0 t1 "
    status, lines = d.post("/api/generate", {"model": "tiny", "prompt": "de", "context": body["context"],
                                             "options": {"num_predict": 1}})
    assert status == 200 and "".join(chr(t) for t in lines[-1]["context"]) == "abct0 t1 det0 "
    assert fake_stats(d)["prompts"][-1] == "abct0 t1 de"  # continued from those tokens
    status, body = d.post("/api/generate", {"model": "tiny", "prompt": "x", "raw": True, "stream": False})
    assert status == 200 and "context" not in body  # as Ollama: not for raw prompts
    status, body = d.post("/api/generate", {"model": "tiny", "prompt": "x", "context": [1, 10**9]})
    assert status == 400 and "token ids" in body["error"]


def test_tool_choice_naming_a_function_reaches_llama_server(fake_daemon: Daemon) -> None:
    d = fake_daemon
    ask = {"model": "chat", "messages": [{"role": "user", "content": "hi"}], "tools": TOOLS}
    status, _ = d.post("/v1/chat/completions", {**ask, "tool_choice": {"type": "function",
                                                                          "function": {"name": "get_time"}}})
    assert status == 200
    sent = fake_stats(d, "chat")["payloads"][-1]
    assert sent["tool_choice"] == "required" and [t["function"]["name"] for t in sent["tools"]] == ["get_time"]
    status, body = d.post("/v1/chat/completions", {**ask, "tool_choice": {"type": "function",
                                                                            "function": {"name": "nope"}}})
    assert status == 400 and "not in tools" in body["error"]["message"]


def test_log_lines_keep_to_their_request(daemon_factory: Any, fake_server: Path, tmp_path: Path) -> None:
    from tests.conftest import fake_with

    folder = tmp_path / "m"
    write_all(folder, ("tiny",))
    d = daemon_factory(fake_with(tmp_path, FAKE_TOKEN_DELAY="0.02", FAKE_TOKENS="200"), folder)
    assert d.post("/api/generate", {"model": "tiny", "prompt": "hi", "options": {"num_predict": 2}})[0] == 200

    async def cut_after(n: int) -> None:
        async with aiohttp.ClientSession() as s, s.post(d.url + "/api/generate",
                                                        json={"model": "tiny", "prompt": "go"}) as r:
            for _ in range(n):
                await r.content.readline()

    asyncio.run(cut_after(20))
    lines = []
    for _ in range(100):
        lines = [json.loads(ln) for ln in d.log().splitlines() if ln.startswith("{")]
        if sum(ln.get("event") == "request" and ln.get("route") == "/api/generate" for ln in lines) >= 2:
            break
        time.sleep(0.05)
    runner_lines = [ln for ln in lines if ln["event"] in ("runner starting", "runner ready", "llama-server")]
    assert runner_lines and not any("request_id" in ln for ln in runner_lines)
    cut = [ln for ln in lines if ln.get("event") == "request" and ln.get("route") == "/api/generate"][-1]
    assert cut["status"] == 499 and cut["tokens"] >= 19, cut
