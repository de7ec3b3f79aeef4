"""Placement over RPC workers, pure: split candidates, and the core's decisions with workers."""

from __future__ import annotations

import asyncio
import itertools
from pathlib import Path

import pytest

from ollamad.memory.workers import WorkerPool, WorkerStatus
from ollamad.models.estimate import Estimate
from ollamad.models.plan import LoadOptions, RunnerPlan
from ollamad.sched.core import Dispatch, Reject, Request, SchedState, Start, Stop, decide
from ollamad.sched.rpcplace import split_note, split_plan, with_workers, workers_fit
from ollamad.sched.workerlink import refresh
from ollamad.settings import SettingsError, load_settings

MiB = 1024**2
GiB = 1024**3
W1, W2, W3 = "10.0.0.1:50052", "10.0.0.2:50052", "10.0.0.3:50052"
# 8 layers of 100 MiB (weights and KV), 200 MiB of output/embedding weights, 50 MiB compute
DETAIL = Estimate(weights=1000 * MiB, kv=0, recurrent=0, compute=50 * MiB, output=0, overhead=16 * MiB,
                  layers=8, layer_weights=800 * MiB)


def local_plan(model: str = "a", np: int = 1) -> RunnerPlan:
    return RunnerPlan(model=model, path=Path(f"/m/{model}.gguf"), num_parallel=np, ctx=2048,
                      estimate=DETAIL.total, detail=DETAIL)


def test_split_moves_layers_and_counts_only_the_local_part() -> None:
    p = split_plan(local_plan(), {W1: 10 * GiB, W2: 10 * GiB}, 4)
    assert p is not None
    assert p.rpc == (W1, W2) and p.tensor_split == (0.5, 0.5) and p.n_gpu_layers == 4
    assert p.remote == (300 * MiB, 300 * MiB)  # half of 4 layers each, and a compute buffer of its own
    assert p.estimate == DETAIL.total - 400 * MiB
    argv = p.argv("llama-server", 8080)
    assert argv[argv.index("--rpc") + 1] == f"{W1},{W2}"
    assert argv[argv.index("--tensor-split") + 1] == "0.5,0.5"
    assert argv[argv.index("--n-gpu-layers") + 1] == "4"


def test_all_layers_remote_takes_the_output_layer_too() -> None:
    p = split_plan(local_plan(), {W1: 3 * GiB, W2: 1 * GiB}, 8)
    assert p is not None and p.n_gpu_layers == 9
    assert p.tensor_split == (0.75, 0.25)  # shares follow free memory
    moved = 800 * MiB + 200 * MiB
    assert p.remote == (int(moved * 0.75) + 100 * MiB, int(moved * 0.25) + 100 * MiB)
    assert p.estimate == DETAIL.compute + DETAIL.overhead  # what is left here


@pytest.mark.parametrize(("mode", "workers", "locals_first", "splits"), [
    ("auto", {W1: GiB, W2: GiB}, True, 4),  # local first, then 2, 4, 6, 8 layers remote
    ("auto", {}, True, 0),  # no worker up: local only
    ("never", {W1: GiB}, True, 0),
    ("always", {W1: GiB}, False, 4),
    ("always", {}, False, 0),  # forced and none up: no plan at all (the scheduler says why)
])
def test_candidates_by_mode(mode: str, workers: dict[str, int], locals_first: bool, splits: int) -> None:
    plans = with_workers((local_plan(),), workers, mode)  # type: ignore[arg-type]
    assert (plans[:1] == (local_plan(),)) is locals_first
    remote = [p for p in plans if p.rpc]
    assert len(remote) == splits
    assert [p.n_gpu_layers for p in remote] == [2, 4, 6, 9][:splits]  # least spread first
    assert all(a.estimate > b.estimate for a, b in itertools.pairwise(remote))


def test_workers_fit_needs_each_worker_up_free_and_unheld() -> None:
    p = split_plan(local_plan(), {W1: GiB, W2: GiB}, 8)
    assert p is not None
    assert workers_fit(p, {W1: GiB, W2: GiB}, [])
    assert not workers_fit(p, {W1: GiB}, [])  # W2 down
    assert not workers_fit(p, {W1: GiB, W2: 100 * MiB}, [])  # W2 has no room for its share
    other = split_plan(local_plan("b"), {W2: GiB, W3: GiB}, 8)
    assert other is not None
    assert not workers_fit(p, {W1: GiB, W2: GiB}, [other])  # W2 serves runner b (one client at a time)
    assert workers_fit(local_plan(), {}, [other])


def test_split_note_only_for_a_lost_split_runner() -> None:
    p = split_plan(local_plan(), {W1: GiB}, 8)
    assert p is not None
    assert W1 in split_note(p, lost=True)
    assert split_note(p, lost=False) == "" and split_note(local_plan(), lost=True) == ""


# --- the core with workers --------------------------------------------------------------
def state(capacity: float, workers: dict[str, float]) -> SchedState:
    return SchedState(max_loaded=3, capacity=capacity, workers=dict(workers))


def submit(s: SchedState, rid: int, model: str, mode: str = "auto") -> Request:
    plans = with_workers((local_plan(model),), s.workers, mode)  # type: ignore[arg-type]
    r = Request(id=rid, model=model, ctx=2048, plans=plans, arrived=0.0, load=LoadOptions())
    s.submit(r)
    return r


def test_fits_locally_loads_locally() -> None:
    s = state(4 * GiB, {W1: 8 * GiB, W2: 8 * GiB})
    submit(s, 1, "a")
    (start,) = decide(s, 0.0)
    assert isinstance(start, Start) and start.plan.rpc == ()


def test_too_big_locally_spreads_as_little_as_needed() -> None:
    s = state(800 * MiB, {W1: 8 * GiB, W2: 8 * GiB})
    submit(s, 1, "a")
    (start,) = decide(s, 0.0)
    assert isinstance(start, Start) and start.plan.rpc == (W1, W2)
    assert start.plan.n_gpu_layers == 4  # 2 layers remote do not fit 800 MiB here, 4 do
    assert start.plan.estimate <= 800 * MiB


def test_never_keeps_it_local_and_says_it_is_too_big() -> None:
    s = state(800 * MiB, {W1: 8 * GiB})
    submit(s, 1, "a", mode="never")
    (reject,) = decide(s, 0.0)
    assert isinstance(reject, Reject) and "requires more system memory" in reject.message


def test_always_uses_the_workers_even_when_it_fits() -> None:
    s = state(100 * GiB, {W1: 8 * GiB})
    submit(s, 1, "a", mode="always")
    (start,) = decide(s, 0.0)
    assert isinstance(start, Start) and start.plan.rpc == (W1,)


def test_a_held_worker_is_not_shared_and_an_idle_holder_is_evicted() -> None:
    s = state(800 * MiB, {W1: 8 * GiB})
    submit(s, 1, "a")
    (start_a,) = decide(s, 0.0)
    assert isinstance(start_a, Start) and start_a.plan.rpc == (W1,)
    s.runner_ready(start_a.runner_id, 0.0)
    assert decide(s, 0.0) == [Dispatch(1, start_a.runner_id)]  # busy with request 1
    submit(s, 2, "b")  # too big here too; with all its layers remote it would fit memory, but W1 is a's
    assert decide(s, 0.0) == []  # W1 serves a's runner; b waits rather than sharing it
    s.release(start_a.runner_id, 1.0)
    acts = decide(s, 100.0)  # idle now, and b waited past max_passover: a is evicted for b
    assert [type(a) for a in acts] == [Stop]
    s.runner_exited(start_a.runner_id)
    (start_b,) = decide(s, 100.0)
    assert isinstance(start_b, Start) and start_b.plan.model == "b" and start_b.plan.rpc == (W1,)


def test_a_worker_going_down_leaves_it_out() -> None:
    s = state(800 * MiB, {W1: 8 * GiB, W2: 8 * GiB})
    r = submit(s, 1, "a")
    s.workers = {W1: 8 * GiB}  # W2 went down while it was queued; the scheduler re-plans
    r.plans = with_workers((local_plan("a"),), s.workers, "auto")
    (start,) = decide(s, 0.0)
    assert isinstance(start, Start) and start.plan.rpc == (W1,)


def test_the_queue_is_replanned_and_a_forced_request_with_no_worker_left_is_a_clear_503() -> None:
    async def main() -> None:
        pool = WorkerPool([W1, W2])
        pool.status = {W1: WorkerStatus(W1, "up", 8 * GiB), W2: WorkerStatus(W2, "down")}
        pool.known_free = {W1: 8 * GiB}
        s = state(800 * MiB, {W1: 8 * GiB, W2: 8 * GiB})
        auto, forced = submit(s, 1, "a"), submit(s, 2, "b", mode="always")
        assert {p.rpc for p in auto.plans if p.rpc} == {(W1, W2)}
        modes = {1: "auto", 2: "always"}
        none_up: dict[str, float] = {}
        rejects = refresh(s, pool, lambda rid: with_workers((local_plan("ab"[rid - 1]),), s.workers, modes[rid]))
        assert rejects == [] and s.workers == {W1: 8 * GiB}
        assert {p.rpc for p in auto.plans if p.rpc} == {(W1,)}
        pool.status[W1] = WorkerStatus(W1, "down")
        rejects = refresh(s, pool, lambda rid: with_workers((local_plan("ab"[rid - 1]),), none_up, modes[rid]))
        assert [(r.request_id, r.status) for r in rejects] == [(2, 503)] and "RPC workers" in rejects[0].message
        assert [q.id for q in s.queue] == [1] and forced not in s.queue

    asyncio.run(main())


@pytest.mark.parametrize(("value", "ok"), [
    ("10.0.0.5:50052", True), ("10.0.0.5:50052,10.0.0.6:50052", True), ("[fd00::5]:50052", True),
    ("10.0.0.5", False), ("host:port", False), (":50052", False), ("10.0.0.5:0", False),
])
def test_rpc_workers_setting(value: str, ok: bool) -> None:
    if ok:
        assert load_settings({"OLLAMAD_RPC_WORKERS": value}).rpc_workers == tuple(value.split(","))
    else:
        with pytest.raises(SettingsError, match="OLLAMAD_RPC_WORKERS"):
            load_settings({"OLLAMAD_RPC_WORKERS": value})


def test_per_model_setting(tmp_path: Path) -> None:
    from ollamad.models.catalog import Catalog
    from ollamad.models.config import ModelConfigError, parse_model_config
    from ollamad.models.testmodels import write_all

    assert parse_model_config('[models."a"]\nrpc = "always"').entries["a"].rpc == "always"
    with pytest.raises(ModelConfigError, match=r"models\.a\.rpc"):
        parse_model_config('[models."a"]\nrpc = "sometimes"')
    write_all(tmp_path, ("tiny",))
    cfg = tmp_path / "models.toml"
    cfg.write_text('[models."tiny"]\nrpc = "never"\n')
    cat = Catalog(tmp_path, cfg)
    cat.scan()
    model = cat.resolve("tiny")
    assert model is not None and model.defaults.rpc == "never"


@pytest.mark.parametrize("a_busy", [False, True])
def test_local_first_means_evicting_idle_models_before_spreading(a_busy: bool) -> None:
    """Room for b here only without a: an idle a is unloaded for b; a busy a stays and b spreads."""
    s = SchedState(max_loaded=3, capacity=1500 * MiB, workers={W1: 8 * GiB}, policy="fifo")
    s.submit(Request(id=1, model="a", ctx=2048, plans=(local_plan("a"),), arrived=0.0, load_only=not a_busy))
    (start_a,) = decide(s, 0.0)
    assert isinstance(start_a, Start)
    s.runner_ready(start_a.runner_id, 0.0)
    assert decide(s, 0.0) == [Dispatch(1, start_a.runner_id)]
    submit(s, 2, "b")
    acts = decide(s, 1.0)
    if a_busy:
        (start_b,) = acts
        assert isinstance(start_b, Start) and start_b.plan.rpc == (W1,)
    else:
        assert acts == [Stop(start_a.runner_id, "evicted to load b")]
        s.runner_exited(start_a.runner_id)
        (start_b,) = decide(s, 2.0)
        assert isinstance(start_b, Start) and start_b.plan.rpc == ()
