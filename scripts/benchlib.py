"""Helpers for the benchmarks: start ollamad or a bare llama-server, stream requests, stats."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import psutil

from ollamad.models.plan import http_threads
from ollamad.settings import Settings

ROOT = Path(__file__).resolve().parent.parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def pct(values: list[float], p: float) -> float:
    if not values:
        return float("nan")
    values = sorted(values)
    k = min(len(values) - 1, max(0, round(p / 100 * (len(values) - 1))))
    return values[k]


async def wait_http(url: str, timeout: float = 60) -> float:
    """Poll ``url`` until it answers 200; returns seconds waited."""
    t0 = time.monotonic()
    async with aiohttp.ClientSession() as s:
        while time.monotonic() - t0 < timeout:
            with contextlib.suppress(aiohttp.ClientError, asyncio.TimeoutError):
                async with s.get(url, timeout=aiohttp.ClientTimeout(total=1)) as r:
                    if r.status == 200:
                        return time.monotonic() - t0
            await asyncio.sleep(0.005)
    raise TimeoutError(url)


@dataclass
class Proc:
    proc: subprocess.Popen[bytes]
    url: str
    log: Path

    @property
    def pid(self) -> int:
        return self.proc.pid

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


@contextlib.asynccontextmanager
async def spawned(argv: list[str], port: int, log: Path | None, ready_path: str, **popen: Any) -> AsyncIterator[Proc]:
    """Start ``argv`` (output to ``log``, or nowhere), wait until ``ready_path`` answers 200, stop it on exit."""
    with open(log or os.devnull, "wb") as f:
        p = subprocess.Popen(argv, stdout=f, stderr=subprocess.STDOUT, **popen)
    proc = Proc(p, f"http://127.0.0.1:{port}", log or Path(os.devnull))
    try:
        await wait_http(proc.url + ready_path)
        yield proc
    finally:
        proc.stop()


@contextlib.asynccontextmanager
async def ollamad(binary: Path, models: Path, logdir: Path, src: Path | None = None, **env: str) -> AsyncIterator[Proc]:
    """``ollamad serve`` on a free port; ``src``: a folder holding another version's ``ollamad`` package."""
    port = free_port()
    e = {k: v for k, v in os.environ.items() if not k.startswith(("OLLAMA_", "OLLAMAD_"))}
    e.update({"OLLAMA_HOST": f"127.0.0.1:{port}", "OLLAMA_MODELS": str(models), "OLLAMAD_LLAMA_SERVER": str(binary),
              "OLLAMAD_RUNNER_ENV_PASS": "FAKE_*"})
    e.update(env)
    argv = [sys.executable, "-m", "ollamad.cli", "serve"]
    async with spawned(argv, port, logdir / f"ollamad-{port}.log", "/", env=e, cwd=src or ROOT) as proc:
        if not os.environ.get("BENCH_PYSPY"):
            yield proc
            return
        # profile the daemon: BENCH_PYSPY=out.txt (py-spy's collapsed stacks; py-spy in the venv)
        spy = subprocess.Popen([str(Path(sys.executable).parent / "py-spy"), "record", "-r", "250", "-f", "raw",
                                "-o", os.environ["BENCH_PYSPY"], "--pid", str(proc.pid)])
        try:
            yield proc
        finally:
            spy.send_signal(signal.SIGINT)
            spy.wait(30)


def runner_http_threads(slots: int) -> int:
    """The --threads-http ollamad gives a runner of ``slots`` slots (OLLAMAD_SEND_AHEAD at its
    default), for a llama-server yardstick with more clients than its default pool has threads:
    each connection holds a thread of the pool for its life."""
    return http_threads(slots, Settings.model_fields["send_ahead"].default)


@contextlib.asynccontextmanager
async def bare_server(binary: Path, model: Path, logdir: Path, parallel: int, ctx: int,
                      threads: int = 0, extra: tuple[str, ...] = ()) -> AsyncIterator[Proc]:
    port = free_port()
    argv = [str(binary), "--model", str(model), "--host", "127.0.0.1", "--port", str(port), "--parallel",
            str(parallel), "--ctx-size", str(parallel * ctx), "--no-webui", "--fit", "off", "--flash-attn", "off",
            *extra]
    if threads:
        argv += ["--threads", str(threads)]
    async with spawned(argv, port, logdir / f"llama-server-{port}.log", "/health", start_new_session=True) as proc:
        yield proc


@dataclass
class Result:
    ttft: float  # seconds to the first content chunk
    total: float
    tokens: int
    status: int
    wait: float = 0.0  # ollamad's load_duration (queue wait + load), seconds
    chunks: int = 0
    seed: int | None = 0
    error: str = ""


@dataclass
class Run:
    results: list[Result] = field(default_factory=list)
    wall: float = 0.0

    @property
    def ok(self) -> list[Result]:
        return [r for r in self.results if r.status == 200]

    def tokens_per_s(self) -> float:
        return sum(r.tokens for r in self.ok) / self.wall if self.wall else 0.0

    def ttft_ms(self, p: float) -> float:
        return 1000 * pct([r.ttft for r in self.ok], p)

    def add(self, other: Run) -> None:
        """Count another run's requests and time as part of this one."""
        self.results += other.results
        self.wall += other.wall

    def errors(self) -> list[str]:
        return [f"{r.status}: {r.error}" for r in self.results if r.status != 200]


async def stream_ollama(s: aiohttp.ClientSession, url: str, model: str, prompt: str, n: int, seed: int,
                        **extra: Any) -> Result:
    t0 = time.monotonic()
    ttft = 0.0
    chunks = 0
    body = {"model": model, "prompt": prompt, "options": {"num_predict": n, "seed": seed, **OLLAMA_SAMPLING}, **extra}
    async with s.post(url + "/api/generate", json=body) as r:
        if r.status != 200:
            return Result(0, time.monotonic() - t0, 0, r.status, seed=seed, error=(await r.text())[:300])
        final: dict[str, Any] = {}
        async for line in r.content:
            obj = json.loads(line)
            if obj.get("done"):
                final = obj
            elif "error" in obj:
                return Result(ttft, time.monotonic() - t0, 0, 500, seed=seed, error=str(obj["error"])[:300])
            else:
                chunks += 1
                if not ttft:
                    ttft = time.monotonic() - t0
    return Result(ttft, time.monotonic() - t0, int(final.get("eval_count", 0)), 200,
                  final.get("load_duration", 0) / 1e9, chunks, seed)


async def stream_direct(s: aiohttp.ClientSession, url: str, prompt: str, n: int, seed: int) -> Result:
    """One streamed /completion straight to llama-server.

    llama-server may close a kept-alive connection after a stream; a request that finds its
    pooled connection closed (before any data) is sent again on a new one.
    """
    for _ in range(3):
        try:
            return await _stream_direct(s, url, prompt, n, seed)
        except (aiohttp.ServerDisconnectedError, aiohttp.ClientOSError):
            continue
    return await _stream_direct(s, url, prompt, n, seed)


async def _stream_direct(s: aiohttp.ClientSession, url: str, prompt: str, n: int, seed: int) -> Result:
    t0 = time.monotonic()
    ttft = 0.0
    # what ollamad sends for a seeded request: the same sampling, and no prompt cache
    body = {"prompt": prompt, "n_predict": n, "seed": seed, "stream": True, "cache_prompt": False, **OLLAMA_SAMPLING}
    final: dict[str, Any] = {}
    chunks = 0
    async with s.post(url + "/completion", json=body) as r:
        async for raw in r.content:
            if not raw.startswith(b"data: "):
                continue
            ev = json.loads(raw[6:])
            if ev.get("stop"):
                final = ev
            elif ev.get("content"):
                chunks += 1
                if not ttft:
                    ttft = time.monotonic() - t0
    return Result(ttft, time.monotonic() - t0, int(final.get("timings", {}).get("predicted_n", 0)), r.status,
                  chunks=chunks, seed=seed)


async def text_seeds(url: str, prompt: str, count: int, tries: int = 400) -> list[int]:
    """Seeds whose first sampled token is whole text, asked of a bare llama-server.

    The generated models have random weights and byte tokens: a token may be part of a
    UTF-8 character, which llama-server holds back until the character is whole, so "time to
    first content" can be several tokens late and differ by whole token times between runs.
    With these seeds the first token is streamed at once, on both paths (same sampling).
    """
    out: list[int] = []
    async with aiohttp.ClientSession() as s:
        for seed in range(tries):
            if (await stream_direct(s, url, prompt, 1, seed)).chunks:
                out.append(seed)
                if len(out) == count:
                    return out
    raise RuntimeError(f"only {len(out)} of {tries} seeds give a whole first token for {prompt!r}")


def paired_median_ms(a: list[Result], b: list[Result]) -> float:
    """Median over requests with the same seed of b's TTFT minus a's, in ms."""
    first = {r.seed: r.ttft for r in a}
    diffs = [r.ttft - first[r.seed] for r in b if r.seed in first]
    return 1000 * statistics.median(diffs) if diffs else float("nan")


def rank_paired_median_ms(a: list[Result], b: list[Result], wave: dict[int, Any]) -> float:
    """Median of b's TTFT minus a's, pairing within each wave (``wave``: seed -> the requests sent
    at the same time) the fastest with the fastest, the second with the second, and so on.

    llama-server evaluates the first of several simultaneous requests alone and batches the rest
    after it, so which request of a wave gets its first token early is a race, on either path: paired
    by seed, a request that won on one path and lost on the other counts that race. Paired by rank,
    a constant delay added to every request reads as itself, and so does a wave that fares worse."""
    def by_wave(rs: list[Result]) -> dict[Any, list[float]]:
        out: dict[Any, list[float]] = {}
        for r in rs:
            if r.seed in wave:
                out.setdefault(wave[r.seed], []).append(r.ttft)
        return {k: sorted(v) for k, v in out.items()}
    first, second = by_wave(a), by_wave(b)
    diffs = [y - x for k, ys in second.items() if len(first.get(k, ())) == len(ys)
             for x, y in zip(first[k], ys, strict=True)]
    return 1000 * statistics.median(diffs) if diffs else float("nan")


async def run_clients(clients: int, per_client: int, one: Any) -> Run:
    """``clients`` concurrent loops of ``per_client`` calls of ``one(session, client, i)``."""
    run = Run()
    conn = aiohttp.TCPConnector(limit=0)
    async with aiohttp.ClientSession(connector=conn, timeout=aiohttp.ClientTimeout(total=600)) as s:
        async def loop(c: int) -> None:
            for i in range(per_client):
                run.results.append(await one(s, c, i))

        t0 = time.monotonic()
        await asyncio.gather(*(loop(c) for c in range(clients)))
        run.wall = time.monotonic() - t0
    return run


def cpu_seconds(pid: int) -> float:
    t = psutil.Process(pid).cpu_times()
    return float(t.user + t.system)


def rss(pid: int) -> int:
    return int(psutil.Process(pid).memory_info().rss)


def mean(values: list[float]) -> float:
    return statistics.fmean(values) if values else float("nan")


# --- one request on any route family (the peer comparison and the relay micro-benchmark) ------
ROUTES = ("generate", "chat", "v1chat", "completion")  # /api/generate, /api/chat, /v1/chat/completions, /completion


# Ollama's sampling defaults (what ollamad sends when a request names none), by the names that
# Ollama's options, llama-server's /completion and its /v1/chat/completions share
OLLAMA_SAMPLING: dict[str, Any] = {"temperature": 0.8, "top_k": 40, "top_p": 0.9, "min_p": 0.0, "typical_p": 1.0,
                                   "repeat_last_n": 64, "repeat_penalty": 1.1, "presence_penalty": 0.0,
                                   "frequency_penalty": 0.0}


async def ask(s: aiohttp.ClientSession, url: str, route: str, model: str, prompt: str, n: int, seed: int | None,
              stream: bool, sampling: dict[str, Any] | None = None) -> Result:
    """One request; tokens are the server's own count (eval_count, usage, or timings).

    ``seed`` None: none sent. ``sampling``: the same sampling settings sent on every route.
    A pooled connection that llama-server closed without notice (before any data) is retried.
    """
    for _ in range(3):
        try:
            return await _ask(s, url, route, model, prompt, n, seed, stream, sampling or {})
        except (aiohttp.ServerDisconnectedError, aiohttp.ClientOSError):
            continue
    return await _ask(s, url, route, model, prompt, n, seed, stream, sampling or {})


def _body(route: str, model: str, prompt: str, n: int, seed: int | None, stream: bool,
          sampling: dict[str, Any]) -> tuple[str, dict[str, Any]]:
    messages = [{"role": "user", "content": prompt}]
    settings = {**sampling, **({} if seed is None else {"seed": seed})}
    if route == "generate":  # raw: the same prompt as /completion gets (no template)
        return "/api/generate", {"model": model, "prompt": prompt, "stream": stream, "raw": True,
                                 "options": {"num_predict": n, **settings}}
    if route == "chat":
        return "/api/chat", {"model": model, "messages": messages, "stream": stream,
                             "options": {"num_predict": n, **settings}}
    if route == "v1chat":
        body: dict[str, Any] = {"model": model, "messages": messages, "max_tokens": n, "stream": stream, **settings}
        if stream:
            body["stream_options"] = {"include_usage": True}
        return "/v1/chat/completions", body
    return "/completion", {"model": model, "prompt": prompt, "n_predict": n, "stream": stream,
                           "cache_prompt": True, **settings}


def _tokens(obj: dict[str, Any]) -> int:
    if "eval_count" in obj:
        return int(obj["eval_count"])
    if obj.get("usage"):
        return int(obj["usage"].get("completion_tokens", 0))
    return int((obj.get("timings") or {}).get("predicted_n", 0))


async def _ask(s: aiohttp.ClientSession, url: str, route: str, model: str, prompt: str, n: int, seed: int | None,
               stream: bool, sampling: dict[str, Any]) -> Result:
    path, body = _body(route, model, prompt, n, seed, stream, sampling)
    t0 = time.monotonic()
    async with s.post(url + path, json=body) as r:
        if r.status != 200:
            return Result(0, time.monotonic() - t0, 0, r.status, seed=seed, error=(await r.text())[:300])
        if not stream:
            obj = await r.json(content_type=None)
            t = time.monotonic() - t0
            return Result(t, t, _tokens(obj), 200, obj.get("load_duration", 0) / 1e9, 1, seed)
        ttft, chunks, tokens, wait = 0.0, 0, 0, 0.0
        sse = route in ("v1chat", "completion")
        async for line in r.content:
            if sse:
                if not line.startswith(b"data: ") or line.startswith(b"data: [DONE]"):
                    continue
                line = line[6:]
            elif not line.strip():
                continue
            obj = json.loads(line)
            if "error" in obj:
                return Result(ttft, time.monotonic() - t0, 0, 500, seed=seed, error=str(obj["error"])[:300])
            choices = obj.get("choices") or [{}]
            content = obj.get("response") or obj.get("content") or (obj.get("message") or {}).get("content") \
                or (choices[0].get("delta") or {}).get("content")
            if content:
                chunks += 1
                ttft = ttft or time.monotonic() - t0
            if obj.get("done") or obj.get("usage") or obj.get("stop"):
                tokens = _tokens(obj)
                wait = obj.get("load_duration", 0) / 1e9
    return Result(ttft, time.monotonic() - t0, tokens, 200, wait, chunks, seed)


@contextlib.asynccontextmanager
async def router(binary: Path, models: Path, logdir: Path, parallel: int, ctx: int,
                 models_max: int = 1, threads: int = 0, extra: tuple[str, ...] = ()) -> AsyncIterator[Proc]:
    """llama.cpp's own multi-model proxy (router mode), same binary: each DIR/NAME.gguf is model NAME."""
    port = free_port()
    argv = [str(binary), "--models-dir", str(models), "--models-max", str(models_max), "--host", "127.0.0.1",
            "--port", str(port), "--parallel", str(parallel), "--ctx-size", str(parallel * ctx), "--no-webui",
            "--fit", "off", "--flash-attn", "off", *extra] + (["--threads", str(threads)] if threads else [])
    async with spawned(argv, port, logdir / f"router-{port}.log", "/health", start_new_session=True) as proc:
        yield proc
