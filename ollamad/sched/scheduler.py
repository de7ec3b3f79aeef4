"""The async driver around the pure scheduler core (schedcore.decide).

Events (a request arrives or leaves, a runner becomes ready, fails or exits, a timer fires)
update the state; ``_step`` asks ``decide`` what to do and carries it out: hand a lease to a
waiting request, refuse it, start or stop a runner. One task group owns every runner task.
"""

from __future__ import annotations

import contextlib
import itertools
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Literal

import aiohttp
import anyio
import structlog
from anyio.abc import TaskGroup, TaskStatus

from ollamad.memory.accountant import Accountant
from ollamad.memory.fit import MemorySnapshot
from ollamad.memory.workers import WorkerPool
from ollamad.models.catalog import Catalog, Model
from ollamad.models.facts import ModelFacts
from ollamad.models.plan import LoadOptions, ModelDefaults, RunnerPlan, plan_candidates, request_context
from ollamad.runner.child import Runner, RunnerError, describe_exit
from ollamad.runner.leftovers import ChildRecords
from ollamad.runner.upstream import runner_session
from ollamad.sched.admission import auto_max_loaded, plan_settings
from ollamad.sched.core import (
    QUEUE_FULL,
    Dispatch,
    Reject,
    Request,
    SchedState,
    Start,
    Stop,
    decide,
    relieve_pressure,
)
from ollamad.sched.lease import Lease
from ollamad.sched.rpcplace import with_workers
from ollamad.sched.workerlink import held, refresh, set_aside
from ollamad.settings import Settings

log = structlog.get_logger("ollamad.scheduler")
NO_LOAD_OPTIONS = LoadOptions()
EARLY_DEATH = 30.0  # seconds: a runner that dies by itself this soon after loading failed to load


class SchedulerError(Exception):
    """A request could not be served; ``status`` is the HTTP status to answer with."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


@dataclass
class _Waiter:
    event: anyio.Event = field(default_factory=anyio.Event)
    lease: Lease | None = None
    error: SchedulerError | None = None
    request: Request | None = None
    replan: Callable[[], tuple[RunnerPlan, ...]] | None = None  # when the usable RPC workers change


@dataclass(frozen=True)
class RunnerEvent:
    """What happened to a runner, for observers (metrics): loads, stops and their reasons."""

    kind: Literal["loaded", "load_failed", "stopped", "died"]
    model: str
    reason: str = ""
    seconds: float = 0.0


class Scheduler:
    def __init__(self, settings: Settings, catalog: Catalog, binary: str, *,
                 clock: Callable[[], float] = time.monotonic, gpus: int = 0,
                 runner_env: dict[str, str] | None = None, accountant: Accountant | None = None,
                 records: ChildRecords | None = None, workers: WorkerPool | None = None) -> None:
        self.settings = settings
        self.catalog = catalog
        self.binary = binary
        self.clock = clock
        self.runner_env = runner_env
        self.accountant = accountant
        self.records = records
        self.workers = workers
        self.plan_settings = plan_settings(settings)
        self.state = SchedState(
            max_loaded=auto_max_loaded(settings, gpus),
            max_queue=settings.max_queue,
            policy=settings.sched_policy,
            max_passover=settings.max_passover,
            send_ahead=settings.send_ahead,
            default_keep_alive=settings.keep_alive,
            capacity=settings.memory_budget or math.inf,
            backoff_base=settings.load_backoff,
            reload_interval=settings.reload_interval,
            reserve=settings.memory_reserve if accountant else 0,
            low_water=settings.memory_low_water if accountant else 0,
        )
        self.runners: dict[int, Runner] = {}
        self._waiters: dict[int, _Waiter] = {}
        self._ids = itertools.count(1)
        self._tg: TaskGroup | None = None
        self._timer: anyio.CancelScope | None = None  # the timer loop's sleep, until the next wakeup
        self._idle = anyio.Event()
        self._session: aiohttp.ClientSession | None = None
        self.accepting = True
        self.on_event: Callable[[RunnerEvent], None] | None = None

    # --- lifecycle ---------------------------------------------------------------------
    async def run(self, *, task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
        """Run until cancelled; on the way out every runner is stopped."""
        async with runner_session() as session:
            self._session = session
            try:
                async with anyio.create_task_group() as tg:
                    self._tg = tg
                    if self.accountant is not None:
                        tg.start_soon(self.accountant.run, self._pids, self._on_snapshot)
                    if self.workers is not None:
                        tg.start_soon(self.workers.run, self._on_workers, lambda: held(self.state))
                    task_status.started()
                    await self._timer_loop()
            finally:
                self._tg = None
                with anyio.CancelScope(shield=True):
                    await self.stop_all("ollamad is shutting down")

    async def stop_all(self, reason: str) -> None:
        runners = list(self.runners.items())
        for rid, runner in runners:
            log.info("stopping runner", runner_id=rid, reason=reason)
            self._emit(RunnerEvent("stopped", runner.plan.model, reason))
        async with anyio.create_task_group() as tg:
            for _, runner in runners:
                tg.start_soon(runner.stop)
        for waiter in self._waiters.values():
            if not waiter.event.is_set():
                waiter.error = SchedulerError(503, reason)
                waiter.event.set()

    async def _timer_loop(self) -> None:
        """Steps when the state's next wakeup comes; every step moves that time (``_reschedule``)
        rather than waking this task, which would cost a task switch and a new scope per request."""
        while True:
            with anyio.CancelScope() as scope:
                self._timer = scope
                self._reschedule(self.clock())
                await anyio.sleep_forever()
            self._timer = None
            if scope.cancelled_caught:
                try:  # keep-alive and backoff timers: a bug here is logged, never the daemon's end
                    self._step(from_timer=True)
                except Exception:
                    log.exception("scheduler step failed")

    def _reschedule(self, now: float) -> None:
        if self._timer is None:
            return
        t = self.state.next_wakeup(now)
        deadline = math.inf if t is None or math.isinf(t) else anyio.current_time() + max(t - now, 0.0)
        if deadline != self._timer.deadline:
            self._timer.deadline = deadline

    # --- requests ----------------------------------------------------------------------
    def plans_for(self, model: Model, num_ctx: int | None, load: LoadOptions,
                  defaults: ModelDefaults | None = None, facts: ModelFacts | None = None,
                  ) -> tuple[int, tuple[RunnerPlan, ...]]:
        """The context and plans for a request; ``facts``: the model's, when the caller just read them."""
        facts = facts or self.catalog.facts(model)
        defaults = defaults or model.defaults
        ctx = request_context(facts, num_ctx, defaults, self.plan_settings)
        loaded = [r.ctx for r in self.state.runners.values() if r.plan.model == model.name and r.status != "stopping"]
        if loaded and ctx > max(loaded):
            ctx = request_context(facts, num_ctx, defaults, self.plan_settings, grow=True)
        plans = plan_candidates(model.name, model.path, facts, self.plan_settings, defaults, ctx,
                                load, projector=model.projector)
        if self.accountant is not None:
            plans = tuple(self.accountant.correct(p) for p in plans)
        return ctx, with_workers(plans, self.state.workers, defaults.rpc)

    async def acquire(self, model: Model, *, num_ctx: int | None = None,
                      load: LoadOptions = NO_LOAD_OPTIONS, keep_alive: float | None = None,
                      load_only: bool = False, facts: ModelFacts | None = None) -> Lease:
        """Wait for a slot on a runner for ``model``; SchedulerError if it cannot be had.
        ``facts``: the model's GGUF facts, when the caller has just read them."""
        if not self.accepting:
            raise SchedulerError(503, "ollamad is shutting down; not accepting new requests")
        if self.workers is not None:
            await self.workers.settled()  # a worker under re-check after a runner died
        ctx, plans = self.plans_for(model, num_ctx, load, facts=facts)
        if not plans:
            raise SchedulerError(503, f"{model.name} runs only on RPC workers (rpc = \"always\") and none is up")
        if keep_alive is None and model.defaults.keep_alive is not None:
            keep_alive = model.defaults.keep_alive
        req = Request(id=next(self._ids), model=model.name, ctx=ctx, plans=plans,
                      arrived=self.clock(), load=load, keep_alive=keep_alive, load_only=load_only)
        waiter = self._waiters[req.id] = _Waiter(request=req, replan=lambda: self.plans_for(model, num_ctx, load)[1])
        try:
            self.state.submit(req)
            if (wait := self.state.reload_wait(req, self.clock())) > 0:
                log.info("reload waits: the model was loaded moments ago (OLLAMAD_RELOAD_INTERVAL)",
                         model=model.name, request_id=req.id, wait=round(wait, 1))
            self._step()
            if not waiter.event.is_set() and self.state.waiting() > self.state.max_queue:
                self.state.cancel(req.id)
                raise SchedulerError(503, QUEUE_FULL)
            try:
                # granted at once (a free slot): no checkpoint, so the request goes to its runner
                # before the handlers of requests that arrived with it run (anyio's wait on a set
                # event yields to the loop once)
                if not waiter.event.is_set():
                    await waiter.event.wait()
            except BaseException:
                if waiter.lease is not None:
                    waiter.lease.release()
                elif self.state.cancel(req.id):
                    log.info("request left the queue", request_id=req.id, model=model.name)
                    self._step()
                raise
        finally:
            self._waiters.pop(req.id, None)
        if waiter.error is not None:
            raise waiter.error
        assert waiter.lease is not None
        return waiter.lease

    def unload(self, model: Model) -> bool:
        """keep_alive 0 with nothing to run: unload once idle; False if not loaded."""
        found = self.state.unload(model.name, self.clock())
        self._step()
        return found

    def _lost(self, lease: Lease, reason: str) -> None:
        r = self.state.runners.get(lease.runner_id)
        if r is not None and r.status != "stopping" and not r.draining:
            log.warning("runner lost a request; replacing it", runner_id=lease.runner_id, reason=reason)
            r.draining = f"runner failed: {reason}"

    def _release(self, lease: Lease) -> None:
        if lease.holds_slot:
            self.state.release(lease.runner_id, self.clock())
            if lease.sent_ahead and not lease.answered:  # e.g. its client left while it waited there
                log.info("request sent ahead ended before its runner answered", request_id=lease.request_id)
        self._step()

    # --- carrying out decisions --------------------------------------------------------
    def _step(self, from_timer: bool = False) -> None:
        now = self.clock()
        for action in decide(self.state, now):
            if isinstance(action, Dispatch):
                self._dispatch(action, now)
            elif isinstance(action, Reject):
                self._reject(action)
            elif isinstance(action, Start):
                self._spawn(self._run_runner, action.runner_id, action.plan)
            elif isinstance(action, Stop):
                self._spawn(self._stop_runner, action.runner_id, action.reason)
        if not from_timer:
            self._reschedule(now)
        if self.busy() == 0:
            self._idle.set()

    def _spawn(self, fn: Callable[..., Any], *args: Any) -> None:
        if self._tg is None:
            raise RuntimeError("scheduler is not running")
        self._tg.start_soon(_detached, fn, *args)

    def _dispatch(self, action: Dispatch, now: float) -> None:
        waiter = self._waiters[action.request_id]
        assert waiter.request is not None
        lease = Lease(self.runners[action.runner_id], action.runner_id, action.request_id,
                      now - waiter.request.arrived, not waiter.request.load_only, self._release, self._lost,
                      sent_ahead=action.ahead)
        waiter.lease = lease
        waiter.event.set()

    def _reject(self, action: Reject) -> None:
        waiter = self._waiters.get(action.request_id)
        if waiter is not None:
            waiter.error = SchedulerError(action.status, action.message)
            waiter.event.set()

    async def _run_runner(self, rid: int, plan: RunnerPlan) -> None:
        env, on_line = dict(self.runner_env or {}), None
        if self.accountant is not None:
            on_line = self.accountant.track(rid, plan)
            plan, gpu_env = self.accountant.place(rid, plan)
            env.update(gpu_env)
        runner = Runner(plan, self.binary, load_timeout=self.settings.load_timeout,
                        stop_grace=self.settings.stop_grace, env=env or None, on_line=on_line,
                        env_pass=self.settings.runner_env_pass, on_spawn=self._record)
        self.runners[rid] = runner
        logger = log.bind(model=plan.model, runner_id=rid)
        for note in plan.notes:
            logger.warning(note, forced_num_parallel=plan.num_parallel)
        logger.info("loading model", num_parallel=plan.num_parallel, ctx=plan.ctx,
                    total_ctx=plan.total_ctx, estimate=plan.estimate)
        assert self._session is not None
        try:
            try:
                await runner.start(self._session)
            except Exception as e:  # a failed load must never take the scheduler down
                message = str(e) if isinstance(e, RunnerError) else f"llama-server failed to start: {e!r}"
                logger.error("model failed to load", error=message, exc_info=not isinstance(e, RunnerError))
                self._emit(RunnerEvent("load_failed", plan.model, message))
                for reject in self.state.runner_failed(rid, self.clock(), message):
                    self._reject(reject)
                self.runners.pop(rid, None)
                self._step()
                return
            ctx = await runner.slot_context(self._session)
            if ctx != plan.ctx:
                logger.info("llama-server rounded the context per slot", requested=plan.ctx, actual=ctx)
            ready = self.clock()
            self.state.runner_ready(rid, ready, ctx=ctx)
            self._emit(RunnerEvent("loaded", plan.model, seconds=runner.ready_at - runner.started_at))
            self._step()
            if self.accountant is not None:
                rm = self.accountant.runners.get(rid)
                if rm is not None:
                    logger.info("model loaded", pid=runner.pid, estimate=plan.estimate,
                                reported_host=rm.reported.host, reported_gpu=rm.reported.gpu)
                self.accountant.poke()
            async with anyio.create_task_group() as watch:
                watch.start_soon(self._watchdog, rid, runner)
                code = await runner.wait()
                watch.cancel_scope.cancel()
            if not runner.ended_on_request(code):
                self._emit(RunnerEvent("died", plan.model, describe_exit(code)))
                logger.error("runner died", pid=runner.pid, how=describe_exit(code),
                             last_output=runner.tail())
                if self.clock() - ready < EARLY_DEATH:  # twice in a row: back off as from a failed load
                    self.state.runner_died_early(rid, self.clock(), f"llama-server {describe_exit(code)} "
                                                 "right after loading the model")
            else:
                self.state.early_deaths.pop(plan.model, None)
        finally:
            with anyio.CancelScope(shield=True):
                # also once it has exited: an unload's stop (or runner.wait) cut by the shutdown
                # has not removed its key file yet; stop() does, and reads its last output
                await runner.stop()
            if self.records is not None:
                self.records.remove(runner.pid)
            self.state.runner_exited(rid)
            self.runners.pop(rid, None)
            if self.workers is not None and plan.rpc:
                set_aside(self.state, self.workers, plan)
            if self.accountant is not None:
                self.accountant.forget(rid)
                self.accountant.poke()  # its memory counts as free once a snapshot shows it
            with contextlib.suppress(RuntimeError):
                self._step()

    def _record(self, runner: Runner) -> None:
        if self.records is not None and runner.pid is not None:
            self.records.add(runner.pid, runner.plan.model, runner.key_file)

    async def _watchdog(self, rid: int, runner: Runner) -> None:
        """Kill a ready runner that stops answering /health; its requests then fail and it is replaced."""
        assert self._session is not None
        interval, timeout = self.settings.health_interval, self.settings.health_timeout
        last_ok = self.clock()
        while True:
            await anyio.sleep(interval)
            if await runner.responds(self._session, timeout):
                last_ok = self.clock()
                continue
            silent = self.clock() - last_ok
            if silent < timeout:
                continue
            log.error("runner not responding; killing it", model=runner.plan.model, runner_id=rid,
                      pid=runner.pid, silent_for=round(silent, 1), last_output=runner.tail())
            r = self.state.runners.get(rid)
            if r is not None and r.status != "stopping":
                r.draining = "runner hung"
            runner.kill()
            return

    async def _stop_runner(self, rid: int, reason: str) -> None:
        runner = self.runners.get(rid)
        if runner is None:
            return
        log.info("unloading model", model=runner.plan.model, runner_id=rid, reason=reason)
        self._emit(RunnerEvent("stopped", runner.plan.model, reason))
        if reason.startswith("runner failed") and runner.proc is not None:  # likely dying: let it, so
            with anyio.move_on_after(0.5):  # its exit is seen as its own (a crash), not our SIGTERM
                await runner.proc.wait()
        await runner.stop()

    # --- memory ------------------------------------------------------------------------
    def _pids(self) -> dict[int, int]:
        return {rid: r.pid for rid, r in self.runners.items() if r.pid is not None}

    def _on_snapshot(self, snap: MemorySnapshot) -> None:
        assert self.accountant is not None
        pids = self._pids()
        ready = {rid for rid, r in self.state.runners.items() if r.status != "starting"}
        obs = self.accountant.observe(snap, pids, ready)
        self.state.observe(obs.free, obs.counted)
        for rid, memory in obs.memory.items():
            self.state.set_memory(rid, memory)
        for stop in relieve_pressure(self.state, self.clock()):
            log.warning("unloading idle model under memory pressure", runner_id=stop.runner_id,
                        reason=stop.reason)
            self._spawn(self._stop_runner, stop.runner_id, stop.reason)
        self._step()

    def _on_workers(self) -> None:
        """RPC workers changed: the usable ones, and the queue re-planned over them."""
        assert self.workers is not None
        replan = {rid: w.replan for rid, w in self._waiters.items() if w.replan is not None}
        for reject in refresh(self.state, self.workers, lambda rid: replan[rid]() if rid in replan else None):
            self._reject(reject)
        self._step()

    def _emit(self, event: RunnerEvent) -> None:
        if self.on_event is not None:
            self.on_event(event)

    async def wait_idle(self) -> None:
        """Return once no request waits or runs."""
        while self.busy():
            self._idle = anyio.Event()
            await self._idle.wait()

    def busy(self) -> int:
        """Requests waiting or in flight."""
        return len(self.state.queue) + sum(r.in_flight for r in self.state.runners.values())


async def _detached(fn: Callable[..., Any], *args: Any) -> None:
    """A scheduler task without the log context (``request_id``) of the request that started it."""
    structlog.contextvars.clear_contextvars()
    await fn(*args)
