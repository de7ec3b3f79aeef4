"""Helpers for the real-model tier: trained weights (cached under ~/.cache/ollamad/models) in a folder,
one daemon per test module."""

from __future__ import annotations

import importlib
import math
import os
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import pytest

from ollamad.models.real import REAL, RealModelError, install
from tests.conftest import Daemon

CHAT = "smollm2:135m"
EMBED = "all-minilm"
BASE = "gemma3:270m-base"
# related pair and an unrelated sentence: related must be closer on every embedding route
CAT, KITTEN, STOCKS = ("The cat sat on the mat.", "A kitten is resting on the rug.",
                       "The stock market fell sharply after the earnings report.")

# SmolLM2-135M (Q4_1) at temperature 0 answers FRANCE with "The capital of France is Paris..." with
# a system message; with none (the GGUF template then adds "You are a helpful AI assistant named
# SmolLM...") it answers in broken French, the same straight from llama-server. Asked "What is the
# capital of France?" its first token is nearly a tie ("The" 0.19, "La" 0.17): without flash
# attention on an AVX2-only CPU (AMD Zen 3) "La" won and the answer had no "Paris". Asked this way,
# the greedy token beats the next by 5x or more at every step up to "Paris", with flash attention on
# or off.
SYSTEM = "You are a helpful assistant."
FRANCE = "Name the capital of France."

# litellm reads its model price map from the network at import unless told not to
os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")
litellm: Any = importlib.import_module("litellm")


def real_folder(folder: Path, names: Sequence[str] = tuple(REAL)) -> Path:
    """``folder`` with the real models as plain files (hard links into the cache: instant when cached)."""
    try:
        for name in names:
            install(name, folder)
    except RealModelError as e:
        pytest.fail(f"real models not available: {e} (scripts/test.sh installs them)")
    return folder


def module_daemon(tmp: Path, binary: Path, names: Sequence[str] = tuple(REAL), **env: str) -> Iterator[Daemon]:
    """A daemon for a whole test module over the real models; stopped afterwards."""
    d = Daemon(binary, real_folder(tmp / "models", names), env).start(tmp / "daemon.log")
    try:
        yield d
    finally:
        d.stop()


def cosine(a: Sequence[float], b: Sequence[float]) -> float:
    dot = sum(x * y for x, y in zip(a, b, strict=True))
    return dot / (math.sqrt(sum(x * x for x in a)) * math.sqrt(sum(y * y for y in b)))


def assert_meaningful(vectors: Sequence[Sequence[float]]) -> None:
    """Three embeddings of CAT, KITTEN, STOCKS: 384 dimensions, related pair closer than unrelated."""
    cat, kitten, stocks = vectors
    assert len(cat) == len(kitten) == len(stocks) == 384
    related, unrelated = cosine(cat, kitten), cosine(cat, stocks)
    assert related > unrelated + 0.2, (related, unrelated)
