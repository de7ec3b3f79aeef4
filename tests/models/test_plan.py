"""Table tests for the planning rules: forcing list, embedding, context floors and clamps."""

from __future__ import annotations

from pathlib import Path

import pytest

from ollamad.models.facts import ModelFacts
from ollamad.models.plan import LoadOptions, ModelDefaults, PlanSettings, plan_candidates, request_context
from ollamad.settings import SINGLE_SLOT_ARCHITECTURES


def facts(arch: str = "llama", **kw: object) -> ModelFacts:
    base: dict[str, object] = dict(architecture=arch, train_ctx=32768, layers=2, embd=128, heads=2, kv_heads=1,
                                   key_length=64, value_length=64, weight_bytes=1000, parameter_count=500)
    base.update(kw)
    return ModelFacts(**base)  # type: ignore[arg-type]


S = PlanSettings(single_slot_architectures=SINGLE_SLOT_ARCHITECTURES)


def plans(f: ModelFacts, settings: PlanSettings = S, defaults: ModelDefaults | None = None, ctx: int = 4096):  # type: ignore[no-untyped-def]
    return plan_candidates("m", Path("/m.gguf"), f, settings, defaults or ModelDefaults(), ctx, LoadOptions())


@pytest.mark.parametrize("arch", SINGLE_SLOT_ARCHITECTURES)
def test_forced_architectures_get_one_slot_with_a_note(arch: str) -> None:
    for n in (0, 4):
        ps = plans(facts(arch), PlanSettings(num_parallel=n, single_slot_architectures=SINGLE_SLOT_ARCHITECTURES))
        assert [p.num_parallel for p in ps] == [1]
        assert "does not currently support parallel requests" in ps[0].notes[0]
        assert arch in ps[0].notes[0]


def test_embedding_models_get_one_slot() -> None:
    ps = plans(facts("bert", embedding=True), PlanSettings(num_parallel=4))
    assert [p.num_parallel for p in ps] == [1] and ps[0].embedding


def test_other_architectures_follow_the_setting() -> None:
    assert [p.num_parallel for p in plans(facts("qwen3"), PlanSettings(num_parallel=3))] == [3]
    assert [p.num_parallel for p in plans(facts("llama"))] == [4, 1]  # auto


def test_forcing_list_is_a_setting() -> None:
    s = PlanSettings(num_parallel=4, single_slot_architectures=("llama",))
    assert [p.num_parallel for p in plans(facts("llama"), s)] == [1]
    assert [p.num_parallel for p in plans(facts("lfm2"), PlanSettings(num_parallel=4))] == [4]


def test_per_model_default_parallel_wins_over_setting() -> None:
    assert [p.num_parallel for p in plans(facts(), PlanSettings(num_parallel=4), ModelDefaults(num_parallel=2))] == [2]


@pytest.mark.parametrize(
    ("requested", "model_default", "setting", "train", "vision", "expected"),
    [
        (None, None, 4096, 32768, False, 4096),
        (8192, None, 4096, 32768, False, 8192),
        (None, 2048, 4096, 32768, False, 2048),
        (65536, None, 4096, 32768, False, 32768),  # clamped to training context
        (1, None, 4096, 32768, False, 4),  # floor of 4
        (None, None, 2, 32768, False, 4),
        (512, None, 4096, 32768, True, 2048),  # vision floor
        (None, None, 4096, None, False, 4096),  # unknown training context: no clamp
    ],
)
def test_request_context(requested: int | None, model_default: int | None, setting: int, train: int | None,
                         vision: bool, expected: int) -> None:
    f = facts(train_ctx=train, vision=vision)
    got = request_context(f, requested, ModelDefaults(num_ctx=model_default), PlanSettings(context_length=setting))
    assert got == expected


def test_argv_has_parallel_and_total_context() -> None:
    p = plans(facts(), PlanSettings(num_parallel=4), ctx=2048)[0]
    argv = p.argv("llama-server", 1234, "/tmp/key-file")
    assert argv[argv.index("--parallel") + 1] == "4"
    assert argv[argv.index("--ctx-size") + 1] == "8192"
    assert argv[argv.index("--host") + 1] == "127.0.0.1"
    assert argv[argv.index("--api-key-file") + 1] == "/tmp/key-file" and "--api-key" not in argv


@pytest.mark.parametrize(("parallel", "ahead", "threads"), [(1, 0, 10), (4, 1, 24), (2, 3, 24)])
def test_argv_gives_llama_server_a_thread_per_connection_the_daemon_may_hold(parallel: int, ahead: int,
                                                                            threads: int) -> None:
    # a completion per slot and per request sent ahead, a /tokenize beside each, and spare for probes
    p = plans(facts(), PlanSettings(num_parallel=parallel, send_ahead=ahead), ctx=2048)[0]
    argv = p.argv("llama-server", 1234)
    assert argv[argv.index("--threads-http") + 1] == str(threads)


def test_embedding_argv_has_embeddings_flag() -> None:
    p = plans(facts("bert", embedding=True))[0]
    assert "--embeddings" in p.argv("x", 1)


def test_estimate_grows_with_slots() -> None:
    four, one = plans(facts())
    assert four.estimate > one.estimate > 0


@pytest.mark.parametrize(("requested", "train", "expected"), [
    (3000, 32768, 4096), (4096, 32768, 4096), (4097, 32768, 8192), (5000, 6000, 6000), (1, 32768, 4),
])
def test_a_reload_for_more_context_takes_the_next_power_of_two(requested: int, train: int, expected: int) -> None:
    got = request_context(facts(train_ctx=train), requested, ModelDefaults(), PlanSettings(), grow=True)
    assert got == expected


def test_a_tiny_num_batch_is_clamped_so_llama_server_can_run() -> None:
    from ollamad.models.options import Options

    assert Options(num_batch=1).load_options() == Options(num_batch=2).load_options()  # one plan, no reload
    assert Options(num_batch=1).load_options().num_batch == 32
    assert Options(num_batch=512).load_options().num_batch == 512
    (p,) = plan_candidates("m", Path("/m.gguf"), facts(), PlanSettings(num_parallel=64), ModelDefaults(), 2048,
                           LoadOptions(num_batch=32))
    argv = p.argv("llama-server", 1234)
    assert argv[argv.index("--batch-size") + 1] == "64"  # never below the slot count
