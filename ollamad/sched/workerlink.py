"""The scheduler's side of its RPC worker pool: which workers the core may plan on, the queue
re-planned when that changes, and a runner's workers set aside when it exits."""

from __future__ import annotations

from collections.abc import Callable

from ollamad.memory.workers import WorkerPool
from ollamad.models.plan import RunnerPlan
from ollamad.sched.core import Reject, SchedState


def held(state: SchedState) -> set[str]:
    """Workers a runner of ours uses (starting, loaded or stopping)."""
    return {ep for r in state.runners.values() for ep in r.plan.rpc}


def refresh(state: SchedState, pool: WorkerPool,
            replan: Callable[[int], tuple[RunnerPlan, ...] | None]) -> list[Reject]:
    """Usable workers from the pool's last check; each queued request re-planned over them
    (``replan`` by request id; None leaves its plans). One left with no plan is refused."""
    state.workers = {ep: float(free) for ep, free in pool.usable(held(state)).items()}
    rejects = []
    for req in list(state.queue):
        plans = replan(req.id)
        if plans is None:
            continue
        req.plans = plans
        if not plans:  # it runs only on workers, and none is up
            state.queue.remove(req)
            rejects.append(Reject(req.id, 503, f"{req.model} runs only on RPC workers and none is up"))
    return rejects


def set_aside(state: SchedState, pool: WorkerPool, plan: RunnerPlan) -> None:
    """A runner on these workers exited: they are free again or gone, so nothing is planned on
    them until the pool has checked them (then ``refresh`` re-plans the queue)."""
    pool.suspect(plan.rpc)
    for ep in plan.rpc:
        state.workers.pop(ep, None)
