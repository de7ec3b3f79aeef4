"""Memory decisions as pure functions: where a plan goes, and what llama-server said it took.

Inputs are a ``MemorySnapshot`` (what memory.py measured) and an ``Estimate``; nothing here
does I/O. ``place`` answers "does this plan fit now, on which GPUs, with how many layers
offloaded?"; ``parse_buffer_line`` reads llama-server's ``... buffer size = X MiB`` lines.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass, field

from ollamad.models.estimate import Estimate, MiB


@dataclass(frozen=True)
class GpuInfo:
    index: int
    name: str
    total: int
    free: int


@dataclass(frozen=True)
class ProcessUse:
    rss: int = 0  # host memory of the process and its descendants
    vram: int = 0  # GPU memory NVML attributes to it, all GPUs together

    @property
    def total(self) -> int:
        return self.rss + self.vram


@dataclass(frozen=True)
class MemorySnapshot:
    host_total: int
    host_available: int  # psutil's available, bounded by the cgroup's memory.max
    gpus: tuple[GpuInfo, ...] = ()
    processes: dict[int, ProcessUse] = field(default_factory=dict)

    @property
    def free(self) -> int:
        return self.host_available + sum(g.free for g in self.gpus)


@dataclass(frozen=True)
class Placement:
    """Where a runner goes: GPUs to pin (CUDA_VISIBLE_DEVICES), layers offloaded, the split."""

    gpus: tuple[int, ...]
    n_gpu_layers: int | None  # None: CPU-only host, leave llama-server's default
    gpu_bytes: int
    cpu_bytes: int
    cuda_bytes: tuple[int, int] = (0, 0)  # of gpu_bytes and cpu_bytes: CUDA's own (contexts, runtime)

    @property
    def processor(self) -> str:
        """Where the model goes, as ``ollama ps`` says it: CUDA's own memory is not the model's."""
        gpu, cpu = self.gpu_bytes - self.cuda_bytes[0], self.cpu_bytes - self.cuda_bytes[1]
        return processor(gpu, gpu + cpu)


def processor(vram: int, size: int, rpc: int = 0) -> str:
    """``ollama ps`` PROCESSOR: "100% GPU", "100% CPU" or "48%/52% CPU/GPU"; with RPC workers
    (``rpc`` bytes of ``size`` on them) "35% CPU / 65% RPC" or "10% CPU / 30% GPU / 60% RPC"."""
    if rpc > 0 and size > 0:
        rpc_pct = round(100 * rpc / size)
        gpu_pct = round(100 * vram / size)
        parts = [f"{100 - rpc_pct - gpu_pct}% CPU"] + ([f"{gpu_pct}% GPU"] if vram > 0 else [])
        return " / ".join([*parts, f"{rpc_pct}% RPC"])
    if size <= 0 or vram <= 0:
        return "100% CPU"
    if vram >= size:
        return "100% GPU"
    gpu = round(100 * vram / size)
    return f"{100 - gpu}%/{gpu}% CPU/GPU"


def usable(snap: MemorySnapshot, gpu_overhead: int, reserve: int) -> tuple[int, list[int]]:
    """Host bytes and per-GPU bytes a new runner may take: free minus overhead and reserve."""
    host = max(snap.host_available - reserve, 0)
    return host, [max(g.free - gpu_overhead - reserve, 0) for g in snap.gpus]


def place(est: Estimate, snap: MemorySnapshot, *, gpu_overhead: int = 0, reserve: int = 0,
          spread: bool = False, total: int | None = None, context: int = 0, runtime: int = 0) -> Placement | None:
    """Where ``est`` fits now, best first; None if it does not fit at all.

    One GPU that holds it all (the tightest such GPU, to keep big holes for big models);
    else all GPUs together (always with ``spread``); else as many layers as the GPUs hold
    with the rest on the CPU; else the CPU alone.

    ``total`` (default ``est.total``) is the whole need on a CPU-only host; where there are GPUs
    it includes ``context`` (GPU memory each GPU a runner uses takes before any buffer: one is
    counted in ``total``, each further GPU adds one) and ``runtime`` (host memory the GPU
    runtime takes), as Accountant.correct adds them.
    """
    need = (est.total + (context + runtime if snap.gpus else 0)) if total is None else total
    host, per_gpu = usable(snap, gpu_overhead, reserve)
    if not snap.gpus:
        return Placement((), None, 0, need) if need <= host else None
    all_layers = est.layers + 1  # the repeating layers and the output layer
    on_gpu = need - runtime  # the buffers and one GPU's context
    holders = sorted((free, g.index) for g, free in zip(snap.gpus, per_gpu, strict=True) if free >= on_gpu)
    if holders and not spread and runtime <= host:
        return Placement((holders[0][1],), all_layers, on_gpu, runtime, (context, runtime))
    usable_gpus = [(g.index, free) for g, free in zip(snap.gpus, per_gpu, strict=True)
                   if free > context and runtime <= host]
    indexes = tuple(i for i, _ in usable_gpus)
    spread_need = on_gpu + context * (len(indexes) - 1)  # each further GPU has a context of its own
    if indexes and sum(free for _, free in usable_gpus) >= spread_need:
        return Placement(indexes, all_layers, spread_need, runtime, (context * len(indexes), runtime))
    bare = need - runtime - context  # without what running on a GPU adds
    gpu_room = sum(free - context for _, free in usable_gpus)
    return _partial(est, bare, host, gpu_room, indexes, context * len(indexes), runtime)


def _partial(est: Estimate, need: int, host: int, gpu_room: int, indexes: tuple[int, ...], contexts: int,
             runtime: int) -> Placement | None:
    """Offload what the GPUs hold layer by layer; the compute buffer goes on the GPU too."""
    per_layer = est.per_layer
    layers = 0
    if per_layer > 0 and gpu_room > est.compute:
        layers = min((gpu_room - est.compute) // per_layer, est.layers)
    if layers == 0:
        return Placement((), 0, 0, need) if need <= host else None
    gpu = layers * per_layer + est.compute + contexts
    cpu = max(need - layers * per_layer, 0) + runtime  # the CPU keeps a compute buffer of its own
    return Placement(indexes, layers, gpu, cpu, (contexts, runtime)) if cpu <= host else None


# --- llama-server's log ------------------------------------------------------------------
_BUFFER = re.compile(r"(\S+)\s+(model|KV|compute|output|RS)\s+buffer size\s*=\s*([\d.]+)\s*MiB")
_RPC_DEVICE = re.compile(r"^RPC\d*\[(.+)\]$")  # RPC0[10.0.0.5:50052]: a buffer on an RPC worker
_OFFLOADED = re.compile(r"offloaded (\d+)/(\d+) layers to GPU")


@dataclass(frozen=True)
class Buffer:
    device: str  # CPU, CPU_Mapped, CUDA0, CUDA_Host, ...
    kind: str  # model, KV, compute, output, RS
    size: int

    @property
    def on_host(self) -> bool:
        return self.device.startswith("CPU") or self.device.endswith("_Host")

    @property
    def worker(self) -> str | None:
        """The RPC worker (host:port) holding this buffer, or None for a local one."""
        m = _RPC_DEVICE.match(self.device)
        return m.group(1) if m else None


def parse_buffer_line(line: str) -> Buffer | None:
    """A ``<device> <kind> buffer size = X MiB`` line, else None."""
    if "buffer size" not in line:  # most lines (with --verbosity 4, about one per token): no regex search
        return None
    m = _BUFFER.search(line)
    if m is None:
        return None
    return Buffer(m.group(1), m.group(2), int(float(m.group(3)) * MiB))


def parse_offloaded(line: str) -> tuple[int, int] | None:
    m = _OFFLOADED.search(line)
    return (int(m.group(1)), int(m.group(2))) if m else None


@dataclass(frozen=True)
class Reported:
    """What llama-server said it allocated: host and GPU bytes (local), and on RPC workers."""

    host: int = 0
    gpu: int = 0
    rpc: int = 0

    @property
    def total(self) -> int:
        """Bytes on this machine."""
        return self.host + self.gpu

    def add(self, b: Buffer) -> Reported:
        if b.worker is not None:
            return Reported(self.host, self.gpu, self.rpc + b.size)
        if b.on_host:
            return Reported(self.host + b.size, self.gpu, self.rpc)
        return Reported(self.host, self.gpu + b.size, self.rpc)


def reported(lines: Iterable[str]) -> Reported:
    out = Reported()
    for line in lines:
        b = parse_buffer_line(line)
        if b is not None:
            out = out.add(b)
    return out
