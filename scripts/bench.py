#!/usr/bin/env python3
"""All benchmarks in one run: ollamad vs llama-server itself, and vs Ollama-style FIFO.

    .venv/bin/python scripts/bench.py [--quick] [--only NAME,...]

Writes BENCHMARKS.md (tables, targets beside measured values) and benchmarks.json.
Every figure is a ratio or a pair measured in the same run. Loopback only; bounded in time.
Benchmarks: overhead, scaling, relay, queue, swap, coldstart.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import platform
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import aiohttp

sys.path.insert(0, str(Path(__file__).resolve().parent))
from benchlib import (
    ROOT,
    Result,
    Run,
    ask,
    bare_server,
    cpu_seconds,
    free_port,
    mean,
    ollamad,
    paired_median_ms,
    pct,
    rank_paired_median_ms,
    rss,
    run_clients,
    runner_http_threads,
    spawned,
    stream_direct,
    stream_ollama,
    text_seeds,
)
from benchpeers import ci_text, geomean_ci, peers, render_peers, swap_router

from ollamad.models.testmodels import BIG, SMALL, write_llama
from ollamad.runner.binary import find_llama_server, patches
from ollamad.settings import load_settings

CACHE = Path.home() / ".cache" / "ollamad" / "bench-models"
FAKE = ROOT / "tests" / "fake_llama_server.py"
PROMPT = "Once upon a time"


def models(quick: bool) -> Path:
    """Generated models for the benchmarks, cached (the big one is 360 MB)."""
    CACHE.mkdir(parents=True, exist_ok=True)
    if not (CACHE / "big.gguf").exists():
        write_llama(CACHE / "big.gguf", BIG, name="big")
    for name in ("a", "b"):
        if not (CACHE / f"{name}.gguf").exists():
            write_llama(CACHE / f"{name}.gguf", SMALL, name=name, seed=ord(name))
    return CACHE


def only(folder: Path, *names: str) -> Path:
    """A folder holding just these models (symlinks), so each run lists only what it uses."""
    d = Path(tempfile.mkdtemp(prefix="bench-models-"))
    for n in names:
        (d / f"{n}.gguf").symlink_to(folder / f"{n}.gguf")
    return d


def fake_binary(tmp: Path) -> Path:
    path = tmp / "llama-server"
    path.write_text(f"#!/bin/sh\nexec {sys.executable} {FAKE} \"$@\"\n")
    path.chmod(0o755)
    return path


# --- 1 and 2 ----------------------------------------------------------------------------
async def overhead(binary: Path, mdir: Path, tmp: Path, quick: bool) -> dict[str, Any]:
    """Same streaming workload (64-token completions) direct to llama-server and through ollamad.

    Both run side by side, idle in turn: rounds alternate between the two paths (and which goes
    first), so a machine that slows down or speeds up during the run weighs on both alike.
    Both paths get the same prompts and seeds, chosen so the first token is whole text (see
    ``text_seeds``), so each request's TTFT is paired with its twin on the other path.
    """
    return {"np1": await _overhead(binary, mdir, tmp, 1, 6 if quick else 16, 2),
            "np4": await _overhead(binary, mdir, tmp, 4, 2 if quick else 6, 2),
            # llama-server on one thread leaves a core to the daemon and the client: TTFT without
            # CPU contention (shorter completions: only the first token is of interest here)
            "np1_threads1": await _overhead(binary, mdir, tmp, 1, 4 if quick else 12, 2, n_tok=8, threads=1)}


async def _overhead(binary: Path, mdir: Path, tmp: Path, np_: int, rounds: int, per_client: int,
                    n_tok: int = 64, threads: int = 0) -> dict[str, Any]:
    ctx, clients = 2048, np_
    extra = {"OLLAMAD_THREADS": str(threads)} if threads else {}
    per_round = clients * per_client
    seeds: list[int] = []

    def seed_of(rnd: int, c: int, i: int) -> int:
        """The seed of round ``rnd``'s ``i``-th request of client ``c``, the same on both paths."""
        return seeds[rnd * per_round + c * per_client + i]

    direct, proxied = Run(), Run()
    async with (bare_server(binary, mdir / "big.gguf", tmp, np_, ctx, threads) as srv,
                ollamad(binary, only(mdir, "big"), tmp, OLLAMA_NUM_PARALLEL=str(np_),
                        OLLAMA_CONTEXT_LENGTH=str(ctx), OLLAMA_KEEP_ALIVE="1h", **extra) as d):
        seeds += await text_seeds(srv.url, PROMPT, rounds * per_round)

        def one(path: str, rnd: int) -> Any:
            async def call(s: aiohttp.ClientSession, c: int, i: int) -> Result:
                seed = seed_of(rnd, c, i)
                if path == "direct":
                    return await stream_direct(s, srv.url, PROMPT, n_tok, seed)
                return await stream_ollama(s, d.url, "big", PROMPT, n_tok, seed)
            return call

        await run_clients(1, 1, one("direct", 0))  # warm-up; ollamad's also loads the model
        await run_clients(1, 1, one("ollamad", 0))
        for rnd in range(rounds):
            order = ("direct", "ollamad") if rnd % 2 == 0 else ("ollamad", "direct")
            for path in order:
                run = await run_clients(clients, per_client, one(path, rnd))
                (direct if path == "direct" else proxied).add(run)
        errors = proxied.errors()
        if errors:
            kept = Path(tempfile.gettempdir()) / f"bench-failed-{d.log.name}"
            shutil.copy(d.log, kept)
            print(f"[bench] overhead np{np_}: {len(errors)} failed through ollamad: {errors[:3]}; log {kept}",
                  flush=True)
    return {
        "slots": np_, "threads": threads or "default", "tokens_per_request": n_tok,
        "requests": len(direct.results), "direct_ok": len(direct.ok), "ollamad_ok": len(proxied.ok),
        "ollamad_errors": proxied.errors(),
        "direct_tokens": sum(r.tokens for r in direct.ok), "ollamad_tokens": sum(r.tokens for r in proxied.ok),
        "direct_tokens_per_s": direct.tokens_per_s(), "ollamad_tokens_per_s": proxied.tokens_per_s(),
        "ratio": proxied.tokens_per_s() / direct.tokens_per_s(),
        "direct_ttft_p50_ms": direct.ttft_ms(50), "ollamad_ttft_p50_ms": proxied.ttft_ms(50),
        "direct_ttft_p99_ms": direct.ttft_ms(99), "ollamad_ttft_p99_ms": proxied.ttft_ms(99),
        "ttft_p50_added_ms": proxied.ttft_ms(50) - direct.ttft_ms(50),
        "ttft_added_paired_median_ms": paired_median_ms(direct.ok, proxied.ok),  # the same requests
        # pairs by rank among the requests sent at once (a round's i-th request of every client)
        "ttft_added_rank_paired_median_ms": rank_paired_median_ms(direct.ok, proxied.ok, {
            seed_of(rnd, c, i): (rnd, i) for rnd in range(rounds) for c in range(clients) for i in range(per_client)}),
    }


async def scaling(binary: Path, mdir: Path, tmp: Path, quick: bool) -> dict[str, Any]:
    """Aggregate tokens/s through ollamad for OLLAMA_NUM_PARALLEL = 1, 2, 4 (8 clients), and
    straight to llama-server with --parallel 1 and 4 for what the machine itself gives.

    The daemons and servers run side by side and the rounds rotate over them, so the machine's
    drift (one daemon measured minutes after another moved the 4-vs-1 ratio from 1.6 to 2.4)
    weighs on all alike.
    """
    rounds = 1 if quick else 8
    keys = ("np1", "np2", "np4", "direct_np1", "direct_np4")
    runs: dict[str, Run] = {k: Run() for k in keys}
    per_round: dict[str, list[float]] = {k: [] for k in keys}  # tokens/s of each round
    big = mdir / "big.gguf"
    async with contextlib.AsyncExitStack() as stack:
        urls: dict[str, str] = {}
        for np_ in (1, 2, 4):
            d = await stack.enter_async_context(ollamad(binary, only(mdir, "big"), tmp, OLLAMA_NUM_PARALLEL=str(np_),
                                                        OLLAMA_CONTEXT_LENGTH="1024"))
            urls[f"np{np_}"] = d.url
        for np_ in (1, 4):
            # the HTTP threads ollamad gives its runners: with llama-server's default pool
            # (max(parallel + 2, cores - 1): 3 threads at 1 slot) 8 kept-alive clients waited for
            # one another's connections, 54-62 tok/s at 1 slot against 82-105 with 24 threads
            srv = await stack.enter_async_context(bare_server(binary, big, tmp, np_, 1024, extra=(
                "--threads-http", str(runner_http_threads(np_)))))
            urls[f"direct_np{np_}"] = srv.url

        def one(key: str, n: int, seed0: int) -> Any:
            if key.startswith("direct"):
                return lambda s, c, i: stream_direct(s, urls[key], PROMPT, n, seed0 + 100 * c + i)
            return lambda s, c, i: stream_ollama(s, urls[key], "big", PROMPT, n, seed0 + 100 * c + i)

        for key in keys:
            await run_clients(1, 1, one(key, 8, 1))
        for rnd in range(rounds):
            order = keys[rnd % len(keys):] + keys[:rnd % len(keys)]
            for key in order:
                run = await run_clients(8, 1, one(key, 64, 1000 * rnd))
                runs[key].add(run)
                per_round[key].append(run.tokens_per_s())
    out: dict[str, Any] = {k: {"tokens_per_s": run.tokens_per_s(), "requests": len(run.ok), "rounds": per_round[k]}
                           for k, run in runs.items()}
    out["rounds"] = rounds
    out["ratio_4_vs_1"] = out["np4"]["tokens_per_s"] / out["np1"]["tokens_per_s"]
    out["direct_ratio_4_vs_1"] = out["direct_np4"]["tokens_per_s"] / out["direct_np1"]["tokens_per_s"]
    # the same ratios round by round (each round runs every key once), with their 95% intervals;
    # and ollamad's 4-vs-1 over llama-server's own in the same round: what the daemon costs the scaling
    ours = [a / b for a, b in zip(per_round["np4"], per_round["np1"], strict=True)]
    theirs = [a / b for a, b in zip(per_round["direct_np4"], per_round["direct_np1"], strict=True)]
    out["ratio_4_vs_1_mean"], out["ratio_4_vs_1_ci"] = geomean_ci(ours)
    out["direct_ratio_4_vs_1_mean"], out["direct_ratio_4_vs_1_ci"] = geomean_ci(theirs)
    out["scaling_vs_direct"], out["scaling_vs_direct_ci"] = geomean_ci(
        [a / b for a, b in zip(ours, theirs, strict=True)])
    return out


# --- 3 and 4: the fake llama-server isolates the daemon's own cost ------------------------
RELAY_FAMILIES = (("generate", True), ("chat", True), ("v1chat", True),
                  ("generate", False), ("chat", False), ("v1chat", False))


BEFORE = "011f24f"  # the relay before issue 15


def source_at(commit: str, tmp: Path) -> Path:
    """The ``ollamad`` package as it was at ``commit``, in a folder of its own."""
    dest = tmp / f"src-{commit}"
    if not dest.exists():
        dest.mkdir()
        archive = subprocess.run(["git", "-C", str(ROOT), "archive", commit, "ollamad"], check=True,
                                 capture_output=True).stdout
        subprocess.run(["tar", "-x", "-C", str(dest)], input=archive, check=True)
    return dest


async def relay(binary: Path, mdir: Path, tmp: Path, quick: bool) -> dict[str, Any]:
    """The daemon's own CPU per relayed token, per route family, with an instant fake llama-server,
    for this version and the one before issue 15 side by side.

    Rounds go over the families in turn (twice), each on both versions one after the other (which
    goes first alternates), so a machine busy with something else for a while weighs on both alike;
    a daemon's CPU time is read before and after each batch.
    """
    fake = fake_binary(tmp)
    n, tok = (160 if quick else 800), 64
    out: dict[str, Any] = {"tokens_per_request": tok}
    before: dict[str, Any] = {"commit": BEFORE, "tokens_per_request": tok}
    env = {"OLLAMA_NUM_PARALLEL": "4", "FAKE_TOKENS": str(tok)}
    async with (ollamad(fake, only(mdir, "a"), tmp, **env) as d,
                ollamad(fake, only(mdir, "a"), tmp, src=source_at(BEFORE, tmp), **env) as old):
        cpu: dict[tuple[str, str], float] = {}
        runs: dict[tuple[str, str], Run] = {}
        for daemon in (d, old):
            for route, stream in RELAY_FAMILIES:  # warm-up: every code path once
                await run_clients(1, 1, lambda s, c, i, r=route, st=stream, u=daemon.url: ask(s, u, r, "a", "x", tok,
                                                                                               1, st))
        for rnd in range(2):
            for k, (route, stream) in enumerate(RELAY_FAMILIES):
                key = f"{route}_{'stream' if stream else 'whole'}"
                for which, daemon in ((("after", d), ("before", old)) if (rnd + k) % 2 == 0
                                      else (("before", old), ("after", d))):
                    cpu0 = cpu_seconds(daemon.pid)
                    run = await run_clients(4, n // 8, lambda s, c, i, r=route, st=stream, u=daemon.url: ask(
                        s, u, r, "a", "x", tok, 1, st))
                    cpu[(which, key)] = cpu.get((which, key), 0.0) + cpu_seconds(daemon.pid) - cpu0
                    runs.setdefault((which, key), Run()).add(run)
        for (which, key), run in runs.items():
            tokens = sum(r.tokens for r in run.ok)
            used = cpu[(which, key)]
            (out if which == "after" else before)[key] = {
                "requests": len(run.results), "ok": len(run.ok), "tokens": tokens,
                "requests_per_s": len(run.ok) / run.wall, "daemon_cpu_s": used,
                "daemon_cpu_us_per_token": 1e6 * used / max(tokens, 1),
                "daemon_cpu_us_per_request": 1e6 * used / max(len(run.ok), 1)}
        out.update(await _first_chunk_latency(d.url, mdir / "a.gguf", 100 if quick else 400))
    out["before"] = before
    return out


async def _first_chunk_latency(url: str, model: Path, n: int) -> dict[str, Any]:
    """One-token requests in turn to a fake llama-server alone and through ollamad (whose runner
    is the same fake): the time to the first chunk that the daemon's own path adds, idle machine."""
    port = free_port()
    async with spawned([sys.executable, str(FAKE), "--port", str(port), "--model", str(model)], port, None,
                       "/health") as fake:
        direct, proxied = Run(), Run()
        async with aiohttp.ClientSession() as s:
            for i in range(n):
                direct.results.append(await stream_direct(s, fake.url, "x", 1, i))
                proxied.results.append(await stream_ollama(s, url, "a", "x", 1, i))
    return {"first_chunk_direct_p50_ms": direct.ttft_ms(50), "first_chunk_ollamad_p50_ms": proxied.ttft_ms(50),
            "first_chunk_added_paired_median_ms": paired_median_ms(direct.ok, proxied.ok), "first_chunk_requests": n}


async def queue(binary: Path, mdir: Path, tmp: Path, quick: bool) -> dict[str, Any]:
    fake = fake_binary(tmp)
    depth = 200 if quick else 500
    async with ollamad(fake, only(mdir, "a"), tmp, OLLAMA_NUM_PARALLEL="1", OLLAMA_MAX_QUEUE=str(depth),
                       FAKE_TOKEN_DELAY="0.5", FAKE_TOKENS="100") as d:
        conn = aiohttp.TCPConnector(limit=0)
        async with aiohttp.ClientSession(connector=conn, timeout=aiohttp.ClientTimeout(total=600)) as s:
            await stream_ollama(s, d.url, "a", "", 1, 1)  # load
            rss0 = rss(d.pid)
            hold = [asyncio.create_task(stream_ollama(s, d.url, "a", "x", 100, 1)) for _ in range(depth + 1)]
            while True:
                async with s.get(d.url + "/api/ps") as r:
                    if (await r.json())["queue"]["waiting"] >= depth:
                        break
                await asyncio.sleep(0.05)
            rss1 = rss(d.pid)
            lat = []
            statuses = []
            for _ in range(200 if quick else 500):
                t0 = time.monotonic()
                async with s.post(d.url + "/api/generate", json={"model": "a", "prompt": "x"}) as r:
                    await r.read()
                    statuses.append(r.status)
                lat.append(time.monotonic() - t0)
            for t in hold:
                t.cancel()
            await asyncio.gather(*hold, return_exceptions=True)
    return {"queued": depth, "refusals": len(lat), "all_503": all(x == 503 for x in statuses),
            "p50_ms": 1000 * pct(lat, 50), "p99_ms": 1000 * pct(lat, 99),
            "rss_before_mb": rss0 / 2**20, "rss_full_mb": rss1 / 2**20,
            "bytes_per_queued_request": (rss1 - rss0) / depth}


# --- 5: alternating two-model workload with room for one ----------------------------------
async def swap(binary: Path, mdir: Path, tmp: Path, quick: bool) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for clients in (4, 8):
        out[f"clients{clients}"] = await _swap(binary, mdir, tmp, clients, (24 if quick else 48) // clients)
    return out


async def _swap(binary: Path, mdir: Path, tmp: Path, clients: int, per_client: int) -> dict[str, Any]:
    out: dict[str, Any] = {"clients": clients}
    for policy in ("fifo", "affinity"):
        async with ollamad(binary, only(mdir, "a", "b"), tmp, OLLAMA_MAX_LOADED_MODELS="1",
                           OLLAMA_NUM_PARALLEL="2", OLLAMAD_SCHED_POLICY=policy,
                           OLLAMA_CONTEXT_LENGTH="1024") as d:
            async def one(s: aiohttp.ClientSession, c: int, i: int, url: str = d.url) -> Any:
                model = "ab"[(c + i) % 2]  # every client alternates; half start on each model
                return await stream_ollama(s, url, model, PROMPT, 16, 10 * c + i)

            run = await run_clients(clients, per_client, one)
            loads = d.log.read_text().count('"loading model"')
        out[policy] = {"requests": len(run.results), "ok": len(run.ok), "loads": loads, "total_s": run.wall,
                       "longest_wait_s": max(r.wait for r in run.ok), "longest_request_s": max(r.total for r in run.ok)}
    out["loads_ratio"] = out["affinity"]["loads"] / out["fifo"]["loads"]
    return out


# --- 6: cold start ------------------------------------------------------------------------
COLD_PROMPT = "Once"


async def coldstart(binary: Path, mdir: Path, tmp: Path, quick: bool) -> dict[str, Any]:
    """First request for an unloaded model to its first token, against llama-server alone.

    llama-server alone is timed from spawn to /health 200 (the issue's yardstick) and on to the
    first token of the same request (same short prompt and seed) sent the moment it is healthy:
    the second difference is what ollamad itself adds.
    """
    reps = 3 if quick else 7
    healthy, bare_first, through = [], [], []
    seed = 0
    async with aiohttp.ClientSession() as s:
        for k in range(reps + 1):
            t0 = time.monotonic()
            async with bare_server(binary, mdir / "big.gguf", tmp, 1, 2048) as srv:
                t1 = time.monotonic()
                if k == 0:  # a first, unrecorded start warms the page cache and picks the seed
                    seed = (await text_seeds(srv.url, COLD_PROMPT, 1))[0]
                    continue
                r = await stream_direct(s, srv.url, COLD_PROMPT, 1, seed)
                healthy.append(t1 - t0)
                bare_first.append(t1 - t0 + r.ttft)
        async with ollamad(binary, only(mdir, "big"), tmp, OLLAMA_NUM_PARALLEL="1",
                           OLLAMA_CONTEXT_LENGTH="2048") as d:
            for _ in range(reps):
                r = await stream_ollama(s, d.url, "big", COLD_PROMPT, 1, seed, keep_alive=0)
                through.append(r.ttft)
                while True:  # wait for the unload before the next cold start
                    async with s.get(d.url + "/api/ps") as resp:
                        if not (await resp.json())["models"]:
                            break
                    await asyncio.sleep(0.05)
    return {"llama_server_healthy_s": mean(healthy), "llama_server_first_token_s": mean(bare_first),
            "ollamad_first_token_s": mean(through),
            "added_ms": 1000 * (mean(through) - mean(healthy)),
            "added_vs_first_token_ms": 1000 * (mean(through) - mean(bare_first)), "reps": reps,
            "prompt": COLD_PROMPT, "seed": seed,
            "healthy_all_s": healthy, "bare_first_token_all_s": bare_first, "ollamad_all_s": through}


BENCHES = {"overhead": overhead, "scaling": scaling, "relay": relay, "queue": queue, "swap": swap,
           "coldstart": coldstart, "peers": peers, "swap_router": swap_router}


def render(res: dict[str, Any], meta: dict[str, Any]) -> str:
    def f(x: float, d: int = 1) -> str:
        return f"{x:.{d}f}"

    lines = ["# Benchmarks", "", f"Measured {meta['date']} on {meta['machine']} ({meta['cpus']} CPUs), "
             f"llama-server {meta['llama_server']}"
             + (f" with runners/patches/ {', '.join(p.split('-')[0] for p in meta['llama_server_patches'])}"
                if meta.get("llama_server_patches") else "")
             + f"; `{meta['command']}` took {f(meta['seconds'], 0)} s.",
             *([f"Load average (1 min) at the start and the end: {f(meta['load_average_start_end'][0])} and "
                f"{f(meta['load_average_start_end'][1])} (other work on the machine)."]
               if meta.get("load_average_start_end") else []),
             *([f"Sections {', '.join(meta['earlier']['kept'])} are from the run of {meta['earlier']['date']} "
                f"(`{meta['earlier']['command']}`, {f(meta['earlier']['seconds'], 0)} s); the rest was measured "
                "in this one."] if meta.get("earlier") else []),
             "Every figure is a ratio or a pair measured in the same run. Generated models with random "
             "weights (big: 360 MB f32 llama, small: 10 MB).", ""]
    if "overhead" in res:
        lines += ["## 1. Proxy overhead (64-token streaming completions, big model)", "",
                  "Both paths get the same prompt and the same seeds, picked so that the first token is whole "
                  "text: the generated models' byte tokens otherwise hold back the first content for a "
                  "varying number of tokens. TTFT added is the median, over requests, of the difference with "
                  "the request of the same rank sent directly: within each wave of requests sent at once (one "
                  "per client), the fastest first token through ollamad against the fastest sent directly, "
                  "the second against the second, and so on (with 1 slot, the same request). llama-server "
                  "evaluates the first of simultaneous requests alone and batches the others after it (straight "
                  "to it, 4 at once: the first token at 12.5 ms for one, about 44 ms for the other three), so "
                  "which request wins is a race on either path; the median of the differences between the same "
                  "requests, which counts that race, and the difference of the two p50s are beside it. The direct "
                  "request names the sampling settings ollamad sends (Ollama's defaults) and, as ollamad does "
                  "for a seeded request, asks llama-server not to reuse its prompt cache.", "",
                  "| slots | requests | direct tok/s | ollamad tok/s | ratio (target >= 0.97) | "
                  "TTFT p50 direct / ollamad ms | TTFT added, paired by rank, median ms (target <= 3) | "
                  "same requests, median ms | difference of p50s ms | TTFT p99 direct / ollamad ms |",
                  "|---|---|---|---|---|---|---|---|---|---|"]
        for v in res["overhead"].values():
            label = f"{v['slots']}" + (f" ({v['threads']} thread, {v['tokens_per_request']} tokens)"
                                       if v["threads"] != "default" else "")
            lines.append(f"| {label} | {v['requests']} | {f(v['direct_tokens_per_s'])} | "
                         f"{f(v['ollamad_tokens_per_s'])} | "
                         f"{f(v['ratio'], 3)} | {f(v['direct_ttft_p50_ms'])} / {f(v['ollamad_ttft_p50_ms'])} | "
                         + (f"**{f(v[rank], 2)}** | " if (rank := "ttft_added_rank_paired_median_ms") in v else "- | ")
                         + f"{f(v['ttft_added_paired_median_ms'], 2)} | {f(v['ttft_p50_added_ms'], 2)} | "
                         f"{f(v['direct_ttft_p99_ms'])} / {f(v['ollamad_ttft_p99_ms'])} |")
        lines += ["", "With llama-server's threads on every core (the default), each token the daemon relays "
                  "waits for the daemon, and then the client, to get a core back: the added TTFT is mostly that "
                  "wait. The row with llama-server on one thread leaves a core free, and section 3 measures the "
                  "daemon's own path with an instant fake llama-server on an idle machine. Profiling that path "
                  "(py-spy, one-token requests) shows its time spread over aiohttp's and asyncio's request "
                  "handling; renicing the runners was tried and measured no better. The daemon runs on uvloop "
                  "(OLLAMAD_EVENT_LOOP). What profiling found and fixed is listed at the end.", ""]
    if "scaling" in res:
        s = res["scaling"]
        lines += ["## 2. Parallel scaling through ollamad (big model, 8 clients)", "",
                  f"8 clients x 1 request of 64 tokens per round, {s.get('rounds', 1)} rounds rotating over the "
                  "daemons (and, for what this machine gives by itself, llama-server with --parallel 1 and 4, "
                  "the same requests), all running side by side. The llama-servers get the --threads-http "
                  "that ollamad gives its runners: with llama-server's default pool (3 threads at 1 slot) the "
                  "8 kept-alive clients waited for one another's connections, and the 1-slot row fell from "
                  "82-105 to 54-62 tok/s (an experiment beside this benchmark), which made llama-server's own "
                  "4-vs-1 look like 2.5-2.8x.", "",
                  "| OLLAMA_NUM_PARALLEL | through ollamad tokens/s | straight to llama-server tokens/s |",
                  "|---|---|---|"]
        for k in ("np1", "np2", "np4"):
            direct = s.get(f"direct_{k}")
            lines.append(f"| {k[2:]} | {f(s[k]['tokens_per_s'])} | {f(direct['tokens_per_s']) if direct else '-'} |")
        lines += ["", f"4 vs 1: **{f(s['ratio_4_vs_1'], 2)}x** (target >= 2x)"
                  + (f"; straight to llama-server {f(s['direct_ratio_4_vs_1'], 2)}x" if "direct_ratio_4_vs_1" in s
                     else ""), ""]
        if "scaling_vs_direct" in s:
            lines += [f"Round by round (geometric mean, 95% interval): through ollamad "
                      f"{ci_text(s['ratio_4_vs_1_mean'], s['ratio_4_vs_1_ci'])}x, straight to llama-server "
                      f"{ci_text(s['direct_ratio_4_vs_1_mean'], s['direct_ratio_4_vs_1_ci'])}x; ollamad's 4 vs 1 over "
                      "llama-server's own in the same round: "
                      f"**{ci_text(s['scaling_vs_direct'], s['scaling_vs_direct_ci'])}**. llama-server by itself "
                      "is what this machine gives: its own 4 vs 1 read 2.00x, 1.90x and 1.88x in three runs of this "
                      "section on 2026-11-25 (4 rounds each), ollamad's 1.84x, 2.08x and 1.90x.", ""]
    if "relay" in res:
        r = res["relay"]
        before = r.get("before", {})
        lines += [f"## 3. Pure relay cost (fake llama-server answering instantly, {r['tokens_per_request']} tokens "
                  "per request)", "",
                  "Daemon CPU (user + system) per relayed token, per route family; 4 clients, rounds over the "
                  "families in turn, each on this version and on the relay as it was (commit 011f24f, *before*), "
                  "run side by side in the same rounds. Issue 15's target: at most a third of the "
                  "85.8 µs per streamed chunk this section showed before, i.e. <= 28.6 µs.", "",
                  "| route | stream | requests/s | µs per token, before | µs per token | µs per request |",
                  "|---|---|---|---|---|---|"]
        for key, v in r.items():
            if not isinstance(v, dict) or key == "before":
                continue
            route, mode = key.rsplit("_", 1)
            was = before.get(key, {}).get("daemon_cpu_us_per_token")
            lines.append(f"| {route} | {mode == 'stream'} | {f(v['requests_per_s'])} | "
                         f"{f(was) if was is not None else '-'} | **{f(v['daemon_cpu_us_per_token'])}** | "
                         f"{f(v['daemon_cpu_us_per_request'], 0)} |")
        lines += ["", f"- time to the first chunk, one-token requests in turn ({r['first_chunk_requests']} each): "
                  f"fake alone {f(r['first_chunk_direct_p50_ms'], 2)} ms, through ollamad "
                  f"{f(r['first_chunk_ollamad_p50_ms'], 2)} ms (p50); added, paired median: "
                  f"**{f(r['first_chunk_added_paired_median_ms'], 2)} ms**", ""]
    if "queue" in res:
        q = res["queue"]
        lines += ["## 4. Queue", "", f"- 503 at a full queue ({q['queued']} waiting): p50 {f(q['p50_ms'], 2)} ms, "
                  f"p99 **{f(q['p99_ms'], 2)} ms** (target < 5 ms); all 503: {q['all_503']}",
                  f"- daemon memory per queued request: {f(q['bytes_per_queued_request'] / 1024)} KiB "
                  f"(RSS {f(q['rss_before_mb'])} -> {f(q['rss_full_mb'])} MiB)", ""]
    if "swap" in res:
        lines += ["## 5. Model swapping (two 10 MB models, room for one, closed-loop clients alternating a/b)", "",
                  "| clients | policy | requests | loads | total s | longest wait s | longest request s |",
                  "|---|---|---|---|---|---|---|"]
        for w in res["swap"].values():
            for p in ("fifo", "affinity"):
                v = w[p]
                lines.append(f"| {w['clients']} | {p} | {v['ok']}/{v['requests']} | {v['loads']} | {f(v['total_s'])} | "
                             f"{f(v['longest_wait_s'], 2)} | {f(v['longest_request_s'], 2)} |")
        lines.append("")
        for w in res["swap"].values():
            lines.append(f"- {w['clients']} clients: affinity/fifo loads **{f(w['loads_ratio'], 2)}** "
                         "(target <= 0.25, longest wait no worse than fifo's)")
        lines += ["", "A closed-loop client that alternates models has at most one request waiting per model, so "
                  "one load can serve at most `clients` requests: loads cannot fall below requests / clients.", ""]
    if "coldstart" in res:
        c = res["coldstart"]
        lines += ["## 6. Cold start (big model)", "",
                  f"Mean of {c['reps']} cold starts, prompt {c['prompt']!r}, one token.", "",
                  f"- llama-server alone, spawn to healthy: {f(1000 * c['llama_server_healthy_s'], 0)} ms; "
                  f"to the first token of the same request sent once healthy: "
                  f"{f(1000 * c['llama_server_first_token_s'], 0)} ms",
                  f"- ollamad, request for an unloaded model to first token: "
                  f"{f(1000 * c['ollamad_first_token_s'], 0)} ms",
                  f"- added over llama-server's time to healthy: **{f(c['added_ms'], 0)} ms** (target <= 100 ms)",
                  f"- added over llama-server's own first token: {f(c['added_vs_first_token_ms'], 0)} ms "
                  "(what ollamad itself costs)", ""]
    lines += render_peers(res)
    gpu = ROOT / "benchmarks-h100.json"  # the peers section run on a lent GPU machine (see its meta)
    if gpu.exists():
        g = json.loads(gpu.read_text())
        lines += render_peers(g["results"], "## 9. The peers of section 7 on an NVIDIA H100 (16 cores)",
                              f"Run on a GPU machine lent for one session ({g['meta']['date']}): "
                              f"`{g['meta']['command']}`, llama-server {g['meta']['llama_server']} built with "
                              "CUDA by `runners/build.sh` there (patches: 0001 only). " + g["meta"].get("note", ""))
    lines += ["## Found and fixed while measuring", "",
              "- **A lost request.** llama-server closes a connection after a streamed reply without a "
              "`Connection: close`; a request sent on it in the moment after a stream ended failed with "
              "\"Can not write request body\" (a 500, and a healthy runner taken as lost): 1 of 48 requests in "
              "the 4-slot run of section 1. The daemon now sends such a request again on a new connection "
              "(`ollamad/runner/upstream.py`); tests reproduce it with the fake and with a real llama-server. "
              "The close itself was a llama-server bug, fixed below (`runners/patches/0002`); the resend stays "
              "for other builds and for idle connections llama-server closes after 5 s.",
              "- **Cold start.** A loading runner's `/health` was polled every 20 ms; the lines llama-server prints "
              "when ready now trigger the check at once.",
              "- **Relay CPU.** Date formatting took 8% of the relay's CPU (py-spy); the timestamp is now made once "
              "per second.",
              "- **Relay per token (issue 15).** py-spy on the instant fake: a socket send per chunk (24% of the "
              "samples), the standard json module (12%) and line-by-line SSE reads (6%). Events are now read as "
              "whole blocks, all that one read brings is written in one write, native chunks are made from byte "
              "prefixes and msgspec-decoded events (typed structs: only the fields used are read), and /v1 streams "
              "are llama-server's bytes with the model field replaced. msgspec over orjson: decoding a chat chunk "
              "0.62 vs 1.09 µs, a /completion event 0.43 vs 0.69 µs; encoding a string alike.",
              "- **stream: false.** This build of llama-server noticed that the client of a one-answer request "
              "went away only 6 to 160 s later (measured; a streamed one within 0.2 s): its handler checked the "
              "client only after a whole second without a result for *any* task, which never comes while another "
              "slot streams. `runners/patches/0001` makes that one deadline; with it, native stream:false requests "
              "ask llama-server for one answer. Fast model, 4 clients x 4 requests x 6 rounds, same tokens: "
              "through ollamad 2037 vs 2096 tok/s direct (0.97); gathered from a stream as before, 2004 vs 2402 "
              "(0.83): llama-server's own per-token events cost it 10% there. Without the patch (another binary) "
              "the daemon still gathers from a stream.",
              "- **Unequal work in the peer rows.** Since issue 14 ollamad sends Ollama's sampling defaults "
              "(repeat penalty 1.1 over 64 tokens, top_k 40, ...) and asks for no prompt cache on a seeded request "
              "(the same seed must give the same answer); the earlier peer rows sent llama-server's defaults "
              "and its cache on the direct and router paths. Given the same settings (named in every request) "
              "and the same cache use, the SmolLM2 rows went from 0.77-0.88 of direct to about 1.0; a model "
              "without a chat template now gets ollamad's prompt-only template on all three paths. What the "
              "seeded guarantee costs is measured beside it (section 7).",
              "- **A shutdown that hangs.** In 4 of 32 runs of section 8's daemon a llama-server did not exit on "
              "SIGTERM and was killed at the 10 s grace, every request for the next model waiting (p99 wait "
              "10.1 s). llama-server ends at once on a second interrupt; the daemon now sends one after 0.5 s "
              "(an idle llama-server exits 3 to 55 ms after the first). The cause inside llama-server is not known.",
              "- **Spawning a runner.** A `preexec_fn` (the parent-death signal) made Python fork its whole heap: "
              "7.8 ms median per spawn in a daemon-sized process; through `setpriv --pdeathsig KILL` 1.5 ms. "
              "Under the hardened systemd unit setpriv cannot apply its capabilities, and the daemon keeps the "
              "slower way there.",
              "- **What a token costs at real pace.** With each token on its own read (a real llama-server) the "
              "daemon spends 70 to 90 µs of CPU per streamed token, against about 21 µs in section 3, where one "
              "read brings many. py-spy, busy samples only: socket sends 34%, the new connection each streamed "
              "request needs (llama-server closes it after every stream) 12%, msgspec and chunk making under 5%; "
              "uvloop measured 78-90 µs against 79-89 µs, no better. On two cores shared by llama-server, "
              "the daemon and the benchmark's clients, that is what is left in the fast model's native "
              "streaming rows. Measured again later with the kernel's per-thread CPU clocks "
              "(/proc/PID/task/*/schedstat; psutil's 10 ms ticks had hidden the difference), the fast model, "
              "4 clients, 48 paired rounds: 39.2 / 47.0 / 46.5 µs per streamed token (v1 chat / chat / "
              "generate) on uvloop against 46.7 / 54.8 / 52.8 on asyncio, and 18.7 to 19.6 µs for the "
              "router's own process. The daemon runs on uvloop since.",
              "- **Starting runners on uvloop.** uvloop's subprocess_exec forks the whole process: 4.5 ms to "
              "start /bin/true from a daemon-sized process, against 0.4 ms with Python's vfork, and 18 ms of "
              "daemon CPU per model switch (load, stop, one request) against 12 on asyncio. Runners are started "
              "with subprocess.Popen and their exit is seen through a pidfd (runner/spawn.py): 9.3 to 9.5 ms.",
              "- **A new connection per stream.** llama-server's stream provider returned false at its end, "
              "which cpp-httplib takes for a cancel: it closed the connection after every streamed reply. "
              "`runners/patches/0002` returns true there; streamed requests then go out on pooled connections. "
              "Daemon CPU per streamed token on the fast model, 4 runs each: chat 103 -> 92 µs, /v1 chat "
              "92 -> 86 µs (medians).",
              "- **Walking process trees.** psutil's `children(recursive=True)` reads every process's stat file; "
              "the memory snapshot and each runner stop walk the tree, which made 11% of the daemon's busy "
              "samples in section 8's workload. `/proc/PID/task/TID/children` gives the same answer in 0.04 ms "
              "instead of 1.8 ms (`ollamad/procs.py`).",
              "- **llama-server's output, a line at a time.** llama-server runs at `--verbosity 4` (the buffer "
              "lines the memory accountant reads are printed only there) and prints about 27 lines per request, "
              "each written to the pipe on its own; each woke the daemon. With one-answer requests to a real "
              "llama-server, py-spy put 17% of the daemon's busy samples there. Once a runner is ready its pipe "
              "is read every 0.25 s (`ollamad/runner/output.py`): daemon CPU per one-answer request 2.60 -> "
              "2.14 ms (A/B in the same rounds, fast model, 4 clients x 24 requests x 4).",
              "- **A task woken per token.** aiohttp's client hands a reply's body over through a StreamReader: "
              "a future set and the relay's task stepped through its async iterators for each piece, and a real "
              "llama-server sends each token on its own read. In a relay of paced events (one per 2 ms, 4 "
              "clients) that took 36-50 µs of user CPU per event against 14-23 µs for a connection protocol "
              "that writes each piece on itself. Streams now go through `ollamad/runner/wire.py` (an HTTP/1.1 "
              "client on httptools' llhttp, kept-alive connections) and are translated and written from its "
              "`data_received` (`ollamad/api/stream.py`; a client slow to read pauses the runner's reply). "
              "A/B against the previous stop's code, same rounds, real llama-server: daemon CPU per streamed "
              "token chat 95.9 -> 69.0 µs, /v1 chat 75.0 -> 50.0 µs, generate 80.0 -> 57.0 µs; per one-answer "
              "request /v1 chat 2.97 -> 1.93 ms, generate 2.19 -> 1.88 ms.",
              "- **The measurements themselves.** The first quick run's \"16 ms added TTFT\" was one token time: "
              "the first *content* came several byte tokens in, differently per run. Its 0.90 throughput ratio at "
              "4 slots was the machine's drift between two runs minutes apart, and its cold start counted the "
              "26-token prompt's evaluation against ollamad. Seeds with a whole first token, interleaved rounds "
              "and a one-token cold start remove those. In section 7, until 2026-11-25, the seeded streamed "
              "chat row measured llama-server with its prompt cache last in the rotation, on the direct path's "
              "own server: direct ran right after its own server in 30 of 36 rounds, with its caches warm (a "
              "server right after itself was 1.1% faster, -1.3 to 3.6%). That row read 3% faster straight to "
              "llama-server than the identical /v1 row, and lowest for both ollamad (0.948) and the router "
              "(0.938). No path now runs right after one on the same llama-server.", "",
              "## Tried and not kept", "",
              "A/B tests beside this benchmark (`geomean (95% interval)`, blocks of fresh processes as in section "
              "7); none moved a figure beyond its noise, so none is in the product.", "",
              "- **Runners reached over a Unix socket.** llama-server listens on loopback TCP and on a socket at "
              "once (`--host 127.0.0.1,PATH.sock`); streams and one-answer requests went over the socket. "
              "Through ollamad, socket / TCP, fast model, 8 blocks x 8 rounds: /v1 chat stream 1.009 (0.986 to "
              "1.032), generate stream 1.000 (0.985 to 1.016). Straight to llama-server the socket read 1.019 over "
              "six blocks on one thread (block means 0.967 to 1.058), 0.992 (0.932 to 1.055) on two threads and "
              "0.996 (0.986 to 1.006) on SmolLM2.",
              "- **Runners at `--poll 0`** (worker threads sleep at once instead of spinning for the next graph). "
              "Section 1's 4-slot workload, 3 blocks x 6 rounds: llama-server itself 1.002 (0.949 to 1.059), "
              "through ollamad 0.999 (0.934 to 1.069). The big model's decode step (about 24 ms) leaves "
              "spinning little to matter.",
              "- **Runners at `--prio -1`** (llama-server at nice 5, so that the daemon's forwarding and "
              "relaying get a core sooner). Section 1's 4-slot workload, 18 rounds: tokens/s 0.998 (0.966 to "
              "1.031) of plain; TTFT added by rank 7.84 ms against 1.56 ms plain.",
              "- **A burst of requests written to llama-server together.** Four requests sent at once reached "
              "llama-server 0.5 to 13.5 ms apart through ollamad (0.1 to 1.2 ms straight to it): the daemon "
              "works through them in turn, and once the first has started llama-server the rest wait for a "
              "core. Deferring each request's write to the end of the loop's ready queue let the others reach "
              "their send first (spread 0.3 to 3.5 ms in 11 of 12 waves). Section 1's 4-slot workload, 8 "
              "paired runs of 18 rounds: TTFT added by rank, before minus after, median 1.46 ms (from -2.62 to "
              "13.49); tokens/s, after / before, 0.992 (0.981 to 1.004).",
              "- **Generate's `/tokenize` (for `context`) sent at the first token** rather than beside the "
              "request, so that it does not compete with the prompt's evaluation. Section 1's 4-slot workload, "
              "two runs of 18 rounds: TTFT added by rank 4.65 -> 1.30 ms and 3.37 -> 4.97 ms; tokens/s, after "
              "/ before, 0.986 (0.947 to 1.026) and 0.961 (0.932 to 0.990).",
              "- **SCHED_BATCH for the daemon** (its wakeups then do not preempt a compute thread). Peers "
              "workload, llama-server on one thread: 1.022 (0.990 to 1.056) over plain; section 1's 4-slot "
              "workload (llama-server on both cores): 0.952 and 0.961 of direct against 0.996 and 1.055 plain.",
              ""]
    return "\n".join(lines)


def kept(out: Path) -> str:
    """Sections of BENCHMARKS.md that other scripts write between markers (scripts/bench_rpc.py)."""
    path = out / "BENCHMARKS.md"
    text = path.read_text() if path.exists() else ""
    blocks = re.findall(r"\n(<!-- (\w+): begin -->.*?<!-- \2: end -->)", text, re.S)
    return "".join(f"\n{block}\n" for block, _ in blocks)


async def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true", help="fewer requests (a smoke run)")
    ap.add_argument("--only", default=",".join(BENCHES))
    ap.add_argument("--out", default=str(ROOT))
    ap.add_argument("--render", action="store_true", help="only rewrite BENCHMARKS.md from benchmarks.json")
    ap.add_argument("--merge", action="store_true",
                    help="keep the other benchmarks' results from benchmarks.json (marked as from that run)")
    args = ap.parse_args()
    out = Path(args.out)
    await asyncio.to_thread(out.mkdir, parents=True, exist_ok=True)
    if args.render:
        saved = json.loads((out / "benchmarks.json").read_text())
        (out / "BENCHMARKS.md").write_text(render(saved["results"], saved["meta"]) + "\n" + kept(out))
        return
    merged: dict[str, Any] | None = None  # the results kept (--merge), read before the run
    if args.merge and (out / "benchmarks.json").exists():
        merged = json.loads((out / "benchmarks.json").read_text())
        if "earlier" in merged["meta"]:  # a merge already: what its own run measured must be measured again
            last = [k for k in merged["results"] if k not in merged["meta"]["earlier"]["kept"]
                    and k not in args.only.split(",")]
            if last:
                raise SystemExit(f"benchmarks.json holds two runs already; --only must include {','.join(last)}")
    s = load_settings()
    binary = find_llama_server(s.llama_server, s.runners_dir)
    mdir = models(args.quick)
    tmp = Path(tempfile.mkdtemp(prefix="ollamad-bench-"))
    t0 = time.monotonic()
    load0 = os.getloadavg()[0]
    results: dict[str, Any] = {}
    for name in args.only.split(","):
        t = time.monotonic()
        print(f"[bench] {name} ...", flush=True)
        results[name] = await BENCHES[name](binary, mdir, tmp, args.quick)
        print(f"[bench] {name} done in {time.monotonic() - t:.0f}s: {json.dumps(results[name])[:300]}", flush=True)
    version = (binary.parent.parent / "VERSION")
    meta = {"date": time.strftime("%Y-%m-%d"), "machine": platform.machine(), "cpus": __import__("os").cpu_count(),
            "llama_server": version.read_text().split("\n")[0] if version.exists() else str(binary),
            "llama_server_patches": sorted(patches(binary)),
            "command": "scripts/bench.py" + (" --quick" if args.quick else ""), "seconds": time.monotonic() - t0,
            "load_average_start_end": [load0, os.getloadavg()[0]]}
    if merged is not None:
        earlier = merged["meta"].get("earlier", merged["meta"])
        meta["earlier"] = {**earlier, "kept": [k for k in merged["results"] if k not in results]}
        meta["command"] += f" --only {args.only} --merge"
        results = {**{k: v for k, v in merged["results"].items() if k not in results}, **results}
    (out / "benchmarks.json").write_text(json.dumps({"meta": meta, "results": results}, indent=2) + "\n")
    (out / "BENCHMARKS.md").write_text(render(results, meta) + "\n" + kept(out))
    shutil.rmtree(tmp, ignore_errors=True)
    print(f"[bench] wrote {out / 'BENCHMARKS.md'} and benchmarks.json in {meta['seconds']:.0f}s")


if __name__ == "__main__":
    asyncio.run(main())
