"""Eviction choice from recorded GPU states: fake NVML -> probe -> accountant -> core.

Loaded runners are NVML compute processes on the GPU (their pids are not real processes,
so their RSS reads as 0 and all they use is VRAM); the host has 1 GiB available.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest

from ollamad.memory.accountant import Accountant
from ollamad.memory.probe import MemoryProbe
from ollamad.models.plan import RunnerPlan
from ollamad.sched.core import Reject, Request, RunnerState, SchedState, Start, Stop, decide
from tests.fake_nvml import STATES, FakeGpu, FakeNvml, FakeProcess, GiB, MiB

PID0 = 3_999_000  # above pid_max: no such process


def plan(model: str, gib: float) -> RunnerPlan:
    return RunnerPlan(model=model, path=Path(f"/{model}.gguf"), num_parallel=1, ctx=2048, estimate=int(gib * GiB))


def world(state: str, loaded: list[tuple[str, float]], reserve: float = 0) -> tuple[SchedState, dict[str, int]]:
    """Runners loaded in this order (the first is least recently used), each on GPU 0."""
    s = SchedState(max_loaded=10, reserve=reserve * GiB)
    acct = Accountant(MemoryProbe(None))
    ids, pids = {}, {}
    for i, (model, gib) in enumerate(loaded):
        rid = s.new_runner_id()
        s.runners[rid] = RunnerState(id=rid, plan=plan(model, gib), keep_alive=300, status="ready",
                                     last_used=float(i), memory=int(gib * GiB))
        acct.track(rid, plan(model, gib))
        ids[model], pids[rid] = rid, PID0 + i
    gpus = list(STATES[state])
    procs = tuple(FakeProcess(PID0 + i, int(gib * GiB)) for i, (_, gib) in enumerate(loaded))
    g0 = gpus[0]
    gpus[0] = FakeGpu(g0.name, g0.total, g0.used + sum(p.usedGpuMemory or 0 for p in procs), g0.processes + procs)
    acct.probe = MemoryProbe(FakeNvml(tuple(gpus)), cgroup=False)
    snap = replace(acct.probe.snapshot(list(pids.values())), host_available=1 * GiB)
    obs = acct.observe(snap, pids, ready=set(pids))
    s.observe(obs.free, obs.counted)
    return s, ids


# (state, loaded in LRU order, new model GiB) -> evicted models ([] = starts at once)
CASES = [
    ("1x24GB", [("a", 8), ("b", 4), ("c", 6)], 6, []),           # 5.6 GiB GPU + 1 GiB host free
    ("1x24GB", [("a", 8), ("b", 4), ("c", 6)], 9, ["a"]),        # LRU first
    ("1x24GB", [("a", 2), ("b", 8), ("c", 6)], 11, ["b"]),       # 8.58 free: a is not enough; b alone is
    ("1x24GB", [("a", 2), ("b", 3), ("c", 6)], 17, ["a", "b"]),  # 13.58 free: neither alone is enough
    ("1x8GB", [("a", 3), ("b", 3)], 4, ["a"]),
    ("2x80GB", [("a", 40), ("b", 30)], 80, []),                  # GPU 1 is empty: room without eviction
    ("2x80GB", [("a", 40), ("b", 30)], 100, ["a"]),
]


@pytest.mark.parametrize(("state", "loaded", "gib", "evicted"), CASES)
def test_eviction_choice(state: str, loaded: list[tuple[str, float]], gib: float, evicted: list[str]) -> None:
    s, ids = world(state, loaded)
    s.submit(Request(id=1, model="new", ctx=2048, plans=(plan("new", gib),), arrived=0))
    acts = decide(s, now=100)
    if not evicted:
        assert [type(a) for a in acts] == [Start]
    else:
        assert acts == [Stop(ids[m], "evicted to load new") for m in evicted]


def test_gpu_taken_by_another_program_refuses_with_numbers() -> None:
    s, _ = world("1x24GB-nearly-full", [])
    s.submit(Request(id=1, model="new", ctx=2048, plans=(plan("new", 4),), arrived=0))
    (act,) = decide(s, now=0)
    assert isinstance(act, Reject) and "4.00 GiB" in act.message
    free = ((24564 - 23900) * MiB + 1 * GiB) / GiB
    assert f"{free:.2f} GiB" in act.message


def test_reserve_turns_a_fit_into_an_eviction() -> None:
    s, ids = world("1x24GB", [("a", 8), ("b", 4), ("c", 6)], reserve=1)
    s.submit(Request(id=1, model="new", ctx=2048, plans=(plan("new", 6),), arrived=0))
    assert decide(s, now=100) == [Stop(ids["a"], "evicted to load new")]
