"""The memory accountant at run time: poll snapshots, read buffer sizes, learn, place.

Turns what memory.py measures into what the scheduler core decides with: free memory,
how much of each runner the snapshot shows, each runner's memory (the larger of what it
uses and what llama-server said it allocated), and per-model corrections of the estimate
when the measurement disagrees with it by more than ``TOLERANCE``.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace

import anyio
import structlog

from ollamad.memory.fit import (
    MemorySnapshot,
    Placement,
    Reported,
    parse_buffer_line,
    parse_offloaded,
    place,
    processor,
)
from ollamad.memory.probe import MemoryProbe
from ollamad.models.estimate import GPU_CONTEXT, GPU_RUNTIME_HOST, PROCESS_OVERHEAD
from ollamad.models.plan import RunnerPlan

log = structlog.get_logger("ollamad.memory")
TOLERANCE = 0.10


@dataclass
class RunnerMemory:
    """What is known about one runner's memory."""

    plan: RunnerPlan
    reported: Reported = field(default_factory=Reported)
    placement: Placement | None = None
    rss: int = 0
    vram: int = 0
    peak: int = 0
    measured: bool = False
    workers: dict[str, int] = field(default_factory=dict)  # bytes llama-server put on each RPC worker
    offloaded: tuple[int, int] | None = None  # llama-server's "offloaded N/M layers to GPU"

    @property
    def used(self) -> int:
        return self.rss + self.vram

    @property
    def size_vram(self) -> int:
        """GPU bytes: NVML's per-process figure, else what llama-server said it put on GPUs."""
        return self.vram or self.reported.gpu

    @property
    def holds(self) -> int:
        """Bytes to account for: it may grow to what llama-server allocated (compute buffers
        are touched under load), and never counts as less than it really uses."""
        allocated = self.reported.total + PROCESS_OVERHEAD if self.reported.total else 0
        return max(self.peak, allocated)

    @property
    def processor(self) -> str:
        """Where the model is, as ``ollama ps`` says it: by layers and llama-server's own buffers.

        Not by RSS against NVML's figure: a CUDA process holds a few hundred MB of host memory
        (the CUDA runtime) and of GPU memory (its context) whatever the model, so a small model
        all on the GPU read "34%/66% CPU/GPU" on an H100. A CPU build logs "offloaded N/N layers"
        too, with no GPU buffers: that stays "100% CPU".
        """
        rpc = self.reported.rpc or sum(self.plan.remote)
        if not rpc and self.gpu_layers is not None:
            assert self.offloaded is not None
            layers, of = self.offloaded
            if layers >= of:
                return "100% GPU"
            if layers == 0:
                return "100% CPU"
            return processor(self.reported.gpu, self.reported.total)
        return processor(self.size_vram, max(self.used, self.reported.total) + rpc, rpc)

    @property
    def gpu_layers(self) -> int | None:
        """The layers llama-server offloaded, where it put buffers on a GPU (a CPU build logs
        "offloaded N/N layers" too); None otherwise."""
        return self.offloaded[0] if self.offloaded is not None and self.reported.gpu > 0 else None


@dataclass(frozen=True)
class Observation:
    free: float  # host available plus each GPU's free less OLLAMA_GPU_OVERHEAD
    counted: dict[int, int]  # runner id -> bytes the snapshot shows it using
    memory: dict[int, int]  # runner id -> bytes to account for it


class Accountant:
    def __init__(self, probe: MemoryProbe, *, interval: float = 1.0, gpu_overhead: int = 0,
                 reserve: int = 0, spread: bool = False) -> None:
        self.probe = probe
        self.interval = interval
        self.gpu_overhead = gpu_overhead
        self.reserve = reserve
        self.spread = spread
        self.snapshot: MemorySnapshot | None = None
        self.runners: dict[int, RunnerMemory] = {}
        # per model, and apart for runs on a GPU and on the CPU alone: a CUDA build's runtime
        # costs host memory also where it is given no GPU (RSS 241 MB for 105 MB planned, H100)
        self.corrections: dict[tuple[str, bool], float] = {}
        self._poke = anyio.Event()

    # --- polling -----------------------------------------------------------------------
    async def run(self, pids: Callable[[], Mapping[int, int]],
                  on_snapshot: Callable[[MemorySnapshot], None]) -> None:
        """Measure every ``interval`` seconds, or at once when poked; NVML runs in a thread.

        A failed measurement (out of file descriptors, /proc unreadable) is logged and the
        last snapshot kept: this loop never ends the daemon.
        """
        failing = ""
        while True:
            self._poke = anyio.Event()
            try:
                snap = await anyio.to_thread.run_sync(self.probe.snapshot, list(pids().values()))
                self.snapshot = snap
                on_snapshot(snap)
                if failing:
                    log.info("memory measurement works again")
                failing = ""
            except Exception as e:
                if repr(e) != failing:  # once per kind of error, not once per poll
                    log.exception("memory measurement failed; keeping the last one", error=repr(e))
                failing = repr(e)
            with anyio.move_on_after(self.interval):
                await self._poke.wait()

    def poke(self) -> None:
        """Measure now (a runner started or exited)."""
        self._poke.set()

    # --- runners -----------------------------------------------------------------------
    def track(self, rid: int, plan: RunnerPlan) -> Callable[[str], None]:
        """Start accounting for a runner; returns the hook for its output lines."""
        rm = self.runners[rid] = RunnerMemory(plan)

        def on_line(line: str) -> None:
            b = parse_buffer_line(line)
            if b is not None:
                rm.reported = rm.reported.add(b)
                if b.worker is not None:
                    rm.workers[b.worker] = rm.workers.get(b.worker, 0) + b.size
            elif "offloaded" in line:
                rm.offloaded = parse_offloaded(line) or rm.offloaded

        return on_line

    def forget(self, rid: int) -> None:
        self.runners.pop(rid, None)

    def observe(self, snap: MemorySnapshot, pids: Mapping[int, int], ready: set[int]) -> Observation:
        """Fold a snapshot into each runner's figures; learn from the ready ones."""
        counted: dict[int, int] = {}
        memory: dict[int, int] = {}
        for rid, pid in pids.items():
            rm = self.runners.get(rid)
            use = snap.processes.get(pid)
            if rm is None or use is None:
                continue
            rm.rss, rm.vram, rm.measured = use.rss, use.vram, True
            rm.peak = max(rm.peak, use.total)
            counted[rid] = use.total
            if rid in ready:
                memory[rid] = rm.holds
                self._learn(rm)
        free = snap.host_available + sum(max(g.free - self.gpu_overhead, 0) for g in snap.gpus)
        return Observation(free, counted, memory)

    def _learn(self, rm: RunnerMemory) -> None:
        plan = rm.plan
        base = plan.detail.total if plan.detail is not None else plan.estimate
        if base <= 0 or rm.holds <= 0 or plan.rpc:  # a split's local part is not the whole estimate
            return
        cuda = rm.placement.cuda_bytes if rm.placement is not None else (0, 0)
        on_gpu = cuda[0] > 0  # placed with a context on a GPU
        base += sum(cuda)  # what correct() and place() add for CUDA itself
        ratio = rm.holds / base
        known = self.corrections.get((plan.model, on_gpu), 1.0)
        if abs(ratio - known) <= TOLERANCE * known:
            return
        self.corrections[(plan.model, on_gpu)] = ratio
        log.info("estimate corrected from measurement", model=plan.model, estimated=base, measured=rm.holds,
                 rss=rm.rss, vram=rm.vram, reported=rm.reported.total, factor=round(ratio, 3))

    # --- planning ----------------------------------------------------------------------
    def correct(self, plan: RunnerPlan) -> RunnerPlan:
        """The plan with what running on a GPU adds (where there are GPUs, unless it is split over
        RPC workers or asks for no GPU layers), scaled by what this model measured before."""
        on_gpu = self._on_gpu(plan)
        factor = self.corrections.get((plan.model, on_gpu), 1.0)
        extra = GPU_CONTEXT + GPU_RUNTIME_HOST if on_gpu else 0
        return plan if not extra and factor == 1.0 else replace(plan, estimate=int((plan.estimate + extra) * factor))

    def _on_gpu(self, plan: RunnerPlan) -> bool:
        return bool(self.snapshot is not None and self.snapshot.gpus and not plan.rpc and plan.load.num_gpu != 0)

    def place(self, rid: int, plan: RunnerPlan) -> tuple[RunnerPlan, dict[str, str]]:
        """Pick GPUs and --n-gpu-layers for a runner about to start; its extra environment."""
        snap = self.snapshot
        if plan.rpc:  # the split's layers go to the workers; the local part stays on the CPU
            return plan, ({"CUDA_VISIBLE_DEVICES": ""} if snap is not None and snap.gpus else {})
        if snap is None or not snap.gpus or plan.detail is None:
            return plan, {}
        p = place(plan.detail, snap, gpu_overhead=self.gpu_overhead, reserve=self.reserve, spread=self.spread,
                  total=plan.estimate, context=GPU_CONTEXT, runtime=GPU_RUNTIME_HOST)
        if p is None:  # the core judged it fits by total; the split says CPU
            p = Placement((), 0, 0, plan.estimate)
        if rid in self.runners:
            self.runners[rid].placement = p
        log.info("placing model", model=plan.model, gpus=list(p.gpus), n_gpu_layers=p.n_gpu_layers,
                 processor=p.processor, gpu_bytes=p.gpu_bytes, cpu_bytes=p.cpu_bytes)
        env = {"CUDA_DEVICE_ORDER": "PCI_BUS_ID",  # the order NVML numbers GPUs in
               "CUDA_VISIBLE_DEVICES": ",".join(str(i) for i in p.gpus)}
        return replace(plan, n_gpu_layers=p.n_gpu_layers, gpus=p.gpus), env
