from __future__ import annotations

from pathlib import Path

import pytest

from ollamad.durations import FOREVER
from ollamad.settings import SettingsError, load_settings, parse_host


def test_defaults() -> None:
    s = load_settings({})
    assert s.bind == ("127.0.0.1", 11434)
    assert s.keep_alive == 300 and s.max_queue == 512 and s.num_parallel == 0 and s.context_length == 4096


@pytest.mark.parametrize(("value", "bind"), [
    ("0.0.0.0", ("0.0.0.0", 11434)), (":8080", ("127.0.0.1", 8080)), ("http://10.0.0.1:9", ("10.0.0.1", 9)),
    ("[::1]:5000", ("::1", 5000)), ("localhost", ("localhost", 11434)),
])
def test_host(value: str, bind: tuple[str, int]) -> None:
    assert parse_host(value) == bind


def test_values_are_trimmed_of_spaces_and_quotes() -> None:
    s = load_settings({"OLLAMA_NUM_PARALLEL": ' "3" ', "OLLAMA_KEEP_ALIVE": "'-1'", "OLLAMA_MODELS": " /x/y "})
    assert s.num_parallel == 3 and s.keep_alive == FOREVER and s.models == Path("/x/y")


@pytest.mark.parametrize(("env", "name"), [
    ({"OLLAMA_NUM_PARALLEL": "many"}, "OLLAMA_NUM_PARALLEL"),
    ({"OLLAMA_NUM_PARALLEL": "-1"}, "OLLAMA_NUM_PARALLEL"),
    ({"OLLAMA_HOST": "host:notaport"}, "OLLAMA_HOST"),
    ({"OLLAMA_KEEP_ALIVE": "forever"}, "OLLAMA_KEEP_ALIVE"),
    ({"OLLAMA_CONTEXT_LENGTH": "0"}, "OLLAMA_CONTEXT_LENGTH"),
    ({"OLLAMA_KV_CACHE_TYPE": "q2"}, "OLLAMA_KV_CACHE_TYPE"),
    ({"OLLAMAD_MEMORY_BUDGET": "lots"}, "OLLAMAD_MEMORY_BUDGET"),
])
def test_invalid_values_name_the_variable(env: dict[str, str], name: str) -> None:
    with pytest.raises(SettingsError, match=name):
        load_settings(env)


def test_byte_sizes_and_lists() -> None:
    s = load_settings({"OLLAMAD_MEMORY_BUDGET": "1.5GiB", "OLLAMAD_SINGLE_SLOT_ARCHITECTURES": "a, b"})
    assert s.memory_budget == int(1.5 * 1024**3)
    assert s.single_slot_architectures == ("a", "b")


def test_lists_from_the_real_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("OLLAMAD_SINGLE_SLOT_ARCHITECTURES", "llama,lfm2")
    monkeypatch.setenv("OLLAMA_ORIGINS", "http://a.example, http://b.example")
    monkeypatch.setenv("OLLAMAD_RUNNER_ENV_PASS", "FAKE_*")
    s = load_settings()
    assert s.single_slot_architectures == ("llama", "lfm2")
    assert s.origins == ("http://a.example", "http://b.example")
    assert s.runner_env_pass == ("FAKE_*",)
