"""The estimate against what the real llama-server logged for the generated models.

Figures recorded with the project's llama-server (CPU build, ``--fit off``, ``-lv 4``):
the sum of its ``model``/``KV``/``compute``/``output`` buffer sizes in MiB.
"""

from __future__ import annotations

import pytest

from ollamad.models.estimate import MiB, estimate_memory
from ollamad.models.facts import ModelFacts, facts_from_gguf
from ollamad.models.ggufmeta import read_gguf
from ollamad.models.testmodels import SPECS, write_llama

# (model, num_parallel, ctx per slot, flash attention) -> MiB llama-server reported
REPORTED = [
    ("tiny", 1, 512, False, 6.14), ("tiny", 1, 2048, False, 15.89), ("tiny", 4, 2048, False, 18.89),
    ("tiny", 4, 4096, False, 34.89), ("tiny", 1, 8192, False, 54.89),
    ("small", 1, 512, False, 18.52), ("small", 1, 2048, False, 36.52), ("small", 4, 2048, False, 48.52),
    ("small", 4, 4096, False, 84.52), ("small", 1, 8192, False, 108.52), ("small", 4, 2048, True, 32.02),
    ("big", 1, 512, False, 378.1), ("big", 1, 2048, False, 441.1), ("big", 4, 2048, False, 489.1),
    ("big", 4, 4096, False, 621.1), ("big", 1, 8192, False, 693.1), ("big", 4, 2048, True, 436.6),
    # contexts llama.cpp pads to a multiple of 256 per slot (1000 -> 1024, 100 -> 256, 350 -> 512)
    ("small", 3, 1000, False, 28.54), ("small", 1, 100, False, 11.09), ("small", 2, 350, False, 19.52),
]  # fmt: skip
# KV buffer alone (MiB) as logged: layers x total ctx x (k + v width) x 2 bytes
REPORTED_KV = [("tiny", 4, 4096, 8.0), ("small", 4, 4096, 32.0), ("big", 1, 8192, 64.0), ("big", 4, 2048, 64.0)]


@pytest.fixture(scope="module")
def facts(tmp_path_factory: pytest.TempPathFactory) -> dict[str, ModelFacts]:
    folder = tmp_path_factory.mktemp("est")
    return {name: facts_from_gguf(read_gguf(write_llama(folder / f"{name}.gguf", spec, name=name)))
            for name, spec in SPECS.items()}


@pytest.mark.parametrize(("model", "np_", "ctx", "fa", "reported"), REPORTED)
def test_estimate_within_10_percent_of_llama_server(facts: dict[str, ModelFacts], model: str, np_: int,
                                                    ctx: int, fa: bool, reported: float) -> None:
    est = estimate_memory(facts[model], np_, ctx, flash_attention=fa)
    assert abs(est.buffers / MiB - reported) <= 0.10 * reported, (est, reported)
    assert est.total > est.buffers  # process overhead comes on top


@pytest.mark.parametrize(("model", "np_", "ctx", "reported"), REPORTED_KV)
def test_kv_cache_is_exact(facts: dict[str, ModelFacts], model: str, np_: int, ctx: int, reported: float) -> None:
    assert estimate_memory(facts[model], np_, ctx).kv == reported * MiB


def test_weights_are_tensor_bytes_not_file_size(facts: dict[str, ModelFacts]) -> None:
    est = estimate_memory(facts["big"], 1, 512)
    assert round(est.weights / MiB, 2) == 346.09  # CPU_Mapped model buffer size in the log
    assert 0 < est.layer_weights < est.weights


@pytest.mark.parametrize(("kv_type", "factor"), [("f16", 1.0), ("q8_0", 34 / 64), ("q4_0", 18 / 64)])
def test_kv_cache_type_scales_kv(facts: dict[str, ModelFacts], kv_type: str, factor: float) -> None:
    f16 = estimate_memory(facts["small"], 4, 4096).kv
    assert estimate_memory(facts["small"], 4, 4096, kv_type).kv == int(f16 * factor)


def test_recurrent_state_counts_per_sequence(facts: dict[str, ModelFacts]) -> None:
    from dataclasses import replace

    hybrid = replace(facts["small"], recurrent_bytes_per_seq=3 * MiB)
    one, four = estimate_memory(hybrid, 1, 2048), estimate_memory(hybrid, 4, 2048)
    assert (one.recurrent, four.recurrent) == (3 * MiB, 12 * MiB)
