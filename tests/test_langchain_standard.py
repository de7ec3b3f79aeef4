"""langchain-tests' standard suites (ChatModelIntegrationTests, EmbeddingsIntegrationTests) with
langchain-ollama's ChatOllama and OllamaEmbeddings against ollamad on the real models."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from langchain_ollama import ChatOllama, OllamaEmbeddings
from langchain_tests.integration_tests import ChatModelIntegrationTests, EmbeddingsIntegrationTests

from tests.conftest import Daemon
from tests.realmodels import CHAT, EMBED, module_daemon

pytestmark = [pytest.mark.real, pytest.mark.realmodel]
URL: dict[str, str] = {}


@pytest.fixture(scope="module", autouse=True)
def daemon(tmp_path_factory: pytest.TempPathFactory, llama_server: Path) -> Iterator[Daemon]:
    for d in module_daemon(tmp_path_factory.mktemp("langchain"), llama_server, (CHAT, EMBED),
                           OLLAMA_NUM_PARALLEL="2"):
        URL["base"] = d.url
        yield d


class TestChatOllamaOnOllamad(ChatModelIntegrationTests):
    @property
    def chat_model_class(self) -> type[ChatOllama]:
        return ChatOllama

    @property
    def chat_model_params(self) -> dict[str, Any]:
        return {"model": CHAT, "base_url": URL["base"], "seed": 42}

    @property
    def supports_json_mode(self) -> bool:
        return True

    @property
    def supports_image_inputs(self) -> bool:
        return False


class TestOllamaEmbeddingsOnOllamad(EmbeddingsIntegrationTests):
    @property
    def embeddings_class(self) -> type[OllamaEmbeddings]:
        return OllamaEmbeddings

    @property
    def embedding_model_params(self) -> dict[str, Any]:
        return {"model": EMBED, "base_url": URL["base"]}
