"""A model too big for the local budget runs over two RPC workers (real ggml-rpc-server and
llama-server on loopback ports): same greedy tokens as locally, a worker killed mid-stream
fails that request quickly and the next is planned without it, a worker that comes back is
used again."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import Daemon, free_port, model_plan, runner_children
from tests.rpcworkers import Worker
from tests.streams import wait_until

pytestmark = pytest.mark.timeout(240)
MiB = 1024**2
GREEDY = {"temperature": 0, "seed": 42, "num_predict": 12, "top_k": 1}


def generate(d: Daemon, **extra: Any) -> str:
    status, body = d.post("/api/generate", {"model": "small", "prompt": "The capital of France is",
                                            "stream": False, "options": GREEDY, **extra})
    assert status == 200, body
    return str(body["response"])


def rpc_argv(d: Daemon) -> list[str]:
    (child,) = [c for c in runner_children(d) if c["model"].endswith("small.gguf")]
    argv: list[str] = child["argv"]
    return argv[argv.index("--rpc") + 1].split(",") if "--rpc" in argv else []


def worker_state(d: Daemon, endpoint: str) -> str:
    _, ps = d.get("/api/ps")
    return next(str(w["state"]) for w in ps["rpc_workers"] if w["endpoint"] == endpoint)


def test_a_model_too_big_here_runs_over_two_workers(tmp_path: Path, daemon_factory: Any, llama_server: Path,
                                                     models_dir: Path) -> None:
    local = daemon_factory(llama_server, models_dir, OLLAMA_CONTEXT_LENGTH="4096")
    expected = generate(local)
    assert rpc_argv(local) == []
    local.stop()

    w1 = Worker(free_port(), tmp_path / "w1.log")
    w2 = Worker(free_port(), tmp_path / "w2.log")
    w2b: Worker | None = None
    try:
        # a budget just under the smallest local plan (one slot): the model cannot load here alone
        budget = model_plan(models_dir, "small", num_parallel=1, ctx=4096).estimate - MiB
        d = daemon_factory(llama_server, models_dir, OLLAMA_CONTEXT_LENGTH="4096",
                           OLLAMAD_MEMORY_BUDGET=str(budget), OLLAMAD_RPC_CHECK_INTERVAL="0.5s",
                           OLLAMAD_RPC_WORKERS=f"{w1.endpoint},{w2.endpoint}")
        assert generate(d) == expected  # same greedy tokens as when local
        assert sorted(rpc_argv(d)) == sorted([w1.endpoint, w2.endpoint])
        _, ps = d.get("/api/ps")
        (m,) = ps["models"]
        assert m["processor"].endswith("% RPC") and "CPU" in m["processor"], m["processor"]
        assert {w["endpoint"] for w in m["rpc_workers"]} == {w1.endpoint, w2.endpoint}
        assert all(w["size"] > 0 for w in m["rpc_workers"])
        # what llama-server reported on the workers stays within what the plan counted for them
        assert sum(w["size"] for w in m["rpc_workers"]) <= sum(w["planned_size"] for w in m["rpc_workers"])
        assert m["estimated_size"] <= budget
        env = {k: v for k, v in os.environ.items() if not k.startswith("OLLAMA")}
        cli = subprocess.run([sys.executable, "-m", "ollamad.cli", "ps"], capture_output=True, text=True,
                             env={**env, "OLLAMA_HOST": f"127.0.0.1:{d.port}"}, timeout=30).stdout
        assert "% RPC" in cli and f"{w1.endpoint} held" in cli, cli

        # a worker dies mid-stream: that client gets an error line within seconds
        req = urllib.request.Request(d.url + "/api/generate", method="POST", data=json.dumps(
            {"model": "small", "prompt": "Once upon a time", "options": {**GREEDY, "num_predict": 100000}}).encode())
        with urllib.request.urlopen(req, timeout=60) as r:
            for _ in range(5):
                assert "response" in json.loads(r.readline())
            w2.kill()
            killed = time.monotonic()
            lines = [json.loads(ln) for ln in r if ln.strip()]
        took = time.monotonic() - killed
        assert lines and "error" in lines[-1], lines[-3:]
        assert took < 5, took
        assert "RPC workers" in lines[-1]["error"] and w2.endpoint in lines[-1]["error"]

        # the next request is served by a plan without it
        assert generate(d) == expected
        assert rpc_argv(d) == [w1.endpoint]
        assert worker_state(d, w2.endpoint) == "down"
        _, metrics = d.request("GET", "/metrics")
        assert f'ollamad_rpc_worker_up{{worker="{w2.endpoint}"}} 0.0' in metrics.decode()
        assert f'ollamad_rpc_worker_up{{worker="{w1.endpoint}"}} 1.0' in metrics.decode()

        # it comes back: the next load uses it again
        w2b = Worker(w2.port, tmp_path / "w2b.log")
        wait_until(lambda: worker_state(d, w2.endpoint) == "up", "the worker to be seen up again", timeout=20)
        status, _ = d.post("/api/generate", {"model": "small", "keep_alive": 0})
        assert status == 200
        wait_until(lambda: not d.get("/api/ps")[1]["models"], "the model to unload", timeout=20)
        assert generate(d) == expected
        assert sorted(rpc_argv(d)) == sorted([w1.endpoint, w2.endpoint])
    finally:
        for w in (w1, w2, w2b):
            if w is not None:
                w.stop()
