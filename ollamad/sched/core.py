"""The scheduler's decisions as a pure function: (state, now) -> actions.

The async driver (scheduler.py) feeds events into a ``SchedState`` through its methods,
calls ``decide`` and carries out the actions. Nothing here does I/O or reads a clock.

Rules:
- Requests for one model start in arrival order; a request for a loaded model never waits
  behind a load of another model (no head-of-line blocking).
- A runner never has more than ``num_parallel`` requests in flight.
- A request that needs a runner starts one if the loaded-model cap and memory allow;
  otherwise it evicts idle runners (least recently used first), never a busy one; a runner
  being evicted finishes what it started and takes nothing new.
- ``affinity`` policy: runners keep serving the queued requests for their own model before
  being evicted for another model, until the waiting request has been passed over for
  ``max_passover`` seconds; ``fifo`` policy evicts at once, in arrival order (Ollama-like).
- Memory has two bounds: ``capacity`` (the budget for all runners, by their ``memory``) and
  ``free`` (what the last snapshot measured as free; ``reserve`` of it is never given to a
  new runner). A runner counts
  against ``free`` by what is not yet measured of it (``memory - counted``); memory of a
  runner that exited counts as free only once a later snapshot shows it free.
- Pressure: when measured free memory falls below ``low_water``, idle runners are
  unloaded, least recently used first; busy ones never are.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Literal

from ollamad.models.plan import LoadOptions, RunnerPlan
from ollamad.sched.room import choose_victims, fits, frees, too_big

Policy = Literal["affinity", "fifo"]
RunnerStatus = Literal["starting", "ready", "stopping"]


@dataclass
class Request:
    id: int
    model: str
    ctx: int
    plans: tuple[RunnerPlan, ...]  # candidate plans for a new runner, best first
    arrived: float
    load: LoadOptions = field(default_factory=LoadOptions)
    keep_alive: float | None = None  # None: leave the runner's value as it is
    load_only: bool = False  # empty prompt: answer once the model is loaded


@dataclass
class RunnerState:
    id: int
    plan: RunnerPlan
    keep_alive: float
    status: RunnerStatus = "starting"
    in_flight: int = 0
    last_used: float = 0.0
    expires_at: float | None = None
    draining: str | None = None  # why it takes no new requests and stops once idle
    claimed_by: int | None = None  # the request whose load waits for this runner to go
    memory: int = 0  # bytes: the estimate until measured
    counted: int = 0  # bytes of it the last memory snapshot already shows as used
    ctx: int = 0  # per-slot context llama-server really gave (it rounds up); plan.ctx until known

    def __post_init__(self) -> None:
        self.ctx = self.ctx or self.plan.ctx

    @property
    def free_slots(self) -> int:
        """Slots with no request: negative while requests wait in llama-server's own queue."""
        return self.plan.num_parallel - self.in_flight

    @property
    def running(self) -> int:
        """Requests that have a slot."""
        return min(self.in_flight, self.plan.num_parallel)

    @property
    def ahead(self) -> int:
        """Requests sent ahead of a free slot, waiting in llama-server's own queue."""
        return max(self.in_flight - self.plan.num_parallel, 0)

    def serves(self, req: Request) -> bool:
        return self.plan.model == req.model and req.ctx <= self.ctx and req.load == self.plan.load


@dataclass(frozen=True)
class Start:
    runner_id: int
    plan: RunnerPlan
    request_id: int


@dataclass(frozen=True)
class Stop:
    runner_id: int
    reason: str


@dataclass(frozen=True)
class Dispatch:
    request_id: int
    runner_id: int
    ahead: bool = False  # sent ahead of a free slot: it waits in llama-server's queue first


@dataclass(frozen=True)
class Reject:
    request_id: int
    status: int
    message: str


Action = Start | Stop | Dispatch | Reject

QUEUE_FULL = "server busy, please try again.  maximum pending requests exceeded"


@dataclass
class Failure:
    count: int
    retry_at: float
    message: str


@dataclass
class SchedState:
    max_loaded: int
    max_queue: int = 512
    policy: Policy = "affinity"
    max_passover: float = 10.0
    send_ahead: int = 0  # requests per slot a busy runner is sent beyond its slots (llama-server queues them)
    default_keep_alive: float = 300.0
    capacity: float = math.inf  # bytes all runners may use together
    free: float = math.inf  # bytes free at the last snapshot (GPUs less overhead, and host RAM)
    reserve: float = 0.0  # bytes of ``free`` never given to a new runner
    low_water: float = 0.0  # below this much free memory, idle runners are unloaded
    unseen_free: float = 0.0  # bytes of runners that exited since the last snapshot
    backoff_base: float = 5.0
    backoff_max: float = 300.0
    reload_interval: float = 0.0  # least time between two loads of one model forced by request options
    loaded_at: dict[str, float] = field(default_factory=dict)  # when each model's last runner started
    early_deaths: dict[str, int] = field(default_factory=dict)  # runners in a row that died right after loading
    workers: dict[str, float] = field(default_factory=dict)  # RPC workers usable now (rpcplace.workers_fit)
    queue: list[Request] = field(default_factory=list)
    runners: dict[int, RunnerState] = field(default_factory=dict)
    failures: dict[str, Failure] = field(default_factory=dict)
    _next_runner: int = 1

    # --- events ------------------------------------------------------------------------
    def submit(self, req: Request) -> None:
        self.queue.append(req)

    def cancel(self, request_id: int) -> bool:
        """Drop a waiting request (its client went away); True if it was waiting."""
        for i, r in enumerate(self.queue):
            if r.id == request_id:
                del self.queue[i]
                return True
        return False

    def release(self, runner_id: int, now: float) -> None:
        """A request on this runner has ended."""
        r = self.runners.get(runner_id)
        if r is None:
            return
        r.in_flight = max(r.in_flight - 1, 0)
        r.last_used = now
        if r.in_flight == 0:
            r.expires_at = now + r.keep_alive

    def runner_ready(self, runner_id: int, now: float, memory: int | None = None, ctx: int | None = None) -> None:
        r = self.runners.get(runner_id)
        if r is None or r.status != "starting":
            return
        r.status = "ready"
        if ctx is not None and ctx >= r.plan.ctx:
            r.ctx = ctx
        r.last_used = now
        r.expires_at = now + r.keep_alive
        if memory is not None:
            r.memory = memory
        self.failures.pop(r.plan.model, None)

    def runner_failed(self, runner_id: int, now: float, message: str) -> list[Reject]:
        """A runner could not start: fail the requests waiting for its model and back off."""
        r = self.runners.pop(runner_id, None)
        if r is None:
            return []
        model = r.plan.model
        self._back_off(model, now, message)
        rejects = [Reject(q.id, 500, message) for q in self.queue if q.model == model]
        self.queue = [q for q in self.queue if q.model != model]
        return rejects

    def runner_died_early(self, runner_id: int, now: float, message: str) -> None:
        """A runner died by itself moments after loading. Once, its queue gets a new one (a
        crash can be bad luck); again in a row, it is a failed load: back off before the next."""
        r = self.runners.get(runner_id)
        if r is None:
            return
        model = r.plan.model
        self.early_deaths[model] = self.early_deaths.get(model, 0) + 1
        if self.early_deaths[model] >= 2:
            self._back_off(model, now, message)

    def _back_off(self, model: str, now: float, message: str) -> None:
        prev = self.failures.get(model)
        count = prev.count + 1 if prev else 1
        delay = min(self.backoff_base * 2 ** (count - 1), self.backoff_max)
        self.failures[model] = Failure(count, now + delay, message)

    def runner_exited(self, runner_id: int) -> None:
        r = self.runners.pop(runner_id, None)
        if r is not None:
            self.unseen_free += r.counted

    def set_memory(self, runner_id: int, memory: int) -> None:
        r = self.runners.get(runner_id)
        if r is not None:
            r.memory = memory

    def observe(self, free: float, counted: dict[int, int]) -> None:
        """A memory snapshot: ``free`` bytes, and how much of each runner it shows as used."""
        self.free = free
        self.unseen_free = 0.0
        for rid, used in counted.items():
            r = self.runners.get(rid)
            if r is not None:
                r.counted = used

    def unload(self, model: str, now: float) -> bool:
        """keep_alive 0 on an empty request: unload the model once its requests end."""
        found = False
        for r in self.runners.values():
            if r.plan.model == model and r.status != "stopping":
                found = True
                r.keep_alive = 0.0
                if r.in_flight == 0:
                    r.expires_at = now
        return found

    # --- queries -----------------------------------------------------------------------
    def waiting(self, model: str | None = None) -> int:
        """Requests without a slot: in the queue, and sent ahead to a busy runner (OLLAMA_MAX_QUEUE counts both)."""
        return (sum(1 for q in self.queue if model is None or q.model == model)
                + sum(r.ahead for r in self.runners.values() if model is None or r.plan.model == model))

    def next_wakeup(self, now: float) -> float | None:
        """The earliest time at which ``decide`` may act without a new event."""
        times: list[float] = []
        for r in self.runners.values():
            if r.status == "ready" and r.in_flight == 0 and r.expires_at is not None:
                times.append(r.expires_at)
        if self.policy == "affinity":
            times += [q.arrived + self.max_passover for q in self.queue
                      if q.arrived + self.max_passover > now]
        times += [now + w for q in self.queue if (w := self.reload_wait(q, now)) > 0]
        return min(times) if times else None

    def reload_wait(self, req: Request, now: float) -> float:
        """Seconds ``req`` must wait before it may reload its model (0: no reload, or not now)."""
        live = [r for r in self.runners.values()
                if r.plan.model == req.model and r.status != "stopping" and not r.draining]
        if not live or any(r.serves(req) for r in live):
            return 0.0
        return max(self.loaded_at.get(req.model, -math.inf) + self.reload_interval - now, 0.0)

    def free_now(self) -> float:
        """Free memory now: the snapshot's, less what runners took since (estimated)."""
        return self.free - sum(max(r.memory - r.counted, 0) for r in self.runners.values())

    def new_runner_id(self) -> int:
        rid = self._next_runner
        self._next_runner += 1
        return rid


def decide(s: SchedState, now: float) -> list[Action]:
    """Everything the scheduler should do now; applies the actions to ``s`` as it goes."""
    actions: list[Action] = []
    waiting_ids = {q.id for q in s.queue}

    for r in s.runners.values():
        # a claim by a request that is gone (cancelled, failed) is void
        if r.claimed_by is not None and r.claimed_by not in waiting_ids and r.status != "stopping":
            r.claimed_by = None
            r.draining = None

    blocked: set[str] = set()
    for req in list(s.queue):
        if req.model in blocked:
            continue  # an earlier request for this model waits: keep arrival order
        runner = _runner_for(s, req)
        if runner is not None:
            s.queue.remove(req)
            ahead = not req.load_only and runner.free_slots <= 0
            if not req.load_only:
                runner.in_flight += 1
                runner.expires_at = None
            if req.keep_alive is not None:
                runner.keep_alive = req.keep_alive
                if runner.in_flight == 0:
                    runner.expires_at = now + req.keep_alive
            actions.append(Dispatch(req.id, runner.id, ahead))
            continue
        if s.reload_wait(req, now) > 0:
            continue  # its model was loaded moments ago: wait; meanwhile its runner serves what it can
        blocked.add(req.model)
        if any(r.serves(req) and r.status != "stopping" and not r.draining for r in s.runners.values()):
            continue  # its runner is starting or busy: wait for a slot
        fail = s.failures.get(req.model)
        if fail is not None and now < fail.retry_at:
            s.queue.remove(req)
            wait = fail.retry_at - now
            actions.append(Reject(req.id, 500, f"{fail.message} (next attempt in {wait:.0f}s)"))
            continue
        actions += _make_room_and_start(s, req, now)

    # only after handing out work: a runner started for a keep_alive 0 request serves it first
    for r in list(s.runners.values()):
        if r.status != "ready" or r.in_flight:
            continue
        if r.draining:
            actions.append(_stop(r, r.draining))
        elif r.expires_at is not None and r.expires_at <= now:
            actions.append(_stop(r, "keep-alive expired"))
    return actions


def _runner_for(s: SchedState, req: Request) -> RunnerState | None:
    """A ready runner that can take ``req`` now: the one with the most free slots. A busy one takes
    up to ``send_ahead`` more per slot, which wait in llama-server's own queue: it starts the next
    the moment a slot frees, where a request sent only then would arrive a few milliseconds later."""
    best = None
    for r in s.runners.values():
        if r.status != "ready" or r.draining or not r.serves(req):
            continue
        # not embeddings: a batch of them is several requests, and one lost with its runner would cut the reply
        room = r.free_slots + (0 if r.plan.embedding else s.send_ahead * r.plan.num_parallel)
        if (req.load_only or room > 0) and (best is None or r.free_slots > best.free_slots):
            best = r
    return best


def _stop(r: RunnerState, reason: str) -> Stop:
    r.status = "stopping"
    r.expires_at = None
    return Stop(r.id, reason)


def _make_room_and_start(s: SchedState, req: Request, now: float) -> list[Action]:
    actions: list[Action] = []
    # runners of the same model that cannot serve it (less context, other load options)
    # are replaced once they drain: a reload
    for r in s.runners.values():
        if r.plan.model == req.model and r.status != "stopping" and not r.draining:
            r.draining = "reload with a new plan"
            r.claimed_by = req.id
            if r.status == "ready" and r.in_flight == 0:
                actions.append(_stop(r, r.draining))

    if any(r.plan.model == req.model for r in s.runners.values()):
        return actions  # the old runner drains and exits first, then the new plan starts

    live = list(s.runners.values())
    local = [p for p in req.plans if not p.rpc]  # split over RPC workers only if none fits, even after evictions
    idle_now = [r for r in live if r.status == "ready" and r.in_flight == 0 and not r.draining and r.claimed_by is None]
    evict_for_local = bool(local) and choose_victims(s, live, [], idle_now, local[-1]) is not None
    plan = next((p for p in req.plans if (not p.rpc or not evict_for_local) and fits(s, live, [], p)), None)
    if plan is not None:
        rid = s.new_runner_id()
        s.loaded_at[req.model] = now
        s.runners[rid] = RunnerState(
            id=rid, plan=plan, keep_alive=_keep_alive(s, req), memory=plan.estimate, last_used=now)
        actions.append(Start(rid, plan, req.id))
        return actions

    plan = local[-1] if evict_for_local else req.plans[-1]  # the smallest candidate
    room = min(s.capacity, s.free_now() + s.unseen_free + sum(frees(r) for r in live) - s.reserve)
    if plan.estimate > room:  # not even with every runner gone, busy ones included
        s.queue.remove(req)
        return [*actions, Reject(req.id, 500, too_big(plan, room))]

    # what goes anyway: runners already stopping or draining for this request
    going = [r for r in live if r.status == "stopping" and r.claimed_by in (None, req.id)]
    going += [r for r in live if r.status != "stopping" and r.claimed_by == req.id]
    for r in going:
        r.claimed_by = req.id
    if fits(s, live, going, plan):
        return actions

    urgent = s.policy == "fifo" or now - req.arrived >= s.max_passover
    idle = [r for r in live if r.status == "ready" and r.in_flight == 0 and not r.draining
            and r.claimed_by is None and (urgent or not _has_waiting(s, r))]
    victims = choose_victims(s, live, going, idle, plan)
    if victims is None and urgent:
        busy = [r for r in live if r.status == "ready" and not r.draining and r.claimed_by is None
                and r not in idle]
        victims = choose_victims(s, live, going, idle + busy, plan)
    for r in victims or []:
        r.claimed_by = req.id
        r.draining = f"evicted to load {req.model}"
        if r.in_flight == 0:
            actions.append(_stop(r, r.draining))
    return actions


def _has_waiting(s: SchedState, r: RunnerState) -> bool:
    return any(r.serves(q) for q in s.queue)


def relieve_pressure(s: SchedState, now: float) -> list[Stop]:
    """Below the low-water mark: stop idle runners, least recently used first, never busy ones."""
    live = list(s.runners.values())
    free = s.free_now() + sum(frees(r) for r in live if r.status == "stopping")
    if free >= s.low_water:
        return []
    stops: list[Stop] = []
    idle = [r for r in live if r.status == "ready" and r.in_flight == 0 and not r.draining]
    for r in sorted(idle, key=lambda r: r.last_used):
        if free >= s.low_water:
            break
        mib = 1024 * 1024
        stops.append(_stop(r, f"memory pressure: {free / mib:.0f} MiB free, below the low-water mark "
                              f"of {s.low_water / mib:.0f} MiB"))
        free += frees(r)
    return stops


def _keep_alive(s: SchedState, req: Request) -> float:
    return req.keep_alive if req.keep_alive is not None else s.default_keep_alive
