"""Measure memory: GPUs through NVML, host RAM and each runner's RSS through psutil.

The NVML module is injected (``pynvml`` in production, a recorded fake in tests); without
it, or when it cannot initialise (no driver, no GPU), only host memory is measured, with
one debug line and no errors. ``MemoryProbe.snapshot`` blocks, so callers run it in a
worker thread (``anyio.to_thread``).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import psutil
import structlog

from ollamad.memory.fit import GpuInfo, MemorySnapshot, ProcessUse
from ollamad.procs import descendants

log = structlog.get_logger("ollamad.memory")


def load_nvml() -> Any | None:
    """pynvml, initialised; None where there is no NVIDIA driver or GPU."""
    try:
        import pynvml

        pynvml.nvmlInit()
        return pynvml
    except Exception as e:  # NVMLError_LibraryNotFound, DriverNotLoaded, ImportError...
        log.debug("no NVML: measuring host memory only", reason=str(e) or type(e).__name__)
        return None


def cgroup_limit(proc_cgroup: Path = Path("/proc/self/cgroup"),
                 root: Path = Path("/sys/fs/cgroup")) -> int | None:
    """Bytes left under this process's tightest cgroup memory limit; None if unlimited.

    cgroup v2 (``memory.max``, systemd ``MemoryMax=``), else v1 (``memory.limit_in_bytes``).
    """
    try:
        lines = proc_cgroup.read_text().splitlines()
    except OSError:
        return None
    v2 = next((ln.split("::", 1)[1] for ln in lines if ln.startswith("0::")), None)
    if v2 is not None:
        left = _tightest(root, root / v2.strip().lstrip("/"), "memory.max", "memory.current")
        if left is not None:
            return left
    v1 = next((ln.split(":", 2)[2] for ln in lines if ":memory:" in ln), None)
    if v1 is not None:
        mount = root / "memory"
        folder = mount / v1.strip().lstrip("/")
        # inside a container the mount is the cgroup itself: its path is not under it
        return _tightest(mount, folder if folder.is_dir() else mount, "memory.limit_in_bytes",
                         "memory.usage_in_bytes")
    return None


def _tightest(root: Path, folder: Path, limit_file: str, usage_file: str) -> int | None:
    best: int | None = None
    while True:
        with contextlib.suppress(OSError, ValueError):
            limit = (folder / limit_file).read_text().strip()
            if limit != "max" and int(limit) < 1 << 60:  # v1 writes "unlimited" as ~2^63
                left = int(limit) - int((folder / usage_file).read_text())
                best = left if best is None else min(best, left)
        if folder == root or root not in folder.parents:
            return None if best is None else max(best, 0)
        folder = folder.parent


class MemoryProbe:
    """Takes MemorySnapshots: free GPU memory and per-pid GPU use (NVML), host memory (psutil)."""

    def __init__(self, nvml: Any | None, *, cgroup: bool = True) -> None:
        self.nvml = nvml
        self.cgroup = cgroup
        self._failed = False

    def snapshot(self, pids: Iterable[int] = ()) -> MemorySnapshot:
        vm = psutil.virtual_memory()
        available = int(vm.available)
        if self.cgroup:
            limit = cgroup_limit()
            if limit is not None:
                available = min(available, limit)
        gpus, vram = self._gpus()
        procs = {pid: ProcessUse(rss=process_rss(pid), vram=vram.get(pid, 0)) for pid in pids}
        return MemorySnapshot(int(vm.total), available, gpus, procs)

    def _gpus(self) -> tuple[tuple[GpuInfo, ...], dict[int, int]]:
        if self.nvml is None or self._failed:
            return (), {}
        nv = self.nvml
        try:
            gpus: list[GpuInfo] = []
            vram: dict[int, int] = {}
            for i in range(nv.nvmlDeviceGetCount()):
                h = nv.nvmlDeviceGetHandleByIndex(i)
                mem = nv.nvmlDeviceGetMemoryInfo(h)
                name = nv.nvmlDeviceGetName(h)
                gpus.append(GpuInfo(i, name.decode() if isinstance(name, bytes) else str(name),
                                    int(mem.total), int(mem.free)))
                for p in nv.nvmlDeviceGetComputeRunningProcesses(h):
                    used = p.usedGpuMemory or 0  # None where the driver does not say
                    vram[int(p.pid)] = vram.get(int(p.pid), 0) + int(used)
            return tuple(gpus), vram
        except Exception as e:
            self._failed = True  # say it once, then measure host memory only
            log.warning("NVML query failed; measuring host memory only", error=str(e))
            return (), {}


def process_rss(pid: int) -> int:
    """RSS of ``pid`` and its descendants; 0 when it is gone."""
    try:
        procs = [psutil.Process(pid), *descendants(pid)]
    except (psutil.Error, ValueError):
        return 0
    total = 0
    for p in procs:
        with contextlib.suppress(psutil.Error):
            total += int(p.memory_info().rss)
    return total
