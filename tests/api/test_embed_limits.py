"""Embedding requests are bounded and batched (issue 17, point 3), on the real llama-server."""

from __future__ import annotations

import math
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from ollamad.api.embedding import BATCH, token_bound
from ollamad.models.testmodels import write_all
from tests.conftest import Daemon

pytestmark = pytest.mark.real


@pytest.fixture(scope="module")
def embed_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("embed")
    write_all(folder, ("embed",))
    return folder


@pytest.fixture
def daemon(daemon_factory: Any, llama_server: Path, embed_dir: Path) -> Daemon:
    return daemon_factory(llama_server, embed_dir, OLLAMA_CONTEXT_LENGTH="512",  # type: ignore[no-any-return]
                          OLLAMAD_EMBED_MAX_INPUTS="1000", OLLAMAD_EMBED_MAX_TOKENS="20000")


def _close(a: list[float], b: list[float]) -> bool:
    return len(a) == len(b) and all(math.isclose(x, y, rel_tol=1e-4, abs_tol=1e-5) for x, y in zip(a, b, strict=True))


def test_too_many_inputs_or_tokens_are_400(daemon: Daemon) -> None:
    many = [f"t{i}" for i in range(1001)]
    status, body = daemon.post("/api/embed", {"model": "embed", "input": many})
    assert status == 400 and "OLLAMAD_EMBED_MAX_INPUTS" in body["error"], body
    status, body = daemon.post("/v1/embeddings", {"model": "embed", "input": many})
    assert status == 400 and "OLLAMAD_EMBED_MAX_INPUTS" in body["error"]["message"], body
    # 60 texts of ~400 tokens: 24,000 tokens, over the cap of 20,000 (each fits the context of 512)
    heavy = [("w " * 100) + str(i) for i in range(60)]
    status, body = daemon.post("/api/embed", {"model": "embed", "input": heavy})
    assert status == 400 and "OLLAMAD_EMBED_MAX_TOKENS" in body["error"], body
    status, body = daemon.post("/api/embed", {"model": "embed", "input": heavy[:40]})
    assert status == 200 and len(body["embeddings"]) == 40 and body["prompt_eval_count"] <= 20000


def test_batches_keep_order_and_match_single_inputs(daemon: Daemon) -> None:
    long = "x " * 400  # more tokens than the context (512): tokenized and truncated
    assert token_bound("t1") < 512 < token_bound(long)
    texts = [f"text number {i}" for i in range(2 * BATCH + 5)]
    texts[BATCH + 1] = long
    status, body = daemon.post("/api/embed", {"model": "embed", "input": texts})
    assert status == 200, body
    vectors = body["embeddings"]
    assert len(vectors) == len(texts) and body["prompt_eval_count"] > 0
    for i in (0, BATCH - 1, BATCH, BATCH + 1, len(texts) - 1):
        status, one = daemon.post("/api/embed", {"model": "embed", "input": texts[i]})
        assert status == 200 and _close(vectors[i], one["embeddings"][0]), i
    status, body = daemon.post("/api/embed", {"model": "embed", "input": [long], "truncate": False})
    assert status == 400 and "maximum context length" in body["error"]
    status, body = daemon.post("/v1/embeddings", {"model": "embed", "input": texts[:BATCH + 2]})
    assert status == 200 and [d["index"] for d in body["data"]] == list(range(BATCH + 2))
    assert _close(body["data"][BATCH + 1]["embedding"], vectors[BATCH + 1])
    assert body["usage"]["prompt_tokens"] > 0 and body["model"] == "embed"


def test_other_requests_wait_one_batch_not_the_whole_request(daemon: Daemon) -> None:
    assert daemon.post("/api/embed", {"model": "embed", "input": "load"})[0] == 200
    done: dict[str, float] = {}

    def big() -> None:
        status, _ = daemon.post("/api/embed", {"model": "embed", "input": [f"t{i}" for i in range(1000)]})
        assert status == 200
        done["big"] = time.monotonic()

    t = threading.Thread(target=big)
    t.start()
    deadline = time.monotonic() + 30
    while not any(m["busy_slots"] for m in daemon.get("/api/ps")[1]["models"]):
        assert time.monotonic() < deadline
        time.sleep(0.01)
    assert daemon.post("/api/embed", {"model": "embed", "input": "small"})[0] == 200
    done["small"] = time.monotonic()
    t.join()
    assert done["small"] < done["big"]  # served between two batches of the big request
