"""Room for a new runner: whether a plan fits beside the runners that stay, what unloading one
gives back, and the fewest least recently used runners whose going makes room."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol, TypeVar

from ollamad.models.plan import RunnerPlan
from ollamad.sched.rpcplace import workers_fit


class RunnerState(Protocol):
    """What is read here of core.RunnerState."""

    plan: RunnerPlan
    in_flight: int
    last_used: float
    memory: int
    counted: int


class SchedState(Protocol):
    """What is read here of core.SchedState."""

    max_loaded: int
    capacity: float
    reserve: float
    workers: dict[str, float]

    def free_now(self) -> float: ...


R = TypeVar("R", bound=RunnerState)


def fits(s: SchedState, live: Sequence[RunnerState], gone: Sequence[RunnerState], plan: RunnerPlan) -> bool:
    remaining = [r for r in live if r not in gone]
    used = sum(r.memory for r in remaining)
    freed = sum(frees(r) for r in gone)
    return (len(remaining) < s.max_loaded and used + plan.estimate <= s.capacity
            and plan.estimate <= s.free_now() + freed - s.reserve
            and workers_fit(plan, s.workers, (r.plan for r in remaining)))


def frees(r: RunnerState) -> int:
    """What unloading ``r`` gives back: its unmeasured part at once, the measured part once a
    snapshot after its exit shows it free."""
    return max(r.memory, r.counted)


def choose_victims(s: SchedState, live: list[R], going: list[R], candidates: list[R],
                   plan: RunnerPlan) -> list[R] | None:
    """Least recently used first until the plan fits; then drop any not needed."""
    chosen: list[R] = []
    for r in sorted(candidates, key=lambda r: (r.in_flight > 0, r.last_used)):
        chosen.append(r)
        if fits(s, live, [*going, *chosen], plan):
            break
    else:
        return None
    for r in sorted(chosen, key=lambda r: -r.last_used):
        rest = [x for x in chosen if x is not r]
        if fits(s, live, going + rest, plan):
            chosen = rest
    return chosen


def too_big(plan: RunnerPlan, room: float) -> str:
    gib = 1024**3
    return (f"model requires more system memory ({plan.estimate / gib:.2f} GiB) "
            f"than is available ({max(room, 0) / gib:.2f} GiB) even with every other model unloaded")
