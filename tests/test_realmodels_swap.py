"""Two real models taking turns with OLLAMA_MAX_LOADED_MODELS=1: each request unloads the other
model and still gets its own model's answer (its own daemon: the setting is daemon-wide)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import ollama
import pytest

from tests.conftest import Daemon
from tests.realmodels import BASE, CAT, CHAT, EMBED, FRANCE, KITTEN, SYSTEM, cosine, module_daemon

pytestmark = [pytest.mark.real, pytest.mark.realmodel]


@pytest.fixture(scope="module")
def daemon(tmp_path_factory: pytest.TempPathFactory, llama_server: Path) -> Iterator[Daemon]:
    yield from module_daemon(tmp_path_factory.mktemp("swap"), llama_server, (CHAT, EMBED, BASE),
                             OLLAMA_MAX_LOADED_MODELS="1", OLLAMA_NUM_PARALLEL="1")


def loaded(oc: ollama.Client) -> list[str]:
    return [m.model or "" for m in oc.ps().models]


def test_alternating_two_real_models_with_one_loaded(daemon: Daemon) -> None:
    oc = ollama.Client(host=daemon.url, timeout=120)
    chat = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": FRANCE}]
    opts = {"temperature": 0, "seed": 42, "num_predict": 12}
    answers, pids = [], set()
    for _ in range(2):
        answers.append(oc.chat(model=CHAT, messages=chat, options=opts).message.content)
        assert loaded(oc) == [CHAT]
        pids |= {p.pid for p in daemon.children()}
        r = oc.generate(model=BASE, prompt="The Eiffel Tower is located in the city of", raw=True, options=opts)
        assert "Paris" in r.response and loaded(oc) == [BASE]
        pids |= {p.pid for p in daemon.children()}
        e = oc.embed(model=EMBED, input=[CAT, KITTEN]).embeddings
        assert len(e[0]) == 384 and cosine(e[0], e[1]) > 0.5 and loaded(oc) == [f"{EMBED}:latest"]
        pids |= {p.pid for p in daemon.children()}
    assert all("Paris" in a for a in answers) and answers[0] == answers[1]
    assert len(pids) == 6  # every turn started a fresh llama-server: one model loaded at a time
