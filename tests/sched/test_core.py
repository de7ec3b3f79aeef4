"""Table tests of the scheduler's pure decisions: (state, events, now) -> actions."""

from __future__ import annotations

import math
from pathlib import Path

import pytest

from ollamad.durations import FOREVER
from ollamad.models.plan import LoadOptions, RunnerPlan
from ollamad.sched.core import Dispatch, Reject, Request, SchedState, Start, Stop, decide, relieve_pressure

GiB = 1024**3


def plan(model: str = "a", np: int = 1, ctx: int = 4096, est: int = 0, load: LoadOptions | None = None) -> RunnerPlan:
    return RunnerPlan(model=model, path=Path(f"/m/{model}.gguf"), num_parallel=np, ctx=ctx,
                      load=load or LoadOptions(), estimate=est)


class World:
    """A SchedState plus helpers that play the driver's part."""

    def __init__(self, **kw: object) -> None:
        kw.setdefault("max_loaded", 3)
        self.s = SchedState(**kw)  # type: ignore[arg-type]
        self.ids = 0
        self.now = 0.0

    def req(self, model: str = "a", np: int = 1, ctx: int = 4096, est: int = 0, **kw: object) -> Request:
        self.ids += 1
        load = kw.pop("load", LoadOptions())
        r = Request(id=self.ids, model=model, ctx=ctx, plans=(plan(model, np, ctx, est, load),),  # type: ignore[arg-type]
                    arrived=self.now, load=load, **kw)  # type: ignore[arg-type]
        self.s.submit(r)
        return r

    def step(self) -> list[object]:
        return list(decide(self.s, self.now))

    def ready_all(self, actions: list[object]) -> None:
        for a in actions:
            if isinstance(a, Start):
                self.s.runner_ready(a.runner_id, self.now)

    def exit_stopped(self, actions: list[object]) -> None:
        for a in actions:
            if isinstance(a, Stop):
                self.s.runner_exited(a.runner_id)

    def loaded(self, model: str = "a", np: int = 1, ctx: int = 4096, est: int = 0) -> int:
        """Load a runner for ``model`` through a load-only request; returns its id."""
        r = self.req(model, np, ctx, est, load_only=True)
        acts = self.step()
        start = next(a for a in acts if isinstance(a, Start))
        self.s.runner_ready(start.runner_id, self.now)
        assert Dispatch(r.id, start.runner_id) in self.step()
        return start.runner_id


def kinds(actions: list[object]) -> list[str]:
    return [type(a).__name__ for a in actions]


def test_first_request_starts_a_runner_then_dispatches_when_ready() -> None:
    w = World()
    r = w.req()
    acts = w.step()
    assert kinds(acts) == ["Start"]
    w.ready_all(acts)
    assert w.step() == [Dispatch(r.id, 1)]


def test_n_plus_k_requests_never_more_than_n_in_flight_and_fifo() -> None:
    w = World()
    rid = w.loaded(np=2)
    reqs = [w.req(np=2) for _ in range(5)]
    acts = w.step()
    assert acts == [Dispatch(reqs[0].id, rid), Dispatch(reqs[1].id, rid)]
    assert w.s.runners[rid].in_flight == 2
    started = [a.request_id for a in acts]
    for _ in range(3):
        w.s.release(rid, w.now)
        acts = w.step()
        assert len(acts) == 1 and w.s.runners[rid].in_flight == 2
        started += [a.request_id for a in acts]  # type: ignore[attr-defined]
    assert started == [r.id for r in reqs]


def test_send_ahead_queues_in_llama_server_and_counts_as_waiting() -> None:
    w = World(send_ahead=1)
    rid = w.loaded(np=2)
    reqs = [w.req(np=2) for _ in range(6)]
    assert w.step() == [Dispatch(reqs[0].id, rid), Dispatch(reqs[1].id, rid),
                        Dispatch(reqs[2].id, rid, ahead=True), Dispatch(reqs[3].id, rid, ahead=True)]
    r = w.s.runners[rid]
    assert (r.in_flight, r.running, r.ahead, r.free_slots) == (4, 2, 2, -2)
    assert w.s.waiting() == w.s.waiting("a") == 4  # two in our queue, two in llama-server's
    assert w.step() == []
    w.s.release(rid, w.now)
    assert w.step() == [Dispatch(reqs[4].id, rid, ahead=True)]
    for _ in range(5):
        w.s.release(rid, w.now)
    assert w.step() == [Dispatch(reqs[5].id, rid)]  # a slot is free: not ahead


def test_nothing_is_sent_ahead_to_a_draining_runner() -> None:
    w = World(max_loaded=1, policy="fifo", send_ahead=1)
    ra = w.loaded(model="a")
    x, y = w.req("a"), w.req("a")
    assert w.step() == [Dispatch(x.id, ra), Dispatch(y.id, ra, ahead=True)]
    w.req("b")
    z = w.req("a")
    assert w.step() == []  # b came first: a drains (x, then y) and takes nothing new
    assert w.s.runners[ra].draining and z in w.s.queue
    w.s.release(ra, w.now)
    assert w.step() == []
    w.s.release(ra, w.now)
    assert w.step() == [Stop(ra, "evicted to load b")]


def test_no_head_of_line_blocking_while_another_model_loads() -> None:
    w = World()
    rb = w.loaded(model="b")
    a = w.req("a")
    b = w.req("b")
    acts = w.step()
    assert Dispatch(b.id, rb) in acts
    assert any(isinstance(x, Start) and x.plan.model == "a" for x in acts)
    assert a in w.s.queue


def test_cap_evicts_least_recently_used_idle_runner() -> None:
    w = World(max_loaded=2)
    ra = w.loaded(model="a")
    w.now = 1
    rb = w.loaded(model="b")
    w.now = 2
    c = w.req("c")
    acts = w.step()
    assert acts == [Stop(ra, "evicted to load c")]
    w.exit_stopped(acts)
    acts = w.step()
    assert kinds(acts) == ["Start"] and acts[0].plan.model == "c"  # type: ignore[attr-defined]
    assert rb in w.s.runners and c in w.s.queue


def test_busy_runner_is_never_evicted_request_waits() -> None:
    w = World(max_loaded=1)
    ra = w.loaded(model="a")
    x = w.req("a")
    assert w.step() == [Dispatch(x.id, ra)]
    w.now = 1
    w.req("b")
    assert w.step() == []  # a is busy: b waits (affinity, within the passover bound)
    w.s.release(ra, w.now)
    acts = w.step()
    assert acts == [Stop(ra, "evicted to load b")]


def test_victim_finishes_its_stream_and_takes_nothing_new() -> None:
    w = World(max_loaded=1, policy="fifo")
    ra = w.loaded(model="a", np=2)
    x = w.req("a", np=2)
    assert w.step() == [Dispatch(x.id, ra)]
    w.req("b")
    assert w.step() == []  # a is busy: marked draining, not stopped
    assert w.s.runners[ra].draining
    y = w.req("a", np=2)
    assert w.step() == []  # the draining runner takes no new request
    w.s.release(ra, w.now)
    assert w.step() == [Stop(ra, "evicted to load b")]
    assert y in w.s.queue


def test_queue_count_and_cancel() -> None:
    w = World()
    w.loaded()
    w.req()
    r2 = w.req()
    w.step()
    assert w.s.waiting() == 1
    assert w.s.cancel(r2.id)
    assert w.s.waiting() == 0
    assert not w.s.cancel(r2.id)


@pytest.mark.parametrize(("keep_alive", "expires_after"), [(0.0, 0.0), (30.0, 30.0), (600.0, 600.0)])
def test_keep_alive_timer_starts_when_last_request_ends(keep_alive: float, expires_after: float) -> None:
    w = World()
    rid = w.loaded()
    r = w.req(keep_alive=keep_alive)
    w.step()
    w.now = 100
    assert w.step() == []
    w.s.release(rid, w.now)
    assert w.s.runners[rid].expires_at == 100 + expires_after
    w.now = 100 + expires_after - 0.001
    assert w.step() == [] or expires_after == 0
    w.now = 100 + expires_after
    assert Stop(rid, "keep-alive expired") in w.step() or keep_alive == 0
    del r


def test_keep_alive_forever_never_expires() -> None:
    w = World()
    rid = w.loaded()
    w.req(keep_alive=FOREVER)
    w.step()
    w.s.release(rid, 0)
    assert w.s.runners[rid].expires_at == math.inf
    w.now = 1e12
    assert w.step() == []
    assert w.s.next_wakeup(w.now) == math.inf


def test_keep_alive_zero_unloads_after_request() -> None:
    w = World()
    rid = w.loaded()
    w.req(keep_alive=0.0)
    w.step()
    w.s.release(rid, 5)
    w.now = 5
    assert w.step() == [Stop(rid, "keep-alive expired")]


def test_request_without_keep_alive_keeps_runner_value() -> None:
    w = World(default_keep_alive=300.0)
    rid = w.loaded()
    w.req(keep_alive=FOREVER)
    w.step()
    w.s.release(rid, 0)
    w.req()  # no keep_alive
    w.step()
    w.s.release(rid, 1)
    assert w.s.runners[rid].keep_alive == FOREVER


def test_unload_with_busy_runner_waits_for_it() -> None:
    w = World()
    rid = w.loaded()
    w.req()
    w.step()
    assert w.s.unload("a", 0)
    assert w.step() == []
    w.s.release(rid, 1)
    w.now = 1
    assert w.step() == [Stop(rid, "keep-alive expired")]


def test_smaller_context_is_served_without_reload() -> None:
    w = World()
    rid = w.loaded(ctx=8192)
    r = w.req(ctx=2048)
    assert w.step() == [Dispatch(r.id, rid)]


def test_bigger_context_waits_for_drain_then_reloads() -> None:
    w = World()
    rid = w.loaded(ctx=2048)
    x = w.req(ctx=2048)
    assert w.step() == [Dispatch(x.id, rid)]
    big = w.req(ctx=8192)
    assert w.step() == []
    assert w.s.runners[rid].draining
    w.s.release(rid, 1)
    acts = w.step()
    assert acts == [Stop(rid, "reload with a new plan")]
    w.exit_stopped(acts)
    acts = w.step()
    assert kinds(acts) == ["Start"] and acts[0].plan.ctx == 8192  # type: ignore[attr-defined]
    assert big in w.s.queue


def test_other_load_options_reload() -> None:
    w = World()
    rid = w.loaded()
    w.req(load=LoadOptions(num_batch=64))
    acts = w.step()
    assert acts == [Stop(rid, "reload with a new plan")]


def test_queue_full_is_counted_on_waiting_requests() -> None:
    w = World(max_queue=2)
    w.req()
    w.req()
    w.req()
    w.step()
    assert w.s.waiting() == 3  # the driver refuses the third with QUEUE_FULL


def test_load_failure_rejects_waiting_and_backs_off() -> None:
    w = World(backoff_base=5.0)
    r1 = w.req()
    acts = w.step()
    r2 = w.req()
    w.step()
    rejects = w.s.runner_failed(acts[0].runner_id, w.now, "bad file")  # type: ignore[attr-defined]
    assert {x.request_id for x in rejects} == {r1.id, r2.id}
    r3 = w.req()
    acts = w.step()
    assert len(acts) == 1 and isinstance(acts[0], Reject) and acts[0].request_id == r3.id
    assert "bad file" in acts[0].message
    w.now = 5
    w.req()
    assert kinds(w.step()) == ["Start"]  # retried after the backoff
    acts2 = [a for a in w.step()]
    assert acts2 == []


def test_backoff_doubles() -> None:
    w = World(backoff_base=2.0)
    for i, expect in enumerate([2.0, 4.0, 8.0]):
        w.now = 100.0 * i
        w.req()
        start = w.step()[0]
        w.s.runner_failed(start.runner_id, w.now, "x")  # type: ignore[attr-defined]
        assert w.s.failures["a"].retry_at - w.now == expect


def test_memory_capacity_evicts_enough_lru_idle() -> None:
    w = World(capacity=10 * GiB, max_loaded=10)
    ra = w.loaded("a", est=4 * GiB)
    w.now = 1
    rb = w.loaded("b", est=4 * GiB)
    w.now = 2
    w.req("c", est=5 * GiB)
    acts = w.step()
    assert acts == [Stop(ra, "evicted to load c")]
    del rb


def test_evicts_smallest_set_not_every_lru() -> None:
    w = World(capacity=10 * GiB, max_loaded=10)
    ra = w.loaded("a", est=1 * GiB)
    w.now = 1
    rb = w.loaded("b", est=6 * GiB)
    w.now = 2
    w.loaded("c", est=2 * GiB)
    w.now = 3
    w.req("d", est=6 * GiB)
    acts = w.step()
    assert acts == [Stop(rb, "evicted to load d")]  # a alone is not enough; b alone is
    del ra


def test_too_big_for_memory_is_refused_with_numbers() -> None:
    w = World(capacity=2 * GiB)
    r = w.req(est=3 * GiB)
    acts = w.step()
    assert len(acts) == 1 and isinstance(acts[0], Reject) and acts[0].request_id == r.id
    assert "3.00 GiB" in acts[0].message and "2.00 GiB" in acts[0].message


def test_memory_short_only_because_busy_waits() -> None:
    w = World(capacity=5 * GiB, max_loaded=10)
    ra = w.loaded("a", est=4 * GiB)
    x = w.req("a", est=4 * GiB)
    w.step()
    y = w.req("b", est=4 * GiB)
    assert w.step() == []
    assert y in w.s.queue
    del ra, x


def test_auto_parallel_takes_first_plan_that_fits() -> None:
    w = World(capacity=5 * GiB)
    w.ids += 1
    r = Request(id=w.ids, model="a", ctx=4096, arrived=0,
                plans=(plan(np=4, est=8 * GiB), plan(np=1, est=2 * GiB)))
    w.s.submit(r)
    acts = w.step()
    assert kinds(acts) == ["Start"] and acts[0].plan.num_parallel == 1  # type: ignore[attr-defined]


def test_affinity_serves_loaded_model_queue_before_swapping() -> None:
    w = World(max_loaded=1, max_passover=10.0)
    ra = w.loaded("a")
    a1 = w.req("a")
    assert w.step() == [Dispatch(a1.id, ra)]
    b1 = w.req("b")
    a2 = w.req("a")
    assert w.step() == []
    w.s.release(ra, 1)
    w.now = 1
    assert w.step() == [Dispatch(a2.id, ra)]  # a2 passes over b1
    w.s.release(ra, 2)
    w.now = 2
    assert w.step() == [Stop(ra, "evicted to load b")]  # nothing more for a: swap
    del b1


def test_affinity_passover_bound_prevents_starvation() -> None:
    w = World(max_loaded=1, max_passover=10.0)
    ra = w.loaded("a")
    w.req("a")
    w.step()
    w.req("b")
    t = 0.0
    for _ in range(5):
        w.req("a")
        w.s.release(ra, t)
        w.step()
        t += 1
    w.now = 10.0
    w.req("a")
    w.s.release(ra, 10.0)
    acts = w.step()
    # b has waited 10 s: a is drained (no new dispatch) and stopped once idle
    assert acts == [Stop(ra, "evicted to load b")]


def test_fifo_policy_swaps_in_arrival_order() -> None:
    w = World(max_loaded=1, policy="fifo")
    ra = w.loaded("a")
    a1 = w.req("a")
    assert w.step() == [Dispatch(a1.id, ra)]
    w.req("b")
    w.req("a")
    assert w.step() == []
    w.s.release(ra, 1)
    assert w.step() == [Stop(ra, "evicted to load b")]


def test_cancelled_claimant_releases_its_victim() -> None:
    w = World(max_loaded=1, policy="fifo")
    ra = w.loaded("a")
    x = w.req("a")
    w.step()
    b = w.req("b")
    w.step()
    assert w.s.runners[ra].draining
    w.s.cancel(b.id)
    w.step()
    assert w.s.runners[ra].draining is None
    del x


def test_stopping_runner_memory_counts_until_exit() -> None:
    w = World(max_loaded=1)
    ra = w.loaded("a")
    w.now = 1
    w.req("b")
    acts = w.step()
    assert acts == [Stop(ra, "evicted to load b")]
    assert w.step() == []  # still exiting: no start, no second eviction
    w.s.runner_exited(ra)
    assert kinds(w.step()) == ["Start"]


def test_load_only_needs_no_free_slot() -> None:
    w = World()
    rid = w.loaded()
    x = w.req()
    w.step()
    r = w.req(load_only=True)
    assert w.step() == [Dispatch(r.id, rid)]
    assert w.s.runners[rid].in_flight == 1
    del x


# --- measured memory: free, reserve, wait for it to show free, pressure -----------------------
def test_evicted_memory_counts_free_only_once_a_snapshot_shows_it() -> None:
    w = World(free=6 * GiB, max_loaded=10)
    ra = w.loaded("a", est=4 * GiB)
    w.s.observe(2 * GiB, {ra: 4 * GiB})  # a really uses 4 GiB; 2 GiB left
    w.now = 1
    w.req("b", est=5 * GiB)
    assert w.step() == [Stop(ra, "evicted to load b")]
    w.s.runner_exited(ra)
    assert w.step() == []  # gone, but the memory does not show as free yet: wait
    w.s.observe(6 * GiB, {})
    assert kinds(w.step()) == ["Start"]


def test_other_program_took_memory_refuses_at_once_with_numbers() -> None:
    w = World(free=1 * GiB)
    r = w.req("a", est=3 * GiB)
    (act,) = w.step()
    assert isinstance(act, Reject) and act.request_id == r.id
    assert "3.00 GiB" in act.message and "1.00 GiB" in act.message


@pytest.mark.parametrize(("est_gib", "kind"), [(2.5, "Start"), (3.5, "Reject")])
def test_reserve_is_never_given_to_a_runner(est_gib: float, kind: str) -> None:
    w = World(free=4 * GiB, reserve=1 * GiB)
    w.req("a", est=int(est_gib * GiB))
    assert kinds(w.step()) == [kind]


def test_starting_runner_counts_by_estimate_until_measured() -> None:
    w = World(free=6 * GiB, max_loaded=10)
    w.req("a", est=4 * GiB)
    (start,) = w.step()
    assert isinstance(start, Start) and w.s.free_now() == 2 * GiB
    w.req("b", est=3 * GiB)
    assert w.step() == []  # a is loading (not idle): b waits, it is not refused
    w.s.runner_ready(start.runner_id, w.now)
    w.s.observe(4 * GiB, {start.runner_id: 2 * GiB})  # a turned out to take 2 GiB
    w.s.set_memory(start.runner_id, 2 * GiB)
    assert kinds(w.step()) == ["Dispatch", "Start"]


def test_pressure_unloads_idle_lru_never_busy() -> None:
    w = World(free=10 * GiB, max_loaded=10, low_water=1 * GiB)
    ra = w.loaded("a", est=2 * GiB)
    w.now = 1
    rb = w.loaded("b", est=2 * GiB)
    w.now = 2
    rc = w.loaded("c", est=2 * GiB)
    w.req("a")  # a is busy now
    w.step()
    assert w.s.runners[ra].in_flight == 1
    w.s.observe(0.5 * GiB, {ra: 2 * GiB, rb: 2 * GiB, rc: 2 * GiB})  # another program took memory
    stops = relieve_pressure(w.s, w.now)
    assert [s.runner_id for s in stops] == [rb]  # the LRU idle one is enough; busy a stays
    assert "memory pressure" in stops[0].reason and "low-water" in stops[0].reason
    assert relieve_pressure(w.s, w.now) == []  # b is on its way out: no second victim


def test_pressure_never_kills_busy_even_when_idle_ones_are_not_enough() -> None:
    w = World(free=10 * GiB, max_loaded=10, low_water=5 * GiB)
    ra = w.loaded("a", est=2 * GiB)
    w.now = 1
    rb = w.loaded("b", est=2 * GiB)
    w.req("b")
    w.step()
    w.s.observe(0, {ra: 2 * GiB, rb: 2 * GiB})
    assert [s.runner_id for s in relieve_pressure(w.s, w.now)] == [ra]
    assert w.s.runners[rb].status == "ready"


def test_no_pressure_above_low_water() -> None:
    w = World(free=10 * GiB, low_water=1 * GiB)
    ra = w.loaded("a", est=2 * GiB)
    w.s.observe(3 * GiB, {ra: 2 * GiB})
    assert relieve_pressure(w.s, w.now) == []


def test_runner_started_for_keep_alive_zero_serves_its_request_first() -> None:
    w = World()
    r = w.req(keep_alive=0.0)
    acts = w.step()
    w.ready_all(acts)
    acts = w.step()
    assert acts == [Dispatch(r.id, 1)]  # not stopped before it serves
    w.s.release(1, w.now)
    assert w.step() == [Stop(1, "keep-alive expired")]


def test_load_only_with_keep_alive_zero_loads_then_unloads() -> None:
    w = World()
    r = w.req(keep_alive=0.0, load_only=True)
    w.ready_all(w.step())
    assert w.step() == [Dispatch(r.id, 1), Stop(1, "keep-alive expired")]


def test_a_reload_waits_out_the_reload_interval_while_the_runner_serves_others() -> None:
    w = World(reload_interval=10.0)
    rid = w.loaded()
    w.now = 1
    other = w.req(load=LoadOptions(num_batch=64))
    same = w.req()
    assert w.step() == [Dispatch(same.id, rid)]  # the runner serves what it can; no drain yet
    assert not w.s.runners[rid].draining and w.s.reload_wait(other, w.now) == 9.0
    assert w.s.next_wakeup(w.now) == 10.0
    w.s.release(rid, w.now)
    w.now = 10
    assert w.step() == [Stop(rid, "reload with a new plan")]


def test_runners_dying_right_after_load_twice_back_off_like_a_failed_load() -> None:
    w = World(backoff_base=5.0)
    for _ in range(2):
        rid = w.loaded()
        w.s.runner_died_early(rid, w.now, "llama-server exited with code 134 right after loading the model")
        w.s.runner_exited(rid)
    r = w.req()
    (reject,) = w.step()
    assert isinstance(reject, Reject) and reject.request_id == r.id and "next attempt in 5s" in reject.message
    w.now = 5
    w.req()
    assert kinds(w.step()) == ["Start"]


def test_one_runner_dying_right_after_load_is_replaced_at_once() -> None:
    w = World()
    rid = w.loaded()
    w.s.runner_died_early(rid, w.now, "killed by signal SIGKILL")
    w.s.runner_exited(rid)
    w.req()
    assert kinds(w.step()) == ["Start"]
