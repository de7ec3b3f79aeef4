"""A fake ``pynvml`` that replays recorded GPU states; used only in tests.

Each state is what NVML reported on a real kind of host: device names and memory totals
as the driver gives them (bytes), free memory, and the compute processes with their use.
"""

from __future__ import annotations

from dataclasses import dataclass, field

GiB = 1024**3
MiB = 1024**2


class NVMLError(Exception):
    pass


@dataclass(frozen=True)
class FakeProcess:
    pid: int
    usedGpuMemory: int | None


@dataclass(frozen=True)
class FakeGpu:
    name: str
    total: int
    used: int
    processes: tuple[FakeProcess, ...] = ()


@dataclass(frozen=True)
class _MemInfo:
    total: int
    free: int
    used: int


# Recorded states (totals as NVML gives them: a little under the marketing size)
STATES: dict[str, tuple[FakeGpu, ...]] = {
    "1x8GB": (FakeGpu("NVIDIA GeForce RTX 3070", 8192 * MiB, 310 * MiB),),
    "1x24GB": (FakeGpu("NVIDIA GeForce RTX 4090", 24564 * MiB, 420 * MiB),),
    "2x80GB": (FakeGpu("NVIDIA H100 80GB HBM3", 81559 * MiB, 530 * MiB),
               FakeGpu("NVIDIA H100 80GB HBM3", 81559 * MiB, 530 * MiB)),
    # read on an H100 (driver 580.159.04, CUDA 13.0) with one llama-server (pid 5762) holding a 10 MB
    # model, all 5 layers offloaded: its buffers are 83 MiB, NVML gives the process 670 MiB (nvidia-smi
    # the same); NVML's v1 "used" counts the 480 MiB the driver reserves
    "1x80GB-llama-server": (FakeGpu("NVIDIA H100 80GB HBM3", 85520809984, 1215102976,
                                    (FakeProcess(5762, 702545920),)),),
    # another program (pid 4242) holds almost all of GPU 0
    "1x24GB-nearly-full": (FakeGpu("NVIDIA GeForce RTX 4090", 24564 * MiB, 23900 * MiB,
                                   (FakeProcess(4242, 23480 * MiB),)),),
}


@dataclass
class FakeNvml:
    """The parts of pynvml that ollamad.memory calls, replaying ``gpus``."""

    gpus: tuple[FakeGpu, ...]
    fail: bool = False
    calls: list[str] = field(default_factory=list)

    @classmethod
    def state(cls, name: str) -> FakeNvml:
        return cls(STATES[name])

    def nvmlInit(self) -> None:
        self.calls.append("init")

    def nvmlDeviceGetCount(self) -> int:
        if self.fail:
            raise NVMLError("GPU is lost")
        return len(self.gpus)

    def nvmlDeviceGetHandleByIndex(self, i: int) -> FakeGpu:
        return self.gpus[i]

    def nvmlDeviceGetMemoryInfo(self, h: FakeGpu) -> _MemInfo:
        return _MemInfo(h.total, h.total - h.used, h.used)

    def nvmlDeviceGetName(self, h: FakeGpu) -> bytes:
        return h.name.encode()

    def nvmlDeviceGetComputeRunningProcesses(self, h: FakeGpu) -> list[FakeProcess]:
        return list(h.processes)
