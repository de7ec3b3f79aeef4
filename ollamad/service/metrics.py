"""/metrics in Prometheus text format, one registry per app (no process-wide singletons).

Counters and histograms are fed by the request middleware (reqlog) and by the scheduler's
runner events; gauges (queue, in flight, memory) are read from the scheduler state at
scrape time, so they can never drift from it.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

from ollamad.sched.scheduler import RunnerEvent, Scheduler

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
SECONDS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600)


def reason_label(reason: str) -> str:
    """A bounded label for why a runner stopped (the reason text may name a model)."""
    if reason.startswith("evicted"):
        return "evicted"
    if reason.startswith("keep-alive"):
        return "keep_alive"
    if reason.startswith("reload"):
        return "reload"
    if "shutting down" in reason:
        return "shutdown"
    return "other"


@dataclass(frozen=True)
class RequestOutcome:
    """What the request middleware learned about one request."""

    route: str
    status: int
    seconds: float
    model: str | None = None
    ttft: float | None = None
    tokens: int | None = None
    prompt_tokens: int | None = None


class _StateCollector(Collector):
    def __init__(self, scheduler: Scheduler) -> None:
        self.scheduler = scheduler

    def collect(self) -> Iterator[GaugeMetricFamily]:
        state = self.scheduler.state
        queue = GaugeMetricFamily("ollamad_queue_length", "Requests waiting for a runner", labels=["model"])
        # in our queue, or sent ahead into a runner's (SchedState.waiting)
        for model in sorted({q.model for q in state.queue} | {r.plan.model for r in state.runners.values() if r.ahead}):
            queue.add_metric([model], state.waiting(model))
        total = GaugeMetricFamily("ollamad_queue_length_total", "Requests waiting for a runner, all models")
        total.add_metric([], state.waiting())
        in_flight = GaugeMetricFamily("ollamad_in_flight", "Requests running on a runner", labels=["model"])
        slots = GaugeMetricFamily("ollamad_slots", "Parallel slots of each loaded model", labels=["model"])
        memory = GaugeMetricFamily("ollamad_runner_memory_bytes",
                                   "Memory of each runner (measured, or the estimate until measured)",
                                   labels=["model", "runner_id", "status"])
        per_model: dict[str, tuple[int, int]] = {}
        for r in state.runners.values():
            busy, n = per_model.get(r.plan.model, (0, 0))
            per_model[r.plan.model] = (busy + r.running, n + r.plan.num_parallel)
            memory.add_metric([r.plan.model, str(r.id), r.status], r.memory)
        for model, (busy, n) in sorted(per_model.items()):
            in_flight.add_metric([model], busy)
            slots.add_metric([model], n)
        accepting = GaugeMetricFamily("ollamad_accepting", "1 while new requests are accepted, 0 while draining")
        accepting.add_metric([], 1 if self.scheduler.accepting else 0)
        yield from (queue, total, in_flight, slots, memory, accepting)
        pool = self.scheduler.workers
        if pool is not None:  # OLLAMAD_RPC_WORKERS
            up = GaugeMetricFamily("ollamad_rpc_worker_up", "1 while an RPC worker answers (or serves a runner)",
                                   labels=["worker"])
            free = GaugeMetricFamily("ollamad_rpc_worker_free_bytes", "Free memory an RPC worker last reported",
                                     labels=["worker"])
            for ep, st in sorted(pool.status.items()):
                up.add_metric([ep], 1 if st.state in ("up", "busy", "held") else 0)
                free.add_metric([ep], pool.known_free.get(ep, 0))
            yield from (up, free)


class Metrics:
    def __init__(self, scheduler: Scheduler) -> None:
        self.registry = r = CollectorRegistry()
        self.requests = Counter("ollamad_requests", "HTTP requests by route and status",
                                ["route", "status"], registry=r)
        self.duration = Histogram("ollamad_request_duration_seconds", "HTTP request duration",
                                  ["route"], buckets=SECONDS, registry=r)
        self.ttft = Histogram("ollamad_time_to_first_token_seconds",
                              "From request arrival to the first generated token (queue and load included)",
                              ["model"], buckets=SECONDS, registry=r)
        self.tokens = Counter("ollamad_tokens_generated", "Tokens generated", ["model"], registry=r)
        self.prompt_tokens = Counter("ollamad_prompt_tokens", "Prompt tokens evaluated", ["model"], registry=r)
        self.loads = Counter("ollamad_model_loads", "Model loads by result", ["model", "result"], registry=r)
        self.load_seconds = Histogram("ollamad_model_load_seconds", "Time to start a runner until healthy",
                                      ["model"], buckets=SECONDS, registry=r)
        self.unloads = Counter("ollamad_model_unloads", "Runners stopped, by reason (evictions included)",
                               ["model", "reason"], registry=r)
        self.deaths = Counter("ollamad_runner_deaths", "Runners that exited on their own", ["model"], registry=r)
        r.register(_StateCollector(scheduler))
        scheduler.on_event = self.runner_event

    def runner_event(self, event: RunnerEvent) -> None:
        if event.kind == "loaded":
            self.loads.labels(event.model, "ok").inc()
            self.load_seconds.labels(event.model).observe(event.seconds)
        elif event.kind == "load_failed":
            self.loads.labels(event.model, "failed").inc()
        elif event.kind == "stopped":
            self.unloads.labels(event.model, reason_label(event.reason)).inc()
        elif event.kind == "died":
            self.deaths.labels(event.model).inc()

    def request_done(self, o: RequestOutcome) -> None:
        self.requests.labels(o.route, str(o.status)).inc()
        self.duration.labels(o.route).observe(o.seconds)
        if o.model is not None:
            if o.ttft is not None:
                self.ttft.labels(o.model).observe(o.ttft)
            if o.tokens:
                self.tokens.labels(o.model).inc(o.tokens)
            if o.prompt_tokens:
                self.prompt_tokens.labels(o.model).inc(o.prompt_tokens)

    def render(self) -> bytes:
        return generate_latest(self.registry)
