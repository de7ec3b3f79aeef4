#!/usr/bin/env python3
"""Benchmark: a model served locally vs split over two RPC workers on loopback ports.

    .venv/bin/python scripts/bench_rpc.py [--tokens 64] [--rounds 5] [--threads 1]

Runs three ``ollamad serve`` at once on the big generated model (360 MB f32): local; forced
onto two ``ollamad worker`` processes with the per-model setting ``rpc = "always"`` (the
least spread split); and, on two other workers, with a memory budget that only the
all-layers-remote split fits. Requests go round-robin, one at a time, so the three share
the machine's other load alike. Measures the load time (the first request's load_duration)
and generation tokens/s (eval_count / eval_duration, greedy, same prompt), and writes
benchmarks-rpc.json and the
"RPC workers" section of BENCHMARKS.md (between markers that scripts/bench.py keeps).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import aiohttp
import psutil

sys.path.insert(0, str(Path(__file__).resolve().parent))
from benchlib import ROOT, cpu_seconds, free_port, mean, ollamad

from ollamad.models.facts import facts_from_gguf
from ollamad.models.ggufmeta import read_gguf
from ollamad.models.plan import LoadOptions, ModelDefaults, PlanSettings, plan_candidates
from ollamad.models.testmodels import BIG, write_llama
from ollamad.runner.binary import find_llama_server
from ollamad.sched.rpcplace import with_workers
from ollamad.settings import load_settings

CACHE = Path.home() / ".cache" / "ollamad" / "bench-models"
BEGIN, END = "<!-- bench_rpc: begin -->", "<!-- bench_rpc: end -->"
CTX = 2048


def start_worker(port: int, log: Path, threads: int) -> subprocess.Popen[bytes]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("OLLAMA_", "OLLAMAD_"))}
    with open(log, "wb") as f:
        return subprocess.Popen([sys.executable, "-m", "ollamad.cli", "worker", "--host", "127.0.0.1",
                                 "--port", str(port), "--threads", str(threads)],
                                env=env, stdout=f, stderr=subprocess.STDOUT)


async def one(s: aiohttp.ClientSession, url: str, tokens: int) -> dict[str, Any]:
    body = {"model": "big", "prompt": "Once upon a time", "stream": False,
            "options": {"temperature": 0, "seed": 1, "num_predict": tokens}}
    async with s.post(url + "/api/generate", json=body) as r:
        out: dict[str, Any] = await r.json()
        assert r.status == 200, out
    return out


def runner_pids(daemon: int) -> list[int]:
    """The daemon's llama-server (started by the first request)."""
    return [c.pid for c in psutil.Process(daemon).children() if "--model" in c.cmdline()]


async def measure(daemons: dict[str, tuple[str, list[int]]], tokens: int, rounds: int) -> dict[str, Any]:
    """Round-robin over the daemons (url, pids that work for it), one request at a time, so that
    they share whatever else runs on the machine alike. The first round's load_duration is the
    load time; CPU time per token (all of a split's processes together) does not depend on what
    else runs."""
    res: dict[str, Any] = {name: {"rates": [], "cpu_ms": []} for name in daemons}
    async with aiohttp.ClientSession() as s:
        for i in range(rounds + 1):
            for name, (url, pids) in daemons.items():
                work = runner_pids(pids[0]) + pids[1:] if i else []  # its llama-server and workers' servers
                before = sum(cpu_seconds(p) for p in work)
                out = await one(s, url, tokens)
                if i == 0:
                    res[name]["load_s"] = out["load_duration"] / 1e9
                    continue
                res[name]["rates"].append(out["eval_count"] / (out["eval_duration"] / 1e9))
                res[name]["cpu_ms"].append(1000 * (sum(cpu_seconds(p) for p in work) - before) / out["eval_count"])
        for name, (url, _) in daemons.items():
            async with s.get(url + "/api/ps") as r:
                (m,) = (await r.json())["models"]
            res[name].update(tok_s=mean(res[name]["rates"]), cpu_ms_per_token=mean(res[name]["cpu_ms"]),
                             processor=m["processor"], workers=[w["endpoint"] for w in m.get("rpc_workers", [])])
    return res


def all_remote_budget(model: Path) -> int:
    """A local memory budget that only the all-layers-remote split fits (one slot)."""
    local = plan_candidates("big", model, facts_from_gguf(read_gguf(model)), PlanSettings(num_parallel=1),
                            ModelDefaults(), CTX, LoadOptions())
    splits = with_workers(local, {"a:1": 1e12, "b:1": 1e12}, "always")
    return splits[-1].estimate + 1024 * 1024


async def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--out", default=str(ROOT))
    ap.add_argument("--threads", type=int, default=1,
                    help="threads of each llama-server and worker (0: one per core); 1 keeps OpenMP threads "
                         "from spinning while they wait for each other on a busy machine")
    args = ap.parse_args()
    s = load_settings()
    binary = find_llama_server(s.llama_server, s.runners_dir)
    CACHE.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix="ollamad-bench-rpc-"))
    mdir = tmp / "models"
    mdir.mkdir()
    if not (CACHE / "big.gguf").exists():
        write_llama(CACHE / "big.gguf", BIG, name="big")
    (mdir / "big.gguf").symlink_to(CACHE / "big.gguf")
    forced = tmp / "models.toml"
    forced.write_text('[models."big"]\nrpc = "always"\n')
    ports = [free_port() for _ in range(4)]  # two workers for each split daemon: one client each
    workers = [start_worker(p, tmp / f"worker-{p}.log", args.threads) for p in ports]
    pair1, pair2 = (",".join(f"127.0.0.1:{p}" for p in ports[i:i + 2]) for i in (0, 2))
    budget = str(all_remote_budget(CACHE / "big.gguf"))
    base = {"OLLAMAD_THREADS": str(args.threads), "OLLAMA_NUM_PARALLEL": "1", "OLLAMA_CONTEXT_LENGTH": str(CTX),
            "OLLAMAD_STATE_DIR": str(tmp / "state")}
    configs = {
        "local": base,
        "split, least spread (rpc = \"always\")": {**base, "OLLAMAD_RPC_WORKERS": pair1,
                                                   "OLLAMAD_MODEL_SETTINGS": str(forced)},
        "split, all layers remote (memory budget)": {**base, "OLLAMAD_RPC_WORKERS": pair2,
                                                     "OLLAMAD_MEMORY_BUDGET": budget},
    }
    with (CACHE / "big.gguf").open("rb") as f:  # in the page cache for every load alike
        while f.read(1 << 24):
            pass
    t0, load_before = time.monotonic(), os.getloadavg()[0]
    try:
        await asyncio.sleep(1)
        async with contextlib.AsyncExitStack() as stack:
            procs = {name: await stack.enter_async_context(ollamad(binary, mdir, tmp, **env))
                     for name, env in configs.items()}
            servers = {name: [c.pid for w in ws for c in psutil.Process(w.pid).children()]
                       for name, ws in zip(configs, ([], workers[:2], workers[2:]), strict=True)}
            results = await measure({n: (p.url, [p.pid, *servers[n]]) for n, p in procs.items()},
                                    args.tokens, args.rounds)
        for name, r in results.items():
            print(f"[bench_rpc] {name}: {r}", flush=True)
    finally:
        for w in workers:
            w.terminate()
            w.wait(15)
    meta = {"date": time.strftime("%Y-%m-%d"), "machine": platform.machine(), "cpus": os.cpu_count(),
            "tokens": args.tokens, "rounds": args.rounds, "threads": args.threads, "seconds": time.monotonic() - t0,
            "load_before": load_before, "load_after": os.getloadavg()[0]}
    out = Path(args.out)
    (out / "benchmarks-rpc.json").write_text(json.dumps({"meta": meta, "results": results}, indent=2) + "\n")
    write_section(out / "BENCHMARKS.md", render(results, meta))
    print(f"[bench_rpc] wrote {out / 'BENCHMARKS.md'} and benchmarks-rpc.json in {meta['seconds']:.0f}s")


def render(results: dict[str, Any], meta: dict[str, Any]) -> str:
    local = results["local"]
    rows = "\n".join(
        f"| {name} | {r['processor']} | {len(r['workers'])} | {r['load_s']:.2f} | {r['tok_s']:.1f} | "
        f"{r['tok_s'] / local['tok_s']:.2f} | {r['cpu_ms_per_token']:.1f} | "
        f"{r['cpu_ms_per_token'] / local['cpu_ms_per_token']:.2f} |" for name, r in results.items())
    return f"""{BEGIN}
## RPC workers: local vs split over two loopback workers (big model)

{header(meta)}
Splitting is expected to be slower: the point is that a model too big for one machine runs.{busy_note(meta)}

| plan | PROCESSOR (/api/ps) | workers | load s | tokens/s | vs local | CPU ms per token | vs local |
|---|---|---|---|---|---|---|---|
{rows}
{END}"""


def header(meta: dict[str, Any]) -> str:
    command = (f"scripts/bench_rpc.py --tokens {meta['tokens']} --rounds {meta['rounds']} "
               f"--threads {meta.get('threads', 0)}")
    return (
        f"Measured {meta['date']} on {meta['machine']} ({meta['cpus']} CPUs) by `{command}`\n"
        f"({meta['seconds']:.0f} s; 1-minute load average {meta['load_before']:.1f} before, "
        f"{meta['load_after']:.1f} after): three `ollamad serve`\n"
        f"with one slot each, {meta['tokens']}-token greedy completions, {meta['rounds']} rounds after the load, "
        f"round-robin\nover the three; {threads_text(meta)} per llama-server and per worker. Every `ollamad worker` "
        "runs on\nthis machine, so all of them share the same cores and every token crosses loopback twice;\n"
        "across real machines the network adds its own latency per token. Tokens/s per round varied\n"
        "by up to 2x on this shared machine: compare the means, and the CPU time per token.")


def threads_text(meta: dict[str, Any]) -> str:
    n = meta.get("threads", 0)
    return "all cores" if not n else f"{n} thread" + ("s" if n > 1 else "")


def busy_note(meta: dict[str, Any]) -> str:
    if max(meta["load_before"], meta["load_after"]) < (meta["cpus"] or 1):
        return ""
    return ("\nThe machine was busy with other work during this run (load average above its core count):"
            "\na split runs as three processes (llama-server and two workers) instead of one and may get a"
            "\nlarger share of the cores, so tokens/s and load times measure that contention more than RPC"
            "\nitself. CPU time per token (the runner and its workers together) depends on it less.")


def write_section(path: Path, section: str) -> None:
    """Replace the marked section of BENCHMARKS.md (or append it)."""
    text = path.read_text() if path.exists() else "# Benchmarks\n"
    if BEGIN in text and END in text:
        head, rest = text.split(BEGIN, 1)
        text = head + section + rest.split(END, 1)[1]
    else:
        text = text.rstrip("\n") + "\n\n" + section + "\n"
    path.write_text(text)


if __name__ == "__main__":
    asyncio.run(main())
