"""Fit, offload split and GPU choice, driven by recorded NVML states (tests/fake_nvml.py)."""

from __future__ import annotations

import os
import subprocess
from dataclasses import replace
from pathlib import Path

import pytest

from ollamad.memory.fit import (
    MemorySnapshot,
    parse_buffer_line,
    parse_offloaded,
    place,
    processor,
    reported,
)
from ollamad.memory.probe import MemoryProbe, cgroup_limit, process_rss
from ollamad.models.estimate import Estimate
from tests.fake_nvml import FakeNvml, GiB, MiB


def model(weights_gib: float, layers: int = 32, kv_gib: float = 1.0, compute_gib: float = 0.25) -> Estimate:
    w = int(weights_gib * GiB)
    return Estimate(weights=w, kv=int(kv_gib * GiB), recurrent=0, compute=int(compute_gib * GiB), output=0,
                    overhead=0, layers=layers, layer_weights=int(w * 0.95))


def snap(state: str, host_gib: float = 64) -> MemorySnapshot:
    s = MemoryProbe(FakeNvml.state(state), cgroup=False).snapshot()
    return replace(s, host_available=int(host_gib * GiB))


# (state, model GiB, spread, overhead GiB, host GiB) -> (gpus, n_gpu_layers, PROCESSOR)
# Layer counts worked by hand: per layer = (0.95 x weights + KV) / 32, GPU room minus the
# compute buffer divided by it; e.g. 8 GB with 3 GiB overhead: (7882 - 3072 - 256) / 153.6 = 29.
CASES = [
    ("1x8GB", 4.0, False, 0, 64, (0,), 33, "100% GPU"),
    ("1x8GB", 4.0, False, 3, 64, (0,), 29, "16%/84% CPU/GPU"),   # OLLAMA_GPU_OVERHEAD leaves less room
    ("1x8GB", 20.0, False, 0, 64, (0,), 11, "67%/33% CPU/GPU"),  # partial offload, rest on CPU
    ("1x8GB", 20.0, False, 0, 8, None, None, None),              # neither GPU nor CPU holds the rest
    ("1x24GB", 20.0, False, 0, 64, (0,), 33, "100% GPU"),
    ("2x80GB", 20.0, False, 0, 64, (0,), 33, "100% GPU"),         # one GPU holds it: pin to one
    ("2x80GB", 20.0, True, 0, 64, (0, 1), 33, "100% GPU"),        # OLLAMA_SCHED_SPREAD
    ("2x80GB", 120.0, False, 0, 64, (0, 1), 33, "100% GPU"),      # must spread
    ("2x80GB", 200.0, False, 0, 128, (0, 1), 26, "23%/77% CPU/GPU"),
    ("1x24GB-nearly-full", 4.0, False, 0, 64, (0,), 2, "90%/10% CPU/GPU"),
    ("1x24GB-nearly-full", 20.0, False, 0.5, 64, (), 0, "100% CPU"),  # GPU too full: CPU only
]


@pytest.mark.parametrize(("state", "gib", "spread", "overhead", "host", "gpus", "ngl", "proc"), CASES)
def test_placement(state: str, gib: float, spread: bool, overhead: float, host: float,
                   gpus: tuple[int, ...] | None, ngl: int | None, proc: str | None) -> None:
    p = place(model(gib), snap(state, host), gpu_overhead=int(overhead * GiB), spread=spread)
    if gpus is None:
        assert p is None
        return
    assert p is not None
    assert (p.gpus, p.n_gpu_layers, p.processor) == (gpus, ngl, proc)
    assert p.gpu_bytes + p.cpu_bytes >= model(gib).total  # nothing is lost in the split


# A CUDA context on each GPU used and the runtime's host memory (Accountant passes GPU_CONTEXT
# and GPU_RUNTIME_HOST; round figures here). total includes one context and the runtime, as
# Accountant.correct adds them. Worked by hand: model(4.0) is 5.25 GiB.
CTX, RT = 600 * MiB, 350 * MiB
CONTEXT_CASES = [
    # 8 GB card (7882 MiB free): 5.25 GiB + 600 MiB fits on it; the runtime goes to the host
    ("1x8GB", 4.0, False, (0,), 33, int(5.25 * GiB) + CTX, RT),
    # 7.25 GiB (7424 MiB) fits in 7882 alone, not with the context (8024): partial. Per layer
    # (0.95 x 6 + 1) GiB / 32 = 214.4 MiB; (7882 - 600 - 256) / 214.4 = 32.8: the 32 repeating
    # layers, the output layer stays on the CPU
    ("1x8GB", 6.0, False, (0,), 32, None, None),
    # two 80 GB cards, spread: each has a context of its own
    ("2x80GB", 20.0, True, (0, 1), 33, int(21.25 * GiB) + 2 * CTX, RT),
    # 664 MiB free: a context (600) and the compute buffer (256) do not fit: CPU only, no context
    ("1x24GB-nearly-full", 4.0, False, (), 0, 0, int(5.25 * GiB)),
]


@pytest.mark.parametrize(("state", "gib", "spread", "gpus", "ngl", "gpu_bytes", "cpu_bytes"), CONTEXT_CASES)
def test_placement_counts_a_context_per_gpu_and_the_runtime_on_the_host(
        state: str, gib: float, spread: bool, gpus: tuple[int, ...], ngl: int, gpu_bytes: int | None,
        cpu_bytes: int | None) -> None:
    est = model(gib)
    p = place(est, snap(state), spread=spread, total=est.total + CTX + RT, context=CTX, runtime=RT)
    assert p is not None and (p.gpus, p.n_gpu_layers) == (gpus, ngl)
    if gpu_bytes is not None:
        assert (p.gpu_bytes, p.cpu_bytes) == (gpu_bytes, cpu_bytes)
    if p.gpus:  # the GPU part holds a context per GPU; the host part the runtime
        assert p.gpu_bytes >= CTX * len(p.gpus) and p.cpu_bytes >= RT
        # PROCESSOR as `ollama ps` says it: all layers on the GPU is 100% GPU (it said 33%/67% on
        # the H100, the runtime's host memory counted as the model's)
        assert (p.processor == "100% GPU") == (ngl == 33)
        assert p.gpu_bytes + p.cpu_bytes >= est.total + CTX * len(p.gpus) + RT


def test_without_a_context_the_nearly_full_gpu_took_layers_it_has_no_room_for() -> None:
    """664 MiB free: without counting the context, 2 layers looked as if they fit."""
    assert place(model(4.0), snap("1x24GB-nearly-full")).n_gpu_layers == 2  # type: ignore[union-attr]
    p = place(model(4.0), snap("1x24GB-nearly-full"), context=CTX, runtime=RT)
    assert p is not None and p.n_gpu_layers == 0 and p.gpus == ()


def test_tightest_gpu_that_holds_it_is_chosen() -> None:
    s = snap("2x80GB")
    s = replace(s, gpus=(replace(s.gpus[0], free=70 * GiB), replace(s.gpus[1], free=30 * GiB)))
    p = place(model(20.0), s)
    assert p is not None and p.gpus == (1,)  # leaves GPU 0's big hole for a bigger model


def test_reserve_counts_against_each_gpu_and_the_host() -> None:
    assert place(model(6.5), snap("1x8GB"), reserve=0) is not None
    p = place(model(6.5), snap("1x8GB"), reserve=1 * GiB)
    assert p is not None and p.n_gpu_layers is not None and p.n_gpu_layers < 33


def test_cpu_only_host() -> None:
    s = MemorySnapshot(host_total=16 * GiB, host_available=8 * GiB)
    p = place(model(4.0), s)
    assert p is not None and (p.gpus, p.n_gpu_layers, p.processor) == ((), None, "100% CPU")
    assert place(model(10.0), s) is None


def test_probe_reads_free_memory_and_per_pid_use() -> None:
    s = MemoryProbe(FakeNvml.state("1x24GB-nearly-full"), cgroup=False).snapshot([4242, os.getpid()])
    (gpu,) = s.gpus
    assert gpu.name == "NVIDIA GeForce RTX 4090" and gpu.free == (24564 - 23900) * MiB
    assert s.processes[4242].vram == 23480 * MiB
    me = s.processes[os.getpid()]
    assert me.vram == 0 and me.rss > 0
    assert process_rss(-1) == 0 and process_rss(_reaped_pid()) == 0
    assert 0 < s.host_available <= s.host_total


def test_no_nvml_and_failing_nvml_mean_host_only() -> None:
    assert MemoryProbe(None).snapshot().gpus == ()
    nv = FakeNvml.state("1x8GB")
    probe = MemoryProbe(nv, cgroup=False)
    assert len(probe.snapshot().gpus) == 1
    nv.fail = True
    assert probe.snapshot().gpus == () and probe.snapshot().gpus == ()
    assert probe._failed


def test_cgroup_limit_bounds_available(tmp_path: Path) -> None:
    (tmp_path / "proc").write_text("0::/system.slice/ollamad.service\n")
    svc = tmp_path / "cg" / "system.slice" / "ollamad.service"
    svc.mkdir(parents=True)
    (svc / "memory.max").write_text(f"{4 * GiB}\n")
    (svc / "memory.current").write_text(f"{1 * GiB}\n")
    (svc.parent / "memory.max").write_text("max\n")
    assert cgroup_limit(tmp_path / "proc", tmp_path / "cg") == 3 * GiB
    (svc.parent / "memory.max").write_text(f"{2 * GiB}\n")
    (svc.parent / "memory.current").write_text(f"{1 * GiB + 512 * MiB}\n")
    assert cgroup_limit(tmp_path / "proc", tmp_path / "cg") == 512 * MiB  # the tighter parent wins
    (svc / "memory.max").write_text("max\n")
    (svc.parent / "memory.max").write_text("max\n")
    assert cgroup_limit(tmp_path / "proc", tmp_path / "cg") is None


def test_buffer_lines_from_llama_server() -> None:
    lines = [
        "0.00.015.828 I load_tensors:   CPU_Mapped model buffer size =     1.38 MiB",
        "0.00.016.165 I llama_context:        CPU  output buffer size =     0.00 MiB",
        "0.00.017.029 I llama_kv_cache:        CPU KV buffer size =     8.00 MiB",
        "0.00.026.128 I sched_reserve:        CPU compute buffer size =    25.51 MiB",
        "load_tensors:        CUDA0 model buffer size =  4096.00 MiB",
        "llama_kv_cache:      CUDA0 KV buffer size =  1024.00 MiB",
        "sched_reserve:  CUDA_Host compute buffer size =    12.00 MiB",
        "0.00.023.860 I llama_kv_cache: size =    8.00 MiB (  4096 cells,   2 layers,  4/4 seqs)",
    ]
    b = parse_buffer_line(lines[0])
    assert b is not None and (b.device, b.kind, b.on_host) == ("CPU_Mapped", "model", True)
    r = reported(lines)
    assert r.host == int(1.38 * MiB) + int(8 * MiB) + int(25.51 * MiB) + 12 * MiB
    assert r.gpu == 5120 * MiB
    assert parse_offloaded("load_tensors: offloaded 3/33 layers to GPU") == (3, 33)


@pytest.mark.parametrize(("vram", "size", "text"), [
    (0, 100, "100% CPU"), (100, 100, "100% GPU"), (52, 100, "48%/52% CPU/GPU"), (0, 0, "100% CPU"),
])
def test_processor_strings(vram: int, size: int, text: str) -> None:
    assert processor(vram, size) == text


def _reaped_pid() -> int:
    p = subprocess.Popen(["true"])
    p.wait()
    return p.pid


def test_cgroup_v1_limit(tmp_path: Path) -> None:
    (tmp_path / "proc").write_text("4:memory:/docker/abc\n0::/\n")
    mem = tmp_path / "cg" / "memory"
    mem.mkdir(parents=True)  # the container sees its own cgroup at the mount point
    (mem / "memory.limit_in_bytes").write_text(f"{2 * GiB}\n")
    (mem / "memory.usage_in_bytes").write_text(f"{512 * MiB}\n")
    assert cgroup_limit(tmp_path / "proc", tmp_path / "cg") == 2 * GiB - 512 * MiB
    (mem / "memory.limit_in_bytes").write_text("9223372036854771712\n")  # unlimited
    assert cgroup_limit(tmp_path / "proc", tmp_path / "cg") is None
