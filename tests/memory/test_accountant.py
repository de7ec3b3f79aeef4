"""The accountant: learning from measurements, GPU placement of a plan, pressure end to end."""

from __future__ import annotations

import json
import sys
import threading
import time
import urllib.request
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from ollamad.api.native import _memory_fields
from ollamad.memory.accountant import Accountant
from ollamad.memory.fit import MemorySnapshot, Placement, ProcessUse
from ollamad.memory.probe import MemoryProbe
from ollamad.models.estimate import GPU_CONTEXT, GPU_RUNTIME_HOST, PROCESS_OVERHEAD, Estimate, MiB
from ollamad.models.plan import RunnerPlan
from tests.conftest import HERE, Daemon, model_plan
from tests.fake_nvml import FakeNvml, FakeProcess, GiB


def a_plan(models_dir: Path, name: str = "small") -> RunnerPlan:
    return model_plan(models_dir, name)


def host(pid: int, rss: int, vram: int = 0) -> MemorySnapshot:
    return MemorySnapshot(16 * GiB, 8 * GiB, (), {pid: ProcessUse(rss, vram)})


def test_learns_when_measured_differs_and_corrects_later_estimates(models_dir: Path) -> None:
    acct = Accountant(MemoryProbe(None))
    plan = a_plan(models_dir)
    on_line = acct.track(1, plan)
    on_line("load_tensors:   CPU_Mapped model buffer size =     9.51 MiB")
    obs = acct.observe(host(100, 30 * MiB), {1: 100}, ready=set())
    assert obs.counted == {1: 30 * MiB} and obs.memory == {} and acct.corrections == {}  # still loading
    big = 2 * plan.estimate
    obs = acct.observe(host(100, big), {1: 100}, ready={1})
    assert obs.memory == {1: big} and acct.corrections["small", False] == pytest.approx(2.0, rel=0.01)
    assert acct.correct(plan).estimate == pytest.approx(2 * plan.estimate, rel=0.01)
    assert acct.correct(replace(plan, model="other")).estimate == plan.estimate


def test_no_correction_within_tolerance(models_dir: Path) -> None:
    acct = Accountant(MemoryProbe(None))
    plan = a_plan(models_dir)
    assert plan.detail is not None
    on_line = acct.track(1, plan)
    for kind, size in (("model", plan.detail.weights), ("KV", plan.detail.kv), ("compute", plan.detail.compute)):
        on_line(f"x:        CPU {kind} buffer size = {size / MiB:.2f} MiB")
    acct.observe(host(100, 20 * MiB), {1: 100}, ready={1})  # RSS below buffers: compute not touched yet
    assert acct.corrections == {}
    assert acct.runners[1].holds == pytest.approx(plan.detail.buffers + PROCESS_OVERHEAD, rel=0.01)


@pytest.mark.parametrize(("state", "spread", "visible", "ngl"), [
    ("1x24GB", False, "0", 33), ("2x80GB", False, "0", 33), ("2x80GB", True, "0,1", 33),
    ("1x24GB-nearly-full", False, "", 0),  # 664 MiB free: no room for a CUDA context and a compute buffer
])
def test_placement_sets_layers_and_pins_gpus(state: str, spread: bool, visible: str, ngl: int) -> None:
    est = Estimate(weights=4 * GiB, kv=1 * GiB, recurrent=0, compute=256 * MiB, output=0, overhead=0,
                   layers=32, layer_weights=int(3.8 * GiB))  # a 7B-like model
    plan = RunnerPlan(model="m", path=Path("/m.gguf"), num_parallel=1, ctx=2048, estimate=est.total, detail=est)
    acct = Accountant(MemoryProbe(FakeNvml.state(state), cgroup=False), spread=spread)
    acct.snapshot = replace(acct.probe.snapshot(), host_available=64 * GiB)
    plan = acct.correct(plan)  # as the scheduler plans: what running on a GPU adds
    assert plan.estimate == est.total + GPU_CONTEXT + GPU_RUNTIME_HOST
    acct.track(1, plan)
    placed, env = acct.place(1, plan)
    assert env["CUDA_VISIBLE_DEVICES"] == visible and placed.n_gpu_layers == ngl
    argv = placed.argv("llama-server", 1)
    assert argv[argv.index("--n-gpu-layers") + 1] == str(ngl)


def test_cpu_only_host_places_nothing(models_dir: Path) -> None:
    acct = Accountant(MemoryProbe(None))
    acct.snapshot = acct.probe.snapshot()
    plan = a_plan(models_dir)
    assert acct.place(1, plan) == (plan, {})


# llama-server's lines for the 10 MB generated model, all 5 layers offloaded, recorded on an H100
# (CUDA build) and on a CPU-only host (a CPU build logs "offloaded 5/5 layers to GPU" as well)
H100_LOAD = """load_tensors: offloading output layer to GPU
load_tensors: offloading 3 repeating layers to GPU
load_tensors: offloaded 5/5 layers to GPU
load_tensors:   CPU_Mapped model buffer size =     0.25 MiB
load_tensors:        CUDA0 model buffer size =     9.26 MiB
llama_context:  CUDA_Host  output buffer size =     0.00 MiB
llama_kv_cache:      CUDA0 KV buffer size =    32.00 MiB
sched_reserve:      CUDA0 compute buffer size =    42.51 MiB
sched_reserve:  CUDA_Host compute buffer size =     9.51 MiB"""
CPU_LOAD = """load_tensors: offloaded 5/5 layers to GPU
load_tensors:   CPU_Mapped model buffer size =     9.51 MiB
llama_context:        CPU  output buffer size =     0.00 MiB
llama_kv_cache:        CPU KV buffer size =    32.00 MiB
sched_reserve:        CPU compute buffer size =    43.01 MiB"""


def feed(on_line: Callable[[str], None], lines: str) -> None:
    """Recorded llama-server lines, as the runner's output pump hands them over."""
    for line in lines.splitlines():
        on_line(f"0.00.307.182 I {line}")


def loaded(models_dir: Path, probe: MemoryProbe, lines: str, pid: int, rss: int) -> Accountant:
    """An accountant that saw one runner load (``lines``) and measured it once (NVML from ``probe``)."""
    acct = Accountant(probe)
    feed(acct.track(1, a_plan(models_dir)), lines)
    measured = probe.snapshot([pid])
    vram = measured.processes[pid].vram
    acct.observe(replace(measured, processes={pid: ProcessUse(rss, vram)}), {1: pid}, ready={1})
    return acct


def test_all_layers_on_the_gpu_is_100_percent_gpu(models_dir: Path) -> None:
    # as measured: NVML gives llama-server 670 MiB (its CUDA context and 83 MiB of buffers), RSS 350 MiB
    acct = loaded(models_dir, MemoryProbe(FakeNvml.state("1x80GB-llama-server"), cgroup=False), H100_LOAD,
                  5762, 367304704)
    rm = acct.runners[1]
    assert rm.offloaded == (5, 5) and rm.size_vram == 702545920  # /api/ps size_vram: NVML's figure
    assert rm.processor == "100% GPU"  # was "34%/66% CPU/GPU": the CUDA runtime's RSS counted as CPU


def test_a_runner_on_the_gpu_is_planned_with_its_cuda_context_and_learns_no_false_factor(models_dir: Path) -> None:
    """The H100 measurement: llama-server held 670 MiB of GPU memory and 350 MiB RSS for 84 MiB
    of buffers. Planned without the CUDA context and runtime, the model learnt a factor of 12.27
    and its next load asked for 1.29 GB, all of it counted as GPU memory."""
    probe = MemoryProbe(FakeNvml.state("1x80GB-llama-server"), cgroup=False)
    acct = Accountant(probe)
    acct.snapshot = probe.snapshot()
    plan = acct.correct(a_plan(models_dir))
    assert plan.detail is not None and plan.estimate == plan.detail.total + GPU_CONTEXT + GPU_RUNTIME_HOST
    on_line = acct.track(1, plan)
    placed, env = acct.place(1, plan)
    assert placed.n_gpu_layers == 5 and placed.gpus == (0,)
    assert env["CUDA_VISIBLE_DEVICES"] == "0" and acct.runners[1].placement is not None
    assert acct.runners[1].placement.cpu_bytes == GPU_RUNTIME_HOST  # the runtime: host memory, not GPU
    feed(on_line, H100_LOAD)
    measured = probe.snapshot([5762])
    acct.observe(replace(measured, processes={5762: ProcessUse(367304704, 702545920)}), {1: 5762}, ready={1})
    assert acct.corrections == {}  # 1070 MB held against about 1.1 GB planned: within TOLERANCE
    assert acct.correct(a_plan(models_dir)).estimate == plan.estimate
    # the same model on the CPU of that host (no room on the GPU): a factor of its own
    acct.runners[1].placement = Placement((), 0, 0, plan.detail.total)
    acct.observe(replace(measured, processes={5762: ProcessUse(241037312, 0)}), {1: 5762}, ready={1})
    assert set(acct.corrections) == {("small", False)}
    assert acct.correct(a_plan(models_dir)).estimate == plan.estimate  # not applied to a GPU load


# SmolLM2-135M on the same H100 with a request's num_gpu 10 (the placement said all 31 layers)
H100_PARTIAL = """load_tensors: offloading output layer to GPU
load_tensors: offloading 9 repeating layers to GPU
load_tensors: offloaded 10/31 layers to GPU
load_tensors:   CPU_Mapped model buffer size =    92.10 MiB
load_tensors:        CUDA0 model buffer size =    47.73 MiB
llama_context:  CUDA_Host  output buffer size =     0.75 MiB
llama_kv_cache:        CPU KV buffer size =   252.00 MiB
llama_kv_cache:      CUDA0 KV buffer size =   108.00 MiB
sched_reserve:      CUDA0 compute buffer size =    96.70 MiB
sched_reserve:  CUDA_Host compute buffer size =    11.01 MiB"""


def test_partial_offload_splits_by_llama_servers_buffers(models_dir: Path) -> None:
    # measured: NVML 944 MiB for the process, RSS 832 MiB; the old split of those read "47%/53% CPU/GPU"
    h100 = FakeNvml.state("1x80GB-llama-server").gpus[0]
    nvml = FakeNvml((replace(h100, processes=(FakeProcess(1936, 989855744),)),))
    acct = loaded(models_dir, MemoryProbe(nvml, cgroup=False), H100_PARTIAL, 1936, 872775680)
    rm = acct.runners[1]
    assert rm.offloaded == (10, 31) and rm.size_vram == 989855744
    assert rm.processor == "59%/41% CPU/GPU"  # 252 MiB of llama-server's buffers on the GPU, 356 MiB on the host
    rm.placement = Placement((0,), 31, 1862631424, 0)  # what the accountant chose before num_gpu overrode it
    fields = _memory_fields(SimpleNamespace(accountant=acct), 1, rm.holds)  # type: ignore[arg-type]
    assert fields["n_gpu_layers"] == 10 and fields["gpus"] == [0]  # /api/ps: what llama-server did


def test_a_cpu_build_saying_offloaded_stays_100_percent_cpu(models_dir: Path) -> None:
    acct = loaded(models_dir, MemoryProbe(None), CPU_LOAD, 5762, 62865408)
    assert acct.runners[1].offloaded == (5, 5) and acct.runners[1].processor == "100% CPU"


# --- end to end with the fake llama-server --------------------------------------------------
@pytest.fixture
def slow_fake(tmp_path: Path) -> Path:
    path = tmp_path / "llama-server"
    path.write_text(f"#!/bin/sh\nFAKE_TOKEN_DELAY=0.02 exec {sys.executable} {HERE / 'fake_llama_server.py'} \"$@\"\n")
    path.chmod(0o755)
    return path


def test_pressure_unloads_idle_runner_but_never_a_busy_one(daemon_factory: Any, slow_fake: Path,
                                                           models_dir: Path) -> None:
    d: Daemon = daemon_factory(slow_fake, models_dir, OLLAMAD_MEMORY_POLL="0.1s",
                               OLLAMAD_MEMORY_LOW_WATER="1000TiB")  # always under pressure
    done: dict[str, Any] = {}

    def stream() -> None:
        req = urllib.request.Request(d.url + "/api/generate", method="POST", data=json.dumps(
            {"model": "tiny", "prompt": "go", "options": {"num_predict": 100}}).encode())
        with urllib.request.urlopen(req, timeout=60) as r:
            done["lines"] = [json.loads(x) for x in r]

    t = threading.Thread(target=stream)
    t.start()
    t.join(60)
    lines = done["lines"]
    assert lines[-1]["done"] is True and lines[-1]["eval_count"] == 100  # never cut off
    assert len(lines) == 101
    deadline = time.monotonic() + 10
    while d.get("/api/ps")[1]["models"] and time.monotonic() < deadline:
        time.sleep(0.05)
    assert d.get("/api/ps")[1]["models"] == []  # idle: unloaded at once for the pressure
    assert "memory pressure" in d.log() and "low-water" in d.log()


def test_fake_server_measurement_corrects_the_next_estimate(daemon_factory: Any, fake_server: Path,
                                                            models_dir: Path) -> None:
    # 4 x 8192 context: the estimate (~130 MiB) is far above what the fake (a small Python process) uses
    d: Daemon = daemon_factory(fake_server, models_dir, OLLAMAD_MEMORY_POLL="0.1s", OLLAMA_CONTEXT_LENGTH="8192")
    assert d.post("/api/generate", {"model": "tiny"})[0] == 200
    time.sleep(0.5)
    (first,) = d.get("/api/ps")[1]["models"]
    assert first["reported_size"] == 0 and first["measured_size"] > 0  # the fake logs no buffers
    assert first["measured_size"] < 0.8 * first["estimated_size"]
    assert d.post("/api/generate", {"model": "tiny", "keep_alive": 0})[0] == 200
    deadline = time.monotonic() + 10
    while d.get("/api/ps")[1]["models"] and time.monotonic() < deadline:
        time.sleep(0.05)
    assert d.post("/api/generate", {"model": "tiny"})[0] == 200
    (second,) = d.get("/api/ps")[1]["models"]
    assert "estimate corrected from measurement" in d.log()
    # the fake (a Python process) is nothing like llama-server: the new estimate is what it measured
    assert second["estimated_size"] != first["estimated_size"]
    assert abs(second["estimated_size"] - first["accounted_size"]) <= 0.10 * first["accounted_size"]
